"""Evaluate a model directory on a split and write `metrics.json` plus a self-contained report.

`jobs/evaluate.py` and the training job's final evaluation both call `evaluate_model` and
`write_report`, so there is one implementation of what "the model's test metrics" means.

The forward pass uses the fused attention path (no weights), so evaluating costs what decoding
plus inference costs; only the handful of images drawn in the report run a second forward pass
that returns attention weights. A model without attention maps (the ResNet-18 baseline) is
evaluated the same way, and its report says that it has no overlays instead of drawing them.

At Kaggle's 525 classes the report stays readable and bounded: the full confusion matrix is an
unnamed overview ordered by co-confusion, next to a named close-up of the most confused classes;
the per-class table sits folded and sorts by any column.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from vitbirds.data.images import load_rgb
from vitbirds.data.loading import ImageDataset, SkippedImage
from vitbirds.data.sources import Sample, model_labels
from vitbirds.data.transforms import EVAL_RESIZE_SCALE, eval_transform
from vitbirds.errors import ConfigError, DataError
from vitbirds.evaluation.metrics import ClassificationReport, ClassMetrics, classification_report
from vitbirds.lifecycle.tracking import Tracker
from vitbirds.model.explain import (
    HeadFusion,
    Method,
    attention_maps,
    denormalize,
    render_overlay,
)
from vitbirds.model.files import LoadedModel
from vitbirds.precision import FP32, Precision
from vitbirds.progress import default_progress

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
WORST_CLASSES = 10
TICK_LABEL_LIMIT = 40  # beyond this many classes, names on the confusion axes are unreadable
ZOOM_CLASSES = 30  # classes in the named close-up of the confusion matrix, when there are more


@dataclass
class EvaluationConfig:
    """How to run the model over a split and what the report shows."""

    batch_size: int = 64
    chunk_size: int = 2048  # images decoded and held in memory at once
    overlays: int = 12  # attention overlays in the report, half right and half wrong if possible
    overlay_size: int = 160  # display side of each overlay panel (decoded sharp, same crop)
    attention_method: Method = "rollout"
    head_fusion: HeadFusion = "mean"
    discard_ratio: float = 0.0
    seed: int = 0  # which images get overlays


@dataclass
class Overlay:
    """One attention overlay of the report."""

    path: Path
    true_name: str
    predicted_name: str
    confidence: float
    png: bytes

    @property
    def correct(self) -> bool:
        return self.true_name == self.predicted_name


@dataclass
class EvaluationResult:
    """Everything `write_report` needs; `labels`/`probs` are in the model's class order."""

    report: ClassificationReport
    labels: np.ndarray
    probs: np.ndarray
    samples: list[Sample]  # the evaluated ones, in the order of `labels`
    skipped: list[SkippedImage]
    overlays: list[Overlay]
    split: str
    model_name: str
    model_version: str
    data_label: str  # where the images came from, for the reader
    data_synthetic: bool
    model_trained_on_synthetic: bool
    history: list[dict[str, float]] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    no_overlays_reason: str | None = None  # set when the model cannot draw attention overlays
    precision: str = "fp32"  # what the forward passes computed in

    @property
    def synthetic(self) -> bool:
        return self.data_synthetic or self.model_trained_on_synthetic

    def to_dict(self) -> dict[str, Any]:
        """metrics.json: the metrics plus what was evaluated, for machines and trackers."""
        return {
            "split": self.split,
            "model": {"name": self.model_name, "version": self.model_version},
            "data": {
                "label": self.data_label,
                "synthetic": self.data_synthetic,
                "model_trained_on_synthetic": self.model_trained_on_synthetic,
                "evaluated": len(self.samples),
                "skipped": [{"path": str(s.path), "reason": s.reason} for s in self.skipped],
            },
            "timing": self.timing,
            "precision": self.precision,
            "overlays": {"count": len(self.overlays), "unavailable": self.no_overlays_reason},
            "metrics": self.report.to_dict(),
        }


def evaluate_model(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    class_names: Sequence[str],
    *,
    config: EvaluationConfig | None = None,
    split: str = "test",
    data_label: str = "",
    data_synthetic: bool = False,
    device: torch.device | str = "cpu",
    precision: Precision = FP32,
) -> EvaluationResult:
    """Run `loaded` over `samples` (labels index `class_names`, the dataset's classes), its
    forward passes and attention overlays at `precision` (probabilities are fp32 softmaxes).

    Dataset classes are matched to the model's by name, so a dataset subset or another class
    order works; a class the model does not know is a DataError naming it.
    """
    config = config or EvaluationConfig()
    if not samples:
        raise DataError(f"split {split!r} has no images to evaluate")
    metadata = loaded.metadata
    to_model = _label_mapping(class_names, metadata.class_names, samples)
    model = loaded.model.to(device).eval()
    transform = eval_transform(metadata.image_size, metadata.mean, metadata.std)
    decode_size = round(metadata.image_size * EVAL_RESIZE_SCALE)

    started = time.perf_counter()
    decode_s = 0.0
    evaluated: list[Sample] = []
    skipped: list[SkippedImage] = []
    probs: list[torch.Tensor] = []
    for start in range(0, len(samples), config.chunk_size):
        chunk_started = time.perf_counter()
        dataset = ImageDataset(
            samples[start : start + config.chunk_size], transform, decode_size=decode_size
        )
        decode_s += time.perf_counter() - chunk_started
        evaluated += dataset.samples
        skipped += dataset.skipped
        with torch.inference_mode():
            batches = DataLoader(dataset, batch_size=config.batch_size)
            for images, _ in default_progress()(batches, desc=f"evaluate {split}"):
                with precision.autocast():
                    logits = model(images.to(device))
                probs.append(logits.float().softmax(dim=-1).cpu())
    inference_s = time.perf_counter() - started

    started = time.perf_counter()
    labels = np.array([to_model[s.label] for s in evaluated], dtype=np.int64)
    prob_array = torch.cat(probs).numpy()
    report = classification_report(labels, prob_array, list(metadata.class_names))
    metrics_s = time.perf_counter() - started

    started = time.perf_counter()
    no_overlays = no_attention_reason(loaded)
    overlays = (
        []
        if no_overlays
        else _overlays(loaded, evaluated, labels, prob_array, config, device, precision)
    )
    overlays_s = time.perf_counter() - started
    return EvaluationResult(
        report=report,
        labels=labels,
        probs=prob_array,
        samples=evaluated,
        skipped=skipped,
        overlays=overlays,
        split=split,
        model_name=metadata.name,
        model_version=metadata.version,
        data_label=data_label,
        data_synthetic=data_synthetic,
        model_trained_on_synthetic=metadata.synthetic,
        history=list(metadata.history),
        timing={
            "decode_s": decode_s,
            "decode_and_forward_s": inference_s,
            "metrics_s": metrics_s,
            "overlays_s": overlays_s,
            "images_per_s": len(evaluated) / (inference_s + metrics_s + overlays_s),
        },
        no_overlays_reason=no_overlays,
        precision=precision.name,
    )


def no_attention_reason(loaded: LoadedModel) -> str | None:
    """Why `loaded` cannot draw attention overlays (a CNN has no attention), else None."""
    if loaded.metadata.attention_maps:
        return None
    return (
        f"architecture {loaded.metadata.architecture!r} has no attention maps, so this report "
        "has no attention overlays"
    )


def _label_mapping(
    dataset_classes: Sequence[str], model_classes: Sequence[str], samples: Sequence[Sample]
) -> dict[int, int]:
    """Dataset label -> model output index, for the labels that occur in `samples` (names
    matched by `vitbirds.data.sources.class_key`, as every scorer matches them)."""
    known = model_labels(dataset_classes, model_classes)
    used = sorted({s.label for s in samples})
    unknown = [dataset_classes[label] for label in used if label not in known]
    if unknown:
        raise DataError(
            f"{len(unknown)} class(es) of the data are not among the model's "
            f"{len(model_classes)} classes, e.g. {unknown[:5]}"
        )
    return {label: known[label] for label in used}


def _overlays(
    loaded: LoadedModel,
    samples: list[Sample],
    labels: np.ndarray,
    probs: np.ndarray,
    config: EvaluationConfig,
    device: torch.device | str,
    precision: Precision,
) -> list[Overlay]:
    """Attention overlays of a seeded choice of images, right and wrong ones mixed."""
    if config.overlays <= 0:
        return []
    predicted = probs.argmax(axis=1)
    rng = np.random.default_rng(config.seed)
    right = rng.permutation(np.flatnonzero(predicted == labels))
    wrong = rng.permutation(np.flatnonzero(predicted != labels))
    take_wrong = min(len(wrong), max(config.overlays // 2, config.overlays - len(right)))
    chosen = [*wrong[:take_wrong], *right[: config.overlays - take_wrong]]
    if not chosen:
        return []
    metadata = loaded.metadata
    model_input = eval_transform(metadata.image_size, metadata.mean, metadata.std)
    display = eval_transform(config.overlay_size, metadata.mean, metadata.std)
    inputs, shown = [], []
    for i in chosen:
        # Same resize-and-centre-crop at two sizes: the map of the small input lands on the
        # same region of the sharp display image.
        image = load_rgb(samples[i].path, short_side=round(config.overlay_size * EVAL_RESIZE_SCALE))
        inputs.append(model_input(image))
        shown.append(denormalize(display(image), metadata.mean, metadata.std))
    _, maps = attention_maps(
        loaded.model,
        torch.stack(inputs).to(device),
        method=config.attention_method,
        head_fusion=config.head_fusion,
        discard_ratio=config.discard_ratio,
        precision=precision,
    )
    names = metadata.class_names
    return [
        Overlay(
            path=samples[i].path,
            true_name=names[labels[i]],
            predicted_name=names[predicted[i]],
            confidence=float(probs[i, predicted[i]]),
            png=render_overlay(image, patch_map.cpu()),
        )
        for i, image, patch_map in zip(chosen, shown, maps, strict=True)
    ]


# ---------------------------------------------------------------------------------------------
# The report


def write_report(result: EvaluationResult, out_dir: str | Path) -> dict[str, Path]:
    """Writes metrics.json and report.html into `out_dir`; returns their paths by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / METRICS_FILE
    metrics_path.write_text(json.dumps(result.to_dict(), indent=1, allow_nan=False) + "\n")
    report_path = out_dir / REPORT_FILE
    report_path.write_text(render_html(result), encoding="utf-8")
    return {"metrics": metrics_path, "report": report_path}


def log_to_tracker(result: EvaluationResult, paths: Mapping[str, Path], tracker: Tracker) -> None:
    """Scalar metrics under `<split>_<name>`, the two files as artifacts under `evaluation/`."""
    summary = result.report.summary()
    tracker.log_metrics(
        {f"{result.split}_{k}": v for k, v in summary.items() if isinstance(v, int | float)}
    )
    tracker.set_tags({f"{result.split}_synthetic": str(result.synthetic)})
    for path in paths.values():
        tracker.log_artifact(path, "evaluation")


_METRIC_LABELS = {
    "num_samples": "Images evaluated",
    "num_classes": "Classes (model outputs)",
    "top1_accuracy": "Top-1 accuracy",
    "top5_accuracy": "Top-5 accuracy",
    "macro_precision": "Precision (macro)",
    "macro_recall": "Recall (macro)",
    "macro_f1": "F1 (macro)",
    "weighted_precision": "Precision (weighted)",
    "weighted_recall": "Recall (weighted)",
    "weighted_f1": "F1 (weighted)",
    "cohen_kappa": "Cohen's kappa",
    "auroc_macro": "AUROC (one-vs-rest, macro)",
    "auroc_classes_used": "Classes in the AUROC average",
    "ece": "Expected calibration error (15 bins)",
}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.banner { background: #fff3cd; border: 2px solid #d39e00; padding: 0.6em 1em; font-weight: bold; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 1em; }
figure { margin: 0; } figcaption { font-size: 0.9em; }
.wrong { color: #b00020; } .right { color: #1b5e20; }
img { max-width: 100%; }
#per-class-table th { cursor: pointer; }
"""

# Click a header of the per-class table to sort by it (numbers as numbers; again: reversed).
_SORT_SCRIPT = """
document.querySelectorAll("#per-class-table th").forEach((th, col) => th.addEventListener(
  "click", () => {
    const table = th.closest("table"), rows = [...table.rows].slice(1);
    const key = r => { const t = r.cells[col].textContent, n = parseFloat(t);
                       return isNaN(n) ? t : n; };
    const dir = th.dataset.dir = th.dataset.dir === "asc" ? "desc" : "asc";
    rows.sort((a, b) => { const x = key(a), y = key(b);
      return (x < y ? -1 : x > y ? 1 : 0) * (dir === "asc" ? 1 : -1); });
    rows.forEach(r => table.tBodies[0].appendChild(r));
  }));
"""


def render_html(result: EvaluationResult) -> str:
    """One HTML page with every figure embedded as a base64 PNG (no external resources)."""
    report = result.report
    title = f"{result.model_name} {result.model_version}: {result.split} split"
    if result.synthetic:
        title = f"[SYNTHETIC] {title}"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
    ]
    if result.synthetic:
        parts.append(_synthetic_banner(result))
    parts += [
        _summary_section(result),
        _metrics_section(report),
        _learning_curves_section(result.history),
        _confusion_section(report),
        _top_confusions_section(report),
        _worst_classes_section(report),
        _per_class_section(report),
        _attention_section(result),
        _reliability_section(report),
        "</body></html>",
    ]
    return "\n".join(parts)


def _e(value: object) -> str:
    return html.escape(str(value))


def _section(key: str, heading: str, body: str) -> str:
    return f'<section id="{key}">\n<h2>{_e(heading)}</h2>\n{body}\n</section>'


def _table(key: str, header: Sequence[str] | None, rows: Sequence[Sequence[object]]) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{_e(c)}</td>' if isinstance(c, int | float) else f"<td>{_e(c)}</td>"
            for c in row
        )
        body.append(f"<tr>{cells}</tr>")
    return f'<table id="{key}-table">{head}{"".join(body)}</table>'


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _fmt(value: float | int | None) -> str:
    if value is None:
        return "undefined"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def _synthetic_banner(result: EvaluationResult) -> str:
    what = []
    if result.data_synthetic:
        what.append("the images evaluated here are synthetic")
    if result.model_trained_on_synthetic:
        what.append("the model was trained on synthetic data")
    return (
        f'<p class="banner" id="synthetic-banner">SYNTHETIC: {_e(" and ".join(what))}. '
        "These numbers say nothing about real bird photos.</p>"
    )


def _summary_section(result: EvaluationResult) -> str:
    rows = [
        ("Model", f"{result.model_name} {result.model_version}"),
        ("Data", result.data_label or "(not given)"),
        ("Split", result.split),
        ("Images evaluated", len(result.samples)),
        ("Images skipped (undecodable)", len(result.skipped)),
        ("Compute precision", result.precision),
        (
            "Throughput (images/s: decode, forward, metrics, overlays)",
            round(result.timing["images_per_s"], 1),
        ),
    ]
    skipped = ""
    if result.skipped:
        items = "".join(f"<li>{_e(s.reason)}</li>" for s in result.skipped[:20])
        skipped = f"<p>Skipped files:</p><ul>{items}</ul>"
    return _section("summary", "What was evaluated", _table("summary", None, rows) + skipped)


def _metrics_section(report: ClassificationReport) -> str:
    summary = report.summary()
    rows = "".join(
        f'<tr data-key="{key}"><td>{_e(label)}</td>'
        f'<td class="num">{_e(_fmt(summary[key]))}</td></tr>'
        for key, label in _METRIC_LABELS.items()
    )
    note = (
        "<p>Macro averages weight every class equally (over the classes present in the labels "
        "or the predictions); weighted averages weight by support. AUROC uses the "
        "probabilities, one class against the rest, over the classes that have both positives "
        "and negatives in this split.</p>"
    )
    table = f'<table id="metrics-table"><tr><th>Metric</th><th>Value</th></tr>{rows}</table>'
    return _section("metrics", "Metrics", table + note)


def _learning_curves_section(history: list[dict[str, float]]) -> str:
    if not history:
        body = "<p>The model's metadata holds no training history.</p>"
    else:
        body = _img(learning_curves_png(history), "learning curves")
    return _section("learning-curves", "Learning curves", body)


def _confusion_section(report: ClassificationReport) -> str:
    c = report.num_classes
    names = [p.name for p in report.per_class]
    ordering = (
        "Classes in label order, named on the axes"
        if c <= TICK_LABEL_LIMIT
        else "Classes ordered so that classes confused with each other sit together "
        "(hierarchical clustering of the confusions); too many to name: the close-up below "
        "names the most confused ones"
    )
    body = (
        f"<p>Rows: true class, columns: predicted class, each row normalised by the class's "
        f"support; colour on a square-root scale so rare confusions stay visible. {ordering}.</p>"
        + _img(confusion_png(report.confusion, names), "confusion")
    )
    if c > TICK_LABEL_LIMIT:
        zoom = most_confused_classes(report.confusion, ZOOM_CLASSES)
        if len(zoom) > 1:
            body += (
                f'<h3 id="confusion-zoom">Close-up: the {len(zoom)} classes most involved in '
                "confusions</h3><p>The same rates for these classes only (each row still divided "
                "by the class's whole support), ordered so that mutual confusions sit together."
                "</p>" + _img(confusion_png(report.confusion, names, zoom), "confusion close-up")
            )
    return _section("confusion-matrix", "Confusion matrix", body)


def _top_confusions_section(report: ClassificationReport) -> str:
    if not report.top_confusions:
        return _section("top-confusions", "Most confused pairs", "<p>No confusions.</p>")
    rows = [
        (p.true_name, p.predicted_name, p.count, f"{100 * p.rate:.1f}%")
        for p in report.top_confusions
    ]
    header = ["True class", "Predicted as", "Images", "Share of the true class"]
    return _section("top-confusions", "Most confused pairs", _table("top-confusions", header, rows))


def worst_classes(report: ClassificationReport, count: int = WORST_CLASSES) -> list[ClassMetrics]:
    """The `count` classes with support in this split and the lowest F1 (then most support)."""
    present = [row for row in report.per_class if row.support > 0]
    return sorted(present, key=lambda row: (row.f1, -row.support, row.index))[:count]


def _worst_classes_section(report: ClassificationReport) -> str:
    rows = []
    for row in worst_classes(report):
        confusion_row = report.confusion[row.index].copy()
        confusion_row[row.index] = 0
        mistaken = (
            report.per_class[int(confusion_row.argmax())].name if confusion_row.any() else "-"
        )
        rows.append(
            (row.name, row.support, _fmt(row.precision), _fmt(row.recall), _fmt(row.f1), mistaken)
        )
    header = ["Class", "Support", "Precision", "Recall", "F1", "Most often predicted instead"]
    return _section(
        "worst-classes",
        f"The {WORST_CLASSES} worst classes by F1",
        _table("worst-classes", header, rows),
    )


def _per_class_section(report: ClassificationReport) -> str:
    rows = [
        (
            r.name,
            r.support,
            r.predicted,
            _fmt(r.precision),
            _fmt(r.recall),
            _fmt(r.f1),
            _fmt(r.auroc),
        )
        for r in report.per_class
    ]
    header = ["Class", "Support", "Predicted", "Precision", "Recall", "F1", "AUROC"]
    body = (
        f"<details><summary>All {report.num_classes} classes, in label order (click a column "
        "header to sort)</summary>"
        + _table("per-class", header, rows)
        + f"</details><script>{_SORT_SCRIPT}</script>"
    )
    return _section("per-class", "Every class", body)


def _attention_section(result: EvaluationResult) -> str:
    if result.no_overlays_reason:
        body = f'<p id="no-overlays">{_e(result.no_overlays_reason.capitalize())}.</p>'
        return _section("attention", "Where the model looks", body)
    figures = []
    for overlay in result.overlays:
        mark = "right" if overlay.correct else "wrong"
        caption = (
            f'<span class="{mark}">{"✓" if overlay.correct else "✗"}</span> '
            f"true: <b>{_e(overlay.true_name)}</b> · predicted: <b>{_e(overlay.predicted_name)}"
            f"</b> ({overlay.confidence:.2f})<br><small>{_e(overlay.path.name)}</small>"
        )
        figures.append(
            f'<figure class="overlay {mark}">{_img(overlay.png, overlay.path.name)}'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    intro = (
        "<p>Attention rollout (Abnar &amp; Zuidema 2020): how much of the final CLS token flows "
        "from each image patch, through every layer. Each image: original | heat map | overlay. "
        "Wrong predictions first.</p>"
    )
    return _section(
        "attention", "Where the model looks", intro + f'<div class="grid">{"".join(figures)}</div>'
    )


def _reliability_section(report: ClassificationReport) -> str:
    body = (
        f"<p>Expected calibration error: {report.ece:.4f}. Bars: accuracy of the images whose "
        "top probability falls in each bin; a calibrated model's bars touch the diagonal.</p>"
        + _img(reliability_png(report), "reliability diagram")
    )
    return _section("reliability", "Reliability diagram", body)


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib's object API: no pyplot global state, safe inside Ray workers)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


_CURVES = (
    ("Loss", ("train_loss", "val_loss")),
    ("Accuracy", ("train_top1", "val_top1", "val_top5")),
)


def learning_curves_png(history: list[dict[str, float]]) -> bytes:
    """Loss and accuracy per epoch, one panel each, for whichever of those keys exist."""
    figure = Figure(figsize=(10, 3.5))
    axes = figure.subplots(1, 2)
    epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
    for ax, (name, keys) in zip(axes, _CURVES, strict=True):
        for key in keys:
            points = [(e, row[key]) for e, row in zip(epochs, history, strict=True) if key in row]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    return _png(figure)


def confusion_order(confusion: np.ndarray) -> np.ndarray:
    """A class order that puts mutually confused classes next to each other.

    Average-linkage clustering on 1 - (symmetrised, row-normalised confusion); classes never
    confused keep their label order at the end of the dendrogram's leaves.
    """
    support = confusion.sum(axis=1, keepdims=True)
    rates = np.divide(confusion, support, out=np.zeros(confusion.shape), where=support > 0)
    similarity = rates + rates.T
    np.fill_diagonal(similarity, 0.0)
    if similarity.max() <= 0 or len(confusion) < 3:
        return np.arange(len(confusion))
    distance = 1.0 - similarity / similarity.max()
    np.fill_diagonal(distance, 0.0)
    return leaves_list(linkage(squareform(distance, checks=False), method="average"))


def most_confused_classes(confusion: np.ndarray, limit: int) -> np.ndarray:
    """Up to `limit` classes with the largest share of confusions, as the true class or as the
    prediction (row-normalised rates), in an order that puts mutual confusions side by side."""
    support = confusion.sum(axis=1, keepdims=True)
    rates = np.divide(confusion, support, out=np.zeros(confusion.shape), where=support > 0)
    np.fill_diagonal(rates, 0.0)
    involvement = rates.sum(axis=0) + rates.sum(axis=1)
    involved = np.flatnonzero(involvement > 0)
    chosen = np.sort(involved[np.argsort(-involvement[involved], kind="stable")][:limit])
    return chosen[confusion_order(confusion[np.ix_(chosen, chosen)])]


def confusion_png(
    confusion: np.ndarray, class_names: Sequence[str], classes: np.ndarray | None = None
) -> bytes:
    """Row-normalised confusion matrix; named axes up to TICK_LABEL_LIMIT classes, else ordered
    by co-confusion without names. `classes` draws only those rows and columns, in that order
    and named (rates still over each class's whole support)."""
    c = len(confusion)
    support = confusion.sum(axis=1, keepdims=True)
    rates = np.divide(confusion, support, out=np.zeros(confusion.shape), where=support > 0)
    if classes is not None:
        order, c = np.asarray(classes), len(classes)
    else:
        order = np.arange(c) if c <= TICK_LABEL_LIMIT else confusion_order(confusion)
    rates = rates[np.ix_(order, order)]
    # Beyond the named range, at least ~2 screen pixels per class so no class row is dropped.
    side = 8 if c <= TICK_LABEL_LIMIT else min(14, max(8, 2 + 2.4 * c / 100))
    figure = Figure(figsize=(side, side))
    ax = figure.subplots()
    image = ax.imshow(rates, cmap="viridis", norm=PowerNorm(0.5, 0, 1), interpolation="nearest")
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if c <= TICK_LABEL_LIMIT:
        names = [class_names[i] for i in order]
        ax.set_xticks(range(c), names, rotation=90, fontsize=7)
        ax.set_yticks(range(c), names, fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    return _png(figure)


def reliability_png(report: ClassificationReport) -> bytes:
    """Accuracy per confidence bin against the diagonal, with the bin counts underneath."""
    figure = Figure(figsize=(5, 6))
    top, bottom = figure.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    bins = report.reliability
    centers = [(b.lower + b.upper) / 2 for b in bins]
    width = bins[0].upper - bins[0].lower
    accuracy = [b.accuracy or 0.0 for b in bins]
    top.bar(centers, accuracy, width=width * 0.95, color="#4c72b0", label="accuracy")
    confidence = [(x, b.confidence) for x, b in zip(centers, bins, strict=True) if b.count]
    if confidence:
        top.plot(*zip(*confidence, strict=True), "o", color="#dd8452", label="mean confidence")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"ECE = {report.ece:.4f}")
    top.legend(loc="upper left")
    bottom.bar(centers, [b.count for b in bins], width=width * 0.95, color="gray")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (top probability)")
    bottom.set_ylabel("images")
    return _png(figure)


# ---------------------------------------------------------------------------------------------
# Does attention point at the object? (synthetic data with known masks)


@dataclass
class AttentionCheck:
    """Rollout mass inside the object masks against the masks' share of the image.

    `ratio` = mean mass inside / mean area fraction: 1 is what a uniform map gives.
    """

    images: int
    mass_inside: float
    area_fraction: float
    ratio: float
    median_image_ratio: float

    def to_dict(self) -> dict[str, float | int]:
        return {
            "images": self.images,
            "mass_inside": self.mass_inside,
            "area_fraction": self.area_fraction,
            "ratio": self.ratio,
            "median_image_ratio": self.median_image_ratio,
        }


def attention_check(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    mask_of: Callable[[Path], Any],
    *,
    config: EvaluationConfig | None = None,
    device: torch.device | str = "cpu",
) -> AttentionCheck:
    """Rollout (per `config`) of each image vs its object mask (`mask_of(path)`: a mask image or
    array the size of the image, nonzero inside the object), both seen through the eval crop."""
    config = config or EvaluationConfig()
    reason = no_attention_reason(loaded)
    if reason:
        raise ConfigError(f"the attention check needs attention maps: {reason.split(',')[0]}")
    metadata = loaded.metadata
    size = metadata.image_size
    transform = eval_transform(size, metadata.mean, metadata.std)
    decode_size = round(size * EVAL_RESIZE_SCALE)
    crop = v2.Compose([v2.Resize(decode_size, antialias=True), v2.CenterCrop(size)])
    model = loaded.model.to(device).eval()
    inside, area, per_image = [], [], []
    for start in range(0, len(samples), config.batch_size):
        batch = samples[start : start + config.batch_size]
        decoded = [load_rgb(s.path, short_side=decode_size) for s in batch]
        images = torch.stack([transform(image) for image in decoded]).to(device)
        _, maps = attention_maps(
            model,
            images,
            method=config.attention_method,
            head_fusion=config.head_fusion,
            discard_ratio=config.discard_ratio,
        )
        maps = maps.cpu()
        masks = torch.stack([_mask_tensor(mask_of(s.path)) for s in batch])
        fractions = F.adaptive_avg_pool2d(crop(masks), maps.shape[-2:])[:, 0]
        mass = maps / maps.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        batch_inside = (mass * fractions).sum(dim=(-2, -1))
        batch_area = fractions.mean(dim=(-2, -1))
        inside += batch_inside.tolist()
        area += batch_area.tolist()
        per_image += (batch_inside / batch_area.clamp_min(1e-12)).tolist()
    mass_inside, area_fraction = float(np.mean(inside)), float(np.mean(area))
    return AttentionCheck(
        images=len(inside),
        mass_inside=mass_inside,
        area_fraction=area_fraction,
        ratio=mass_inside / area_fraction,
        median_image_ratio=float(np.median(per_image)),
    )


def _mask_tensor(mask: Any) -> torch.Tensor:
    """[1, H, W] float in {0, 1} from a PIL mask, a numpy array or a tensor."""
    array = np.asarray(mask)
    if array.ndim == 3:
        array = array[..., 0]
    return torch.from_numpy((array > 0).astype(np.float32))[None]
