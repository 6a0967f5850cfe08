"""The closed loop on a local Ray with token auth and synthetic birds: the monitor watches the
registry's champion and says RETRAIN -> `--submit` trains a challenger as a Ray job, which
registers itself -> the gate promotes it -> Serve, redeployed with `models:/vitbirds@champion`,
loads the new version. (The gate's refusals are specified in tests/test_promote.py.)"""

import contextlib
import io
import json
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from ray_head import wait_for_job
from test_monitor import write_log
from test_registry import register_model_dir

from jobs import promote
from jobs.benchlib.shifts import noise_images, train_subject
from vitbirds.data import make_synthetic_dataset
from vitbirds.lifecycle.registry import CHAMPION, Registry
from vitbirds.lifecycle.store import fetch_model, materialize, resolve
from vitbirds.lifecycle.tracking import default_mlflow_uri
from vitbirds.model.files import load_model, read_metadata
from vitbirds.monitoring.reference import model_outputs
from vitbirds.presets import get_recipe

ROOT = Path(__file__).resolve().parent.parent
JOB_TIMEOUT_S = 480


def run_promote(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = promote.main(list(argv))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> dict:
    """A tiny model trained on synthetic birds, registered and promoted to first champion, and a
    prediction log of noise images: its monitor must say RETRAIN."""
    root = tmp_path_factory.mktemp("loop")
    birds = make_synthetic_dataset(root / "birds", images_per_class=30, image_size=37)
    recipe = get_recipe("vit-test")
    recipe.train = replace(recipe.train, epochs=2, device="cpu")
    subject = train_subject(birds, recipe, root / "initial")
    storage = root / "runs"
    register_model_dir(storage, subject.model_dir, "initial")
    gate_flags = ["--data-dir", str(birds), "--split", "all", "--storage-path", str(storage)]
    code, out = run_promote(*gate_flags)
    assert code == 0, out
    loaded = load_model(subject.model_dir)
    log = root / "predictions.jsonl"
    noise = model_outputs(loaded, noise_images(80, loaded))
    write_log(log, noise, loaded.metadata.version, datetime.now(UTC), subject.classes)
    return {"root": root, "storage": storage, "log": log, "gate_flags": gate_flags}


@pytest.fixture(scope="module")
def loop(deployed, token_cluster) -> dict:
    """monitor --submit on the champion, the retraining job to its end, then the gate."""
    address, env = token_cluster
    root, storage = deployed["root"], deployed["storage"]
    summary = root / "retrain-summary.json"
    train_args = (
        f"--preset vit-test --epochs 2 --images-per-class 30 --cache-dir {root / 'cache'} "
        f"--summary {summary}"
    )
    command = [
        sys.executable, str(ROOT / "jobs" / "monitor.py"), "--model", "models:/vitbirds@champion",
        "--prediction-log", str(deployed["log"]), "--tracker", "none", "--submit",
        "--ray-address", address, "--python", sys.executable, "--retrain-storage", str(storage),
        "--train-args", train_args, "--out", str(root / "monitor"),
    ]  # fmt: skip
    monitored = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert monitored.returncode == 0, monitored.stdout[-2000:] + monitored.stderr[-3000:]
    result = json.loads((root / "monitor" / "monitor.json").read_text())
    status, logs = wait_for_job(address, env, result["retrain"]["job_id"], JOB_TIMEOUT_S)
    assert status == "SUCCEEDED", logs[-3000:]
    # Two tiny models near chance on synthetic birds: a wide margin keeps this test about the
    # loop's wiring; the gate's statistics are specified in tests/test_promote.py.
    gate = run_promote(*deployed["gate_flags"], "--margin", "0.5")
    return {
        "monitor": result,
        "monitor_stdout": monitored.stdout,
        "job_logs": logs,
        "trained": json.loads(summary.read_text()),
        "gate": gate,
        "storage": storage,
        "root": root,
    }


def test_the_monitor_watches_the_champion_and_says_retrain(loop) -> None:
    assert loop["monitor"]["model"]["registry"]["uri"] == "models:/vitbirds/1"
    assert loop["monitor"]["assessment"]["decision"] == "RETRAIN"
    assert "jobs/promote.py" in loop["monitor_stdout"]


def test_the_retraining_job_registers_its_model_as_the_challenger(loop) -> None:
    assert loop["trained"]["tracking"]["model_uri"] == "models:/vitbirds/2"
    assert "registered models:/vitbirds/2 as challenger" in loop["job_logs"]


def test_the_retraining_job_shows_a_progress_bar_inside_each_epoch(loop) -> None:
    assert "epoch 1/2" in loop["job_logs"] and "epoch 2/2" in loop["job_logs"]


def test_the_gate_promotes_the_challenger(loop) -> None:
    code, out = loop["gate"]
    assert code == 0 and "decision: PROMOTED" in out
    registry = Registry(default_mlflow_uri(loop["storage"]))
    assert registry.by_alias(CHAMPION).version == 2


def test_serve_redeployed_on_the_champion_alias_loads_the_retrained_model(loop) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VITBIRDS_CACHE", str(loop["root"] / "cache"))
        patch.setenv("MLFLOW_TRACKING_URI", default_mlflow_uri(loop["storage"]))
        fetched = fetch_model("models:/vitbirds@champion")
        # What Serve does: resolve at deployment, load the pinned version in each replica.
        served = load_model(materialize(resolve("models:/vitbirds@champion")))
    assert fetched.registered.version == 2
    assert served.metadata.version == read_metadata(loop["trained"]["model_dir"]).version


def test_the_retrained_run_is_tracked_in_the_store_that_holds_the_registry(loop) -> None:
    assert loop["trained"]["tracking"]["tracking_uri"] == default_mlflow_uri(loop["storage"])
