"""Submitting a command as a Ray job to a cluster that keeps token auth on (Ray 2.60's
`ray start --head` default), with this checkout as the job's working directory.

The monitoring job sends a retraining run this way; the token is found where Ray's CLI finds it.
"""

import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vitbirds.errors import ConfigError
from vitbirds.paths import repo_root

DEFAULT_RAY_ADDRESS = "http://127.0.0.1:8265"
# Not uploaded with the job: environments, outputs, caches.
WORKING_DIR_EXCLUDES = [
    ".git", ".venv", "venv", "runs", "mlruns", "models", "__pycache__", ".pytest_cache",
    ".ruff_cache", "*.egg-info", "*.safetensors",
]  # fmt: skip
# Passed on to the job when set here: a shared registry, so a retrained model registers where
# the monitored one came from.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI",)


class SubmissionError(Exception):
    """The cluster refused the job or could not be reached."""


def default_ray_address() -> str:
    """Where `ray job submit` would send the job: RAY_API_SERVER_ADDRESS, an http(s) RAY_ADDRESS,
    else the local dashboard."""
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        if os.environ.get(name, "").startswith(("http://", "https://")):
            return os.environ[name]
    return DEFAULT_RAY_ADDRESS


def ray_auth_headers() -> dict[str, str]:
    """A bearer token for a cluster with token auth.

    Looked up where Ray's CLI looks: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, then
    ~/.ray/auth_token. RAY_AUTH_MODE=disabled sends none; RAY_AUTH_MODE=token without a token is
    a usage error rather than a 401 from the cluster.
    """
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token and path.is_file():
        token = path.read_text().strip()
    if not token and mode == "token":
        raise ConfigError(
            "RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or "
            "run `ray get-auth-token` where the cluster was started and save it to "
            "~/.ray/auth_token"
        )
    return {"Authorization": f"Bearer {token}"} if token else {}


def submit_job(
    address: str,
    command: list[str],
    *,
    headers: Mapping[str, str],
    job_metadata: Mapping[str, str],
) -> str:
    """Submits `command` with this checkout as the working dir; returns the job id."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    runtime_env: dict[str, Any] = {
        "working_dir": str(repo_root()),
        "excludes": WORKING_DIR_EXCLUDES,
    }
    forwarded = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    if forwarded:
        runtime_env["env_vars"] = forwarded
    try:
        client = JobSubmissionClient(address, headers=dict(headers))
        return client.submit_job(
            entrypoint=shlex.join(command), runtime_env=runtime_env, metadata=dict(job_metadata)
        )
    except (AuthenticationError, ConnectionError, RuntimeError, ValueError) as error:
        raise SubmissionError(f"submitting to {address} failed: {error}") from error
