"""`jobs/tune.py` on the shared local Ray (2 CPUs): a tiny grid sweep with ASHA, its outputs and
the best model; a sweep killed mid-way resumes without re-running its finished trials.

The vit-test preset on the generated synthetic birds: a trial is a few seconds of training plus
the start of its Ray Train run."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jobs import tune as tune_cli
from vitbirds.model.files import load_model

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _trial_results(experiment: Path) -> dict[str, list[dict]]:
    """Every result Tune recorded, per trial folder (named by trial id)."""
    results = {}
    for path in sorted(experiment.glob("*/result.json")):
        lines = path.read_text().splitlines()
        results[path.parent.name] = [json.loads(line) for line in lines if line.strip()]
    return results


def _saved_statuses(experiment: Path) -> dict[str, str]:
    """Trial id -> status in the newest experiment state Tune has written to storage."""
    states = sorted(experiment.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except json.JSONDecodeError:  # being rewritten right now
        return {}
    trials = (json.loads(state) for state, _ in data["trial_data"])
    return {trial["trial_id"]: trial["status"] for trial in trials}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def grid_sweep(ray_session, tmp_path_factory, cache_dir) -> dict:
    """2 depths x 2 learning rates, 4 epochs, ASHA grace 1 / reduction 2; two trials at a time
    (2 CPUs, one 1-CPU worker per trial).

    Trials start in grid order, the two 3e-3 trials first. After one epoch of 840 images a 1e-5
    trial trails them by ~10 points of valid top-1, so it meets a better recorded peer at the
    first rung and is stopped there: the stop does not hinge on a coin flip.
    """
    out = tmp_path_factory.mktemp("sweep")
    argv = [
        "--name", "grid", "--preset", "vit-test", "--search", "grid",
        "--depth", "1", "2", "--lr-choices", "3e-3", "1e-5", "--epochs", "4",
        "--grace-period", "1", "--reduction-factor", "2", "--batch-size", "16",
        "--images-per-class", "200", "--cache-dir", str(cache_dir),
        "--storage-path", str(out / "runs"), "--out", str(out / "results"), "--tracker", "mlflow",
    ]  # fmt: skip
    code = tune_cli.main(argv)
    results = out / "results"
    return {
        "code": code,
        "argv": argv,
        "out": out,
        "experiment": out / "runs" / "grid",
        "summary": json.loads((results / "summary.json").read_text()) if code == 0 else {},
        "table": list(csv.DictReader((results / "results.csv").open())) if code == 0 else [],
    }


def test_tiny_grid_sweep_completes_every_trial(grid_sweep) -> None:
    assert grid_sweep["code"] == 0
    table = grid_sweep["table"]
    assert len(table) == 4
    assert {(r["depth"], r["lr"]) for r in table} == {
        (d, lr) for d in ("1", "2") for lr in ("0.003", "1e-05")
    }
    assert all(r["status"] in ("completed", "stopped") for r in table)
    top1 = [float(r["val_top1"]) for r in table]
    assert top1 == sorted(top1, reverse=True)
    assert (grid_sweep["out"] / "results" / "results.md").is_file()
    assert (grid_sweep["out"] / "results" / "sweep.png").read_bytes().startswith(b"\x89PNG")


def test_asha_stops_at_least_one_trial_before_the_last_epoch(grid_sweep) -> None:
    reported = _trial_results(grid_sweep["experiment"])
    assert len(reported) == 4
    epochs = {trial: max(r["epoch"] for r in results) for trial, results in reported.items()}
    table = {row["trial"]: row for row in grid_sweep["table"]}
    stopped = {trial for trial, epoch in epochs.items() if epoch < 4}
    small_lr = {trial for trial, row in table.items() if row["lr"] == "1e-05"}
    assert small_lr <= stopped, epochs
    assert all(table[trial]["status"] == "stopped" for trial in stopped)
    summary = grid_sweep["summary"]
    assert summary["stopped_early"] >= 1
    assert summary["trial_epochs_used"] == sum(epochs.values())
    assert summary["trial_epochs_full"] == 16


def test_best_trial_model_exports_and_loads(grid_sweep) -> None:
    summary = grid_sweep["summary"]
    best = grid_sweep["table"][0]
    assert summary["best_trial"] == best["trial"] and best["status"] == "completed"
    loaded = load_model(summary["best_model"])
    assert loaded.metadata.model_config.depth == int(best["depth"])
    assert loaded.metadata.metrics["val_top1"] == pytest.approx(float(best["val_top1"]))
    assert loaded.model(torch.zeros(1, 3, 32, 32)).shape == (1, 6)


def test_reproduce_command_names_the_best_trial_values(grid_sweep) -> None:
    best = grid_sweep["table"][0]
    command = (grid_sweep["out"] / "results" / "reproduce.txt").read_text().strip()
    assert command.startswith("python jobs/train.py --preset vit-test")
    assert f"--depth {best['depth']}" in command and "--epochs 4" in command
    assert f"--lr {float(best['lr'])!r}" in command


def test_sweep_is_one_mlflow_parent_run_with_a_child_per_trial(grid_sweep) -> None:
    from mlflow.tracking import MlflowClient

    from vitbirds.lifecycle.tracking import default_mlflow_uri

    client = MlflowClient(default_mlflow_uri(grid_sweep["out"] / "runs"))
    experiment = client.get_experiment_by_name("vitbirds")
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if run.data.tags.get("kind") == "sweep"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 4


def test_rerun_with_other_settings_is_refused_not_mixed(grid_sweep, capsys) -> None:
    argv = [*grid_sweep["argv"]]
    argv[argv.index("--epochs") + 1] = "5"
    assert tune_cli.main(argv) == 2
    assert "was started with other settings" in capsys.readouterr().err


def test_killed_sweep_resumes_without_rerunning_finished_trials(
    ray_session, tmp_path, cache_dir
) -> None:
    """The sweep's driver is killed (SIGKILL) as soon as Tune has saved one trial as finished;
    rerunning the command restores it: the finished trial is not run again, the other one runs
    (from its last Ray Train checkpoint if it had reported an epoch before the kill)."""
    import ray

    argv = [
        "--name", "killed", "--preset", "vit-test", "--search", "grid",
        "--depth", "1", "2", "--lr-choices", "3e-3", "--epochs", "4", "--grace-period", "4",
        "--max-concurrent", "1", "--images-per-class", "200", "--cache-dir", str(cache_dir),
        "--storage-path", str(tmp_path / "runs"), "--tracker", "none",
    ]  # fmt: skip
    experiment = tmp_path / "runs" / "killed"
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,  # join this test's Ray
        "TUNE_GLOBAL_CHECKPOINT_S": "0",  # save the experiment state at every step
    }
    driver = subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "tune.py"), *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    finished: list[str] = []
    deadline = time.monotonic() + 300
    try:
        while not finished and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.5)
            statuses = _saved_statuses(experiment)
            finished = [trial for trial, status in statuses.items() if status == "TERMINATED"]
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert finished, "the sweep never finished a trial before the deadline"
    before = _trial_results(experiment)
    finished_before = {trial: before[trial] for trial in finished}
    interrupted = {t: r for t, r in before.items() if t not in finished and r}

    assert tune_cli.main(argv) == 0

    after = _trial_results(experiment)
    assert len(after) == 2
    for trial, results in finished_before.items():
        assert after[trial] == results  # not one more report: the trial did not run again
    assert all(max(r["epoch"] for r in results) == 4 for results in after.values())
    for trial, results in interrupted.items():
        # Epochs after the restore continue from the Train checkpoint of the killed run.
        resumed = after[trial][len(results) :]
        assert resumed and resumed[0]["epoch"] > 1
