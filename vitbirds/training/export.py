"""What goes into an exported model directory, and where it is published. No Ray here.

`export_model` turns a trained model (the best checkpoint of a run, already loaded) into:

    <target>/model/        model.safetensors + metadata.json (config, classes, metrics, history)
                           reference.safetensors + reference.json (the valid split's profile,
                           which jobs/monitor.py and Serve's drift gauges compare traffic with)
                           MODEL_CARD.md (intended use, data, metrics, failure modes)
    <target>/evaluation/   learning_curves.png, and when evaluated: metrics.json, report.html,
                           confusion_matrix.png, of the test split (valid when there is none)

`<target>` is a local folder or a URI (gs://...); `export_dir` also gets a copy of the model
directory (`--export-dir models/latest`). The Ray adapter calls it at the end of a run, a Tune
sweep for its best trial, and `jobs/evaluate.py` shares `evaluate_and_report` with it. It returns
the published paths and the metadata, so a model registry records an export with one call.
"""

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vitbirds.data.sources import DatasetSplits, Sample
from vitbirds.devices import cpu_name
from vitbirds.errors import ConfigError
from vitbirds.evaluation.evaluate import EvaluationConfig, EvaluationResult, evaluate_model
from vitbirds.evaluation.figures import confusion_png, learning_curves_png
from vitbirds.evaluation.model_card import render_model_card
from vitbirds.evaluation.report import log_to_tracker, write_report
from vitbirds.lifecycle.tracking import NullTracker, Tracker
from vitbirds.model.files import (
    METADATA_FILE,
    MODEL_CARD_FILE,
    LoadedModel,
    ModelMetadata,
    save_model,
)
from vitbirds.monitoring.reference import build_reference_profile, save_reference_profile
from vitbirds.paths import is_uri
from vitbirds.precision import FP32, Precision
from vitbirds.training.runner import data_label

MODEL_FOLDER = "model"
EVALUATION_FOLDER = "evaluation"


@dataclass
class ExportedModel:
    """What `export_model` published: where, and what a registry needs to record it."""

    model_dir: str  # <target>/model, local path or URI
    evaluation_dir: str
    metadata: ModelMetadata  # as written to metadata.json, metrics and history included
    metrics: dict[str, float]
    evaluated_split: str | None  # None when not evaluated
    report_path: str | None
    export_dir: str | None  # the extra local copy, if one was asked for


def export_model(
    loaded: LoadedModel,
    splits: DatasetSplits,
    *,
    target: str,
    history: list[dict[str, float]],
    metrics: dict[str, float],
    evaluate: bool = True,
    device: torch.device | str = "cpu",
    precision: Precision = FP32,
    tracker: Tracker | None = None,
    export_dir: str | None = None,
) -> ExportedModel:
    """Evaluates `loaded`, writes its model directory and report, and publishes them under
    `target` (and a copy of the model directory to `export_dir`).

    `metrics` are the exported checkpoint's (best epoch, val loss/top-1/top-5); the evaluation
    adds `<split>_<metric>` ones. Everything lands in `metadata.json` and in the tracker.
    """
    tracker = tracker or NullTracker()
    metrics = dict(metrics)
    metadata = loaded.metadata
    metadata.history = list(history)
    evaluated_split = None
    with tempfile.TemporaryDirectory() as staging_name:
        staging = Path(staging_name)
        eval_dir = staging / EVALUATION_FOLDER
        eval_dir.mkdir()
        (eval_dir / "learning_curves.png").write_bytes(learning_curves_png(metadata.history))
        if evaluate:
            evaluated_split = "test" if splits.test else "valid"
            result, _ = evaluate_and_report(
                loaded, splits.split(evaluated_split), splits.classes, out_dir=eval_dir,
                split=evaluated_split, data_label=data_label(splits),
                data_synthetic=splits.synthetic, device=device, precision=precision,
                tracker=tracker,
            )  # fmt: skip
            metrics.update(split_metrics(result))
        metadata.metrics = metrics
        model_staging = staging / MODEL_FOLDER
        save_model(model_staging, loaded.model, metadata)
        # The monitoring job compares live traffic against this profile of the valid split.
        profile = build_reference_profile(
            loaded, splits.valid, split="valid", data=splits.describe()
        )
        save_reference_profile(model_staging, profile)
        card = render_model_card(
            metadata,
            result if evaluated_split else None,
            reference_metrics=profile.metrics,
            machine=cpu_name(),
        )
        (model_staging / MODEL_CARD_FILE).write_text(card, encoding="utf-8")
        model_dir = publish(model_staging, f"{target}/{MODEL_FOLDER}")
        evaluation_dir = publish(eval_dir, f"{target}/{EVALUATION_FOLDER}")
        tracker.log_artifact(eval_dir / "learning_curves.png", "plots")
        tracker.log_artifact(model_staging, "model")
        if export_dir:
            replace_model_dir(model_staging, Path(export_dir))
    tracker.log_metrics(metrics)
    tracker.set_tags({"model_dir": model_dir})
    return ExportedModel(
        model_dir=model_dir,
        evaluation_dir=evaluation_dir,
        metadata=metadata,
        metrics=metrics,
        evaluated_split=evaluated_split,
        report_path=f"{evaluation_dir}/report.html" if evaluated_split else None,
        export_dir=export_dir,
    )


def evaluate_and_report(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    class_names: Sequence[str],
    *,
    out_dir: Path,
    split: str,
    data_label: str,
    data_synthetic: bool,
    device: torch.device | str = "cpu",
    precision: Precision = FP32,
    config: EvaluationConfig | None = None,
    tracker: Tracker | None = None,
) -> tuple[EvaluationResult, dict[str, Path]]:
    """Evaluates `samples` and writes metrics.json, report.html and confusion_matrix.png into
    `out_dir`; the metrics and files go to the tracker. Returns the result and the files."""
    tracker = tracker or NullTracker()
    result = evaluate_model(
        loaded, samples, class_names, config=config, split=split, data_label=data_label,
        data_synthetic=data_synthetic, device=device, precision=precision,
    )  # fmt: skip
    paths = write_report(result, out_dir)
    log_to_tracker(result, paths, tracker)
    names = [row.name for row in result.report.per_class]
    paths["confusion_matrix"] = Path(out_dir) / "confusion_matrix.png"
    paths["confusion_matrix"].write_bytes(confusion_png(result.report.confusion, names))
    tracker.log_artifact(paths["confusion_matrix"], "plots")
    return result, paths


def split_metrics(result: EvaluationResult) -> dict[str, float]:
    """The evaluation's numbers as `<split>_<name>` (test_top1_accuracy, ...)."""
    return {
        f"{result.split}_{key}": float(value)
        for key, value in result.report.summary().items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def publish(local_dir: Path, target: str) -> str:
    """Copies `local_dir` to `target` (a local path or a URI) and returns `target`."""
    if not is_uri(target):
        _replace_dir(local_dir, Path(target))
        return target
    import pyarrow.fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(target)
    filesystem.create_dir(path, recursive=True)
    pafs.copy_files(
        str(local_dir), path, source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=filesystem,
    )  # fmt: skip
    return target


def _replace_dir(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fresh = target.with_name(f".{target.name}.new")
    shutil.rmtree(fresh, ignore_errors=True)
    shutil.copytree(source, fresh)
    shutil.rmtree(target, ignore_errors=True)
    fresh.rename(target)


def replace_model_dir(source: Path, target: Path) -> None:
    """`--export-dir`: overwrites a previous model directory, never an unrelated folder."""
    if target.is_symlink():
        target.unlink()
    elif target.exists() and any(target.iterdir()) and not (target / METADATA_FILE).is_file():
        raise ConfigError(f"--export-dir {target} is not empty and holds no model: not replacing")
    _replace_dir(source, target)
