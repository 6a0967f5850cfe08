"""Every tracker backend honours the one `Tracker` interface; Neptune works offline, no token."""

import json

import pytest

from vitbirds.errors import ConfigError
from vitbirds.lifecycle.tracking import NullTracker, flatten, make_tracker


def test_nested_configs_are_flattened_to_dotted_keys() -> None:
    assert flatten({"model": {"dim": 192, "depth": 6}, "lr": 0.1}) == {
        "model.dim": 192,
        "model.depth": 6,
        "lr": 0.1,
    }


def test_unknown_tracker_is_a_config_error_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match="unknown tracker 'wandb'; choose one of mlflow"):
        make_tracker("wandb", run_name="x")


def test_none_tracker_accepts_everything_and_stores_nothing(tmp_path) -> None:
    tracker = make_tracker("none", run_name="x", storage_path=tmp_path)
    assert isinstance(tracker, NullTracker)
    tracker.log_params({"a": 1})
    tracker.child("trial").log_metrics({"m": 1.0}, step=1)
    tracker.close()
    assert list(tmp_path.iterdir()) == []


def test_neptune_runs_offline_under_the_storage_path(tmp_path, monkeypatch) -> None:
    pytest.importorskip("neptune")
    monkeypatch.delenv("NEPTUNE_API_TOKEN", raising=False)
    monkeypatch.delenv("NEPTUNE_DATA_DIRECTORY", raising=False)
    artifact = tmp_path / "curve.json"
    artifact.write_text("{}")
    tracker = make_tracker("neptune", run_name="offline-run", storage_path=tmp_path)
    tracker.log_params({"model": {"dim": 48}, "lr": 0.002})
    tracker.log_metrics({"val_top1": 0.75}, step=1)
    tracker.child("trial-0").log_metrics({"val_top1": 0.5}, step=1)
    tracker.log_artifact(artifact)
    tracker.close()
    paths = set()
    for log in (tmp_path / "neptune").rglob("data-*.log"):
        for line in log.read_text().splitlines():
            operation = json.loads(line)["obj"]
            paths.add("/".join(operation.get("path", [])))
    assert {"parameters/model.dim", "parameters/lr", "metrics/val_top1"} <= paths
    assert "trials/trial-0/metrics/val_top1" in paths
    assert "artifacts/curve.json" in paths
