"""Where things live: the checkout, the shared data, the cache, and where a job's outputs go.

Outputs (`--storage-path`, `--export-dir`, `--out`, `--summary`, ...) go through `output_path`, so
the train, tune, evaluate and monitor jobs put them in the same place whether they run here
(`python jobs/train.py`: relative to the current directory) or as a Ray job with a working
directory (`ray job submit --working-dir . -- python jobs/train.py`). In a Ray job the current
directory is Ray's unpacked copy of the working directory
(`<session>/runtime_resources/working_dir_files/_ray_pkg_…`), which nobody looks in and which the
next code change replaces; there a relative output path is resolved against `$VITBIRDS_HOME`
(default `~/vitbirds`) on the machine the job's driver runs on: the head node.
"""

import json
import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent
HOME_ENV = "VITBIRDS_HOME"
DEFAULT_HOME = "~/vitbirds"
CACHE_ENV = "VITBIRDS_CACHE"
DEFAULT_CACHE = "~/.cache/vitbirds"
# Set by Ray's job supervisor for the entrypoint: the job's runtime_env (working_dir among it).
_RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
_RAY_WORKING_DIR_FOLDER = "working_dir_files"


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


def cache_root() -> Path:
    """`$VITBIRDS_CACHE` (default `~/.cache/vitbirds`): everything vitbirds fetches or generates
    and can fetch or generate again: downloaded and registered models, deployment snapshots
    (`vitbirds.lifecycle.store`) and synthetic datasets (`vitbirds.training.runner`)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def is_uri(path: str) -> bool:
    """gs://, s3://, file:// ...: handed to a filesystem library rather than to pathlib."""
    return "://" in path


def vitbirds_home() -> Path:
    """`$VITBIRDS_HOME` (default `~/vitbirds`), absolute."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()


def in_ray_job_working_dir() -> bool:
    """True when this process is a `ray job submit --working-dir` entrypoint, whose current
    directory is Ray's temporary copy of the working directory."""
    config = os.environ.get(_RAY_JOB_CONFIG_ENV)
    if config:
        try:
            runtime_env = json.loads(config).get("runtime_env") or {}
        except (ValueError, AttributeError):
            runtime_env = {}
        if runtime_env.get("working_dir"):
            return True
    return _RAY_WORKING_DIR_FOLDER in Path.cwd().parts


def output_root() -> Path:
    """What a relative output path is relative to: $VITBIRDS_HOME in a Ray job with a working
    directory, else the current directory."""
    return vitbirds_home() if in_ray_job_working_dir() else Path.cwd()


def output_path(path: str | Path | None) -> str | None:
    """An output path made absolute where its user will look for it (see the module's note);
    URIs pass unchanged, `~` is expanded. None stays None."""
    if path is None or is_uri(str(path)):
        return None if path is None else str(path)
    # normpath, not resolve(): a symlinked --export-dir is replaced as a link, not followed
    return os.path.normpath(output_root() / Path(path).expanduser())


def output_note() -> str | None:
    """One line for a job to print when relative outputs do not go to the current directory."""
    if not in_ray_job_working_dir():
        return None
    return (
        f"running as a Ray job with a working directory: relative output paths are under "
        f"${HOME_ENV}={vitbirds_home()} on this node"
    )
