"""A Ray Train run in stream mode: a worker failure mid-run resumes from the last checkpoint and
trains on exactly as an uninterrupted stream run does. Tiny preset and synthetic data."""

from pathlib import Path

import pytest

from vitbirds.presets import get_recipe
from vitbirds.ray_adapter.train import TrainJob, run_training


def _job(storage: Path, cache_dir: Path, run_name: str, **overrides) -> TrainJob:
    recipe = get_recipe("vit-test")
    recipe.data.images_per_class = 10
    recipe.data.data_mode = "stream"
    recipe.data.stream_workers = 1
    recipe.train.epochs = 3
    values = dict(
        recipe=recipe, run_name=run_name, storage_path=str(storage), num_workers=2,
        tracker="none", evaluate=False, cache_dir=str(cache_dir),
    )  # fmt: skip
    return TrainJob(**{**values, **overrides})


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory) -> dict[str, object]:
    cache_dir, storage = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("runs")
    return {
        "failed": run_training(_job(storage, cache_dir, "failed", fail_at_epoch=2, max_failures=1)),
        "clean": run_training(_job(storage, cache_dir, "clean")),
    }


def test_a_stream_run_interrupted_mid_way_resumes_from_its_last_checkpoint(runs) -> None:
    failed = runs["failed"]
    assert failed.worker_failures == 1
    assert failed.started_at_epoch == 1  # epoch 2 failed before its report: resumed after 1
    assert failed.epochs_run == [1, 2, 3]
    assert [row["epoch"] for row in failed.history] == [1, 2, 3]


def test_the_resumed_stream_run_trains_as_the_uninterrupted_one(runs) -> None:
    failed, clean = runs["failed"], runs["clean"]
    # Order and augmentation are functions of (seed, rank, epoch): the replayed epochs match.
    for resumed, straight in zip(failed.history, clean.history, strict=True):
        assert resumed["train_loss"] == pytest.approx(straight["train_loss"], abs=1e-4)
        assert resumed["val_top1"] == pytest.approx(straight["val_top1"], abs=1e-6)
    assert all(row["skipped_images"] == 0 for row in failed.history)
