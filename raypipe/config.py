"""The one typed config that drives every stage.

Validated once, where the user enters (the CLI), before Ray starts. Errors name the user's key.
No Ray or torch imports here: this module must stay cheap to import.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel, ConfigDict, Field, SecretStr, StrictFloat, StrictInt, ValidationError, field_validator, model_validator,
)

# The bundled default (digits) is package data, so an installed raypipe finds it from any directory.
DEFAULT_CONFIG = resources.files("raypipe") / "configs" / "default.yaml"

# What `--smoke-test` changes in any config: a few hundred rows, a few epochs, about a minute.
SMOKE_OVERRIDES: dict[str, Any] = {
    "data.limit": 500,
    "data.shard_mb": 0.05,
    "train.epochs": 4,
    "train.batch_size": 32,
    "compress.latency_repeats": 5,
    # A few hundred rows leave ~70 in the validation split, where one row is 1.4 points: the default 0.01
    # would reject any variant that answers a single row differently.
    "compress.max_accuracy_drop": 0.05,
}


SMOKE_FINETUNE_EPOCHS = 2  # and finetunes of at most this many epochs


class ConfigError(ValueError):
    """Bad user input: one line naming the key, file or column. The CLI exits 2 on it."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Fields whose values are never logged, written, or echoed in an error.
SECRET_FIELDS = frozenset({"access_key_id", "secret_access_key"})

# A model name is one segment of a URL and of a path (bundles hold a folder per model).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# A variant name is a folder of the run, on disks that may ignore case: no dots, at most 64 characters.
VARIANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


class S3Config(_Model):
    """Where s3:// URIs live. Unset fields fall back to the usual AWS variables and files."""

    endpoint_url: str | None = Field(None, description="S3 endpoint, e.g. a MinIO or moto server. Default: AWS_ENDPOINT_URL or AWS.")
    region: str | None = Field(None, description="Region name. Default: AWS_DEFAULT_REGION.")
    access_key_id: SecretStr | None = Field(None, description="Access key id. Default: AWS_ACCESS_KEY_ID. Never logged.")
    secret_access_key: SecretStr | None = Field(None, description="Secret key. Default: AWS_SECRET_ACCESS_KEY. Never logged.")


class StorageConfig(_Model):
    root: str = Field("./runs", description="Where runs go: a local folder or s3://bucket/prefix.")
    shared: bool = Field(
        False, description="The local root is a shared filesystem mounted at the same path on every node "
                           "(NFS, EFS, ...): allowed on a multi-node cluster, where a local root is refused.")
    s3: S3Config = Field(default_factory=S3Config, description="S3 endpoint and credentials for s3:// URIs.")

    @field_validator("root")
    @classmethod
    def _absolute(cls, root: str) -> str:
        if root.startswith("s3://"):
            if len(root) <= len("s3://") or root[len("s3://")] == "/":
                raise ValueError("an s3:// root needs a bucket: s3://bucket/prefix")
            return root.rstrip("/")
        if "://" in root:
            raise ValueError(f"unsupported scheme in {root!r}: use a local path or s3://")
        return str(Path(root).expanduser().resolve())


class SplitConfig(_Model):
    val: float = Field(0.15, gt=0, lt=0.5, description="Fraction of rows held out for validation.")
    test: float = Field(0.15, gt=0, lt=0.5, description="Fraction of rows held out for the final test.")


class AugmentConfig(_Model):
    ops: list[Literal["crop", "flip", "rotate", "noise", "cutout"]] = Field(
        default_factory=list,
        description="Augmentations of the train split, drawn afresh each epoch: crop (random crop after "
                    "zero padding), flip (horizontal), rotate, noise (Gaussian), cutout. All but noise need images.",
    )
    crop_padding: int = Field(2, ge=0, le=16, description="Zero padding before the random crop, in pixels.")
    max_degrees: float = Field(10.0, ge=0, le=45, description="Largest rotation in degrees.")
    noise_std: float = Field(0.5, ge=0, description="Gaussian noise, in raw input units.")
    cutout_size: int = Field(8, ge=1, description="Side of the square cutout, in pixels.")


class OutlierConfig(_Model):
    method: Literal["none", "zscore", "iqr"] = Field(
        "zscore", description="Robust z-score (median/MAD) or IQR fences per feature; never applied to images.")
    threshold: float | None = Field(
        None, gt=0, description="Cut-off: robust z above this (default 3.5), or IQRs beyond the quartiles (default 1.5).")
    sample_rows: int = Field(20000, ge=100, description="Train rows sampled to estimate medians and quartiles.")

    def cutoff(self) -> float:
        return self.threshold or (3.5 if self.method == "zscore" else 1.5)


class DataConfig(_Model):
    source: str = Field(
        "digits", description="'digits' (scikit-learn's bundled 8x8 digits), or a local or s3:// URI of parquet "
                              "files, CSV files, or an image folder (one sub-folder per class).")
    format: Literal["auto", "parquet", "csv", "images"] = Field(
        "auto", description="Source format; auto: from the file extensions under the URI.")
    features: list[str] | None = Field(
        None, description="Feature columns (numbers, or one tensor column such as an HxWxC image); "
                          "default: every column but the label.")
    label: str = Field("label", description="Label column of a parquet or CSV source.")
    classes: list[str] | None = Field(
        None, description="The declared classes; rows with any other label are dropped. "
                          "Default: every label found (sub-folder names for images).")
    limit: int | None = Field(None, gt=0, description="Use at most this many rows (smoke tests).")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Validation and test fractions.")
    outliers: OutlierConfig = Field(default_factory=OutlierConfig, description="Outlier removal for tabular data.")
    standardize: Literal["channel", "feature"] = Field(
        "channel", description="Standardize per image channel or per feature, fitted on the train split only.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Train-time augmentation.")
    shard_mb: float = Field(64, gt=0, description="Target size of each parquet shard, in MiB.")

    @field_validator("source")
    @classmethod
    def _source(cls, source: str) -> str:
        if source != "digits" and "://" in source and not source.startswith("s3://"):
            raise ValueError(f"unsupported scheme in {source!r}: use 'digits', a local path or s3://")
        if source != "digits" and not source.startswith("s3://"):
            return str(Path(source).expanduser().resolve())
        return source.rstrip("/")

    @field_validator("classes", mode="before")
    @classmethod
    def _classes_as_text(cls, classes: Any) -> Any:
        # Labels are compared as text, so `classes: [0, 1, 2]` matches integer label columns.
        return [str(c) for c in classes] if isinstance(classes, list) else classes


class ModelConfig(_Model):
    arch: Literal["mlp", "cnn", "resnet"] = Field(
        "mlp", description="mlp (hidden layers), cnn (small conv net) or resnet (residual stages, for 32x32 images).")
    hidden: list[int] = Field(default_factory=lambda: [256, 128], min_length=1, description="MLP hidden widths.")
    channels: list[int] = Field(default_factory=lambda: [32, 64], min_length=1,
                                description="CNN conv channels, or ResNet stage widths.")
    blocks: int = Field(1, ge=1, le=8, description="ResNet residual blocks per stage.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before the classifier.")


class WorkersRange(_Model):
    min: int = Field(ge=1, description="Fewest workers the run may use.")
    max: int = Field(ge=1, description="Most workers the run may use.")

    @model_validator(mode="after")
    def _ordered(self) -> WorkersRange:
        if self.min > self.max:
            raise ValueError(f"train.workers.min ({self.min}) must be <= train.workers.max ({self.max})")
        return self


class TrainConfig(_Model):
    epochs: int = Field(30, ge=1, description="Epochs to train.")
    batch_size: int = Field(64, ge=1, description="Global batch size per optimizer step, whatever the worker count.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    warmup_epochs: float = Field(1.0, ge=0, description="Linear learning-rate warmup, then cosine decay.")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    workers: int | WorkersRange = Field(2, description="Number of data-parallel workers, or {min, max}.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker reserves; fractions leave room for Ray Data.")
    device: Literal["cpu", "cuda"] = Field("cpu", description="cpu, or cuda for one GPU per worker.")
    resources_per_worker: dict[str, StrictFloat | StrictInt] = Field(
        default_factory=dict,
        description="Other Ray resources each worker asks for, e.g. {\"accelerator_type:A10G\": 0.001} or a custom "
                    "node resource: the autoscaler starts the node group that has them.")
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field("fp32", description="Autocast precision.")
    max_failures: int = Field(1, ge=-1, description="Worker-group restarts allowed after failures (-1: unlimited).")
    checkpoint_every: int = Field(1, ge=1, description="Checkpoint every N epochs (and after the last).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept to resume from: the latest N (the best by validation accuracy is kept too).")
    elastic_monitor_s: float = Field(10.0, gt=0, description="How often an elastic run looks for room to grow.")

    @field_validator("resources_per_worker")
    @classmethod
    def _resources(cls, resources: dict[str, float]) -> dict[str, float]:
        for name, amount in resources.items():
            if not name.strip():
                raise ValueError("train.resources_per_worker: a resource needs a name")
            if name.lower() in ("cpu", "gpu", "memory"):
                raise ValueError(f"train.resources_per_worker.{name}: set by train.cpus_per_worker and "
                                 f"train.device, not here")
            if not 0 < amount < math.inf:
                raise ValueError(f"train.resources_per_worker.{name}: must be a finite number > 0 (got {amount})")
        return resources

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, workers: Any) -> int | WorkersRange:
        if isinstance(workers, dict):
            try:
                return WorkersRange.model_validate(workers)
            except ValidationError as err:
                first = err.errors()[0]
                sub = ".".join(str(p) for p in first["loc"])
                msg = first["msg"].removeprefix("Value error, ")
                raise ValueError(f"train.workers.{sub}: {msg}" if sub else msg) from None
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"train.workers: must be an integer >= 1 or {{min, max}} (got {workers!r})")
        return workers

    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; equal for a fixed-size run."""
        if isinstance(self.workers, int):
            return self.workers, self.workers
        return self.workers.min, self.workers.max


class PruneStep(_Model):
    op: Literal["prune"] = "prune"
    ratio: float = Field(gt=0, lt=1, description="Fraction of the parameters to remove, as whole neurons or channels "
                                                 "chosen by weight magnitude (the classifier's outputs stay).")


class FinetuneStep(_Model):
    op: Literal["finetune"] = "finetune"
    epochs: StrictInt = Field(3, ge=1, le=10_000, description="Epochs of training after pruning, on Ray Train like the train stage.")
    lr: float | None = Field(None, gt=0, allow_inf_nan=False, description="Peak learning rate (then cosine decay, no warmup); default: train.lr.")


class QuantizeStep(_Model):
    op: Literal["quantize"] = "quantize"
    mode: Literal["static", "dynamic"] = Field(
        "static", description="static: int8 QDQ with activation ranges calibrated on train rows (any model); "
                              "dynamic: int8 weights, activations quantized per call (Linear-only models: mlp).")


Step = Annotated[PruneStep | FinetuneStep | QuantizeStep, Field(discriminator="op")]
EXAMPLES = {"prune": "{ratio: 0.5}", "finetune": "{epochs: 3}", "quantize": "{mode: static}"}
STEPS = tuple(EXAMPLES)


def step_as_config(step: PruneStep | FinetuneStep | QuantizeStep) -> dict[str, Any]:
    """A step as a user writes it: {prune: {ratio: 0.5}}."""
    return {step.op: step.model_dump(mode="json", exclude={"op"}, exclude_none=True)}


class CompressConfig(_Model):
    recipes: dict[str, list[Step]] = Field(
        default_factory=lambda: {"int8": [QuantizeStep()]},
        description="Variants to build besides fp32: name -> ordered steps, each `prune: {ratio}`, `finetune: "
                    "{epochs, lr}` or `quantize: {mode}` (quantize last). Every variant is exported to ONNX.")
    promote: Literal["smallest", "fastest", "most_accurate"] = Field(
        "smallest", description="Which accepted variant is served by default: smallest file, lowest latency at "
                                "batch 64 (beyond the measured timing noise), or highest validation accuracy.")
    max_accuracy_drop: float = Field(
        0.01, ge=0, le=1, description="Largest validation-accuracy drop against fp32 a variant may have (the "
                                      "test split stays out of every decision).")
    calibration_rows: int = Field(512, ge=1, description="Train rows used to calibrate int8 activation ranges.")
    latency_repeats: int = Field(30, ge=1, description="Timed calls per batch size; the median is reported.")

    @field_validator("recipes", mode="before")
    @classmethod
    def _steps(cls, recipes: Any) -> Any:
        """`[prune: {ratio: 0.5}, finetune]` -> [{op: prune, ratio: 0.5}, {op: finetune}]."""
        if not isinstance(recipes, dict):
            return recipes
        parsed = {}
        for name, steps in recipes.items():
            where = f"compress.recipes.{name}"
            if (not isinstance(name, str) or not re.fullmatch(VARIANT_PATTERN, name)
                    or name.casefold() == "fp32"):
                raise ValueError(f"{where}: a variant name is up to 64 letters, digits, '_' or '-', and not fp32 "
                                 f"(always built)")
            if name.casefold() in {n.casefold() for n in parsed}:
                raise ValueError(f"{where}: another variant has this name but for case (one folder on some disks)")
            if not isinstance(steps, list) or not steps:
                raise ValueError(f"{where}: a list of steps, e.g. [prune: {{ratio: 0.5}}, finetune: {{epochs: 3}}]")
            parsed[name] = [_step(step, f"{where}.{i}") for i, step in enumerate(steps)]
            ops = [step["op"] if isinstance(step, dict) else step.op for step in parsed[name]]
            if "quantize" in ops[:-1]:
                raise ValueError(f"{where}.{ops.index('quantize')}: quantize must be the last step")
        return parsed


def _step(step: Any, where: str) -> Any:
    if isinstance(step, (PruneStep, FinetuneStep, QuantizeStep)):
        return step
    if isinstance(step, str):
        op, options = step, {}
    elif isinstance(step, dict) and len(step) == 1:
        (op, options), = step.items()
        options = {} if options is None else options
    else:
        raise ValueError(f"{where}: a step is one name with its options, e.g. prune: {{ratio: 0.5}}")
    if op not in STEPS:
        raise ValueError(f"{where}: unknown step {op!r} (steps: {', '.join(STEPS)})")
    if not isinstance(options, dict):
        raise ValueError(f"{where}.{op}: options are a mapping, e.g. {op}: {EXAMPLES[op]}")
    if "op" in options:
        raise ValueError(f"{where}.{op}.op: unknown key")
    return {"op": op, **options}


class ServeConfig(_Model):
    proxy: Literal["haproxy", "default"] = Field(
        "haproxy", description="haproxy: Ray Serve's HAProxy ingress balancing each replica's own HTTP server "
                               "(throughput-optimized); default: Serve's Python proxy. Read when Ray starts.")
    min_replicas: int = Field(1, ge=1, description="Fewest replicas.")
    max_replicas: int = Field(2, ge=1, description="Most replicas (autoscaling).")
    target_ongoing_requests: float = Field(
        8, gt=0, description="Autoscaling target of in-flight requests per replica.")
    upscale_delay_s: float = Field(3, ge=0, description="Load must stay above target this long before scaling up.")
    downscale_delay_s: float = Field(30, ge=0, description="Load must stay below target this long before scaling down.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica accepts at once; more queue.")
    cpus_per_replica: float = Field(0.25, gt=0, description="CPUs each replica reserves.")
    memory_mb: int | None = Field(None, ge=1, description="Memory each replica reserves, in MiB (default: none).")
    node_resource: str | None = Field(
        None, description="A custom Ray resource replicas require, to place them on nodes a cluster marks "
                          "(e.g. 'edge'); each replica asks for 0.01 of it.")
    max_batch_size: int = Field(32, ge=1, description="Most requests joined into one model call.")
    batch_wait_ms: float = Field(
        0, ge=0, description="How long a request waits for others to join its batch; 0 joins only requests "
                             "already queued, so a lone request never waits.")
    max_models_per_replica: int = Field(4, ge=1, description="Models each replica keeps loaded (LRU).")
    access_log: bool = Field(False, description="A log line per request (off: it costs throughput).")
    app_name: str = Field(
        "raypipe", pattern=NAME_PATTERN,
        description="The Serve application's name (its REST API is served at /). On a shared cluster an "
                    "application of that name that this `raypipe serve` did not deploy is never replaced, "
                    "and Ctrl-C deletes this one alone.")

    @model_validator(mode="after")
    def _ordered(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"serve.min_replicas ({self.min_replicas}) must be <= serve.max_replicas ({self.max_replicas})"
            )
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"serve.max_ongoing_requests ({self.max_ongoing_requests}) must be >= "
                             f"serve.max_batch_size ({self.max_batch_size}), or batches never fill")
        return self


class RayConfig(_Model):
    num_cpus: int | None = Field(None, ge=1, description="Logical CPUs of the embedded local Ray (default: all).")


class Config(_Model):
    """A whole pipeline: data -> train -> compress -> store -> serve."""

    name: str = Field("digits", pattern=NAME_PATTERN, description="Model name served over REST.")
    seed: int = Field(0, description="Seeds the split, the augmentation and the model initialisation.")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _dynamic_needs_linear_only(self) -> Config:
        # ONNX Runtime's dynamic int8 convolution is several times slower than fp32 on CPUs: static it is.
        for name, steps in self.compress.recipes.items():
            for i, step in enumerate(steps):
                if step.op == "quantize" and step.mode == "dynamic" and self.model.arch != "mlp":
                    raise ValueError(f"compress.recipes.{name}.{i}.quantize.mode: dynamic is for Linear-only models "
                                     f"(model.arch mlp); {self.model.arch} has convolutions: use static")
        return self

    def rng_seed(self) -> int:
        """`seed` as every random generator downstream takes it (0 <= s < 2**32): a seed in that range
        is used as it is; any other integer (negative, huge) is hashed into it."""
        if 0 <= self.seed < 2**32:
            return self.seed
        return int.from_bytes(hashlib.blake2b(str(self.seed).encode(), digest_size=4).digest(), "big")

    def public_dict(self) -> dict[str, Any]:
        """The resolved config as plain data, secrets left out: safe to log and to write."""
        data = self.model_dump(mode="json")
        data["storage"]["s3"] = {k: v for k, v in data["storage"]["s3"].items() if k not in SECRET_FIELDS}
        data["compress"]["recipes"] = {name: [step_as_config(step) for step in steps]
                                       for name, steps in self.compress.recipes.items()}
        return data


def upgrade(tree: dict[str, Any]) -> dict[str, Any]:
    """A run's stored config in today's form: runs made before `compress.recipes` had `compress.int8`, a
    switch for the one int8 variant."""
    compress = tree.setdefault("compress", {}) if isinstance(tree, dict) else {}
    if isinstance(compress, dict):
        if "int8" in compress:
            compress.setdefault("recipes", {"int8": ["quantize"]} if compress.pop("int8") else {})
        compress.setdefault("recipes", {"int8": ["quantize"]})
    return tree


def recipes_named(overrides: dict[str, Any]) -> list[str] | None:
    """The recipes that `--set` overrides name (`compress.recipes={a: [...]}` or `compress.recipes.a=[...]`),
    or None when they name none."""
    names, named = [], False
    for key, value in overrides.items():
        if key == "compress" and isinstance(value, dict) and "recipes" in value:
            key, value = "compress.recipes", value["recipes"]
        if key == "compress.recipes":
            names += [str(name) for name in value] if isinstance(value, dict) else []
            named = True
        elif key.startswith("compress.recipes."):
            names.append(key.split(".")[2])
            named = True
    return names if named else None


def short_finetunes(cfg: Config, epochs: int = SMOKE_FINETUNE_EPOCHS) -> Config:
    """`cfg` with every finetune step of at most `epochs` epochs (`--smoke-test`)."""
    recipes = {name: [step.model_copy(update={"epochs": min(step.epochs, epochs)}) if step.op == "finetune" else step
                      for step in steps] for name, steps in cfg.compress.recipes.items()}
    return cfg.model_copy(update={"compress": cfg.compress.model_copy(update={"recipes": recipes})})


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` -> ("key.sub", value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.epochs=5")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: value is not valid YAML ({err.problem})") from None


def _format_error(err: ValidationError) -> str:
    # An unknown key first: a misspelt option also leaves the real one missing, and the typo is the news.
    first = next((e for e in err.errors() if e["type"] == "extra_forbidden"), err.errors()[0])
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if any(part in SECRET_FIELDS for part in first["loc"]):
        return f"{loc}: {msg} (value not shown: it is a secret)"
    if first["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if first["type"] == "missing":
        return f"{loc}: required"
    if msg.startswith(loc) or not loc:
        return msg
    return f"{loc}: {msg}" if "(got" in msg else f"{loc}: {msg} (got {first['input']!r})"


def load(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config, apply dotted overrides, validate. Raises ConfigError naming the key."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.MarkedYAMLError as err:  # FILE:LINE:COLUMN, as compilers and editors read them
        # A key missing its colon is noticed a line later; the key itself is where the mistake is.
        simple_key = err.context == "while scanning a simple key" and err.context_mark
        mark = simple_key or err.problem_mark or err.context_mark
        raise ConfigError(f"{path}:{mark.line + 1}:{mark.column + 1}: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return validate(tree, overrides)


def validate(tree: dict[str, Any], overrides: dict[str, Any] | None = None) -> Config:
    """Apply dotted overrides to a config tree and validate it. Raises ConfigError naming the key."""
    for key, value in (overrides or {}).items():
        _set_path(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
