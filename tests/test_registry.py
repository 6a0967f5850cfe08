"""The model registry: every export a numbered version, `challenger` on registration, and
`models:/` URIs resolved to one immutable version and its files."""

from pathlib import Path

import pytest
import torch

from vitbirds.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from vitbirds.errors import ConfigError, ModelFileError
from vitbirds.lifecycle.registry import (
    CHALLENGER,
    CHAMPION,
    ModelUri,
    Registry,
    parse_model_uri,
    register_export,
    registry_uri,
)
from vitbirds.lifecycle.store import fetch_model
from vitbirds.lifecycle.tracking import MlflowTracker, default_mlflow_uri
from vitbirds.model.files import ModelMetadata, load_model, save_model
from vitbirds.model.vit import build_model
from vitbirds.presets import get_recipe

CLASSES = ["Blue Tit", "Robin", "Wren"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VITBIRDS_CACHE", str(tmp_path / "cache"))


def fetch_registered(uri: str, storage: Path):
    """(local directory, registered version) of a models:/ URI, through the model store."""
    fetched = fetch_model(uri, tracking_uri=registry_uri(storage))
    return fetched.path, fetched.registered


def tiny_model_dir(path: Path, *, seed: int, classes: list[str] = CLASSES) -> Path:
    """A vit-test model with seeded random weights, saved in the project's format."""
    config = get_recipe("vit-test").model
    config.num_classes = len(classes)
    torch.manual_seed(seed)
    metadata = ModelMetadata(
        model=config.to_dict(), class_names=list(classes), mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD), image_size=config.image_size, name="tiny",
        version=f"seed{seed}", data={"source": "synthetic", "synthetic": True},
        metrics={"val_top1": 0.5},
    )  # fmt: skip
    return save_model(path, build_model(config), metadata)


def register_model_dir(storage: Path, model_dir: Path, run_name: str) -> int:
    """What training does: log the model folder to an MLflow run, then register it."""
    tracker = MlflowTracker(default_mlflow_uri(storage), "vitbirds", run_name)
    tracker.log_artifact(model_dir, "model")
    tracker.close()
    metadata = load_model(model_dir).metadata
    return register_export(tracker.tracking_uri, tracker.run_id, metadata).version


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory) -> tuple[Path, Registry]:
    """One store for the module (creating an MLflow database takes seconds); tests move only
    aliases of their own."""
    root = tmp_path_factory.mktemp("registry")
    storage = root / "runs"
    for seed in (1, 2):
        register_model_dir(storage, tiny_model_dir(root / f"m{seed}", seed=seed), f"r{seed}")
    return storage, Registry(default_mlflow_uri(storage))


def test_each_export_is_a_new_version_and_the_newest_is_the_challenger(two_versions) -> None:
    _, registry = two_versions
    assert [registry.get(v).version for v in (1, 2)] == [1, 2]
    assert registry.by_alias(CHALLENGER).version == 2
    assert registry.by_alias(CHAMPION) is None


def test_a_version_records_the_model_it_holds_as_tags(two_versions) -> None:
    _, registry = two_versions
    tags = registry.get(1).tags
    assert tags["vitbirds.version"] == "seed1" and tags["vitbirds.synthetic"] == "true"
    assert tags["metric.val_top1"] == "0.5"


def test_a_version_holds_the_safetensors_and_metadata_files_and_no_pickle(two_versions) -> None:
    storage, _ = two_versions
    local, _ = fetch_registered("models:/vitbirds/1", storage)
    assert {p.name for p in local.iterdir()} == {"model.safetensors", "metadata.json"}


def test_an_alias_resolves_to_the_version_it_points_to_and_its_files(two_versions) -> None:
    storage, _ = two_versions
    local, version = fetch_registered("models:/vitbirds@challenger", storage)
    assert version.version == 2 and version.uri == "models:/vitbirds/2"
    assert load_model(local).metadata.version == "seed2"


def test_a_resolved_version_keeps_its_files_when_the_alias_moves(two_versions) -> None:
    storage, registry = two_versions
    registry.set_alias("staging", 2)
    before, pinned = fetch_registered("models:/vitbirds@staging", storage)
    registry.set_alias("staging", 1)
    again, _ = fetch_registered(pinned.uri, storage)
    now, moved = fetch_registered("models:/vitbirds@staging", storage)
    assert again == before and load_model(again).metadata.version == "seed2"
    assert moved.version == 1 and load_model(now).metadata.version == "seed1"


def test_a_missing_alias_is_a_model_file_error_naming_it(two_versions) -> None:
    storage, _ = two_versions
    with pytest.raises(ModelFileError, match="no alias 'champion'"):
        fetch_registered("models:/vitbirds@champion", storage)


def test_a_missing_version_is_a_model_file_error_naming_it(two_versions) -> None:
    storage, _ = two_versions
    with pytest.raises(ModelFileError, match="models:/vitbirds/9"):
        fetch_registered("models:/vitbirds/9", storage)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("models:/vitbirds@champion", ModelUri("vitbirds", alias="champion")),
        ("models:/birds-b/12", ModelUri("birds-b", version=12)),
    ],
)
def test_registry_uris_name_a_model_and_an_alias_or_a_version(text, parsed) -> None:
    assert parse_model_uri(text) == parsed and str(parsed) == text


@pytest.mark.parametrize(
    "text", ["models:/vitbirds", "models:/vitbirds/latest", "runs:/abc/model", "models:/a@b/3"]
)
def test_a_malformed_registry_uri_is_a_config_error_with_an_example(text) -> None:
    with pytest.raises(ConfigError, match="models:/vitbirds@champion"):
        parse_model_uri(text)
