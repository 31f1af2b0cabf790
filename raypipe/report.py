"""report.json (for machines), report.md and plots/*.png (for people)."""

from __future__ import annotations

import base64
import html
import io
import shlex
from importlib.metadata import version
from typing import Any

from raypipe import console
from raypipe.records import DataStats, TrainSummary, Variant
from raypipe.storage import RunPaths, sha256_bytes


def _pyplot():
    """matplotlib, imported only to draw (`raypipe show` and the summary need none of it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def versions() -> dict[str, str]:
    return {pkg: version(pkg) for pkg in ("raypipe", "ray", "torch", "onnxruntime")}


def build(paths: RunPaths, public_config: dict[str, Any], stats: DataStats, trained: TrainSummary,
          variants: list[Variant], promoted: str, hashes: dict[str, tuple[str, int]]) -> dict[str, Any]:
    """The report.json document; every field is described in the README. `hashes` holds (sha256, size) of
    the data files and the checkpoint, which the manifest reuses."""
    # One digest for the whole data set: over each file's path and sha256, in path order.
    dataset_sha = sha256_bytes("".join(f"{rel}:{sha}\n" for rel, (sha, _) in sorted(hashes.items())
                                       if rel.startswith("data/")).encode())
    return {
        "run_id": paths.run_id,
        "uri": paths.uri,
        "versions": versions(),
        "config": public_config,
        "data": stats.model_dump(include={"source", "rows_read", "rows_dropped", "rows", "shards", "augmentations"}),
        "train": {
            **trained.model_dump(mode="json", exclude={"checkpoint", "best_val_accuracy"}),
            "epochs": len(trained.history),
            "checkpoint": paths.child_uri(trained.checkpoint),
        },
        "variants": [v.model_dump(mode="json") for v in variants],
        "promoted": promoted,
        "lineage": {
            "dataset": dataset_sha,
            "checkpoint": hashes[trained.checkpoint][0],
            "artifacts": {v.name: v.sha256 for v in variants},
        },
    }


def _training_plot(history: list[dict[str, Any]]) -> bytes:
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    left.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    left.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    left.legend()
    right.plot(epochs, [h["val_accuracy"] for h in history], marker="o", color="tab:green")
    right.set(xlabel="epoch", ylabel="accuracy", title="Validation accuracy", ylim=(0, 1.01))
    for axis in (left, right):
        axis.grid(alpha=0.3)
    return _png(fig)


def decided_on(variant: dict[str, Any]) -> str:
    """The accuracy the guard and promotion read: validation; in runs made before it was recorded, test."""
    return "test_accuracy" if variant.get("val_accuracy") is None else "val_accuracy"


def pareto_front(variants: list[dict[str, Any]]) -> set[str]:
    """Names of the variants no other variant beats: at least as accurate (on the split decisions read), as
    fast at batch 64 and as small, and better in one of them."""
    def score(v):
        return (-v[decided_on(v)], v["latency_ms"]["batch_64"], v["size_bytes"])

    return {v["name"] for v in variants
            if not any(score(o) != score(v) and all(a <= b for a, b in zip(score(o), score(v))) for o in variants)}


def _variants_plot(variants: list[dict[str, Any]], max_drop: float) -> bytes:
    """Validation accuracy (what the guard reads) against latency at batch 64, each marker's area in
    proportion to the file size; the Pareto front ringed, rejected variants in red, the guard's floor dashed."""
    plt = _pyplot()
    front, largest = pareto_front(variants), max(v["size_bytes"] for v in variants)
    fig, axis = plt.subplots(figsize=(8, 4.6))
    for i, v in enumerate(sorted(variants, key=lambda v: v["latency_ms"]["batch_64"])):
        x, y = v["latency_ms"]["batch_64"], v[decided_on(v)]
        axis.scatter(x, y, s=60 + 900 * v["size_bytes"] / largest, alpha=0.6,
                     color="tab:blue" if v["accepted"] else "tab:red",
                     edgecolors="black" if v["name"] in front else "none", linewidths=2)
        axis.annotate(f"{v['name']} ({v['size_bytes'] / 1024:.0f} KiB)", (x, y), textcoords="offset points",
                      xytext=(8, 10 if i % 2 == 0 else -16), fontsize=8)  # alternate: neighbours' labels apart
    fp32 = next(v for v in variants if v["name"] == "fp32")
    axis.axhline(fp32[decided_on(fp32)] - max_drop, color="tab:red", linestyle="--", linewidth=1,
                 label=f"guard: fp32 accuracy - {max_drop}")
    axis.set(xlabel="latency at batch 64, one thread (ms)", ylabel="validation accuracy",
             title="Variants: marker area = file size; black ring = Pareto front; red = rejected")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    return _png(fig)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    return buffer.getvalue()


def _markdown(report: dict[str, Any]) -> str:
    data, trained = report["data"], report["train"]
    last = trained["history"][-1]
    lines = [
        f"# raypipe run `{report['run_id']}`",
        "",
        f"Data: {data['rows_read']} rows read, dropped {console.counts(data['rows_dropped'])}, "
        f"split {console.counts(data['rows'], zeros=True)}, "
        f"augmentations {', '.join(data['augmentations']) or 'none'}.",
        "",
        f"Training: {trained['workers']} workers on {trained['device']}, {trained['precision']}, "
        f"{trained['epochs']} epochs, {trained['restarts']} restarts; "
        f"final validation accuracy {last['val_accuracy']:.4f}; "
        f"{(trained['samples_per_second'] or 0):.0f} samples/s.",
        "",
        "![training curves](plots/training.png)",
        "",
        "Accepted and promoted on validation accuracy; test accuracy is the untouched estimate.",
        "",
        "| variant | recipe | params | MACs | size (KiB) | smaller | validation accuracy | test accuracy "
        "| latency b=1 (ms) | latency b=64 (ms) | faster b=64 | accepted | reason |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for v in report["variants"]:
        lines.append(
            f"| {v['name']}{' (promoted)' if v['name'] == report['promoted'] else ''} | {recipe_text(v['recipe'])} | "
            f"{v['params']} | {v['macs']} | {v['size_bytes'] / 1024:.1f} | {v['size_ratio']:.2f}x | "
            f"{_accuracy(v, 'val_accuracy')} | {v['test_accuracy']:.4f} | {v['latency_ms']['batch_1']:.3f} | "
            f"{v['latency_ms']['batch_64']:.3f} | {v['speedup_b64']:.2f}x | {'yes' if v['accepted'] else 'no'} | {v['reason']} |"
        )
    lines += ["", "![variants](plots/variants.png)", ""]
    return "\n".join(lines)


def _html(report: dict[str, Any], plots: dict[str, bytes]) -> str:
    """report.html: the summary, the variants table and the plots embedded as data: URIs, so the one file
    opens anywhere (local disk, an S3 presigned URL) with nothing beside it."""
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>"
        for row in _variant_rows(report))
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{name}</figcaption></figure>" for name, png in plots.items())
    summary = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in _facts(report))
    head = "".join(f"<th>{h}</th>" for h in VARIANT_COLUMNS)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>raypipe run {html.escape(report['run_id'])}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:72rem;color:#222}"
        "dl{display:grid;grid-template-columns:max-content 1fr;gap:.3rem 1.2rem}dt{font-weight:600}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}figure{margin:1.5rem 0}"
        f"</style></head><body><h1>raypipe run <code>{html.escape(report['run_id'])}</code></h1>"
        f"<dl>{summary}</dl><h2>Variants</h2><table><tr>{head}</tr>{rows}</table>"
        f"<h2>Plots</h2>{images}</body></html>\n"
    )


VARIANT_COLUMNS = ("variant", "size", "smaller", "val accuracy", "test accuracy", "b=1 ms", "b=64 ms", "faster",
                   "accepted")


def _variant_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per variant; a rejected one shows its drop on the split the guard read."""
    fp32 = next(v for v in report["variants"] if v["name"] == "fp32")
    return [(
        f"{v['name']}{' *' if v['name'] == report['promoted'] else ''}", _kib(v["size_bytes"]),
        _times(v, "size_ratio"), _accuracy(v, "val_accuracy"), f"{v['test_accuracy']:.4f}",
        f"{v['latency_ms']['batch_1']:.3f}", f"{v['latency_ms']['batch_64']:.3f}", _times(v, "speedup_b64"),
        "yes" if v["accepted"] else f"no, drop {fp32[decided_on(v)] - v[decided_on(v)]:.4f}",
    ) for v in report["variants"]]


def _accuracy(variant: dict[str, Any], key: str) -> str:
    """`0.9583`, or `-` in a run made before the figure was recorded."""
    return "-" if variant.get(key) is None else f"{variant[key]:.4f}"


def _times(variant: dict[str, Any], key: str) -> str:
    """`2.45x`, or `-` in a run made before the ratio was recorded."""
    return f"{variant[key]:.2f}x" if key in variant else "-"


def recipe_text(recipe: list[dict[str, Any]]) -> str:
    """The steps as run, short: `prune 0.5, finetune 5, quantize static`."""
    short = {"prune": "ratio", "finetune": "epochs", "quantize": "mode"}
    return ", ".join(f"{op} {options[short[op]]}" for step in recipe for op, options in step.items()) or "-"


def _kib(size: int) -> str:
    return f"{size / 1024:.1f} KiB"


def _facts(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The run in a few labelled lines: what `raypipe run` ends with and `raypipe show` prints."""
    data, trained = report["data"], report["train"]
    dropped = sum(data["rows_dropped"].values())
    reasons = console.counts(data["rows_dropped"])
    # The epoch whose checkpoint was kept as the best (and compressed), as the train stage reported it.
    best = next((h for h in trained["history"] if h["epoch"] == trained["best_epoch"]),
                max(trained["history"], key=lambda h: h["val_accuracy"]))
    promoted = next(v for v in report["variants"] if v["name"] == report["promoted"])
    return [
        ("data", f"{data['rows_read']} rows read, {data['rows_read'] - dropped} kept, {dropped} dropped ({reasons}); "
                 + " / ".join(f"{split} {n}" for split, n in data["rows"].items())),
        ("training", f"{trained['epochs']} epochs on {trained['workers']} {trained['device']} workers "
                     f"({trained['precision']}), {trained['restarts']} restarts; best epoch {best['epoch']}, "
                     f"validation accuracy {best['val_accuracy']:.4f}"),
        ("promoted", f"{promoted['name']}: {_kib(promoted['size_bytes'])}, test accuracy "
                     f"{promoted['test_accuracy']:.4f}"),
        ("run", report["uri"]),
        ("next", f"raypipe serve {shlex.quote(report['uri'])}"),
    ]


def summary(report: dict[str, Any]) -> str:
    """The run's summary as plain text lines (no colour, no control characters: any in the report's strings
    are shown escaped)."""
    facts = [(k, console.printable(v)) for k, v in _facts(report)]
    width = max(len(k) for k, _ in facts)
    rows = [tuple(console.printable(cell) for cell in row) for row in _variant_rows(report)]
    variants = console.columns([VARIANT_COLUMNS, *rows], right=(1, 2, 3, 4, 5, 6, 7))
    lines = [f"{k:<{width}}  {v}" for k, v in facts[:2]]
    lines += [f"{'variants' if i == 0 else '':<{width}}  {row}" for i, row in enumerate(variants)]
    lines += [f"{k:<{width}}  {v}" for k, v in facts[2:]]
    return "\n".join(lines)


def write(paths: RunPaths, report: dict[str, Any]) -> None:
    plots = {"training": _training_plot(report["train"]["history"]),
             "variants": _variants_plot(report["variants"], report["config"]["compress"]["max_accuracy_drop"])}
    for name, png in plots.items():
        paths.write_bytes(f"plots/{name}.png", png)
    paths.write_bytes("report.md", _markdown(report).encode())
    paths.write_bytes("report.html", _html(report, plots).encode())
    paths.write_json("report.json", report)
