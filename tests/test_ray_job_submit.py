"""`ray job submit` of the unchanged training script to a real `ray start --head` cluster with
token authentication on (a private head, see tests/ray_head.py).
"""

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_head import RAY, http_status, token_auth_head

from vitbirds.inference.batch_files import read_output
from vitbirds.model.files import load_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def vitbirds_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vitbirds-home")


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory, vitbirds_home) -> Iterator[tuple[str, dict[str, str]]]:
    """conftest's head, started with what a user's shell would give it: this venv's `python` and
    `ray` first on PATH, $VITBIRDS_HOME (here a temporary folder) and a private data cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", f"{RAY.parent}{os.pathsep}{os.environ['PATH']}")
        patch.setenv("VITBIRDS_HOME", str(vitbirds_home))
        patch.setenv("VITBIRDS_CACHE", str(tmp_path_factory.mktemp("cache")))
        with token_auth_head(tmp_path_factory.mktemp("auth")) as cluster:
            yield cluster


def _submit(command: list[str] | str, env: dict[str, str]) -> str:
    """Runs a `ray job submit` command until the cluster accepts the job; its output.

    Retried: the head's job agent registers a few seconds after the dashboard answers, and a busy
    2-core machine can time out the CLI's first connection."""
    for _ in range(6):
        done = subprocess.run(
            command, env=env, cwd=ROOT, shell=isinstance(command, str), capture_output=True,
            text=True, timeout=600,
        )  # fmt: skip
        output = done.stdout + done.stderr
        if done.returncode == 0 or "submitted successfully" in output:
            break
        time.sleep(5)
    assert done.returncode == 0, output[-4000:]
    return output


def _readme_command(marker: str) -> str:
    """The README's `ray job submit` line that contains `marker`, exactly as printed there."""
    lines = (ROOT / "README.md").read_text().splitlines()
    found = [line.strip() for line in lines if line.strip().startswith("ray job submit")]
    (command,) = [line.split("  #")[0].strip() for line in found if marker in line]
    return command


def test_the_readme_job_submit_command_exports_where_the_readme_says(
    token_cluster, vitbirds_home
) -> None:
    address, env = token_cluster
    command = _readme_command("--export-dir models/smoke")
    output = _submit(command, {**env, "RAY_ADDRESS": address})
    assert "succeeded" in output.lower()
    # README: relative outputs of a submitted job land under $VITBIRDS_HOME on the head node
    model = load_model(vitbirds_home / "models" / "smoke")
    assert model.metadata.synthetic and model.metadata.extra["preset"] == "vit-test"
    assert (vitbirds_home / "runs" / "mlflow.db").is_file()
    assert f"exported copy: {vitbirds_home / 'models' / 'smoke'}" in output
    assert "Ray dashboard: http://" in output
    assert "mlflow ui --backend-store-uri" in output


def test_a_submitted_job_trains_on_a_token_auth_cluster_and_exports_a_model(
    token_cluster, tmp_path
) -> None:
    address, env = token_cluster
    summary = tmp_path / "summary.json"
    submit = [
        str(RAY), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
        sys.executable, "jobs/train.py", "--preset", "vit-test", "--epochs", "1",
        "--images-per-class", "10", "--cache-dir", str(tmp_path / "cache"), "--tracker", "none",
        "--storage-path", str(tmp_path / "runs"), "--run-name", "submitted",
        "--summary", str(summary),
    ]  # fmt: skip
    output = _submit(submit, env)
    assert "succeeded" in output.lower()
    result = json.loads(summary.read_text())
    assert load_model(result["model_dir"]).metadata.synthetic
    assert result["tracking"] == {"kind": "none"} and result["epochs_run"] == [1]


def test_a_submitted_batch_prediction_writes_its_table_under_vitbirds_home(
    token_cluster, vitbirds_home, model_dir, cub_valid, tmp_path
) -> None:
    address, env = token_cluster
    photos = tmp_path / "photos"
    photos.mkdir()
    for source in sorted(cub_valid.rglob("*.jpg"))[:6]:
        shutil.copy(source, photos / f"{source.parent.name}-{source.name}")
    submit = [
        str(RAY), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
        sys.executable, "jobs/predict.py", "--model", str(model_dir), "--input", str(photos),
        "--output", "predictions/photos.csv",
    ]  # fmt: skip
    output = _submit(submit, env)
    assert "succeeded" in output.lower() and "6 rows in" in output
    table = read_output(vitbirds_home / "predictions" / "photos.csv")
    assert table.num_rows == 6 and table["error"].null_count == 6


def test_the_cluster_refuses_requests_without_the_right_token(token_cluster) -> None:
    address, env = token_cluster
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text()
    assert http_status(f"{address}/api/version", token) == 200
    assert http_status(f"{address}/api/version", None) == 401  # unauthenticated
    assert http_status(f"{address}/api/version", secrets.token_hex(32)) == 403  # wrong token
