"""Every file in cluster/ is checked the way the tool that reads it would: launcher YAMLs by the installed
Ray's own autoscaler config functions (ray-schema.json), KubeRay manifests by KubeRay v1.7.0's CRD schemas
(strict, like `kubectl apply`), the NetworkPolicies by the networking.k8s.io/v1 schema and by what they
admit, the RayService's Serve config by Ray Serve's schema and raypipe's builder, and every Ray image by
the installed Ray version. Every cluster has Ray's token auth on, with the token outside the files."""

import gzip
import ipaddress
import re
import shlex
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
NETWORK_POLICY = CLUSTER / "kuberay" / "networkpolicy.yaml"
KUBERAY = sorted(p for p in (CLUSTER / "kuberay").glob("*.yaml") if p != NETWORK_POLICY)  # the Ray manifests
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
        # The fake provider runs this machine's Ray; the NetworkPolicies run no pods.
        if path not in (CLUSTER / "local.yaml", NETWORK_POLICY):
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
    assert config["file_mounts"]["~/raypipe"] == "."
    assert any("-c ~/raypipe/requirements.lock" in c and "[all]" in c for c in config["setup_commands"])
    run_options = " ".join(config["docker"]["run_options"])
    assert all(f"--env {k}={v}" in run_options for k, v in FAST_PATH.items())


def ray_start(command: str) -> tuple[dict[str, str], dict[str, str | bool]]:
    """The environment assignments and the flags of the `ray start` in a start command (`A || B` runs B
    only when A fails, so the `ray start` is the last alternative)."""
    words = shlex.split(command.split("||")[-1])
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[:2] == ["ray", "start"], command
    flags = {}
    for word in words[2:]:
        key, _, value = word.partition("=")
        flags[key] = value or True
    return env, flags


def test_ray_start_reads_the_environment_and_flags_of_a_start_command():
    env, flags = ray_start("pgrep -x raylet || RAY_AUTH_MODE=token ray start --head --dashboard-host=127.0.0.1")
    assert env == {"RAY_AUTH_MODE": "token"} and flags == {"--head": True, "--dashboard-host": "127.0.0.1"}
    env, flags = ray_start("ray start --head --dashboard-host=0.0.0.0")
    assert env == {} and flags["--dashboard-host"] == "0.0.0.0"


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_clusters_require_the_token_and_keep_the_dashboard_on_loopback(name: str):
    """Every `ray start` runs with token auth; the head's dashboard and job API listen on its loopback only
    (`ray dashboard` tunnels there over SSH); the token reaches every node from a file outside this
    checkout, through file_mounts, at the path where Ray looks by default."""
    config = load(CLUSTER / name)
    (head,) = config["head_start_ray_commands"]
    env, flags = ray_start(head)
    assert env.get("RAY_AUTH_MODE") == "token", head
    assert flags.get("--head") is True and flags.get("--dashboard-host") == "127.0.0.1", head
    (worker,) = config["worker_start_ray_commands"]
    env, flags = ray_start(worker)
    assert env.get("RAY_AUTH_MODE") == "token" and "--head" not in flags, worker

    # Clients inside the containers (`ray exec ... 'ray status'`, job drivers) need the mode too; no
    # group's own run options may turn it off.
    docker = config["docker"]
    assert "--env RAY_AUTH_MODE=token" in docker["run_options"]
    options = [o for k, v in docker.items() if k.endswith("run_options") for o in v]
    options += [o for t in config["available_node_types"].values() for k, v in t.get("docker", {}).items()
                if k.endswith("run_options") for o in v]
    assert [o for o in options if "RAY_AUTH" in o] == ["--env RAY_AUTH_MODE=token"]

    # ~/.ray/auth_token in the container, from a folder of the user's, never from the synced checkout.
    source = config["file_mounts"]["~/.ray"]
    assert not (REPO / Path(source).expanduser()).resolve().is_relative_to(REPO), source  # as `ray up` reads it
    assert source == f"~/.raypipe/{name.removesuffix('.yaml')}", "one token per cluster"


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


TOKEN_SECRET = "raypipe-ray-token"  # the Secret holding the `auth_token` key, created by the user
AUTH_ENV = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}


@pytest.mark.parametrize("name, cluster", list(_cluster_specs()), ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_clusters_take_the_token_from_the_secret(name: str, cluster: dict):
    """KubeRay's own token auth (authOptions): the operator sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN,
    read from the Secret, in the Ray container of the head and of every worker group (and the RayJob's
    submitter), and authenticates its own dashboard calls with it. It skips a variable a container already
    sets, so a container that set one itself would override it: none does."""
    assert cluster["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        spec = group["template"]["spec"]
        for container in spec["containers"] + spec.get("initContainers", []):
            assert not {e["name"] for e in container.get("env", [])} & AUTH_ENV, f"{name}: {container['name']}"
    assert not {e["name"] for e in cluster["autoscalerOptions"].get("env", [])} & AUTH_ENV  # the autoscaler's


# A credential written into a file: a hex token (what `ray get-auth-token --generate` writes), an AWS access
# key ID, or a literal value given to a token or key variable ($VARIABLES, <placeholders> and ... are fine).
SECRET_LITERAL = re.compile(r"""\b[0-9a-fA-F]{32,}\b | \bAKIA[0-9A-Z]{16}\b
    | \b(?:RAY_AUTH_TOKEN|AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|auth_token)["']?[ \t]*[=:][ \t]*["']?(?![$<.{])\S""",
                            re.X)


def test_the_secret_check_finds_a_written_token_or_key():
    token = "0123456789abcdef" * 4
    for text in [f"export RAY_AUTH_TOKEN={token[:12]}", token, "--env AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI",
                 "RAY_AUTH_TOKEN: 'x1'", "kubectl create secret generic t --from-literal=auth_token=abc",
                 "AKIAIOSFODNN7EXAMPLE"]:
        assert SECRET_LITERAL.search(text), text
    for text in ["RAY_AUTH_TOKEN_PATH=$HOME/.raypipe/aws/auth_token", "--from-file=auth_token=$HOME/t",
                 "--from-literal=AWS_SECRET_ACCESS_KEY=...", "RAY_AUTH_TOKEN (the `auth_token` key)"]:
        assert not SECRET_LITERAL.search(text), text


@pytest.mark.parametrize("path", sorted(p for p in CLUSTER.rglob("*") if p.is_file()), ids=lambda p: p.name)
def test_no_token_or_key_is_written_in_a_cluster_file(path: Path):
    assert not SECRET_LITERAL.findall(path.read_text()), path.name


# ---- NetworkPolicy ----------------------------------------------------------------------------------

# networking.k8s.io/v1 NetworkPolicy, all of its fields, strict like `kubectl apply` (no Kubernetes
# schema ships in any installed package).
_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["key", "operator"], "properties": {
            "key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
            "values": {"type": "array", "items": {"type": "string"}}}}}}}
_PEER = {"type": "object", "additionalProperties": False, "minProperties": 1, "properties": {
    "podSelector": _SELECTOR, "namespaceSelector": _SELECTOR,
    "ipBlock": {"type": "object", "additionalProperties": False, "required": ["cidr"], "properties": {
        "cidr": {"type": "string"}, "except": {"type": "array", "items": {"type": "string"}}}}},
    # an ipBlock stands alone in its peer
    "anyOf": [{"not": {"required": ["ipBlock"]}}, {"maxProperties": 1}]}
_PORTS = {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
    "protocol": {"enum": ["TCP", "UDP", "SCTP"]}, "port": {"type": ["integer", "string"]},
    "endPort": {"type": "integer"}}}}
NETWORK_POLICY_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "networking.k8s.io/v1"}, "kind": {"const": "NetworkPolicy"},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"}}},
        "spec": {"type": "object", "additionalProperties": False, "required": ["podSelector"], "properties": {
            "podSelector": _SELECTOR,
            "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
            "ingress": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
                "from": {"type": "array", "items": _PEER}, "ports": _PORTS}}},
            "egress": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
                "to": {"type": "array", "items": _PEER}, "ports": _PORTS}}}}}}}


def network_policies() -> list[dict]:
    """The NetworkPolicies of networkpolicy.yaml, one YAML document each."""
    return list(yaml.safe_load_all(NETWORK_POLICY.read_text()))


def selects(selector: dict, labels: dict) -> bool:
    """Kubernetes label-selector matching: every matchLabels pair and every expression holds ({} selects all)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        has = e["key"] in labels
        if not {"In": has and labels[e["key"]] in e.get("values", []),
                "NotIn": not has or labels[e["key"]] not in e.get("values", []),
                "Exists": has, "DoesNotExist": not has}[e["operator"]]:
            return False
    return True


def admitted(policy: dict, port: int, source: dict) -> bool:
    """Whether `policy` lets `source` open TCP `port` on a pod it selects, as Kubernetes reads it: some
    ingress rule whose peers (every source, when it names none) include the source and whose ports (every
    port, when it names none) include the port. A source is a pod ({"labels", "namespace": "same" or
    "other", "namespace_labels"}) or an address outside the cluster ({"ip"})."""
    assert "Ingress" in policy["spec"]["policyTypes"]

    def peer_admits(peer: dict) -> bool:
        if "ipBlock" in peer:
            if "ip" not in source:
                return False
            ip, block = ipaddress.ip_address(source["ip"]), peer["ipBlock"]
            return ip in ipaddress.ip_network(block["cidr"]) and not any(
                ip in ipaddress.ip_network(c) for c in block.get("except", []))
        if "ip" in source:
            return False
        in_namespace = (selects(peer["namespaceSelector"], source.get("namespace_labels", {}))
                        if "namespaceSelector" in peer else source["namespace"] == "same")
        return in_namespace and selects(peer.get("podSelector", {}), source["labels"])

    def port_admits(p: dict) -> bool:
        assert isinstance(p["port"], int), "named ports are not modelled here"
        return p.get("protocol", "TCP") == "TCP" and p["port"] <= port <= p.get("endPort", p["port"])

    return any((not rule.get("from") or any(peer_admits(peer) for peer in rule["from"]))
               and (not rule.get("ports") or any(port_admits(p) for p in rule["ports"]))
               for rule in policy["spec"].get("ingress", []))


def test_the_network_policies_are_valid_kubernetes_objects():
    policies = network_policies()
    for policy in policies:
        jsonschema.validate(policy, NETWORK_POLICY_SCHEMA)
    assert len({p["metadata"]["name"] for p in policies}) == len(policies)
    misspelt = network_policies()[0]
    misspelt["spec"]["ingres"] = misspelt["spec"].pop("ingress")
    with pytest.raises(jsonschema.ValidationError, match="ingres"):
        jsonschema.validate(misspelt, NETWORK_POLICY_SCHEMA)


def _pod_labels(cluster: dict) -> list[dict]:
    """The labels of the pods of the head and of every worker group."""
    return [g["template"].get("metadata", {}).get("labels", {})
            for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]]


# The operator as its Helm chart labels it, in a namespace of its own.
OPERATOR = {"labels": {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay"},
            "namespace": "other", "namespace_labels": {"kubernetes.io/metadata.name": "kuberay-system"}}
STRANGER = {"labels": {"app": "anything"}, "namespace": "same"}
OUTSIDE = {"ip": "203.0.113.7"}
# Ray's ports besides the containers' named ones: object manager, dashboard agent, metrics, HAProxy's
# stats pages, a worker's port.
MORE_RAY_PORTS = {8076, 52365, 8080, 8404, 9101, 10002, 19999}


@pytest.mark.parametrize("name, cluster", list(_cluster_specs()), ids=lambda v: v if isinstance(v, str) else "")
def test_each_ray_cluster_admits_only_its_own_pods_and_its_callers(name: str, cluster: dict):
    pods = _pod_labels(cluster)
    assert pods[0]["raypipe.io/cluster"] == Path(name).stem
    (policy,) = [p for p in network_policies() if selects(p["spec"]["podSelector"], pods[0])]
    assert all(selects(policy["spec"]["podSelector"], labels) for labels in pods), "every pod of the cluster"
    others = [labels for other, spec in _cluster_specs() if other != name for labels in _pod_labels(spec)]
    assert not any(selects(policy["spec"]["podSelector"], labels) for labels in others)

    ports = {p["containerPort"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265, 10001} <= ports
    own = [{"labels": labels, "namespace": "same"} for labels in pods]
    neighbours = [{"labels": labels, "namespace": "same"} for labels in others]  # other raypipe clusters
    for port in (ports | MORE_RAY_PORTS) - {8000}:
        assert all(admitted(policy, port, s) for s in own), port
        assert not any(admitted(policy, port, s) for s in [STRANGER, OUTSIDE, *neighbours]), port
        assert admitted(policy, port, OPERATOR) == (port == 8265), port

    manifest = load(CLUSTER / "kuberay" / name)
    if manifest["kind"] == "RayJob":  # its submitter pod, labelled by Kubernetes with its Job's name
        job = manifest["metadata"]["name"]
        submitter = {"labels": {"batch.kubernetes.io/job-name": job, "job-name": job}, "namespace": "same"}
        assert admitted(policy, 8265, submitter) and not admitted(policy, 6379, submitter)
    # The Serve port is reachable from anywhere only where it is the product: the RayService.
    public = manifest["kind"] == "RayService"
    assert all(admitted(policy, 8000, s) == public for s in [STRANGER, OUTSIDE, *neighbours])
    assert all(admitted(policy, 8000, s) for s in own)


def test_the_raycluster_has_cpu_gpu_and_edge_groups_with_the_fast_path():
    cluster = load(CLUSTER / "kuberay" / "raycluster.yaml")["spec"]
    for group, container in _containers(cluster):
        assert {e["name"]: e["value"] for e in container["env"]} == FAST_PATH, group.get("groupName", "head")


# The worker groups each manifest must have: training needs CPU and GPU (spot first), serving CPU and edge.
GROUPS = {"raycluster.yaml": {"cpu", "edge", "gpu-spot", "gpu"}, "rayjob.yaml": {"cpu", "gpu-spot", "gpu"},
          "rayservice.yaml": {"cpu", "edge"}}


@pytest.mark.parametrize("name, cluster", list(_cluster_specs()), ids=lambda v: v if isinstance(v, str) else "")
def test_rays_own_kuberay_reader_sees_the_groups_we_mean(name: str, cluster: dict):
    """What Ray's autoscaler makes of each cluster spec (the code that runs beside the head on KubeRay)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    assert cluster["autoscalerOptions"]["version"] == "v2"  # v1 ignores group priorities
    types = _derive_autoscaling_config_from_ray_cr({"metadata": {"name": "raypipe", "namespace": "default"}, "spec": cluster})[
        "available_node_types"]
    assert set(types) == {"headgroup", *GROUPS[name]}  # so a group below cannot go missing unnoticed
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert types["cpu"]["resources"]["CPU"] > 0 and "GPU" not in types["cpu"]["resources"]
    if "edge" in GROUPS[name]:
        assert types["edge"]["resources"]["edge"] == 1 and "GPU" not in types["edge"]["resources"]
    if "gpu" in GROUPS[name]:
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


def test_the_cluster_readme_creates_the_token_where_the_configs_read_it():
    text = (CLUSTER / "README.md").read_text()
    for name in LAUNCHER:
        folder = load(CLUSTER / name)["file_mounts"]["~/.ray"]
        assert f"mkdir -p -m 700 {folder}" in text or f"`{folder}`" in text, folder
    assert "> ~/.raypipe/aws/auth_token" in text  # the file name Ray reads in ~/.ray
    (secret,) = {spec["authOptions"]["secretName"] for _, spec in _cluster_specs()}
    assert f"kubectl create secret generic {secret} --from-file=auth_token=" in text  # the key KubeRay reads
    assert "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=" in text
    assert f"kubectl apply -f cluster/kuberay/{NETWORK_POLICY.name}" in text
