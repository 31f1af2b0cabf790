"""What a person sees: one line per stage with its time, progress bars on a terminal (plain timestamped lines
elsewhere), and Ray's internal chatter kept in log files under Ray's session folder instead of the terminal.

Quiet is the default; `-v/--verbose` leaves Ray's logging as Ray configures it. Ray's own warnings and
errors still reach the terminal either way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger("raypipe")
VERBOSE = False  # set by the CLI (-v)
FORMAT = "text"  # set by the CLI (--log-format)

# Ray Data's default logging config, with its console handler raised to WARNING: the execution plans and
# per-dataset start/finish lines stay in <session>/logs/ray-data/ray-data.log.
RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")


def columns(rows: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> list[str]:
    """Rows of text cells as aligned lines, two spaces apart; the columns in `right` flush right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]


def counts(by_key: dict[str, int], zeros: bool = False) -> str:
    """`duplicate 3, outlier 1`: counts by key as a person reads them; zeros left out unless `zeros`."""
    return ", ".join(f"{key} {n}" for key, n in by_key.items() if n or zeros) or "none"


def printable(text: str) -> str:
    """`text` with every character a terminal would act on (escape sequences, newlines, bidirectional
    overrides) written as its Python escape: what a run's files say is shown, never obeyed."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in str(text))


def interactive() -> bool:
    """A person is watching: stderr is a terminal, and the logs are not JSON for a machine."""
    return FORMAT != "json" and sys.stderr.isatty()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line)


class _TerminalFormatter(logging.Formatter):
    """Messages as they are; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


class _TerminalHandler(logging.Handler):
    """Writes through tqdm, which lifts its bars off the screen for the line and draws them again below."""

    def emit(self, record: logging.LogRecord) -> None:
        try:  # from the line's start, cleared: a bar Ray Data closed may have left the cursor on its line
            line = "\r\x1b[2K" + self.format(record)
            try:
                from tqdm import tqdm
            except ImportError:  # `raypipe[edge]` installs no tqdm, and draws no bars
                print(line, file=sys.stderr, flush=True)
            else:
                tqdm.write(line, file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup(fmt: str, verbose: bool) -> None:
    """raypipe's log lines on stderr: JSON, short lines on a terminal, or timestamped lines (CI, pipes, job
    logs). Also decides whether Ray's internals are quieted (see `quiet_ray`)."""
    global VERBOSE, FORMAT
    VERBOSE, FORMAT = verbose, fmt
    handler = _TerminalHandler() if fmt != "json" and interactive() else logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    elif interactive():
        handler.setFormatter(_TerminalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s raypipe %(levelname)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def quiet_ray() -> None:
    """Before Ray is imported (every Ray process then inherits it): Ray Data, Serve and Ray Train keep
    their informational logs in their files under the session folder; only warnings and errors reach the
    terminal. (Ray Data draws progress bars only when stdout is a terminal; otherwise it logs progress, to
    its file.) Imports nothing from Ray."""
    if VERBOSE:
        return
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_LOGGING))
    # Serve's controller, proxies and replicas log to files under <session>/logs/serve/ only; what matters
    # (ready, scaling, unhealthy) `raypipe serve` reports itself from serve.status().
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    for name in ("ray.serve", "ray.train"):  # their driver-side informational lines
        logging.getLogger(name).setLevel(logging.WARNING)
    # Serve resets its logger's level to INFO whenever it starts or connects (serve.start, serve.run), but
    # keeps a logger's filters: "Started Serve", "Connecting to existing Serve app", "Application ... is
    # ready at" (a URL without the /v2 the API lives under) stay out of raypipe's output.
    logging.getLogger("ray.serve").addFilter(_warnings_only)


def _warnings_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def embedded_ray_env() -> dict[str, str]:
    """The environment of an embedded local Ray, set before it starts: Ray Train's preemption watcher
    polls for spot-instance notices, which one machine never gets (its actor is also created with
    by-reference arguments and restarts, which Ray's core worker reports as an error line)."""
    return {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def ray_runtime_env(one_machine: bool = True) -> dict:
    """The job-wide runtime environment raypipe gives Ray, embedded or joined: quiet Ray's worker processes
    too (unless -v). Ray Data inside workers (Ray Train's per-epoch ingest) draws no bars: forwarded to this
    terminal or the job's log, they would stack up, one set per dataset and epoch. On `one_machine`, Ray
    Train's preemption watcher is off: it polls for spot-instance notices that one machine never gets, and
    its actor (created with by-reference arguments and restarts) makes Ray's core worker log an error line
    each time training starts."""
    if VERBOSE:
        return {}
    env_vars = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    if one_machine:
        env_vars.update(embedded_ray_env())
    return {"worker_process_setup_hook": "raypipe.console.quiet_ray_worker", "env_vars": env_vars}


def quiet_ray_worker() -> None:
    """Runs as each of Ray's worker processes for a raypipe job starts (a documented runtime_env hook)."""
    import sys
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    # Deprecations Ray's own modules raise about their own calls (e.g. Ray Train's dataset manager
    # setting ExecutionOptions.exclude_resources): nothing a raypipe user can act on. A deprecated call
    # made from raypipe's code is reported as from raypipe's module, and still shows.
    warnings.filterwarnings("ignore", category=RayDeprecationWarning, module=r"ray\.")
    # Ray Data's execution plans and per-dataset lines go to its log file, as in the driver. A worker of an
    # embedded Ray inherits the variable; one on a cluster gets it here, with this worker's own path.
    if "RAY_DATA_LOGGING_CONFIG" not in os.environ:
        os.environ["RAY_DATA_LOGGING_CONFIG"] = str(RAY_DATA_LOGGING)
        if "ray.data" in sys.modules:  # configured at import: configure it again
            from ray.data._internal.logging import configure_logging  # pinned: ray==2.60.0

            configure_logging()
    # Ray Train 2.60 logs "Reporting training result N: ..." at INFO from a logger named by its file path
    # (getLogger(__file__)), which RunConfig's log level, a filter on ray.train.*, does not reach. Named
    # here without importing Ray Train, which every worker (Serve replicas too) would then pay for.
    import ray

    context = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    logging.getLogger(context).setLevel(logging.WARNING)


def configure_ray_data() -> None:
    """After Ray starts, in this process: Ray Data draws its bars here, where a person may watch; inside
    Ray's workers (Ray Train's per-epoch ingest) it logs progress to its file instead of forwarding bars."""
    if VERBOSE:
        return
    from ray.data import DataContext

    context = DataContext.get_current()
    context.use_ray_tqdm = False  # in a worker, whose stdout is no terminal: progress goes to ray-data.log
    context.enable_progress_bar_name_truncation = False  # a long name is cut by the bar itself, unannounced
    context.enable_progress_bars = False  # only where `ray_data_bars` asks for them, on a terminal


@contextlib.contextmanager
def ray_data_bars() -> Iterator[None]:
    """Ray Data's own progress bars, on a terminal, for the data stage's passes over the source (the long
    part of a large data set). Elsewhere (per-epoch reads, evaluation) they would leave a few lines per
    dataset behind; raypipe shows its own bars there."""
    from ray.data import DataContext
    from tqdm import tqdm

    context = DataContext.get_current()
    before, bars = context.enable_progress_bars, set(tqdm._instances)
    context.enable_progress_bars = interactive() or VERBOSE
    try:
        yield
    finally:
        context.enable_progress_bars = before
        # An execution Ray Data stops early (a `limit` reached) never closes its bar, which tqdm would
        # then draw again below every later line: close what the stage left open.
        for bar in set(tqdm._instances) - bars:
            bar.leave = False
            bar.close()


class RayDataNotices(logging.Filter):
    """Ray Data's one-time notices that its progress bars are off: raypipe turned them off on purpose
    (see `ray_data_bars`), so they are kept from the terminal (ray-data.log still has them). Nothing
    else is held back."""

    NOTICES = ("Progress bars disabled. To enable", "Progress bars for operators disabled. To enable")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOTICES)


def compact() -> bool:
    """Short lines for a person: on a terminal, unless -v."""
    return interactive() and not VERBOSE


def config_line(resolved: dict, source: str, base: dict | None) -> str:
    """The resolved config for the log: all of it as JSON, except on a terminal, where its source and the
    keys that differ from it (`base`, the source without overrides) say the same in a line; the run's
    config.yaml holds all of it."""
    if not compact() or base is None:
        return json.dumps(resolved, separators=(",", ":"))
    flat_base = _flat(base)
    changed = [f"{k}={json.dumps(v)}" for k, v in _flat(resolved).items() if flat_base.get(k, object()) != v]
    return f"{source}" + (f" with {', '.join(changed)}" if changed else "")


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def ray_log_level() -> str:
    """For Ray Train's RunConfig(logging_config=...): what its controller and workers print."""
    return "INFO" if VERBOSE else "WARNING"


@contextlib.contextmanager
def stage(name: str, what: str = "") -> Iterator[dict]:
    """One line as a stage starts and one as it ends, with its time. The caller may put a short result
    in the yielded dict's "done" key ("1797 rows kept")."""
    began, outcome = time.monotonic(), {"done": ""}
    log.info("%s: %s", name, what or "started")
    yield outcome
    elapsed = time.monotonic() - began
    log.info("%s: done in %s%s", name, _duration(elapsed), f" ({outcome['done']})" if outcome["done"] else "")


def _duration(seconds: float) -> str:
    tenths = round(seconds * 10)
    return f"{tenths / 10:.1f} s" if tenths < 600 else f"{tenths // 600} min {tenths % 600 / 10:04.1f} s"


class Progress:
    """A progress bar on a terminal (tqdm, on stderr); elsewhere one log line per update."""

    def __init__(self, total: int, desc: str, log_updates: bool = True):
        self.desc, self.total, self.log_updates = desc, total, log_updates
        self.bar = None
        if interactive():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True,
                            bar_format="{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")

    def update(self, done: int, note: str) -> None:
        if self.bar is None:
            if self.log_updates:
                log.info("%s %d/%d %s", self.desc, done, self.total, note)
            return
        self.bar.n = done
        self.bar.set_postfix_str(note, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
