"""What goes into an exported model directory (`vitbirds.training.export`), without Ray: a tiny
random-weight model over generated birds is exported as a training run exports its best epoch."""

import json
from pathlib import Path

import pytest
import torch
from recording_tracker import RecordingTracker

from vitbirds.config import DataConfig, ModelConfig
from vitbirds.data import discover_dataset, make_synthetic_dataset
from vitbirds.data.sources import DatasetSplits
from vitbirds.errors import ConfigError
from vitbirds.model.files import LoadedModel, load_model
from vitbirds.model.vit import build_model
from vitbirds.monitoring.reference import load_reference_profile
from vitbirds.presets import Recipe
from vitbirds.training.export import export_model
from vitbirds.training.runner import build_metadata

TINY = ModelConfig(image_size=32, patch_size=8, dim=32, depth=2, heads=2, drop_path=0.0)
HISTORY = [
    {"epoch": 1, "train_loss": 1.4, "val_loss": 1.3, "train_top1": 0.3, "val_top1": 0.35},
    {"epoch": 2, "train_loss": 1.2, "val_loss": 1.25, "train_top1": 0.4, "val_top1": 0.4},
]
BEST = {"best_epoch": 2, "val_loss": 1.25, "val_top1": 0.4, "val_top5": 1.0}


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> DatasetSplits:
    root = tmp_path_factory.mktemp("birds")
    make_synthetic_dataset(root, num_classes=3, images_per_class=12, image_size=36)
    return discover_dataset(root)


def _loaded(splits: DatasetSplits) -> LoadedModel:
    torch.manual_seed(0)
    config = ModelConfig(**{**TINY.to_dict(), "num_classes": len(splits.classes)})
    recipe = Recipe(config, DataConfig(image_size=32), preset="tiny")
    metadata = build_metadata(recipe, splits, name="tiny-run")
    return LoadedModel(model=build_model(config).eval(), metadata=metadata)


def test_an_export_holds_the_model_its_metrics_its_report_and_its_reference_profile(
    splits, tmp_path
) -> None:
    tracker = RecordingTracker()
    exported = export_model(
        _loaded(splits), splits, target=str(tmp_path / "runs" / "tiny-run"), history=HISTORY,
        metrics=BEST, tracker=tracker, export_dir=str(tmp_path / "models" / "latest"),
    )  # fmt: skip
    model_dir, evaluation = Path(exported.model_dir), Path(exported.evaluation_dir)
    assert model_dir == tmp_path / "runs" / "tiny-run" / "model"
    reloaded = load_model(model_dir)
    assert reloaded.metadata.class_names == splits.classes
    assert reloaded.metadata.history == HISTORY
    assert exported.evaluated_split == "test"  # the generated birds have a test split
    assert reloaded.metadata.metrics["best_epoch"] == 2
    assert 0.0 <= reloaded.metadata.metrics["test_top1_accuracy"] <= 1.0
    assert reloaded.metadata.metrics == exported.metrics == exported.metadata.metrics
    assert load_reference_profile(model_dir).split == "valid"
    names = {"metrics.json", "report.html", "confusion_matrix.png", "learning_curves.png"}
    assert names <= {path.name for path in evaluation.iterdir()}
    assert exported.report_path == f"{evaluation}/report.html"
    assert json.loads((evaluation / "metrics.json").read_text())["split"] == "test"
    assert load_model(tmp_path / "models" / "latest").metadata.metrics == exported.metrics
    assert tracker.metrics["test_top1_accuracy"] == exported.metrics["test_top1_accuracy"]
    assert ("model", "model") in tracker.artifacts
    assert tracker.tags["model_dir"] == exported.model_dir


def test_an_export_without_evaluation_still_holds_model_profile_and_curves(
    splits, tmp_path
) -> None:
    exported = export_model(
        _loaded(splits), splits, target=str(tmp_path / "run"), history=HISTORY, metrics=BEST,
        evaluate=False,
    )  # fmt: skip
    assert exported.evaluated_split is None and exported.report_path is None
    assert exported.metrics == BEST
    assert load_reference_profile(exported.model_dir).split == "valid"
    evaluation = Path(exported.evaluation_dir)
    assert sorted(path.name for path in evaluation.iterdir()) == ["learning_curves.png"]


def test_an_export_dir_holding_something_else_is_not_overwritten(splits, tmp_path) -> None:
    occupied = tmp_path / "mine"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds no model"):
        export_model(
            _loaded(splits), splits, target=str(tmp_path / "run"), history=HISTORY,
            metrics=BEST, evaluate=False, export_dir=str(occupied),
        )  # fmt: skip
    assert (occupied / "notes.txt").read_text() == "keep me"
