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


def _load_config(args: argparse.Namespace) -> Config:
    overrides = dict(config_mod.SMOKE_OVERRIDES) if getattr(args, "smoke_test", False) else {}
    overrides.update(config_mod.parse_override(item) for item in args.set or [])
    cfg = config_mod.load(args.config, overrides)
    if getattr(args, "smoke_test", False):
        cfg = config_mod.short_finetunes(cfg)
    _log_config(cfg, args.config or "configs/default.yaml", lambda: config_mod.load(args.config))
    return cfg


def _log_config(cfg: Config, source: str, without_overrides) -> None:
    """The resolved-config line; on a terminal, the keys that differ from `without_overrides()`."""
    try:
        base = without_overrides().public_dict() if console.compact() else None
    except ConfigError:  # valid only with the overrides: log the whole resolved config instead
        base = None
    log.info("config %s", console.config_line(cfg.public_dict(), source, base))


def _init_ray(address: str | None, cfg: Config | None = None, trains: bool = False) -> None:
    """Connect to a cluster, or start an embedded local Ray. A command that `trains` is refused (exit 2)
    when its minimum worker group can never fit the embedded Ray, where it would otherwise wait forever;
    a cluster may still grow, so there it waits."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("ray: connecting to %s", address)
        ray.init(address=address, log_to_driver=True)
        if cfg is not None:
            _check_storage_reaches_every_node(cfg)
    else:
        if trains:
            _check_fits_locally(cfg)
        # Ray Train's controller polls workers every 2 s by default, which each per-epoch report waits on.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        for key, value in console.embedded_ray_env().items():
            os.environ.setdefault(key, value)
        # With the dashboard: Ray Train's placement-group cleaner asks the State API (served by the
        # dashboard) every second whether the controller lives, and warns each time it cannot.
        context = ray.init(num_cpus=cfg.ray.num_cpus if cfg else None, _node_ip_address="127.0.0.1",
                           include_dashboard=True, dashboard_host="127.0.0.1", configure_logging=False,
                           runtime_env=console.ray_runtime_env())
        log.info("ray: embedded local Ray on 127.0.0.1, dashboard http://%s", context.dashboard_url)
    console.configure_ray_data()


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
    """Check a config file (and --set overrides) without running anything."""
    args.config = args.file
    _load_config(args)
    print(f"{args.file}: valid")
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
    """An existing run and its config.yaml with --set overrides applied (S3 settings: --config or AWS_*)."""
    from raypipe.storage import RunPaths

    s3 = config_mod.load(args.config).storage.s3 if args.config else config_mod.S3Config()
    paths = RunPaths.open(args.run, s3)
    if not paths.exists("config.yaml"):
        raise ConfigError(f"{args.run}: no config.yaml (not a raypipe run)")
    overrides = dict(config_mod.parse_override(item) for item in args.set or [])
    tree = config_mod.upgrade(yaml.safe_load(paths.read_bytes("config.yaml")))
    tree["storage"] = {"root": paths.root, "s3": s3.model_dump()}
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
        recipes = {**config_mod.validate({"compress": {"recipes": stored}}).compress.recipes, **cfg.compress.recipes}
        cfg = cfg.model_copy(update={"compress": cfg.compress.model_copy(update={"recipes": recipes})})
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
    from raypipe.serving.app import deployment, proxy_env
    from raypipe.serving.catalog import open_sources

    catalog = open_sources(args.sources, _variants(args.variants))
    app = deployment(catalog, cfg.serve)
    if args.address or os.environ.get("RAY_ADDRESS"):
        log.info("serve.proxy is the cluster's: it is set by the head's environment (see cluster/README.md)")
    else:
        os.environ.update(proxy_env(cfg.serve.proxy))
    _init_ray(args.address)
    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": args.host, "port": args.port})
    watch = threading.Thread(target=_ScalingWatch().run, args=(stop,), daemon=True)
    try:
        serve.run(app, name="raypipe", route_prefix="/")
        url = f"http://{args.host}:{args.port}"
        models = "; ".join(f"{name} ({', '.join(spec.versions)})" for name, spec in catalog.models.items())
        log.info("serve: ready on %s/v2: %s; docs %s/docs; Ctrl-C to stop", url, models, url)
        # Watched from a thread: a Serve controller slow to answer never delays Ctrl-C.
        watch.start()
        stop.wait()
    finally:
        stop.set()
        if watch.is_alive():  # a status call in flight would reconnect Serve (and start a Ray) after shutdown
            watch.join(timeout=5)
        log.info("serve: draining in-flight requests and shutting down")
        serve.shutdown()
        import ray

        ray.shutdown()
    return 0


class _ScalingWatch:
    """One line per change in the number of running replicas or in the deployment's status."""

    def __init__(self):
        self.replicas, self.status = None, None

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(1.0):
            self.check()

    def check(self) -> None:
        from ray import serve

        try:
            deployment = serve.status().applications["raypipe"].deployments["raypipe"]
        except Exception:  # the controller is busy or restarting: look again next second
            return
        running = deployment.replica_states.get("RUNNING", 0)
        if self.replicas is not None and running != self.replicas:
            log.info("serve: %d -> %d replicas", self.replicas, running)
        status = getattr(deployment.status, "value", deployment.status)
        if status != self.status and status in ("UNHEALTHY", "DEPLOY_FAILED"):
            log.warning("serve: %s: %s", status, deployment.message)
        self.replicas, self.status = running, status


def cmd_edge(args: argparse.Namespace) -> int:
    """Serve a run or bundle without Ray: the same V2 REST API on uvicorn and ONNX Runtime."""
    if args.config:
        _s3_to_env(config_mod.load(args.config).storage.s3)
    from pathlib import Path

    from raypipe.serving import bundle, catalog, edge

    source = args.source
    if catalog.is_bundle(source):
        cache = Path(args.cache).expanduser() if args.cache else bundle.DEFAULT_CACHE
        source = str(bundle.pull(source, cache, args.digest))
        log.info("bundle %s verified, cached at %s", args.source, source)
    elif args.digest:
        raise ConfigError(f"--digest: {args.source} is a run, not a bundle")
    served = catalog.open_sources([source], _variants(args.variants))
    log.info("edge: serving %s on http://%s:%d/v2 with %d worker(s); Ctrl-C to stop",
             ", ".join(f"{m}:{','.join(s.versions)}" for m, s in served.models.items()), args.host, args.port,
             args.workers)
    edge.serve(source, args.host, args.port, args.workers, _variants(args.variants))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a bundle (also a Triton model repository) of runs' promoted or chosen variants; prints its
    digest, then its URI last."""
    if args.config:
        _s3_to_env(config_mod.load(args.config).storage.s3)
    from raypipe.serving import bundle

    digest = bundle.export(args.runs, args.to, _variants(args.variants))
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
    from raypipe import report
    from raypipe.storage import MANIFEST, RunPaths

    paths = RunPaths.open(args.run, config_mod.load(args.config).storage.s3 if args.config else None)
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
            config_help: str = "pipeline config (default: configs/default.yaml)") -> None:
    if config:
        parser.add_argument("--config", metavar="FILE", help=config_help)
        parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                            help="override a config key, value parsed as YAML (repeatable), e.g. train.epochs=5")
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
        stage.add_argument("run", help="run URI printed by an earlier stage (local path or s3://)")
        _common(stage, config_help="config whose storage.s3 settings reach the run (the run's own "
                                   "config.yaml is used, with --set overrides)")
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
    validate.add_argument("file", help="config file to check")
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
                               "storage.s3 reaches the sources (default: configs/default.yaml)")
    serve.set_defaults(func=cmd_serve)

    edge = commands.add_parser("edge", help=cmd_edge.__doc__, description=cmd_edge.__doc__)
    edge.add_argument("source", metavar="RUN_OR_BUNDLE", help="a sealed run or a bundle (local path or s3://)")
    edge.add_argument("--host", default="127.0.0.1", help="HTTP host (default: 127.0.0.1)")
    edge.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    edge.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
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
    show.add_argument("run", help="a run's URI (local path or s3://)")
    show.add_argument("--config", metavar="FILE", help="config whose storage.s3 settings reach the run")
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

