"""`raypipe serve` on Ray Serve: check that replicas can be placed, deploy without blocking, report scaling,
and on Ctrl-C drain the app's requests in flight before anything stops.

On an embedded Ray raypipe owns Serve, so it shuts Serve and Ray down afterwards. On a cluster it joined
(`--address`) it owns only its application (`serve.app_name`): it refuses to replace an application of
that name that it did not deploy, and on Ctrl-C deletes that one application alone.
"""

from __future__ import annotations

import logging
import threading
import time

from raypipe.config import ConfigError, ServeConfig
from raypipe.serving.catalog import Catalog

log = logging.getLogger("raypipe")
STATUS_EVERY_S = 15  # how often a deployment that waits for room says so


def room_problems(cfg: ServeConfig, resources: dict[str, float]) -> list[str]:
    """Why `serve.min_replicas` cannot be placed on a cluster with these total resources (none: they fit)."""
    need = cfg.min_replicas * cfg.cpus_per_replica
    problems = []
    if need > resources.get("CPU", 0):
        problems.append(f"serve.cpus_per_replica: {cfg.min_replicas} replica(s) x {cfg.cpus_per_replica} CPUs "
                        f"need {need:g} CPUs; the cluster has {resources.get('CPU', 0):g}")
    if cfg.node_resource and resources.get(cfg.node_resource, 0) < 0.01 * cfg.min_replicas:
        problems.append(f"serve.node_resource: no node offers the resource {cfg.node_resource!r}")
    if cfg.memory_mb and "memory" in resources and cfg.min_replicas * cfg.memory_mb * 2**20 > resources["memory"]:
        problems.append(f"serve.memory_mb: {cfg.min_replicas} replica(s) x {cfg.memory_mb} MiB exceed the "
                        f"cluster's {resources['memory'] / 2**20:.0f} MiB")
    return problems


def check_fits_locally(cfg: ServeConfig, cpus: float) -> None:
    """Before an embedded Ray starts: replicas it can never hold are refused (exit 2), where the deployment
    would otherwise wait forever. (An embedded Ray has no custom resources.)"""
    problems = room_problems(cfg, {"CPU": cpus})
    if problems:
        raise ConfigError(f"{problems[0]}; lower it, or pass --address to serve on a cluster that has room")


def warn_if_no_room(cfg: ServeConfig) -> None:
    """On a cluster, which may still grow: say what the deployment waits for."""
    import ray

    for problem in room_problems(cfg, ray.cluster_resources()):
        log.warning("serve: %s now; waiting for the autoscaler to add room (Ctrl-C to stop)", problem)


def run(app, catalog: Catalog, cfg: ServeConfig, host: str, port: int, embedded: bool,
        stop: threading.Event) -> None:
    """Deploy `app` as `cfg.app_name`, say when it is ready, and serve until `stop` is set; then drain.
    Returns once the application is gone (and, on an embedded Ray, Serve with it)."""
    from ray import serve
    from ray.serve.api import RunTarget

    if not embedded:
        warn_if_no_room(cfg)
    serve.start(http_options={"host": host, "port": port})
    if cfg.app_name in serve.status().applications:
        raise ConfigError(f"serve.app_name: an application named {cfg.app_name!r} is already deployed on this "
                          "cluster; choose another serve.app_name, or delete that one (serve delete NAME)")
    watch = _ScalingWatch(cfg.app_name)
    watcher = threading.Thread(target=watch.run, args=(stop,), daemon=True)
    try:
        try:
            serve.run_many([RunTarget(app, name=cfg.app_name, route_prefix="/")],
                           wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
        except Exception as err:  # Serve's own refusal of a second application at /
            if "is being used by application" in str(err):
                raise ConfigError(f"serve.app_name: another application already serves the route prefix / on "
                                  f"this cluster (the REST API lives at /v2): {err}") from None
            raise
        if not _wait_running(cfg.app_name, stop):
            return
        models = "; ".join(f"{name} ({', '.join(spec.versions)})" for name, spec in catalog.models.items())
        if embedded:
            url = f"http://{host}:{port}"
            log.info("serve: ready on %s/v2: %s; docs %s/docs; Ctrl-C to stop", url, models, url)
        else:
            log.info("serve: ready as %r at /v2 of the cluster's Serve HTTP address: %s; Ctrl-C to stop",
                     cfg.app_name, models)
        # From a thread: a Serve controller slow to answer never delays Ctrl-C.
        watcher.start()
        stop.wait()
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join(timeout=5)
        log.info("serve: draining in-flight requests and shutting down")
        # Deleting the application first lets its replicas finish what they hold while the proxy still
        # routes to them; only then does Serve itself stop (and only if raypipe started it).
        try:
            serve.delete(cfg.app_name)
        finally:
            if embedded:
                serve.shutdown()


def _wait_running(name: str, stop: threading.Event) -> bool:
    """Wait until the application runs (True), or Ctrl-C (False); a failed deployment raises."""
    from ray import serve

    said = time.monotonic()
    while not stop.wait(0.5):
        try:
            app = serve.status().applications.get(name)
        except Exception:  # the controller is busy: ask again
            continue
        status = getattr(app.status, "value", app.status) if app else "NOT_STARTED"
        if status == "RUNNING":
            return True
        if status == "DEPLOY_FAILED":
            raise RuntimeError(f"serve: deploying {name!r} failed: {app.message}")
        if time.monotonic() - said > STATUS_EVERY_S:
            said = time.monotonic()
            log.info("serve: %s is %s: waiting for its replicas to start (Ctrl-C to stop)", name, status.lower())
    return False


class _ScalingWatch:
    """One line per change in the number of running replicas or in the deployment's status."""

    def __init__(self, app: str):
        self.app, self.replicas, self.status = app, None, None

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(1.0):
            self.check()

    def check(self) -> None:
        from ray import serve

        try:
            deployment = next(iter(serve.status().applications[self.app].deployments.values()))
        except Exception:  # the controller is busy or restarting: look again next second
            return
        running = deployment.replica_states.get("RUNNING", 0)
        if self.replicas is not None and running != self.replicas:
            log.info("serve: %d -> %d replicas", self.replicas, running)
        status = getattr(deployment.status, "value", deployment.status)
        if status != self.status and status in ("UNHEALTHY", "DEPLOY_FAILED"):
            log.warning("serve: %s: %s", status, deployment.message)
        self.replicas, self.status = running, status
