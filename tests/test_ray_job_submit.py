"""`ray job submit` of the unchanged training script to a real `ray start --head` cluster with
token authentication on (the `token_cluster` fixture, see tests/ray_head.py).
"""

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

from ray_head import RAY, http_status

from vitbirds.model.files import load_model

ROOT = Path(__file__).resolve().parent.parent


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
    # Retried until the job is accepted: the head's job agent registers a few seconds after the
    # dashboard answers, and a busy 2-core machine can time out the CLI's first connection.
    for _ in range(6):
        done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=420)
        output = done.stdout + done.stderr
        if done.returncode == 0 or "submitted successfully" in output:
            break
        time.sleep(5)
    assert done.returncode == 0, output[-4000:]
    assert "succeeded" in output.lower()
    result = json.loads(summary.read_text())
    assert load_model(result["model_dir"]).metadata.synthetic
    assert result["tracking"] == {"kind": "none"} and result["epochs_run"] == [1]


def test_the_cluster_refuses_requests_without_the_right_token(token_cluster) -> None:
    address, env = token_cluster
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text()
    assert http_status(f"{address}/api/version", token) == 200
    assert http_status(f"{address}/api/version", None) == 401  # unauthenticated
    assert http_status(f"{address}/api/version", secrets.token_hex(32)) == 403  # wrong token
