"""What the training job hands the tracker lands in the MLflow store under the storage path.

The end-to-end check (a real Ray Train run's store) is in test_train_job.py; these cover the
pieces without starting Ray Train: the store itself and the driver's per-epoch progress.
"""

from pathlib import Path

from mlflow.tracking import MlflowClient

from vitbirds.lifecycle.tracking import default_mlflow_uri, make_tracker
from vitbirds.ray_adapter.train import _Progress, format_epoch_line

EPOCH = {
    "epoch": 3, "train_loss": 1.234, "train_top1": 0.5, "val_loss": 1.1, "val_top1": 0.625,
    "val_top5": 0.9, "lr": 1e-3, "images_per_s": 312.4, "epoch_wall_s": 12.0,
}  # fmt: skip


def _client(storage: Path) -> MlflowClient:
    return MlflowClient(default_mlflow_uri(storage))


def test_params_metrics_and_artifacts_are_read_back_from_the_local_store(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # artifacts must land under the storage path, not the cwd
    storage = tmp_path / "runs"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "metadata.json").write_text("{}")
    curve = tmp_path / "learning_curves.png"
    curve.write_bytes(b"png")

    tracker = make_tracker("mlflow", run_name="tracked", storage_path=storage)
    tracker.log_params({"recipe": {"model": {"depth": 6}}, "num_workers": 2})
    tracker.log_metrics({"val_top1": 0.5}, step=1)
    tracker.log_metrics({"val_top1": 0.75}, step=2)
    tracker.log_artifact(curve, "plots")
    tracker.log_artifact(model_dir, "model")
    tracker.close()

    client = _client(storage)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params == {"recipe.model.depth": "6", "num_workers": "2"}
    history = client.get_metric_history(run.info.run_id, "val_top1")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75)]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        "plots/learning_curves.png"
    }
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {
        "model/metadata.json"
    }
    assert run.info.artifact_uri.startswith(storage.as_uri())
    assert not (tmp_path / "mlruns").exists()


def test_each_epoch_report_is_printed_once_and_logged_at_its_epoch(tmp_path, capsys) -> None:
    tracker = make_tracker("mlflow", run_name="progress", storage_path=tmp_path)
    progress = _Progress(tracker, epochs=10, max_failures=1)
    progress.handle({"kind": "epoch", "metrics": EPOCH})
    progress.handle({"kind": "failure", "errors": {1: "RuntimeError: boom"}})
    tracker.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == format_epoch_line(EPOCH, 10, eta_s=7 * 12.0)
    assert "worker failure 1 of 1 allowed (rank 1: RuntimeError: boom)" in lines[1]
    assert progress.epochs_run == [3] and progress.failures == 1
    history = _client(tmp_path).get_metric_history(tracker.run_id, "val_top1")
    assert [(m.step, m.value) for m in history] == [(3, 0.625)]


def test_the_epoch_line_shows_progress_metrics_and_time_left() -> None:
    line = format_epoch_line(EPOCH, 10, eta_s=84.0)
    assert line.startswith("epoch  3/10 | train loss 1.234 top1  50.0%")
    assert "val loss 1.100 top1  62.5% top5  90.0%" in line
    assert line.endswith("| lr 1.00e-03 | 312 img/s | 12.0 s/epoch | ETA 1m24s")
