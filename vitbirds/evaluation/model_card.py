"""MODEL_CARD.md: what an exported model is for, what it was trained and measured on, and where it
fails, in the sections of Mitchell et al. 2019, "Model Cards for Model Reporting".

Every export writes one beside `model.safetensors` (it travels with the model: registry versions,
gs:// copies and Serve's snapshots), and Serve answers it at `GET /model/card`. Everything in it
comes from the model's metadata and its evaluation; nothing is typed by hand, so a card cannot
describe another model than the one beside it.
"""

import math
from collections.abc import Mapping
from typing import Any

from vitbirds.evaluation.evaluate import EvaluationResult
from vitbirds.evaluation.report import worst_classes
from vitbirds.model.files import ModelMetadata

CARD_WORST_CLASSES = 5
CARD_CONFUSIONS = 5


def proportion_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95 % by default): honest at small `total` and at
    proportions near 0 or 1, where the normal approximation is not."""
    if total <= 0:
        return 0.0, 1.0
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def render_model_card(
    metadata: ModelMetadata,
    result: EvaluationResult | None,
    *,
    reference_metrics: Mapping[str, Any] | None = None,
    machine: str = "",
) -> str:
    """The card of the model `metadata` describes; `result` is its evaluation (None when the
    export skipped it), `reference_metrics` its valid split's, which the monitor compares traffic
    with, and `machine` where it was exported and evaluated."""
    parts = [
        f"# Model card: {metadata.name} {metadata.version}",
        _synthetic_warning(metadata),
        _details(metadata, machine),
        _intended_use(metadata),
        _training_data(metadata),
        _metrics(metadata, result),
        _failure_modes(result, reference_metrics),
        _caveats(metadata),
    ]
    return "\n\n".join(part for part in parts if part) + "\n"


def _synthetic_warning(metadata: ModelMetadata) -> str:
    if not metadata.synthetic:
        return ""
    return (
        "> **SYNTHETIC.** This model was trained on generated shapes, not photos of birds. "
        "Its numbers say nothing about real photos; it exists to exercise the pipeline."
    )


def _details(metadata: ModelMetadata, machine: str) -> str:
    train = metadata.extra.get("train_config", {})
    precision = metadata.extra.get("precision") or {}
    config = metadata.model_config
    shape = (
        f"ViT, {config.depth} blocks, width {config.dim}, {config.heads} heads, "
        f"{config.patch_size} px patches"
        if metadata.architecture == "vit"
        else metadata.architecture
    )
    rows = [
        ("Architecture", f"{shape}, {metadata.image_size} px input"),
        ("Preset", metadata.extra.get("preset") or "-"),
        ("Classes", str(len(metadata.class_names))),
        ("Trained", f"{train.get('epochs', '?')} epochs on {train.get('device', '?')}"),
        (
            "Compute precision",
            f"{precision.get('compute', 'fp32')} ({precision.get('reason', '')})",
        ),
        ("Weights", "fp32, safetensors (never pickled)"),
        ("Distilled from", str(metadata.extra.get("teacher") or "-")),
        ("Exported and evaluated on", machine or "-"),
        ("Created", metadata.created_at),
        ("Code version", metadata.code_version),
    ]
    return "## Model details\n\n" + _table(("", ""), rows)


def _intended_use(metadata: ModelMetadata) -> str:
    species = ", ".join(metadata.class_names[:8])
    more = f" and {len(metadata.class_names) - 8} more" if len(metadata.class_names) > 8 else ""
    return (
        "## Intended use\n\n"
        f"Naming which of its {len(metadata.class_names)} species ({species}{more}) a photo of "
        "one bird shows, with the top-k probabilities and an attention map to check the answer "
        "against.\n\n"
        "**Out of scope:** species outside that list (the model always names one of its own), "
        "photos without a bird or with several, decisions about individual animals or people, "
        "and any use where a wrong species has a cost without a person checking it."
    )


def _training_data(metadata: ModelMetadata) -> str:
    data = metadata.data
    sizes = data.get("sizes", {})
    rows = [
        ("Source", f"{data.get('source', '?')} at {data.get('root', '?')}"),
        ("Synthetic", "yes" if metadata.synthetic else "no"),
        ("Images", ", ".join(f"{sizes[k]} {k}" for k in sizes) or "-"),
        ("Fingerprint", f"`{data.get('fingerprint', '-')}` (class names, paths, sizes)"),
    ]
    return "## Training data\n\n" + _table(("", ""), rows)


def _metrics(metadata: ModelMetadata, result: EvaluationResult | None) -> str:
    if result is None:
        best = metadata.metrics.get("val_top1")
        shown = f"{best:.3f}" if isinstance(best, int | float) else "?"
        return f"## Metrics\n\nNot evaluated at export; best valid top-1 during training: {shown}."
    report = result.report
    n = report.num_samples
    rows = []
    for label, value in (
        ("Top-1 accuracy", report.top1_accuracy),
        ("Top-5 accuracy", report.top5_accuracy),
    ):
        low, high = proportion_interval(round(value * n), n)
        rows.append((label, f"{value:.3f}", f"{low:.3f} - {high:.3f}"))
    rows += [
        ("Macro F1", f"{report.macro_f1:.3f}", "-"),
        ("Expected calibration error", f"{report.ece:.3f}", "-"),
    ]
    return (
        f"## Metrics\n\nOn the {result.split} split: {n} images of {report.num_classes} classes "
        f"({result.data_label or 'data as recorded above'}); {len(result.skipped)} undecodable "
        "images left out. Intervals: 95 % Wilson score.\n\n"
        + _table(("Metric", "Value", "95 % interval"), rows)
        + "\n\nCalibration: an expected calibration error near 0 means the top probability can be "
        "read as the chance of being right; the report's reliability diagram shows where not."
    )


def _failure_modes(
    result: EvaluationResult | None, reference_metrics: Mapping[str, Any] | None
) -> str:
    lines = ["## Known failure modes"]
    if result is not None:
        report = result.report
        worst = [
            (row.name, str(row.support), f"{row.f1:.2f}")
            for row in worst_classes(report, CARD_WORST_CLASSES)
        ]
        lines.append("The species it gets wrong most (lowest F1 on the evaluated split):")
        lines.append(_table(("Species", "Images", "F1"), worst))
        pairs = [
            (p.true_name, p.predicted_name, f"{100 * p.rate:.0f} %")
            for p in report.top_confusions[:CARD_CONFUSIONS]
        ]
        if pairs:
            lines.append("The species it mistakes for each other most:")
            lines.append(_table(("True species", "Taken for", "Share"), pairs))
    if reference_metrics:
        accuracy = reference_metrics.get("top1_accuracy")
        lines.append(
            f"Drift: the reference profile (valid split, top-1 {accuracy:.3f}) is what "
            "`jobs/monitor.py` and Serve's drift gauges compare traffic with; photos unlike the "
            "training data (other cameras, seasons, crops, image sizes) lower accuracy before "
            "any label says so."
            if isinstance(accuracy, int | float)
            else "Drift: the reference profile is what the monitor compares traffic with."
        )
    return "\n\n".join(lines) if len(lines) > 1 else ""


def _caveats(metadata: ModelMetadata) -> str:
    return (
        "## Caveats and recommendations\n\n"
        "- Confidence is not correctness: check low-confidence answers and the attention map.\n"
        "- Watch the deployed model with `jobs/monitor.py` (decay with labels, drift without) "
        "and retrain when it says RETRAIN.\n"
        f"- Trained with seed {metadata.extra.get('train_config', {}).get('seed', '?')}; another "
        "seed gives other numbers, and the intervals show how far the evaluation images alone "
        "can move them."
    )


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(tuple("---" for _ in header)), *map(line, rows)])
