"""Where shared data lives. One helper so tests and jobs agree on it."""

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def repo_root() -> Path:
    """The project checkout (where jobs/, serve/ and cluster/ live)."""
    return _REPO_ROOT


def shared_data_dir() -> Path | None:
    """`$VITBIRDS_DATA` if set, else `../shared/data` beside the checkout; None when absent."""
    env = os.environ.get("VITBIRDS_DATA")
    candidates = [Path(env)] if env else [_REPO_ROOT.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


def shared_schemas_dir() -> Path | None:
    """`../shared/schemas` beside the checkout (KubeRay CRDs), or None when absent."""
    candidate = _REPO_ROOT.parent / "shared" / "schemas"
    return candidate if candidate.is_dir() else None
