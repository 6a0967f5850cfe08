"""`jobs/train.py` on the shared local Ray: trains, reports, checkpoints, exports, survives a
worker failure and resumes a rerun. Tiny preset and synthetic data: each run takes seconds."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from jobs import train as train_cli
from vitbirds.errors import ConfigError
from vitbirds.lifecycle.tracking import default_mlflow_uri
from vitbirds.model.files import load_model, read_metadata
from vitbirds.monitoring.reference import load_reference_profile
from vitbirds.precision import resolve_precision
from vitbirds.presets import get_recipe
from vitbirds.ray_adapter.train import TrainJob, run_training
from vitbirds.training.runner import build_run_model


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def cli_run(ray_session, tmp_path_factory, cache_dir) -> dict:
    """One 2-worker CPU run through the CLI, shared by the assertions below."""
    out = tmp_path_factory.mktemp("cli")
    argv = [
        "--preset", "vit-test", "--num-workers", "2", "--epochs", "2",
        "--images-per-class", "20", "--cache-dir", str(cache_dir),
        "--storage-path", str(out / "runs"), "--run-name", "two-workers",
        "--summary", str(out / "summary.json"), "--export-dir", str(out / "models" / "latest"),
    ]  # fmt: skip
    code = train_cli.main(argv)
    return {"code": code, "out": out, "summary": json.loads((out / "summary.json").read_text())}


def test_two_worker_run_exports_a_model_that_loads_and_predicts(cli_run) -> None:
    assert cli_run["code"] == 0
    summary = cli_run["summary"]
    assert summary["model_dir"] == str(cli_run["out"] / "runs" / "two-workers" / "model")
    loaded = load_model(summary["model_dir"])
    logits = loaded.model(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 6)
    assert load_model(cli_run["out"] / "models" / "latest").metadata.version == (
        loaded.metadata.version
    )


def test_the_export_carries_the_monitoring_reference_profile(cli_run) -> None:
    profile = load_reference_profile(cli_run["summary"]["model_dir"])
    assert profile.class_names == load_model(cli_run["summary"]["model_dir"]).metadata.class_names
    assert len(profile.outputs.labels) > 0 and 0.0 <= profile.accuracy <= 1.0


def test_every_epoch_is_reported_and_checkpointed_in_the_training_format(cli_run) -> None:
    summary = cli_run["summary"]
    assert summary["epochs_run"] == [1, 2]
    assert [row["epoch"] for row in summary["history"]] == [1, 2]
    keys = {"train_loss", "val_loss", "train_top1", "val_top1", "val_top5", "lr", "images_per_s"}
    assert keys <= set(summary["history"][-1])
    run_dir = cli_run["out"] / "runs" / "two-workers"
    checkpoints = sorted(run_dir.glob("epoch_*"))
    assert [p.name for p in checkpoints] == ["epoch_0001", "epoch_0002"]  # keep 2: both
    for checkpoint in checkpoints:
        names = {p.name for p in checkpoint.iterdir()}
        assert {"model.safetensors", "metadata.json", "training_state.safetensors"} <= names


def test_the_summary_and_the_model_say_the_data_was_synthetic(cli_run) -> None:
    summary = cli_run["summary"]
    assert summary["synthetic"] is True and summary["data"]["source"] == "synthetic"
    metadata = read_metadata(summary["model_dir"])
    assert metadata.synthetic
    assert metadata.extra["preset"] == "vit-test"  # what `jobs/monitor.py` retrains with
    assert [row["epoch"] for row in metadata.history] == [1, 2]  # the report's learning curves


def test_the_best_checkpoint_is_evaluated_on_the_test_split(cli_run) -> None:
    summary = cli_run["summary"]
    metrics = summary["metrics"]
    assert summary["evaluated_split"] == "test"
    assert metrics["test_num_samples"] == 18  # 6 classes x 3 test images
    best = max(summary["history"], key=lambda row: row["val_top1"])
    assert metrics["val_top1"] == best["val_top1"]
    assert Path(summary["report_path"]).is_file()
    assert (
        read_metadata(summary["model_dir"]).metrics["test_top1_accuracy"]
        == (metrics["test_top1_accuracy"])
    )
    assert summary["wall_time_s"] > 0


def test_the_model_records_the_precision_auto_chose_for_these_workers(cli_run) -> None:
    """On this machine's CPU `auto` is bf16 where it has AMX-BF16 or AVX512-BF16, else fp32;
    the choice and its reason are in the exported metadata and in the evaluation's metrics."""
    expected = resolve_precision("auto", "cpu")
    summary = cli_run["summary"]
    recorded = read_metadata(summary["model_dir"]).extra["precision"]
    assert recorded == {**expected.to_dict(), "requested": "auto"}
    metrics = json.loads((Path(summary["report_path"]).parent / "metrics.json").read_text())
    assert metrics["precision"] == expected.name


def test_the_mlflow_store_under_the_storage_path_holds_the_run(cli_run) -> None:
    from mlflow.tracking import MlflowClient

    summary = cli_run["summary"]
    client = MlflowClient(default_mlflow_uri(cli_run["out"] / "runs"))
    run = client.get_run(summary["tracking"]["run_id"])
    assert run.data.params["recipe.model.depth"] == "2"
    assert run.data.params["num_workers"] == "2"
    assert run.data.params["system.ray"] and run.data.params["system.torch"]
    assert run.data.tags["synthetic"] == "true"
    history = client.get_metric_history(run.info.run_id, "val_top1")
    assert sorted(m.step for m in history if m.step) == [1, 2]
    assert run.data.metrics["test_top1_accuracy"] == summary["metrics"]["test_top1_accuracy"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "plots", "evaluation"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/learning_curves.png", "plots/confusion_matrix.png"}


def _job(storage: Path, cache_dir: Path, **overrides) -> TrainJob:
    recipe = get_recipe("vit-test")
    recipe.data.images_per_class = 10
    recipe.train.epochs = overrides.pop("epochs", 3)
    values = dict(
        recipe=recipe, run_name="fault", storage_path=str(storage), num_workers=2,
        tracker="none", evaluate=False, cache_dir=str(cache_dir),
    )  # fmt: skip
    return TrainJob(**{**values, **overrides})


@pytest.fixture(scope="module")
def failed_once(ray_session, tmp_path_factory, cache_dir) -> tuple[Path, object]:
    storage = tmp_path_factory.mktemp("fault")
    outcome = run_training(_job(storage, cache_dir, fail_at_epoch=2, max_failures=1))
    return storage, outcome


def test_a_worker_failure_restarts_from_the_last_checkpoint(failed_once) -> None:
    _, outcome = failed_once
    assert outcome.worker_failures == 1
    assert outcome.started_at_epoch == 1  # epoch 2 failed before its report: resumed after 1
    assert outcome.epochs_run == [1, 2, 3]  # epoch 2 reported once, by the restarted group
    assert [row["epoch"] for row in outcome.history] == [1, 2, 3]


def test_a_rerun_with_the_same_name_resumes_without_redoing_epochs(failed_once, cache_dir) -> None:
    storage, _ = failed_once
    # One worker this time: a checkpoint does not depend on how many workers wrote it.
    outcome = run_training(_job(storage, cache_dir, epochs=4, num_workers=1))
    assert outcome.started_at_epoch == 3
    assert outcome.epochs_run == [4]
    assert [row["epoch"] for row in outcome.history] == [1, 2, 3, 4]


def test_mps_on_a_machine_without_it_is_a_one_line_usage_error(capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert train_cli.main(["--device", "mps"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device 'mps' was requested but") and "Traceback" not in err


def test_a_gpu_run_on_this_machine_without_cuda_is_a_usage_error(capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert train_cli.main(["--use-gpu"]) == 2
    assert "error: device 'cuda' was requested" in capsys.readouterr().err


def test_flags_override_the_preset_and_nothing_else() -> None:
    args = train_cli.parse_args(
        ["--preset", "vit-test", "--epochs", "7", "--lr", "0.01", "--depth", "3", "--dim", "64",
         "--heads", "4", "--patch-size", "4", "--weight-decay", "0.1", "--batch-size", "16",
         "--num-classes", "4", "--data-dir", "/data", "--use-gpu"]
    )  # fmt: skip
    recipe, preset = train_cli.build_recipe(args), get_recipe("vit-test")
    assert (recipe.train.epochs, recipe.train.lr, recipe.train.batch_size) == (7, 0.01, 16)
    assert (recipe.model.depth, recipe.model.dim, recipe.model.heads) == (3, 64, 4)
    assert (recipe.model.patch_size, recipe.train.weight_decay) == (4, 0.1)
    assert (recipe.data.num_classes, recipe.data.data_dir) == (4, "/data")
    assert recipe.train.device == "cuda"
    assert recipe.model.mlp_ratio == preset.model.mlp_ratio
    relative = train_cli.build_recipe(train_cli.parse_args(["--data-dir", "data/birds"]))
    assert relative.preset == "vit-cpu-small-data"  # the default: the best small-data recipe
    assert relative.data.data_dir == str(Path.cwd() / "data" / "birds")  # workers run elsewhere
    assert recipe.train.seed == preset.train.seed


def test_init_from_starts_the_run_model_from_timm_weights(tmp_path) -> None:
    timm = pytest.importorskip("timm")
    recipe = get_recipe("vit-test")
    config = recipe.model
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=config.image_size, patch_size=config.patch_size, embed_dim=config.dim,
        depth=config.depth, num_heads=config.heads, num_classes=config.num_classes,
    )  # fmt: skip
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    model = build_run_model(recipe, path)
    assert torch.equal(model.blocks[0].mlp.fc1.weight, reference.blocks[0].mlp.fc1.weight)


def test_a_distilled_run_learns_from_the_teacher_directory(cli_run, tmp_path, cache_dir) -> None:
    teacher = cli_run["summary"]["model_dir"]  # any classifier of the same classes will do
    job = _job(tmp_path, cache_dir, epochs=1, num_workers=1, run_name="distilled", teacher=teacher)
    job.recipe.model.distill_token = True
    job.recipe.train.distillation = "soft"
    outcome = run_training(job)
    loaded = load_model(outcome.model_dir)
    assert loaded.model.head_dist is not None
    assert loaded.metadata.extra["teacher"] == teacher
    assert loaded.metadata.extra["train_config"]["distillation"] == "soft"


def test_a_teacher_of_other_classes_is_refused_before_training(cli_run, tmp_path, cache_dir):
    teacher = cli_run["summary"]["model_dir"]
    job = _job(tmp_path, cache_dir, num_workers=1, teacher=teacher)
    job.recipe.data.num_classes = 4  # the teacher knows 6
    with pytest.raises(ConfigError, match=r"teacher .* predicts 6 classes, the dataset has 4"):
        run_training(job)


def test_a_distilling_preset_without_a_teacher_is_a_usage_error(capsys) -> None:
    assert train_cli.main(["--preset", "vit-cpu-distilled"]) == 2
    err = capsys.readouterr().err
    assert "distils from a teacher: pass --teacher" in err and "Traceback" not in err
