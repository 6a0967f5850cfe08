"""The evaluation's record: metrics.json and one self-contained report.html (`write_report`), and
the numbers a tracker keeps (`log_to_tracker`).

At Kaggle's 525 classes the report stays readable and bounded: the full confusion matrix is an
unnamed overview ordered by co-confusion, next to a named close-up of the most confused classes;
the per-class table sits folded and sorts by any column.
"""

import json
from collections.abc import Mapping
from pathlib import Path

from vitbirds.evaluation.evaluate import EvaluationResult
from vitbirds.evaluation.figures import (
    TICK_LABEL_LIMIT,
    ZOOM_CLASSES,
    confusion_png,
    learning_curves_png,
    most_confused_classes,
    reliability_png,
)
from vitbirds.evaluation.html_page import escape, image, page, section, table
from vitbirds.evaluation.metrics import ClassificationReport, ClassMetrics
from vitbirds.lifecycle.tracking import Tracker

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
WORST_CLASSES = 10


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
.banner { background: #fff3cd; border: 2px solid #d39e00; padding: 0.6em 1em; font-weight: bold; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 1em; }
figure { margin: 0; } figcaption { font-size: 0.9em; }
.wrong { color: #b00020; } .right { color: #1b5e20; }
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
    return page(
        title,
        [
            _synthetic_banner(result) if result.synthetic else "",
            _summary_section(result),
            _metrics_section(report),
            _learning_curves_section(result.history),
            _confusion_section(report),
            _top_confusions_section(report),
            _worst_classes_section(report),
            _per_class_section(report),
            _attention_section(result),
            _reliability_section(report),
        ],
        _STYLE,
    )


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
        f'<p class="banner" id="synthetic-banner">SYNTHETIC: {escape(" and ".join(what))}. '
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
        items = "".join(f"<li>{escape(s.reason)}</li>" for s in result.skipped[:20])
        skipped = f"<p>Skipped files:</p><ul>{items}</ul>"
    return section("summary", "What was evaluated", table("summary", None, rows) + skipped)


def _metrics_section(report: ClassificationReport) -> str:
    summary = report.summary()
    rows = "".join(
        f'<tr data-key="{key}"><td>{escape(label)}</td>'
        f'<td class="num">{escape(_fmt(summary[key]))}</td></tr>'
        for key, label in _METRIC_LABELS.items()
    )
    note = (
        "<p>Macro averages weight every class equally (over the classes present in the labels "
        "or the predictions); weighted averages weight by support. AUROC uses the "
        "probabilities, one class against the rest, over the classes that have both positives "
        "and negatives in this split.</p>"
    )
    table = f'<table id="metrics-table"><tr><th>Metric</th><th>Value</th></tr>{rows}</table>'
    return section("metrics", "Metrics", table + note)


def _learning_curves_section(history: list[dict[str, float]]) -> str:
    if not history:
        body = "<p>The model's metadata holds no training history.</p>"
    else:
        body = image(learning_curves_png(history), "learning curves")
    return section("learning-curves", "Learning curves", body)


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
        + image(confusion_png(report.confusion, names), "confusion")
    )
    if c > TICK_LABEL_LIMIT:
        zoom = most_confused_classes(report.confusion, ZOOM_CLASSES)
        if len(zoom) > 1:
            body += (
                f'<h3 id="confusion-zoom">Close-up: the {len(zoom)} classes most involved in '
                "confusions</h3><p>The same rates for these classes only (each row still divided "
                "by the class's whole support), ordered so that mutual confusions sit together."
                "</p>" + image(confusion_png(report.confusion, names, zoom), "confusion close-up")
            )
    return section("confusion-matrix", "Confusion matrix", body)


def _top_confusions_section(report: ClassificationReport) -> str:
    if not report.top_confusions:
        return section("top-confusions", "Most confused pairs", "<p>No confusions.</p>")
    rows = [
        (p.true_name, p.predicted_name, p.count, f"{100 * p.rate:.1f}%")
        for p in report.top_confusions
    ]
    header = ["True class", "Predicted as", "Images", "Share of the true class"]
    return section("top-confusions", "Most confused pairs", table("top-confusions", header, rows))


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
    return section(
        "worst-classes",
        f"The {WORST_CLASSES} worst classes by F1",
        table("worst-classes", header, rows),
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
        + table("per-class", header, rows)
        + f"</details><script>{_SORT_SCRIPT}</script>"
    )
    return section("per-class", "Every class", body)


def _attention_section(result: EvaluationResult) -> str:
    if result.no_overlays_reason:
        body = f'<p id="no-overlays">{escape(result.no_overlays_reason.capitalize())}.</p>'
        return section("attention", "Where the model looks", body)
    figures = []
    for overlay in result.overlays:
        mark = "right" if overlay.correct else "wrong"
        caption = (
            f'<span class="{mark}">{"✓" if overlay.correct else "✗"}</span> '
            f"true: <b>{escape(overlay.true_name)}</b> · predicted: "
            f"<b>{escape(overlay.predicted_name)}</b> ({overlay.confidence:.2f})<br>"
            f"<small>{escape(overlay.path.name)}</small>"
        )
        figures.append(
            f'<figure class="overlay {mark}">{image(overlay.png, overlay.path.name)}'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    intro = (
        "<p>Attention rollout (Abnar &amp; Zuidema 2020): how much of the final CLS token flows "
        "from each image patch, through every layer. Each image: original | heat map | overlay. "
        "Wrong predictions first.</p>"
    )
    return section(
        "attention", "Where the model looks", intro + f'<div class="grid">{"".join(figures)}</div>'
    )


def _reliability_section(report: ClassificationReport) -> str:
    body = (
        f"<p>Expected calibration error: {report.ece:.4f}. Bars: accuracy of the images whose "
        "top probability falls in each bin; a calibrated model's bars touch the diagonal.</p>"
        + image(reliability_png(report), "reliability diagram")
    )
    return section("reliability", "Reliability diagram", body)
