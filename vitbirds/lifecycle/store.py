"""The model store: where a model reference becomes a verified local model directory.

Every entry point takes the same references and hands them to `fetch_model` (train's
`--init-from` and `--teacher`, evaluate's and monitor's `--model`, promote, Serve's `model`, the
benches):

    runs/my-run/model            a model directory: model.safetensors + metadata.json
    runs/my-run                  a run directory: the `model/` folder its export wrote
    gs://bucket/models/latest    a model directory in object storage (gs://, s3://, file://)
    models:/vitbirds/3           a registered version (`vitbirds.lifecycle.registry`)
    models:/vitbirds@champion    the version an alias points to when the reference is read

What is fetched lands in one cache, `$VITBIRDS_CACHE` (`vitbirds.paths.cache_root`):

    models/<uri>                 object-storage copies, refreshed when the source's files change
    registry/<store>/<name>/<n>  registered versions (immutable, so fetched once)
    model-versions/<sha256>      deployment snapshots (below)

A deployment pins what it resolved. A reference such as `models/latest` or
`models:/vitbirds@champion` moves when a new model is exported or promoted. If every server process
read it when it started, a process started after a re-export (a restarted or autoscaled replica)
would serve other weights than the ones beside it, under another class list. So Serve resolves the
reference once, when the application is deployed (`resolve`), to a `ModelVersion`: the SHA-256 of
the weights and metadata plus a content-addressed snapshot of those files. Every process then
loads the snapshot, or re-fetches the source and refuses to start if its content is no longer that
digest (`materialize`). A new model reaches the processes only through a new resolution, i.e. a
new deployment (a config update). The SNAPSHOTS_KEPT most recently resolved snapshots are kept per
node (the one being deployed, and the ones a rollback or an old replica may still want); older
ones are removed at resolution, so a service rolled out daily does not fill the node's disk.

No Ray here.
"""

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vitbirds.errors import ConfigError, ModelFileError
from vitbirds.lifecycle.registry import (
    RegisteredVersion,
    Registry,
    is_model_uri,
    parse_model_uri,
    registry_uri,
)
from vitbirds.model.files import METADATA_FILE, OPTIONAL_FILES, WEIGHTS_FILE, read_metadata
from vitbirds.paths import cache_root, is_uri, output_path

# The folder of a run directory that holds its exported model (vitbirds.training.export).
RUN_MODEL_FOLDER = "model"
# The files whose bytes define a version: what the classifier computes and the class list.
VERSIONED_FILES = (WEIGHTS_FILE, METADATA_FILE)
SNAPSHOTS_KEPT = 3
ACCEPTED_REFERENCES = (
    "a model directory (model.safetensors + metadata.json), a run directory holding model/, "
    "gs://, s3:// or file:// model directory, models:/NAME/VERSION or models:/NAME@ALIAS"
)
# Not read: snapshots follow VITBIRDS_CACHE. Refused when set, so a deployment that sets it
# learns where its snapshots go instead of silently writing elsewhere.
_RETIRED_SNAPSHOT_ENV = "VITBIRDS_MODEL_SNAPSHOTS"
# Artifact locations pyarrow reads; others (a tracking server's mlflow-artifacts:/) go through
# the registry.
_STORAGE_SCHEMES = ("gs://", "s3://", "file://")
_CHUNK = 1 << 20
_HEX = frozenset("0123456789abcdef")

logger = logging.getLogger(__name__)


class ModelReferenceError(ModelFileError):
    """A model reference names no model this store can fetch."""


class ModelVersionMismatchError(ModelFileError):
    """The model at a reference is no longer the version the application was deployed with."""


@dataclass(frozen=True)
class FetchedModel:
    """A model reference and the verified local directory it names now."""

    reference: str  # as given
    path: Path  # model.safetensors + metadata.json, checked (and never a pickle)
    registered: RegisteredVersion | None = None  # the registry version a models:/ URI named

    @property
    def location(self) -> str:
        """Where any process can fetch the same files again, never through an alias that may
        move: a registered version's artifact folder when storage can read it (gs://, s3://,
        file://, a path), else its pinned `models:/NAME/N`; a storage URI as given; else the
        directory."""
        if self.registered is not None:
            source = self.registered.source
            readable = source.startswith(("/", *_STORAGE_SCHEMES))
            return source if readable else self.registered.uri
        return self.reference if is_uri(self.reference) else str(self.path)

    @property
    def label(self) -> str:
        """A short name for output folders and run names: `vitbirds-v3`, or the model's folder
        (the run's, for a run's `model/`)."""
        if self.registered is not None:
            return f"{self.registered.name}-v{self.registered.version}"
        folder = self.path.resolve()
        return folder.parent.name if folder.name == RUN_MODEL_FOLDER else folder.name


@dataclass(frozen=True)
class ModelVersion:
    """A model resolved for one deployment; picklable, so it travels to every replica."""

    reference: str  # what the operator configured, e.g. models/latest or models:/vitbirds@champion
    source: str  # where any process can fetch it again (`FetchedModel.location`)
    sha256: str  # content_digest() of VERSIONED_FILES
    snapshot: str  # the content-addressed copy on the node that resolved it

    @property
    def short(self) -> str:
        return self.sha256[:12]


def default_snapshot_root() -> Path:
    """Where deployment snapshots live: `$VITBIRDS_CACHE/model-versions`."""
    if os.environ.get(_RETIRED_SNAPSHOT_ENV):
        raise ConfigError(
            f"{_RETIRED_SNAPSHOT_ENV} is not read: model snapshots live under "
            f"$VITBIRDS_CACHE/model-versions; set VITBIRDS_CACHE instead"
        )
    return cache_root() / "model-versions"


def fetch_model(reference: str | Path, *, tracking_uri: str | None = None) -> FetchedModel:
    """The verified local model directory `reference` names now (see the module's table).

    A relative directory is relative to where the jobs write (`vitbirds.paths.output_path`), so
    a model one job exported is found by the next. `tracking_uri` is the registry a `models:/`
    reference is read from (default: MLFLOW_TRACKING_URI, else the SQLite store under runs/)."""
    text = str(reference).strip()
    if not text:
        raise ModelReferenceError(f"an empty model reference; expected {ACCEPTED_REFERENCES}")
    if is_model_uri(text):
        return _fetch_registered(text, tracking_uri)
    if is_uri(text):
        return FetchedModel(text, _fetch_remote(text))
    return FetchedModel(text, _local_model_dir(Path(output_path(text))))


def _fetch_registered(uri: str, tracking_uri: str | None) -> FetchedModel:
    try:
        parsed = parse_model_uri(uri)
    except ConfigError as error:
        raise ModelReferenceError(f"{error}; a model reference is {ACCEPTED_REFERENCES}") from None
    registry = Registry(registry_uri(tracking_uri=tracking_uri), parsed.name)
    version = registry.resolve(parsed)
    local = registry.download(version, cache_root() / "registry")
    read_metadata(local)
    return FetchedModel(uri, local, version)


def _local_model_dir(path: Path) -> Path:
    if path.is_dir() and not (path / WEIGHTS_FILE).exists():
        if (path / RUN_MODEL_FOLDER / WEIGHTS_FILE).is_file():
            path = path / RUN_MODEL_FOLDER
        elif not (path / METADATA_FILE).exists():
            raise ModelReferenceError(
                f"{path} holds neither {WEIGHTS_FILE} nor {RUN_MODEL_FOLDER}/{WEIGHTS_FILE}; "
                f"a model reference is {ACCEPTED_REFERENCES}"
            )
    elif not path.exists():
        raise ModelReferenceError(
            f"{path} does not exist; a model reference is {ACCEPTED_REFERENCES}"
        )
    read_metadata(path)  # a clear ModelFileError for a file, a partial model or a pickle
    return path


def _fetch_remote(uri: str) -> Path:
    """A local copy of an object-storage model directory, kept per URI and fetched again when
    the source's metadata.json or weights size differ from the copy's (a re-export to the same
    URI is seen; an unchanged model is not downloaded twice). Read through pyarrow, which Ray
    already depends on."""
    import pyarrow.fs as pafs

    try:
        source_fs, source_path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as error:  # pyarrow.ArrowInvalid (a ValueError): unknown scheme
        raise ModelReferenceError(
            f"{uri}: {error}; a model reference is {ACCEPTED_REFERENCES}"
        ) from None
    source_path = source_path.rstrip("/")
    target = cache_root() / "models" / uri.split("://", 1)[1].strip("/").replace("/", "__")
    try:
        with source_fs.open_input_stream(f"{source_path}/{METADATA_FILE}") as stream:
            metadata = stream.read()
        weights = source_fs.get_file_info(f"{source_path}/{WEIGHTS_FILE}")
    except OSError as error:
        raise ModelFileError(f"{uri} holds no readable model: {error}") from error
    if weights.type == pafs.FileType.NotFound:
        raise ModelFileError(f"{uri} has no {WEIGHTS_FILE}")
    if _same_copy(target, metadata, weights.size):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        names = [WEIGHTS_FILE, METADATA_FILE, *OPTIONAL_FILES]
        found = source_fs.get_file_info([f"{source_path}/{name}" for name in names])
        for name, info in zip(names, found, strict=True):
            if info.type != pafs.FileType.NotFound:
                pafs.copy_files(
                    info.path,
                    str(staging / name),
                    source_filesystem=source_fs,
                    destination_filesystem=pafs.LocalFileSystem(),
                )
        read_metadata(staging)
        _replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _same_copy(local: Path, metadata: bytes, weights_size: int) -> bool:
    try:
        return (local / METADATA_FILE).read_bytes() == metadata and (
            local / WEIGHTS_FILE
        ).stat().st_size == weights_size
    except OSError:
        return False


def _replace_dir(new: Path, target: Path) -> None:
    """Moves `new` to `target`, replacing what is there; a reader sees one or the other whole."""
    old = target.with_name(f".{target.name}.old.{os.getpid()}")
    if target.exists():
        target.rename(old)
    try:
        new.rename(target)
    except OSError:  # another process put its copy of the same source in first
        if not (target / METADATA_FILE).is_file():
            raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Deployment versions


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
    fetched = fetch_model(reference)
    source = fetched.location
    root = snapshot_root or default_snapshot_root()
    digest, snapshot = _snapshot(fetched.path, root)
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

    The resolving node's snapshot when this process sees it; else a fresh fetch of the source,
    snapshotted here, which must still have the version's digest."""
    snapshot = Path(version.snapshot)
    if snapshot.is_dir():
        try:
            if content_digest(snapshot) == version.sha256:
                return snapshot
        except ModelFileError:
            pass  # incomplete: fall back to the source
    fetched = fetch_model(version.source)
    digest, local = _snapshot(fetched.path, snapshot_root or default_snapshot_root())
    if digest != version.sha256:
        raise ModelVersionMismatchError(
            f"{version.reference} ({version.source}) now has sha256 {digest}, but this "
            f"application was deployed with {version.sha256}: a new model is rolled out by a "
            "config update (serve deploy / RayService upgrade), not by replacing the files"
        )
    return local
