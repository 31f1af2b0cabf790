"""Every file in cluster/ is checked the way the tool that reads it would: launcher YAMLs by the installed
Ray's own autoscaler config functions (ray-schema.json), KubeRay manifests by KubeRay v1.7.0's CRD schemas
(strict, like `kubectl apply`), the RayService's Serve config by Ray Serve's schema and raypipe's builder,
and every Ray image by the installed Ray version."""

import gzip
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from raypipe.serving.app import ServeArgs
from tests.conftest import REPO

CLUSTER = REPO / "cluster"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
CRDS = Path(__file__).parent / "kuberay-crds" / "v1.7.0"
FAST_PATH = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
             "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0", "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": "65536"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ---- Ray versions ---------------------------------------------------------------------------------

# Every image a file names (image:, head_image:, worker_image:, FROM, BASE=) and KubeRay's rayVersion.
IMAGE_REF = re.compile(r"^(?:\s*(?:- )?(?:image|head_image|worker_image):\s*|FROM\s+|ARG BASE=|.*--build-arg BASE=)(\S+)",
                       re.M)
# What an image must be: Ray's own, or ours built on it, tagged <ray version>-py311-cpu|gpu.
PINNED = re.compile(r"(?:rayproject/ray|registry\.example\.com/raypipe):(\d+\.\d+\.\d+)-py311-(?:cpu|gpu)")
RAY_VERSION = re.compile(r"rayVersion:\s*\"?([^\"\s]+)")


def version_problems(text: str, installed: str) -> list[str]:
    """Images that are not pinned to the installed Ray version, and rayVersions that differ from it."""
    problems = []
    for ref in IMAGE_REF.findall(text):
        if ref.startswith("${"):  # FROM ${BASE}: BASE= is checked
            continue
        pinned = PINNED.fullmatch(ref)
        if not pinned or pinned.group(1) != installed:
            problems.append(ref)
    return problems + [v for v in RAY_VERSION.findall(text) if v != installed]


def test_the_version_check_catches_a_mismatched_or_floating_tag():
    assert version_problems("image: rayproject/ray:2.59.0-py311-gpu", "2.60.0") == ["rayproject/ray:2.59.0-py311-gpu"]
    assert version_problems("  worker_image: rayproject/ray:latest", "2.60.0") == ["rayproject/ray:latest"]
    assert version_problems("ARG BASE=rayproject/ray:2.60.0-py310-cpu", "2.60.0") == ["rayproject/ray:2.60.0-py310-cpu"]
    assert version_problems('rayVersion: "2.9.3"', "2.60.0") == ["2.9.3"]
    assert version_problems("FROM ${BASE}\nimage: registry.example.com/raypipe:2.60.0-py311-cpu", "2.60.0") == []


@pytest.mark.parametrize("path", sorted(p for p in CLUSTER.rglob("*") if p.is_file()), ids=lambda p: p.name)
def test_every_ray_image_is_the_installed_ray(path: Path):
    assert version_problems(path.read_text(), ray.__version__) == [], f"{path.name}: Ray {ray.__version__} is installed"
    locked = re.search(r"^ray==(\S+)$", (REPO / "requirements.lock").read_text(), re.M).group(1)
    assert locked == ray.__version__


def test_every_cluster_file_names_a_ray_image():
    for path in [*CLUSTER.glob("*.yaml"), *(CLUSTER / "kuberay").iterdir()]:
        if path.name != "local.yaml":  # the fake provider runs this machine's Ray
            assert IMAGE_REF.findall(path.read_text()), f"{path.name} names no Ray image"


# ---- launcher ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_configs_pass_rays_own_validation(name: str):
    config = prepare_config(load(CLUSTER / name))  # merges the provider's defaults, as `ray up` does
    validate_config(config)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_groups(name: str):
    config = load(CLUSTER / name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    # The head schedules no work: the autoscaler plans with CPU 0 and Ray starts it with no CPUs.
    assert head["resources"] == {"CPU": 0}
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert all(t.get("min_workers", 0) == 0 for t in workers.values()), "every group scales to zero"
    assert config["idle_timeout_minutes"] > 0
    assert workers["cpu"]["resources"]["CPU"] > 0 and "GPU" not in workers["cpu"]["resources"]
    assert workers["edge"]["resources"]["edge"] >= 1

    spot, on_demand = workers["gpu_spot"], workers["gpu_on_demand"]
    for group in (spot, on_demand):
        assert group["resources"]["GPU"] >= 1 and group["max_workers"] >= 1
        assert group["docker"]["worker_image"].endswith("-gpu")
        (setup,) = group["worker_setup_commands"]  # replaces the global (CPU torch) setup on this group
        assert "-c ~/raypipe/requirements.lock" in setup and "[all]" in setup and "whl/cpu" not in setup
    # priority only breaks ties: the two groups must offer the same resources.
    assert spot["resources"] == on_demand["resources"]
    assert spot["priority"] > on_demand["priority"], "spot first, on-demand as the fallback"
    if name == "aws.yaml":
        assert spot["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        assert "InstanceMarketOptions" not in on_demand["node_config"]
    else:
        assert spot["node_config"]["scheduling"]["provisioningModel"] == "SPOT"
        assert "provisioningModel" not in on_demand["node_config"]["scheduling"]

    commands = [c for k, v in config.items() if k.endswith("_commands") for c in v]
    commands += [c for t in types.values() for c in t.get("worker_setup_commands", [])]
    assert not [c for c in commands if "ray stop" in c], "never end a Ray by name"
    assert config["docker"]["image"].endswith("-cpu")
    assert config["file_mounts"] == {"~/raypipe": "."}
    assert any("-c ~/raypipe/requirements.lock" in c and "[all]" in c for c in config["setup_commands"])
    run_options = " ".join(config["docker"]["run_options"])
    assert all(f"--env {k}={v}" in run_options for k, v in FAST_PATH.items())


@pytest.mark.parametrize("name", LAUNCHER + ["local.yaml"])
def test_launcher_configs_explain_every_key(name: str):
    """A reader new to Ray finds a comment on, or right above, every top-level key, every node group, and
    the first use of each key inside a group."""
    lines = (CLUSTER / name).read_text().splitlines()
    in_groups, seen = False, set()
    for at, line in enumerate(lines):
        key = re.match(r"( *)([\w.~-]+):", line)
        if not key or line.lstrip().startswith("#"):
            continue
        depth = len(key.group(1))
        if depth == 0:
            in_groups = key.group(2) == "available_node_types"
        elif not (in_groups and depth in (2, 4)) or (depth == 4 and key.group(2) in seen):
            continue
        seen.add(key.group(2))
        commented = " # " in line or (at > 0 and lines[at - 1].lstrip().startswith("#"))
        assert commented, f"{name}: `{key.group(2)}` (line {at + 1}) has no comment"


def test_the_local_config_passes_what_the_autoscaler_checks():
    """`ray start --head --autoscaling-config` (autoscaler v1) validates against ray-schema.json as is;
    prepare_config does not apply: this Ray's wheel lacks the fake provider's defaults file."""
    config = load(CLUSTER / "local.yaml")
    validate_config(config)
    provider = config["provider"]
    assert provider["type"] == "fake_multinode" and provider["gcs_address"].startswith("127.0.0.1:")
    assert provider["use_node_id_as_ip"] and provider["disable_node_updaters"]


# ---- KubeRay ----------------------------------------------------------------------------------------

def _strict(schema):
    """kubectl rejects unknown fields; JSON schema allows them unless told: forbid them wherever the CRD
    lists an object's fields and does not preserve unknown ones."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def crd_schema(kind: str) -> dict:
    crd = yaml.load(gzip.open(CRDS / f"ray.io_{kind.lower()}s.yaml.gz"), Loader=getattr(yaml, "CSafeLoader",
                                                                                         yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(version["schema"]["openAPIV3Schema"])


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifests_validate_against_the_crds(path: Path):
    manifest = load(path)
    assert manifest["apiVersion"] == "ray.io/v1"
    jsonschema.validate(manifest, crd_schema(manifest["kind"]))


def test_the_strict_schema_catches_a_misspelt_field():
    manifest = load(CLUSTER / "kuberay" / "raycluster.yaml")
    manifest["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        jsonschema.validate(manifest, crd_schema("RayCluster"))


def _cluster_specs():
    for path in KUBERAY:
        manifest = load(path)
        spec = manifest["spec"]
        yield path.name, {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
                          "RayService": spec.get("rayClusterConfig")}[manifest["kind"]]


def _containers(cluster: dict):
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        yield group, group["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("name, cluster", list(_cluster_specs()), ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_clusters_autoscale_from_zero_and_keep_secrets_out(name: str, cluster: dict):
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group, container in _containers(cluster):
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert container["image"].endswith("-gpu" if gpus else "-cpu"), container["image"]
        if gpus:
            assert group["minReplicas"] == 0, f"{name}: GPU group {group['groupName']} must scale from zero"
        # Credentials only from the Secret, never inline.
        assert {"secretRef": {"name": "raypipe-s3", "optional": True}} in container["envFrom"]
        for env in container.get("env", []):
            assert not env["name"].startswith("AWS_"), f"{name}: {env['name']} is set inline"
    groups = {g["groupName"] for g in cluster["workerGroupSpecs"]}
    assert "cpu" in groups


def test_the_raycluster_has_cpu_gpu_and_edge_groups_with_the_fast_path():
    cluster = load(CLUSTER / "kuberay" / "raycluster.yaml")["spec"]
    for group, container in _containers(cluster):
        assert {e["name"]: e["value"] for e in container["env"]} == FAST_PATH, group.get("groupName", "head")


@pytest.mark.parametrize("name, cluster", list(_cluster_specs()), ids=lambda v: v if isinstance(v, str) else "")
def test_rays_own_kuberay_reader_sees_the_groups_we_mean(name: str, cluster: dict):
    """What Ray's autoscaler makes of each cluster spec (the code that runs beside the head on KubeRay)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    assert cluster["autoscalerOptions"]["version"] == "v2"  # v1 ignores group priorities
    types = _derive_autoscaling_config_from_ray_cr({"metadata": {"name": "raypipe", "namespace": "default"}, "spec": cluster})[
        "available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert types["cpu"]["resources"]["CPU"] > 0 and "GPU" not in types["cpu"]["resources"]
    if "edge" in types:
        assert types["edge"]["resources"]["edge"] == 1
    if "gpu" in types:
        spot, on_demand = types["gpu-spot"], types["gpu"]
        assert spot["resources"]["GPU"] == 1 and spot["resources"] == on_demand["resources"]
        assert spot["priority"] > on_demand["priority"] and spot["min_workers"] == on_demand["min_workers"] == 0


def test_the_rayjob_runs_the_pipeline_into_s3_and_cleans_up():
    spec = load(CLUSTER / "kuberay" / "rayjob.yaml")["spec"]
    assert spec["entrypoint"].startswith("python -m raypipe run ")
    assert re.search(r"--set storage\.root=s3://", spec["entrypoint"])
    assert spec["shutdownAfterJobFinishes"] is True and 0 < spec["ttlSecondsAfterFinished"] <= 600
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] == 0


def test_the_rayservice_serves_a_run_through_the_builder_with_autoscaling():
    spec = load(CLUSTER / "kuberay" / "rayservice.yaml")["spec"]
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    (app,) = serve_config.applications
    assert app.import_path == "raypipe.serving.app:build_app"
    args = ServeArgs.model_validate(app.args)
    assert args.sources[0].startswith("s3://")
    assert args.serve.min_replicas < args.serve.max_replicas
    assert args.serve.model_dump(exclude_unset=True) == app.args["serve"]  # no key silently dropped


# ---- docs -------------------------------------------------------------------------------------------

def test_the_cluster_readme_covers_the_whole_lifecycle():
    text = (CLUSTER / "README.md").read_text()
    for command in ["ray up", "ray job submit", "serve deploy", "kubectl apply", "ray status", "ray down",
                    "kubectl delete", "RAY_FAKE_CLUSTER=1"]:
        assert command in text, command
    readme = (REPO / "README.md").read_text()
    quickstart = readme[readme.index("## Quickstart"):readme.index("\n## The CLI")]
    assert "cluster/README.md" in quickstart and "ray up cluster/aws.yaml" in quickstart
