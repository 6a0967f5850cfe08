"""One model version per deployment: a model reference resolved once to immutable content.

A reference such as `models/latest`, `gs://bucket/models/latest` or, through the model registry,
`models:/vitbirds@champion` names whatever was exported there last, and it moves when a new
model is exported. If every server process read the reference when it started, a process started
after a re-export (a restarted or autoscaled replica) would serve other weights than the ones
beside it, under another class list. So the reference is resolved once, when the application is
deployed, to a `ModelVersion`: the SHA-256 of the weights and metadata, plus a content-addressed
snapshot of those files. Every process then loads the snapshot, or re-fetches the source and
refuses to start if its content is no longer that digest. A new model reaches the processes only
through a new resolution, i.e. a new deployment (a config update).

Snapshots are kept per node for the SNAPSHOTS_KEPT most recently resolved versions (the one being
deployed, and the ones a rollback or an old replica may still want); older ones are removed at
resolution, so a service that is rolled out daily does not fill the node's disk.

No Ray here: serve/app.py resolves in its application builder and materialises in each replica.
"""

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vitbirds.errors import ModelFileError
from vitbirds.model.files import (
    METADATA_FILE,
    OPTIONAL_FILES,
    WEIGHTS_FILE,
    fetch_model_dir,
    read_metadata,
)

# The files whose bytes define a version: what the classifier computes and the class list.
VERSIONED_FILES = (WEIGHTS_FILE, METADATA_FILE)
SNAPSHOT_ROOT_ENV = "VITBIRDS_MODEL_SNAPSHOTS"
REGISTRY_SCHEME = "models:/"
SNAPSHOTS_KEPT = 3
_CHUNK = 1 << 20
_HEX = frozenset("0123456789abcdef")

logger = logging.getLogger(__name__)


class ModelVersionMismatchError(ModelFileError):
    """The model at a reference is no longer the version the application was deployed with."""


@dataclass(frozen=True)
class ModelVersion:
    """A model resolved for one deployment; picklable, so it travels to every replica."""

    reference: str  # what the operator configured, e.g. models/latest or models:/vitbirds@champion
    source: str  # where the files were found: a directory or a gs:// / s3:// URI
    sha256: str  # content_digest() of VERSIONED_FILES
    snapshot: str  # the content-addressed copy on the node that resolved it

    @property
    def short(self) -> str:
        return self.sha256[:12]


def default_snapshot_root() -> Path:
    """$VITBIRDS_MODEL_SNAPSHOTS, else ~/.cache/vitbirds/model-versions."""
    configured = os.environ.get(SNAPSHOT_ROOT_ENV)
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "vitbirds" / "model-versions"


def _resolve_registry_uri(uri: str) -> str:
    """`models:/name@alias` or `models:/name/3` to the downloaded directory of the one version it
    names now, through the MLflow registry (MLFLOW_TRACKING_URI, else the store under runs/).
    Imported here: only a registry reference needs MLflow."""
    from vitbirds.training.registry import resolve_model_uri

    model_dir, _ = resolve_model_uri(uri)
    return str(model_dir)


# The single hook for reference schemes that name a model indirectly: prefix -> resolver giving a
# directory or a gs:// / s3:// URI. Everything else is a path or a storage URI as it is.
RESOLVERS: dict[str, Callable[[str], str]] = {REGISTRY_SCHEME: _resolve_registry_uri}


def locate(reference: str) -> str:
    """The directory or storage URI a reference names now."""
    for prefix, resolver in RESOLVERS.items():
        if reference.startswith(prefix):
            return resolver(reference)
    return reference


def content_digest(model_dir: str | Path) -> str:
    """SHA-256 over the names, sizes and bytes of the versioned files of a model directory."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for name in VERSIONED_FILES:
        path = model_dir / name
        if not path.is_file():
            raise ModelFileError(f"{model_dir} has no {name}")
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _snapshot(local_dir: Path, root: Path) -> tuple[str, Path]:
    """Copies a model directory into root/<sha256> (hashing the copy, so a file rewritten while
    it is copied cannot yield a digest of other bytes) and returns (digest, snapshot dir)."""
    read_metadata(local_dir)  # a clear ModelFileError for a missing, partial or pickled model
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        for name in (*VERSIONED_FILES, *OPTIONAL_FILES):
            if (local_dir / name).is_file():
                shutil.copyfile(local_dir / name, staging / name)
        digest = content_digest(staging)
        target = root / digest
        if target.is_dir() and content_digest(target) == digest:
            return digest, target
        if target.exists():  # a damaged earlier snapshot: replace it
            shutil.rmtree(target)
        for path in staging.iterdir():
            path.chmod(0o444)
        try:
            staging.rename(target)  # atomic: other processes see all of it or nothing
        except OSError:
            # Another replica on this node snapshotted the same version first.
            if not (target.is_dir() and content_digest(target) == digest):
                raise
        return digest, target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fetch_and_snapshot(source: str, root: Path) -> tuple[str, Path]:
    """(digest, snapshot) of what `source` holds now; a remote source is downloaded afresh (not
    from fetch_model_dir's cache, which keeps whatever a URI held the first time)."""
    if "://" not in source:
        return _snapshot(Path(source), root)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as download:
        return _snapshot(fetch_model_dir(source, cache_dir=download), root)


def prune_snapshots(root: Path, keep: int = SNAPSHOTS_KEPT) -> list[Path]:
    """Removes all but the `keep` most recently resolved snapshots under `root` (by the time
    `resolve` last touched them); staging and download folders are left alone. Returns what
    was removed."""
    snapshots = [
        path
        for path in root.iterdir()
        if path.is_dir() and len(path.name) == 64 and set(path.name) <= _HEX
    ]
    snapshots.sort(key=lambda path: path.stat().st_mtime, reverse=True)
    for old in snapshots[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return snapshots[keep:]


def resolve(
    reference: str,
    *,
    expected_sha256: str | None = None,
    snapshot_root: Path | None = None,
    keep_snapshots: int = SNAPSHOTS_KEPT,
) -> ModelVersion:
    """Resolves `reference` once, at deployment: the version to serve and its snapshot; then
    prunes the node's snapshots to the `keep_snapshots` most recently resolved.

    `expected_sha256` pins the version (cluster/render_rayservice.py writes it): a reference
    whose content differs is refused instead of served."""
    source = locate(reference)
    root = snapshot_root or default_snapshot_root()
    digest, snapshot = _fetch_and_snapshot(source, root)
    if expected_sha256 and digest != expected_sha256:
        raise ModelVersionMismatchError(
            f"{reference} ({source}) has sha256 {digest}, not the pinned {expected_sha256}"
        )
    os.utime(snapshot)  # most recently resolved: the last to be pruned
    for removed in prune_snapshots(root, max(keep_snapshots, 1)):
        logger.info("removed model snapshot %s (older than the %d kept)", removed, keep_snapshots)
    return ModelVersion(reference=reference, source=source, sha256=digest, snapshot=str(snapshot))


def materialize(version: ModelVersion, *, snapshot_root: Path | None = None) -> Path:
    """A local directory holding exactly `version`, for a process about to load it.

    The resolving node's snapshot when this process sees it; else a fresh copy of the source,
    snapshotted here, which must still have the version's digest."""
    snapshot = Path(version.snapshot)
    if snapshot.is_dir():
        try:
            if content_digest(snapshot) == version.sha256:
                return snapshot
        except ModelFileError:
            pass  # incomplete: fall back to the source
    digest, local = _fetch_and_snapshot(version.source, snapshot_root or default_snapshot_root())
    if digest != version.sha256:
        raise ModelVersionMismatchError(
            f"{version.reference} ({version.source}) now has sha256 {digest}, but this "
            f"application was deployed with {version.sha256}: a new model is rolled out by a "
            "config update (serve deploy / RayService upgrade), not by replacing the files"
        )
    return local
