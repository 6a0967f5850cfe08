"""A model reference resolved once to an immutable version (vitbirds.lifecycle.store)."""

import shutil
from pathlib import Path

import pytest
from test_registry import register_model_dir, tiny_model_dir

from vitbirds.errors import ModelFileError
from vitbirds.inference.stand_in import make_model_dir
from vitbirds.lifecycle.registry import CHALLENGER, registry_uri
from vitbirds.lifecycle.store import ModelVersionMismatchError, content_digest, materialize, resolve
from vitbirds.model.files import METADATA_FILE, WEIGHTS_FILE, read_metadata

CLASSES = ["Blue_Jay", "Cardinal", "Mallard"]


@pytest.fixture()
def latest(tmp_path: Path) -> Path:
    return make_model_dir(tmp_path / "models" / "latest", CLASSES, seed=0)


@pytest.fixture()
def snapshots(tmp_path: Path) -> Path:
    return tmp_path / "snapshots"


def _reexport(model_dir: Path, seed: int, classes: list[str]) -> None:
    make_model_dir(model_dir, classes, seed=seed)


def test_resolving_snapshots_the_content_under_its_digest(latest, snapshots):
    version = resolve(str(latest), snapshot_root=snapshots)
    assert version.sha256 == content_digest(latest)
    assert Path(version.snapshot) == snapshots / version.sha256
    assert content_digest(version.snapshot) == version.sha256
    assert read_metadata(version.snapshot).class_names == CLASSES


def test_digest_changes_with_the_weights_and_with_the_class_list(latest, tmp_path):
    before = content_digest(latest)
    _reexport(latest, seed=1, classes=CLASSES)
    reweighted = content_digest(latest)
    _reexport(latest, seed=1, classes=list(reversed(CLASSES)))
    assert len({before, reweighted, content_digest(latest)}) == 3


def test_a_replica_started_after_a_reexport_loads_the_deployed_version(latest, snapshots):
    version = resolve(str(latest), snapshot_root=snapshots)
    _reexport(latest, seed=1, classes=list(reversed(CLASSES)))
    local = materialize(version, snapshot_root=snapshots)
    assert content_digest(local) == version.sha256
    assert read_metadata(local).class_names == CLASSES


def test_a_replica_without_the_snapshot_refuses_changed_files(latest, snapshots, tmp_path):
    # Another node: the resolving node's snapshot is not there, only the source is.
    version = resolve(str(latest), snapshot_root=snapshots)
    shutil.rmtree(version.snapshot)
    _reexport(latest, seed=1, classes=CLASSES)
    with pytest.raises(ModelVersionMismatchError, match=version.sha256):
        materialize(version, snapshot_root=tmp_path / "other-node")
    # ... while unchanged files are fetched and verified.
    _reexport(latest, seed=0, classes=CLASSES)
    fresh = materialize(version, snapshot_root=tmp_path / "other-node")
    assert fresh == tmp_path / "other-node" / version.sha256
    assert content_digest(fresh) == version.sha256


def test_a_damaged_snapshot_is_not_loaded(latest, snapshots, tmp_path):
    version = resolve(str(latest), snapshot_root=snapshots)
    weights = Path(version.snapshot) / WEIGHTS_FILE
    weights.chmod(0o644)
    weights.write_bytes(b"\0" * 16)
    local = materialize(version, snapshot_root=tmp_path / "elsewhere")
    assert content_digest(local) == version.sha256


def test_a_pinned_digest_refuses_other_content(latest, snapshots):
    pinned = content_digest(latest)
    assert resolve(str(latest), expected_sha256=pinned, snapshot_root=snapshots).sha256 == pinned
    _reexport(latest, seed=1, classes=CLASSES)
    with pytest.raises(ModelVersionMismatchError, match=pinned):
        resolve(str(latest), expected_sha256=pinned, snapshot_root=snapshots)


def test_a_missing_or_partial_model_is_a_model_file_error(tmp_path, snapshots):
    with pytest.raises(ModelFileError, match="does not exist"):
        resolve(str(tmp_path / "nowhere"), snapshot_root=snapshots)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / METADATA_FILE).write_text("{}")
    with pytest.raises(ModelFileError, match=WEIGHTS_FILE):
        resolve(str(partial), snapshot_root=snapshots)


def test_a_registry_alias_is_pinned_to_the_files_of_the_version_it_names(
    tmp_path, snapshots, monkeypatch
):
    """A replica on another node re-fetches the version's own artifact folder, never the alias,
    which may have moved since the deployment resolved it."""
    storage = tmp_path / "runs"
    monkeypatch.setenv("VITBIRDS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry_uri(storage))
    first = tiny_model_dir(tmp_path / "m1", seed=1)
    register_model_dir(storage, first, "one")
    version = resolve(f"models:/vitbirds@{CHALLENGER}", snapshot_root=snapshots)
    assert version.reference == f"models:/vitbirds@{CHALLENGER}"
    assert version.sha256 == content_digest(first) and version.source.endswith("model")

    register_model_dir(storage, tiny_model_dir(tmp_path / "m2", seed=2), "two")  # alias moves
    shutil.rmtree(version.snapshot)  # a node that never saw the snapshot
    assert content_digest(materialize(version, snapshot_root=tmp_path / "elsewhere")) == (
        version.sha256
    )


def test_only_the_most_recently_resolved_snapshots_are_kept(latest, snapshots):
    """Each rollout snapshots a version; resolution keeps the newest `keep_snapshots` (here 2),
    and resolving an older version again makes it the newest."""
    versions = []
    for seed in range(4):
        _reexport(latest, seed=seed, classes=CLASSES)
        versions.append(resolve(str(latest), snapshot_root=snapshots, keep_snapshots=2))
    (snapshots / ".staging-left-by-a-crash").mkdir()
    kept = {path.name for path in snapshots.iterdir()}
    assert kept == {versions[2].sha256, versions[3].sha256, ".staging-left-by-a-crash"}

    _reexport(latest, seed=2, classes=CLASSES)  # a rollback to version 2
    resolve(str(latest), snapshot_root=snapshots, keep_snapshots=1)
    assert {path.name for path in snapshots.iterdir()} == {
        versions[2].sha256,
        ".staging-left-by-a-crash",
    }
