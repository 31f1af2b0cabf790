"""What one stage hands the next: typed records beside the Config, validated wherever a run is read.

The data stage writes `DataStats` to data/stats.json, the train stage `TrainSummary` to train.json, the
compress stage a `Variant` per model to models/<name>/meta.json (and all of them into report.json). A
later stage reads them back through `read`, so a renamed or missing key fails at the boundary, naming
the file and the field, not three modules later. No Ray or torch imports here.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raypipe.config import NAME_PATTERN, VARIANT_PATTERN, ConfigError

if TYPE_CHECKING:
    from raypipe.storage import RunPaths

R = TypeVar("R", bound="Record")

# Names that serving turns into paths and URL segments, checked by the config's own rules when read back.
ModelName = Annotated[str, Field(pattern=NAME_PATTERN)]
VariantName = Annotated[str, Field(pattern=VARIANT_PATTERN)]


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def read(cls: type[R], paths: RunPaths, rel: str) -> R:
        """The record stored at `rel` in the run; ConfigError naming the file and field if it does not fit."""
        return cls.parse(paths.read_bytes(rel), f"{paths.uri}/{rel}")

    @classmethod
    def parse(cls: type[R], data: bytes, where: str) -> R:
        """The record in `data` (JSON bytes already read, and checked, from the file `where`)."""
        try:
            tree = json.loads(data)
        except ValueError as err:
            raise ConfigError(f"{where}: not valid JSON ({err})") from None
        try:
            return cls.model_validate(tree)
        except ValidationError as err:
            first = err.errors()[0]
            loc, msg = [str(p) for p in first["loc"]], first["msg"]
            if loc[-1:] == ["[key]"]:  # a mapping's key, such as a model name in bundle.json
                loc, msg = loc[:-2], f"key {first['input']!r}: {msg}"
            elif first["type"] == "string_pattern_mismatch":
                msg += f" (got {first['input']!r})"
            raise ConfigError(f"{where}: {'.'.join(loc)}: {msg}") from None

    def write(self, paths: RunPaths, rel: str) -> None:
        paths.write_json(rel, self.model_dump(mode="json"))


class Standardize(Record):
    mean: list[float] = Field(description="Per input feature, fitted on the train split.")
    std: list[float]


class DataStats(Record):
    """data/stats.json: what the data stage found and wrote."""

    source: str
    format: str
    features: int = Field(description="Inputs per row (an image's C x H x W).")
    image_shape: list[int] = Field(description="[C, H, W] for images, [features] for tabular rows.")
    classes: list[str]
    num_classes: int
    rows_read: int
    rows_dropped: dict[str, int] = Field(description="By reason: nan, label, duplicate, outlier.")
    rows: dict[str, int] = Field(description="Per split: train, val, test.")
    shards: dict[str, int]
    augmentations: list[str]
    standardize: Standardize

    def is_image(self) -> bool:
        return len(self.image_shape) == 3


class Epoch(Record):
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    workers: int
    weights_drift: float = Field(0.0, description="Spread of a weight checksum across workers; 0 in sync.")


class TrainSummary(Record):
    """train.json: what the train stage did; compression reads `checkpoint`."""

    history: list[Epoch]
    samples_per_second: float | None
    precision: str
    device: str
    workers: int
    best_epoch: int
    best_val_accuracy: float
    restarts: int
    resizes: int
    start_epochs: list[int] = Field(default_factory=list, description="The epoch each start of the workers began from.")
    start_workers: list[int] = Field(default_factory=list, description="The worker count of each start.")
    checkpoint: str = Field(description="The best checkpoint, relative to the run.")


class Variant(Record):
    """models/<name>/meta.json: one compressed (or not) model and the guard's verdict."""

    name: VariantName
    format: str
    uri: str
    sha256: str
    size_bytes: int
    val_accuracy: float | None = Field(
        None, description="Accuracy on the validation split: what the guard and promotion decide on. None in "
                          "runs made before it was recorded (they decided on test_accuracy).")
    test_accuracy: float = Field(description="Accuracy on the test split, which no decision looks at.")
    latency_ms: dict[str, float]
    accepted: bool = False
    reason: str = ""
    input: str = "input"
    output: str = "logits"
    recipe: list[dict[str, Any]] = Field(default_factory=list, description="The steps as run, with what each found.")
    params: int = Field(0, description="Parameters of the network (int8 variants: of the network quantized).")
    macs: int = Field(0, description="Multiply-accumulates per sample.")
    size_ratio: float = Field(1.0, description="fp32's file size / this one's.")
    speedup_b64: float = Field(1.0, description="fp32's latency at batch 64 / this one's.")
    latency_spread: float = Field(
        0.0, description="The interquartile range of the batch-64 timing rounds over their median: the noise "
                         "under which `promote: fastest` treats two variants as equally fast.")


class ReportedConfig(Record):
    """The run's config as report.json holds it; serving reads its `name`, the model's name."""

    model_config = ConfigDict(extra="allow")

    name: ModelName


class RunReport(Record):
    """The part of report.json that serving reads (the rest is for people and scripts)."""

    model_config = ConfigDict(extra="ignore")

    variants: list[Variant]
    promoted: VariantName
    config: ReportedConfig
