"""The raypipe command line: parse, validate, log the resolved config, start Ray, call one function.

Exit codes: 0 success; 2 bad input (config, flag, file, data schema), one line naming it, nothing
written; 1 runtime failure. Logs go to stderr; `raypipe run` prints the run URI as the last stdout line.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import signal
import sys
import threading

import yaml

# Keep every address Ray advertises on loopback for an embedded local Ray; read when ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from raypipe import config as config_mod  # noqa: E402
from raypipe import console  # noqa: E402
from raypipe.config import Config, ConfigError  # noqa: E402

log = logging.getLogger("raypipe")


def _load_config(args: argparse.Namespace, logged: bool = True) -> Config:
    """--config (default: the bundled digits config) with --smoke-test and --set applied; the resolved
    config is logged unless not `logged` (a command that runs nothing)."""
    overrides = dict(config_mod.SMOKE_OVERRIDES) if getattr(args, "smoke_test", False) else {}
    overrides.update(config_mod.parse_override(item) for item in args.set or [])
    cfg = config_mod.load(args.config, overrides)
    if getattr(args, "smoke_test", False):
        cfg = config_mod.short_finetunes(cfg)
    if logged:
        _log_config(cfg, args.config or str(config_mod.DEFAULT_CONFIG), lambda: config_mod.load(args.config))
    return cfg


def _log_config(cfg: Config, source: str, without_overrides) -> None:
    """The resolved-config line; on a terminal, the keys that differ from `without_overrides()`."""
    try:
        base = without_overrides().public_dict() if console.compact() else None
    except ConfigError:  # valid only with the overrides: log the whole resolved config instead
        base = None
    log.info("config %s", console.config_line(cfg.public_dict(), source, base))


def _init_ray(address: str | None, cfg: Config | None = None, trains: bool = False,
              log_to_driver: bool = True, check_storage: bool = True) -> None:
    """Connect to a cluster, or start an embedded local Ray. A command that `trains` is refused (exit 2)
    when its minimum worker group can never fit the embedded Ray, where it would otherwise wait forever;
    a cluster may still grow, so there it waits. Ray's workers are quieted the same way in both cases."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("ray: connecting to %s", address)
        # A GCS address on loopback is a head on this machine (as under `ray job submit` to a local head); a
        # Ray Client address (ray://) may be a tunnel to anywhere.
        one_machine = address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost")
        ray.init(address=address, log_to_driver=log_to_driver, configure_logging=False,
                 runtime_env=console.ray_runtime_env(one_machine=one_machine))
        if cfg is not None and check_storage:
            _check_storage_reaches_every_node(cfg)
    else:
        if trains:
            _check_fits_locally(cfg)
        _ensure_auth_token()
        # Ray Train's controller polls workers every 2 s by default, which each per-epoch report waits on.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        for key, value in console.embedded_ray_env().items():
            os.environ.setdefault(key, value)
        # With the dashboard: Ray Train's placement-group cleaner asks the State API (served by the
        # dashboard) every second whether the controller lives, and warns each time it cannot.
        # address="local": a new Ray of our own, even where a `ray start` head runs (or left its address
        # file behind), which a bare ray.init() would join instead.
        context = ray.init(address="local", num_cpus=cfg.ray.num_cpus if cfg else None, _node_ip_address="127.0.0.1",
                           include_dashboard=True, dashboard_host="127.0.0.1", configure_logging=False,
                           log_to_driver=log_to_driver, runtime_env=console.ray_runtime_env())
        log.info("ray: embedded local Ray on 127.0.0.1, dashboard http://%s", context.dashboard_url)
    console.configure_ray_data()


def _ensure_auth_token() -> None:
    """With token auth on and no token anywhere, write one readable by this user alone. (Ray would write
    ~/.ray/auth_token itself, but with the process umask: usually world-readable, and anyone who reads it
    can submit jobs to every cluster that trusts it.)"""
    from pathlib import Path

    if os.environ.get("RAY_AUTH_MODE") != "token" or os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.exists():
        return
    import secrets

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # as Ray's own generator: 256 bits
    try:  # whole or absent, and never over another start's token: the first one written stays
        os.link(tmp, path)
    except FileExistsError:
        return
    finally:
        tmp.unlink()
    log.info("ray: token auth on; wrote a new token to %s (mode 0600)", path)


def _usable_cpus() -> int:
    """The CPUs the embedded Ray will count: this process's affinity and cgroup quota, as Ray reads them."""
    from ray._private.utils import get_num_cpus  # pinned: ray==2.60.0

    return get_num_cpus()


def _check_storage_reaches_every_node(cfg: Config) -> None:
    """On a multi-node cluster, Ray Data and Ray Train tasks on other nodes would write a local root to
    their own disks: refused (as Ray Train refuses a local storage path there) unless it is shared."""
    import ray

    nodes = sum(node["Alive"] for node in ray.nodes())
    if nodes > 1 and not cfg.storage.root.startswith("s3://") and not cfg.storage.shared:
        ray.shutdown()
        raise ConfigError(f"storage.root: {cfg.storage.root} is a local path and the cluster has {nodes} nodes; "
                          "use s3://..., or set storage.shared=true if it is a filesystem every node mounts")


def _check_fits_locally(cfg: Config) -> None:
    tcfg, cpus = cfg.train, cfg.ray.num_cpus or _usable_cpus()
    low = tcfg.worker_range()[0]
    if low * tcfg.cpus_per_worker > cpus:
        raise ConfigError(
            f"train.cpus_per_worker: {low} worker(s) x {tcfg.cpus_per_worker} CPUs do not fit the embedded Ray's "
            f"{cpus} CPUs; lower train.workers or train.cpus_per_worker, set ray.num_cpus, or pass --address")
    if tcfg.resources_per_worker:
        # A resource no local node has would leave the run waiting forever for a node that never comes.
        raise ConfigError(f"train.resources_per_worker: {sorted(tcfg.resources_per_worker)} exist only on a "
                          f"cluster whose nodes declare them; pass --address (or set RAY_ADDRESS)")
    if tcfg.device == "cuda":
        import torch

        if torch.cuda.device_count() < low:
            raise ConfigError(f"train.device: cuda needs {low} GPU(s), one per worker; this machine has "
                              f"{torch.cuda.device_count()}")


def _print_last(uri: str) -> None:
    """Print the URI as the last line of stdout: Ray is shut down first, so none of its log lines
    (which reach the driver asynchronously) can follow it."""
    import ray

    ray.shutdown()
    sys.stderr.flush()
    print(uri, flush=True)


# ---- commands --------------------------------------------------------------------------------------

def cmd_validate(args: argparse.Namespace) -> int:
    """Check a config file (and --set overrides) without running anything; with no file, the bundled
    default."""
    args.config = args.file
    _load_config(args, logged=False)
    print(f"{args.file or config_mod.DEFAULT_CONFIG}: valid")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run the whole pipeline: data -> train -> compress -> report; prints the run URI last."""
    cfg = _load_config(args)
    from raypipe import data, pipeline

    source = data.inspect_source(cfg.data, cfg.storage.s3)
    data.check_settings_fit(cfg, source["image_shape"], cfg.data.source)
    _init_ray(args.address, cfg, trains=True)
    paths = pipeline.run(cfg, source)
    _summarize(args, paths)
    _print_last(paths.uri)
    return 0


def _summarize(args: argparse.Namespace, paths) -> None:
    """The run's summary on stderr (stdout stays the URI alone); JSON logs stay JSON."""
    if args.log_format == "text":
        from raypipe import report

        try:
            print(f"\n{report.summary(paths.read_json('report.json'))}\n", file=sys.stderr, flush=True)
        except Exception as err:  # the run is sealed: a summary that cannot be shown must not fail it
            log.warning("summary not shown: %s (raypipe show %s tries again)", err, paths.uri)


def _run_config(args: argparse.Namespace):
    """An existing run (a URI, or an id under storage.root of --config) and its config.yaml with --set
    overrides applied (S3 settings: --config or AWS_*)."""
    from raypipe import runs
    from raypipe.storage import RunPaths

    storage = config_mod.load(args.config).storage
    paths = RunPaths.open(runs.locate(args.run, storage), storage.s3)
    if not paths.exists("config.yaml"):
        raise ConfigError(f"{args.run}: no config.yaml (not a raypipe run)")
    overrides = dict(config_mod.parse_override(item) for item in args.set or [])
    tree = config_mod.upgrade(yaml.safe_load(paths.read_bytes("config.yaml")))
    tree["storage"] = {"root": paths.root, "s3": storage.s3.model_dump()}
    stored = copy.deepcopy(tree)  # validate() applies the overrides to the tree it is given
    cfg = config_mod.validate(tree, overrides)
    _log_config(cfg, f"{paths.uri}/config.yaml", lambda: config_mod.validate(stored))
    return cfg, paths


def cmd_data(args: argparse.Namespace) -> int:
    """Run the data stage only: a new run holding clean, split, sharded data; prints its URI."""
    cfg = _load_config(args)
    from raypipe import data, pipeline

    source = data.inspect_source(cfg.data, cfg.storage.s3)
    data.check_settings_fit(cfg, source["image_shape"], cfg.data.source)
    _init_ray(args.address, cfg)
    paths = pipeline.start(cfg)
    pipeline.data_stage(cfg, paths, source)
    _print_last(paths.uri)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train on a run made by `raypipe data` (or continue one with --resume); prints its URI."""
    cfg, paths = _run_config(args)
    if not paths.exists("data/stats.json"):
        raise ConfigError(f"{args.run}: no data/stats.json; run `raypipe data` first")
    if paths.exists("checkpoints") and not args.resume:
        raise ConfigError(f"{args.run}: already has checkpoints; pass --resume to continue from the latest")
    if paths.exists("MANIFEST.json"):
        raise ConfigError(f"{args.run}: is sealed (has MANIFEST.json); start a new run to train again")
    from raypipe import data

    from raypipe.records import DataStats

    stats = DataStats.read(paths, data.STATS)
    data.check_settings_fit(cfg, stats.image_shape, args.run)
    _init_ray(args.address, cfg, trains=True)
    from raypipe import pipeline

    pipeline.train_stage(cfg, paths, stats)
    _print_last(paths.uri)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    """Compress, evaluate, report and seal a trained run; on a sealed one, --set compress.recipes={...}
    adds or replaces just those variants. Prints its URI."""
    cfg, paths = _run_config(args)
    if not paths.exists("train.json"):
        raise ConfigError(f"{args.run}: no train.json; run `raypipe train {args.run}` first")
    from raypipe import data, pipeline
    from raypipe.records import DataStats, TrainSummary

    names = config_mod.recipes_named(dict(config_mod.parse_override(item) for item in args.set or []))
    if names is not None and paths.exists("report.json"):  # compressed before: add to its recipes
        stored = config_mod.upgrade(yaml.safe_load(paths.read_bytes("config.yaml")))["compress"]["recipes"]
        merged = cfg.model_dump()  # validated again whole: the new names must be distinct from the stored ones
        merged["compress"]["recipes"] = {**config_mod.validate({"compress": {"recipes": stored}}).compress.recipes,
                                         **cfg.compress.recipes}
        cfg = config_mod.validate(merged)
    else:
        names = None
    stats, trained = DataStats.read(paths, data.STATS), TrainSummary.read(paths, pipeline.TRAIN_SUMMARY)
    finetunes = any(step.op == "finetune" for name, steps in cfg.compress.recipes.items()
                    if names is None or name in names for step in steps)
    _init_ray(args.address, cfg, trains=finetunes)
    pipeline.finish(cfg, paths, stats, trained, names)
    _summarize(args, paths)
    _print_last(paths.uri)
    return 0


def cmd_datagen(args: argparse.Namespace) -> int:
    """Write a synthetic image data set (class-dependent patterns) to a folder or s3:// URI."""
    try:
        shape = tuple(int(v) for v in args.shape.split(","))
        assert len(shape) == 3 and min(shape) > 0
    except (ValueError, AssertionError):
        raise ConfigError(f"--shape {args.shape!r}: expected H,W,C such as 32,32,3") from None
    if args.rows < 1 or args.classes < 2:
        raise ConfigError("--rows must be >= 1 and --classes >= 2")
    if not 0 <= args.difficulty <= 1:
        raise ConfigError(f"--difficulty {args.difficulty}: must be between 0 and 1")
    _init_ray(args.address)
    from raypipe import datagen

    datagen.generate(args.out, args.rows, shape, args.classes, args.format, args.seed, args.rows_per_file,
                     difficulty=args.difficulty)
    _print_last(args.out)
    return 0


def _s3_to_env(s3: config_mod.S3Config) -> None:
    """Put S3 settings from --config into the environment, where s3fs finds them in this process and in
    the Ray workers it starts (they inherit it): never into arguments that Ray shows in deployed configs."""
    values = {
        "AWS_ENDPOINT_URL": s3.endpoint_url,
        "AWS_DEFAULT_REGION": s3.region,
        "AWS_ACCESS_KEY_ID": s3.access_key_id and s3.access_key_id.get_secret_value(),
        "AWS_SECRET_ACCESS_KEY": s3.secret_access_key and s3.secret_access_key.get_secret_value(),
    }
    os.environ.update({key: value for key, value in values.items() if value})


def _variants(text: str | None) -> list[str] | None:
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve sealed runs or bundles on Ray Serve until Ctrl-C: the V2 REST API on autoscaling replicas."""
    if args.access_log:
        args.set = [*(args.set or []), "serve.access_log=true"]
        os.environ["RAY_SERVE_LOG_TO_STDERR"] = "1"  # replicas write their access lines to the terminal too
    cfg = _load_config(args)
    _s3_to_env(cfg.storage.s3)
    from raypipe import runs
    from raypipe.serving import server
    from raypipe.serving.app import deployment, proxy_env
    from raypipe.serving.catalog import open_sources

    catalog = open_sources([runs.locate(source, cfg.storage) for source in args.sources], _variants(args.variants))
    app = deployment(catalog, cfg.serve)
    embedded = not (args.address or os.environ.get("RAY_ADDRESS"))
    private = None
    if embedded:
        from raypipe.serving import loopback

        server.check_fits_locally(cfg.serve, cfg.ray.num_cpus or _usable_cpus())
        os.environ.update(proxy_env(cfg.serve.proxy))
        os.environ[loopback.LOOPBACK_ENV] = "1"  # one machine: replicas' own servers listen on loopback
        if cfg.serve.proxy == "haproxy":
            env, private = loopback.prepare()
            os.environ.update(env)
    else:
        log.info("serve.proxy is the cluster's: it is set by the head's environment (see cluster/README.md)")
    stop = threading.Event()

    def on_signal(*_):
        if stop.is_set():
            log.info("serve: already stopping; waiting for requests in flight")
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):  # before Ray starts: Ctrl-C works from the first moment
        signal.signal(sig, on_signal)
    try:
        # Serve's own logs stay in its files (raypipe reports ready, scaling and failures itself), unless
        # the user asked for the access log or everything.
        _init_ray(args.address, cfg, check_storage=False, log_to_driver=cfg.serve.access_log or console.VERBOSE)
        if not stop.is_set():
            server.run(app, catalog, cfg.serve, args.host, args.port, embedded, stop)
    finally:
        import ray

        ray.shutdown()
        if private is not None:
            import shutil

            shutil.rmtree(private, ignore_errors=True)
        # Done: a signal that lands while the interpreter exits must not turn a clean stop into a kill.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    return 0


def cmd_edge(args: argparse.Namespace) -> int:
    """Serve a run or bundle without Ray: the same V2 REST API on uvicorn and ONNX Runtime."""
    storage = config_mod.load(args.config).storage
    _s3_to_env(storage.s3)
    from pathlib import Path

    from raypipe import runs
    from raypipe.serving import bundle, catalog, edge

    source, digest = runs.locate(args.source, storage), args.digest and catalog.pinned(args.digest, "--digest")
    # A pinned bundle may be served from the cache alone: the source is not reached before the cache is.
    if digest or catalog.is_bundle(source):
        cache = Path(args.cache).expanduser() if args.cache else bundle.DEFAULT_CACHE
        pulled = bundle.pull(source, cache, digest)
        source, digest = str(pulled.path), pulled.digest
        if pulled.fetched:
            log.info("bundle %s: every file verified against its bundle.json (%s), cached at %s",
                     args.source, digest, source)
        elif not pulled.source_read:
            log.info("bundle %s: verified copy cached at %s; %s not read", digest, source, args.source)
        elif pulled.damaged:
            log.warning("bundle %s is damaged (%s); serving the verified copy of %s cached at %s",
                        args.source, "; ".join(pulled.damaged), digest, source)
        else:
            log.info("bundle %s (%s): verified copy cached at %s", args.source, digest, source)
    served = catalog.open_sources([source], _variants(args.variants), digest and {source: digest})
    log.info("edge: serving %s on http://%s:%d/v2 with %d worker(s); Ctrl-C to stop",
             ", ".join(f"{m}:{','.join(s.versions)}" for m, s in served.models.items()), args.host, args.port,
             args.workers)
    edge.serve(served, args.host, args.port, args.workers)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a bundle (also a Triton model repository) of runs' promoted or chosen variants; prints its
    digest, then its URI last."""
    storage = config_mod.load(args.config).storage
    _s3_to_env(storage.s3)
    from raypipe import runs
    from raypipe.serving import bundle

    digest = bundle.export([runs.locate(run, storage) for run in args.runs], args.to, _variants(args.variants))
    log.info("bundle %s written, digest %s", args.to, digest)
    print(digest)
    print(args.to.rstrip("/"), flush=True)
    return 0


def _emit(text: str) -> None:
    """A listing on stdout; a reader that stops early (`raypipe runs | head`) has what it wanted."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def cmd_runs(args: argparse.Namespace) -> int:
    """List the runs under a storage root (local or s3://), newest first."""
    from raypipe import runs

    cfg = config_mod.load(args.config, {"storage.root": args.root} if args.root else None)  # the root checked
    found = runs.list_runs(cfg.storage.root, cfg.storage.s3)
    _emit(runs.to_json(found) if args.json else runs.table(found) if found else f"no runs under {cfg.storage.root}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Print a run's summary: data, training, the variants, the promoted one, and how to serve it."""
    from raypipe import report, runs
    from raypipe.storage import MANIFEST, RunPaths

    storage = config_mod.load(args.config).storage
    paths = RunPaths.open(runs.locate(args.run, storage), storage.s3)
    if not paths.exists("report.json"):
        raise ConfigError(f"{args.run}: no report.json (the run is incomplete: `raypipe runs` shows how far it got)")
    try:
        summary = report.summary(paths.read_json("report.json"))
    except (KeyError, IndexError, TypeError, ValueError, StopIteration) as err:
        raise ConfigError(f"{paths.uri}/report.json: not a raypipe report ({type(err).__name__}: {err})") from None
    _emit(summary)
    if not paths.exists(MANIFEST):
        print("warning: not sealed (no MANIFEST.json): its files are not vouched for", file=sys.stderr)
    return 0


# ---- parsing ---------------------------------------------------------------------------------------

def _common(parser: argparse.ArgumentParser, config: bool = True,
            config_help: str = "pipeline config (default: the bundled configs/default.yaml; `raypipe validate` "
                               "prints where it is)",
            example: str = "train.epochs=5") -> None:
    """The flags every Ray command takes; `example` is a --set that matters to this command."""
    if config:
        parser.add_argument("--config", metavar="FILE", help=config_help)
        parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                            help=f"override a config key, value parsed as YAML (repeatable), e.g. {example}")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    _output(parser)


def _output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="text (short lines on a terminal, timestamped otherwise) or json")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show Ray's own informational logs (otherwise in its session log files)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raypipe",
        description="From raw data to load-balanced REST endpoints on a Ray cluster.",
        epilog="Run with no arguments to run the whole pipeline on the bundled digits data set.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help=cmd_run.__doc__, description=cmd_run.__doc__)
    _common(run)
    run.add_argument("--smoke-test", action="store_true", help="a few hundred rows and a few epochs (about a minute)")
    run.set_defaults(func=cmd_run)

    data = commands.add_parser("data", help=cmd_data.__doc__, description=cmd_data.__doc__)
    _common(data)
    data.add_argument("--smoke-test", action="store_true", help="a few hundred rows")
    data.set_defaults(func=cmd_data)

    stages = {}
    for name, func in (("train", cmd_train), ("compress", cmd_compress)):
        stage = stages[name] = commands.add_parser(name, help=func.__doc__, description=func.__doc__)
        stage.add_argument("run", help="run URI printed by an earlier stage (local path or s3://), or a run id "
                                       "under storage.root")
        _common(stage, config_help="config whose storage.root holds a run given by id and whose storage.s3 "
                                   "reaches it (the run's own config.yaml is used, with --set overrides)")
        stage.set_defaults(func=func)
    stages["train"].add_argument("--resume", action="store_true",
                       help="continue from the run's latest checkpoint (epoch, optimizer, grad scaler, RNG)")

    datagen = commands.add_parser("datagen", help=cmd_datagen.__doc__, description=cmd_datagen.__doc__)
    datagen.add_argument("out", help="output folder or s3:// URI (S3 settings from the AWS_* variables)")
    datagen.add_argument("--rows", type=int, default=100_000, help="images to write (default: 100000)")
    datagen.add_argument("--shape", default="32,32,3", help="H,W,C of each image (default: 32,32,3)")
    datagen.add_argument("--classes", type=int, default=10, help="number of classes (default: 10)")
    datagen.add_argument("--format", choices=("parquet", "images"), default="parquet",
                         help="parquet (image + label columns) or PNG files in one folder per class")
    datagen.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    datagen.add_argument("--difficulty", type=float, default=0.0,
                         help="0 to 1: how much the classes overlap (patterns wander towards each other, more "
                              "pixel noise, up to 5%% of labels random); default 0, easy")
    datagen.add_argument("--rows-per-file", type=int, default=10_000, help="rows per parquet file")
    _common(datagen, config=False)
    datagen.set_defaults(func=cmd_datagen)

    validate = commands.add_parser("validate", help=cmd_validate.__doc__, description=cmd_validate.__doc__)
    validate.add_argument("file", nargs="?", help="config file to check (default: the bundled default, whose path "
                                                  "it prints)")
    validate.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    _output(validate)
    validate.set_defaults(func=cmd_validate, smoke_test=False)

    serve = commands.add_parser("serve", help=cmd_serve.__doc__, description=cmd_serve.__doc__)
    serve.add_argument("sources", nargs="+", metavar="RUN_OR_BUNDLE",
                       help="sealed runs or bundles (local paths or s3://); each model under its config name")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP host (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    serve.add_argument("--variants", metavar="V1,V2", help="serve only these variants (default: every accepted one)")
    serve.add_argument("--access-log", action="store_true",
                       help="log every request, with Serve's own logs (off by default: it costs throughput)")
    _common(serve, config_help="config whose serve.* keys set replicas, batching and the proxy, and whose "
                               "storage.s3 reaches the sources (default: the bundled configs/default.yaml)",
            example="serve.max_replicas=4")
    serve.set_defaults(func=cmd_serve)

    edge = commands.add_parser("edge", help=cmd_edge.__doc__, description=cmd_edge.__doc__)
    edge.add_argument("source", metavar="RUN_OR_BUNDLE", help="a sealed run or a bundle (local path or s3://)")
    edge.add_argument("--host", default="127.0.0.1", help="HTTP host (default: 127.0.0.1)")
    edge.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    # The CPUs this process may use where the OS says (Linux); elsewhere (macOS) the machine's count.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    edge.add_argument("--workers", type=int, default=cpus,
                      help="uvicorn worker processes (default: one per CPU this process may use)")
    edge.add_argument("--variants", metavar="V1,V2", help="serve only these variants (default: all in the source)")
    edge.add_argument("--digest", metavar="sha256:HEX", help="refuse a bundle whose digest differs (pinning)")
    edge.add_argument("--cache", metavar="DIR",
                      help="where pulled bundles are kept, by digest (default: $RAYPIPE_CACHE/bundles or "
                           "~/.cache/raypipe/bundles)")
    edge.add_argument("--config", metavar="FILE", help="config whose storage.s3 settings reach the source")
    _output(edge)
    edge.set_defaults(func=cmd_edge)

    listing = commands.add_parser("runs", help=cmd_runs.__doc__, description=cmd_runs.__doc__)
    listing.add_argument("root", nargs="?", help="a storage root (default: storage.root of --config, ./runs)")
    listing.add_argument("--json", action="store_true", help="one JSON list, for scripts")
    listing.add_argument("--config", metavar="FILE", help="config whose storage.root and storage.s3 to use")
    _output(listing)
    listing.set_defaults(func=cmd_runs)

    show = commands.add_parser("show", help=cmd_show.__doc__, description=cmd_show.__doc__)
    show.add_argument("run", help="a run's URI (local path or s3://), or its id under storage.root (as `raypipe "
                                  "runs` lists it)")
    show.add_argument("--config", metavar="FILE",
                      help="config whose storage.root holds a run given by id, and whose storage.s3 reaches it")
    _output(show)
    show.set_defaults(func=cmd_show)

    export = commands.add_parser("export", help=cmd_export.__doc__, description=cmd_export.__doc__)
    export.add_argument("runs", nargs="+", metavar="RUN", help="sealed runs (local paths or s3://)")
    export.add_argument("--to", required=True, metavar="URI", help="a new folder or s3:// prefix for the bundle")
    export.add_argument("--variants", metavar="V1,V2", help="variants to include (default: each run's promoted)")
    export.add_argument("--config", metavar="FILE", help="config whose storage.s3 settings reach runs and --to")
    _output(export)
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv or ["run"])
    if args.command is None:
        args = parser.parse_args(["run", *argv])
    console.setup(args.log_format, args.verbose)
    console.quiet_ray()
    if not (getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")):
        # An embedded Ray gets token auth, as Ray sets up a new local cluster; said explicitly, and before
        # Ray is imported (it reads the mode then), so Ray prints no notice about it.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        return args.func(args)
    except ConfigError as err:  # always one line, whatever the message quotes
        print(f"raypipe: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a runtime failure: say what, keep the traceback in the log
        log.exception("failed: %s", err)
        print(f"raypipe: error: {err}", file=sys.stderr)
        return 1

