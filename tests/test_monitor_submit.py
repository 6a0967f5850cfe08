"""On RETRAIN, `jobs/monitor.py --submit` starts a real training job on a Ray cluster with token
authentication (the `token_cluster` fixture, see tests/ray_head.py)."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from ray_head import wait_for_job
from test_monitor import write_log

from jobs.benchlib.shifts import Subject, noise_images, train_subject
from vitbirds.data import make_synthetic_dataset
from vitbirds.model.files import load_model
from vitbirds.monitoring.reference import REFERENCE_JSON, model_outputs
from vitbirds.presets import get_recipe

ROOT = Path(__file__).resolve().parent.parent
JOB_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> tuple[Subject, Path]:
    """A tiny synthetic-bird model and a prediction log of noise images: a sure RETRAIN."""
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("data") / "birds", images_per_class=30, image_size=37
    )
    recipe = get_recipe("vit-test")
    recipe.train = replace(recipe.train, epochs=2, device="cpu")
    subject = train_subject(root, recipe, tmp_path_factory.mktemp("model") / "model")
    loaded = load_model(subject.model_dir)
    log = tmp_path_factory.mktemp("log") / "predictions.jsonl"
    noise = model_outputs(loaded, noise_images(80, loaded))
    write_log(log, noise, loaded.metadata.version, datetime.now(UTC), subject.classes)
    return subject, log


def monitor(subject: Subject, log: Path, env: dict[str, str], *args: str):
    command = [
        sys.executable, str(ROOT / "jobs" / "monitor.py"), "--model", str(subject.model_dir),
        "--prediction-log", str(log), "--tracker", "none", "--submit", *args,
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_submit_without_a_token_on_a_token_auth_setup_is_a_usage_error(noisy, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tmp_path / "none"), HOME=str(tmp_path)
    )
    done = monitor(*noisy, env)
    assert done.returncode == 2 and "RAY_AUTH_MODE=token but no token" in done.stderr


def test_retrain_submits_a_training_job_that_succeeds_on_the_cluster(
    noisy,
    token_cluster,
    tmp_path,
) -> None:
    address, env = token_cluster
    summary = tmp_path / "summary.json"
    train_args = (
        "--preset vit-test --epochs 1 --images-per-class 10 --no-evaluate --tracker none "
        f"--summary {summary}"
    )
    done = monitor(
        *noisy, env, "--ray-address", address, "--python", sys.executable,
        "--retrain-storage", str(tmp_path / "runs"), "--train-args", train_args,
        "--out", str(tmp_path / "monitor"),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "monitor" / "monitor.json").read_text())
    assert result["assessment"]["decision"] == "RETRAIN"
    job_id = result["retrain"]["job_id"]

    status, logs = wait_for_job(address, env, job_id, JOB_TIMEOUT_S)
    assert status == "SUCCEEDED", logs[-3000:]
    trained = json.loads(summary.read_text())
    assert trained["run_name"].startswith("retrain-") and load_model(trained["model_dir"])
    # the retrained model carries its own reference profile: the next monitor run can start
    assert (Path(trained["model_dir"]) / REFERENCE_JSON).is_file()
