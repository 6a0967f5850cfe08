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
from vitbirds.devices import cpu_name
from vitbirds.errors import ConfigError
from vitbirds.evaluation.model_card import proportion_interval
from vitbirds.model.files import MODEL_CARD_FILE, LoadedModel, load_model
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


def test_every_export_carries_a_model_card_of_its_own_numbers(splits, tmp_path) -> None:
    exported = export_model(
        _loaded(splits), splits, target=str(tmp_path / "run"), history=HISTORY, metrics=BEST
    )
    card = (Path(exported.model_dir) / MODEL_CARD_FILE).read_text()
    for heading in ("## Model details", "## Intended use", "## Training data", "## Metrics",
                    "## Known failure modes", "## Caveats and recommendations"):  # fmt: skip
        assert heading in card
    assert card.startswith("# Model card: tiny-run")
    assert "SYNTHETIC" in card  # generated birds: said before anything else
    top1 = exported.metrics["test_top1_accuracy"]
    n = int(exported.metrics["test_num_samples"])
    low, high = proportion_interval(round(top1 * n), n)
    assert f"| Top-1 accuracy | {top1:.3f} | {low:.3f} - {high:.3f} |" in card
    assert splits.describe()["fingerprint"] in card
    assert cpu_name() in card


def test_an_export_without_evaluation_says_so_in_its_card(splits, tmp_path) -> None:
    exported = export_model(
        _loaded(splits), splits, target=str(tmp_path / "run"), history=HISTORY, metrics=BEST,
        evaluate=False,
    )  # fmt: skip
    card = (Path(exported.model_dir) / MODEL_CARD_FILE).read_text()
    assert "Not evaluated at export; best valid top-1 during training: 0.400." in card


@pytest.mark.parametrize(
    ("successes", "total", "low", "high"),
    [(50, 100, 0.4038, 0.5962), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (0, 0, 0.0, 1.0)],
)
def test_the_wilson_interval_holds_at_the_edges(successes, total, low, high) -> None:
    assert proportion_interval(successes, total) == pytest.approx((low, high), abs=1e-4)
