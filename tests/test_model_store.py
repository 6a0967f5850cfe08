"""The model store: every reference form to one verified local directory, one cache, one error
naming what was given and what is accepted; and the train job's --init-from and --teacher."""

import pickle
from pathlib import Path

import pytest
import torch
from test_registry import register_model_dir, tiny_model_dir

from vitbirds.errors import ConfigError, ModelFileError, UnsafeModelFileError
from vitbirds.lifecycle.registry import CHALLENGER, RegisteredVersion, registry_uri
from vitbirds.lifecycle.store import (
    FetchedModel,
    ModelReferenceError,
    default_snapshot_root,
    fetch_model,
)
from vitbirds.model.baselines import build_classifier
from vitbirds.model.files import load_model, read_metadata, save_model
from vitbirds.presets import get_recipe
from vitbirds.training.runner import build_run_model, pin_model_references, starting_weights


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("VITBIRDS_CACHE", str(root))
    monkeypatch.delenv("VITBIRDS_MODEL_SNAPSHOTS", raising=False)
    return root


def test_a_model_directory_is_itself(tmp_path) -> None:
    model_dir = tiny_model_dir(tmp_path / "m", seed=1)
    fetched = fetch_model(str(model_dir))
    assert fetched.path == model_dir and fetched.registered is None
    assert fetched.location == str(model_dir) and fetched.label == "m"


def test_a_run_directory_names_the_model_its_export_wrote(tmp_path) -> None:
    tiny_model_dir(tmp_path / "my-run" / "model", seed=1)
    fetched = fetch_model(tmp_path / "my-run")
    assert fetched.path == tmp_path / "my-run" / "model"
    assert fetched.label == "my-run"


def test_a_relative_directory_is_relative_to_where_jobs_write(tmp_path, monkeypatch) -> None:
    tiny_model_dir(tmp_path / "runs" / "r" / "model", seed=1)
    monkeypatch.chdir(tmp_path)
    assert fetch_model("runs/r").path.resolve() == (tmp_path / "runs/r/model").resolve()


def test_a_storage_uri_is_copied_into_the_cache_with_its_reference_profile(tmp_path, cache) -> None:
    source = tiny_model_dir(tmp_path / "bucket" / "model", seed=1)
    (source / "reference.json").write_text("{}")
    fetched = fetch_model(source.as_uri())
    assert fetched.path.is_relative_to(cache / "models")
    assert sorted(p.name for p in fetched.path.iterdir()) == [
        "metadata.json",
        "model.safetensors",
        "reference.json",
    ]
    assert fetched.location == source.as_uri()


def test_a_storage_uri_re_exported_is_fetched_again_and_an_unchanged_one_is_not(tmp_path) -> None:
    source = tiny_model_dir(tmp_path / "bucket" / "latest", seed=1)
    first = fetch_model(source.as_uri()).path
    copied_at = (first / "model.safetensors").stat().st_mtime_ns
    assert (fetch_model(source.as_uri()).path / "model.safetensors").stat().st_mtime_ns == copied_at

    tiny_model_dir(source, seed=2)  # a new export to the same URI
    again = fetch_model(source.as_uri()).path
    assert again == first and read_metadata(again).version == "seed2"


def test_a_registry_uri_names_one_version_whose_files_are_fetched_once(tmp_path, cache) -> None:
    storage = tmp_path / "runs"
    register_model_dir(storage, tiny_model_dir(tmp_path / "m1", seed=1), "one")
    fetched = fetch_model(f"models:/vitbirds@{CHALLENGER}", tracking_uri=registry_uri(storage))
    assert fetched.registered is not None and fetched.registered.version == 1
    assert fetched.path.is_relative_to(cache / "registry")
    assert fetched.label == "vitbirds-v1"
    assert fetched.location == fetched.registered.source
    assert load_model(fetch_model(fetched.location).path).metadata.version == "seed1"


@pytest.mark.parametrize(
    ("source", "location"),
    [
        ("gs://bucket/mlruns/1/abc/artifacts/model", "gs://bucket/mlruns/1/abc/artifacts/model"),
        ("/srv/mlruns/1/abc/artifacts/model", "/srv/mlruns/1/abc/artifacts/model"),
        ("mlflow-artifacts:/1/abc/artifacts/model", "models:/vitbirds/3"),
    ],
)
def test_a_registered_model_is_fetched_again_by_its_files_or_its_pinned_version(
    source, location, tmp_path
) -> None:
    """Workers and replicas on other nodes re-fetch `location`: storage they can read, or the
    registry's pinned version when the files sit behind a tracking server."""
    version = RegisteredVersion("vitbirds", 3, source, run_id="abc", aliases=("champion",))
    fetched = FetchedModel("models:/vitbirds@champion", tmp_path, version)
    assert fetched.location == location


@pytest.mark.parametrize(
    ("reference", "names"),
    [
        ("", "an empty model reference"),
        ("no/such/dir", "does not exist"),
        ("models:/vitbirds", "not a registry URI"),
        ("models:/vitbirds@a@b", "not a registry URI"),
        ("nosuchscheme://bucket/model", "nosuchscheme://bucket/model"),
    ],
)
def test_a_bad_reference_names_what_was_given_and_what_is_accepted(reference, names) -> None:
    with pytest.raises(ModelReferenceError, match=names) as raised:
        fetch_model(reference)
    assert "models:/NAME@ALIAS" in str(raised.value)


def test_a_folder_without_a_model_is_a_reference_error(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelReferenceError, match=r"holds neither model\.safetensors"):
        fetch_model(tmp_path / "empty")


def test_a_pickled_model_is_refused_whatever_the_reference_form(tmp_path) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(pickle.dumps({"weights": [1, 2]}))
    with pytest.raises(UnsafeModelFileError):
        fetch_model(bad)


def test_a_storage_uri_without_a_model_is_a_model_file_error(tmp_path) -> None:
    (tmp_path / "bucket").mkdir()
    with pytest.raises(ModelFileError, match="holds no readable model"):
        fetch_model((tmp_path / "bucket").as_uri())


def test_snapshots_live_in_the_one_cache(cache, monkeypatch) -> None:
    assert default_snapshot_root() == cache / "model-versions"
    monkeypatch.setenv("VITBIRDS_MODEL_SNAPSHOTS", "/somewhere")
    with pytest.raises(ConfigError, match="set VITBIRDS_CACHE instead"):
        default_snapshot_root()


def test_init_from_a_vitbirds_model_starts_from_its_weights_with_a_fresh_head(tmp_path) -> None:
    source = tiny_model_dir(tmp_path / "run" / "model", seed=1, classes=["a", "b", "c", "d"])
    recipe = get_recipe("vit-test")  # its own class count: the head cannot be carried over
    assert starting_weights(tmp_path / "run") == source / "model.safetensors"
    started = build_run_model(recipe, str(tmp_path / "run")).state_dict()
    loaded = load_model(source).model.state_dict()
    assert torch.equal(started["blocks.0.attn.qkv.weight"], loaded["blocks.0.attn.qkv.weight"])
    assert started["head.weight"].shape[0] == recipe.model.num_classes


def test_init_from_a_resnet_is_refused_by_name(tmp_path) -> None:
    metadata = read_metadata(tiny_model_dir(tmp_path / "vit", seed=1))
    metadata.architecture = "resnet18"
    save_model(tmp_path / "resnet", build_classifier("resnet18", metadata.model_config), metadata)
    with pytest.raises(ConfigError, match="is a resnet18 model"):
        starting_weights(tmp_path / "resnet")


def test_a_timm_file_passes_through_and_a_missing_one_is_named(tmp_path) -> None:
    pinned, _ = pin_model_references("w.safetensors", None)
    assert pinned == str(Path("w.safetensors").resolve())  # workers run in another directory
    with pytest.raises(ModelFileError, match=r"--init-from file .*w\.safetensors does not exist"):
        build_run_model(get_recipe("vit-test"), str(tmp_path / "w.safetensors"))


def test_the_train_job_pins_a_registry_alias_to_the_files_it_names_now(tmp_path) -> None:
    storage = tmp_path / "runs"
    register_model_dir(storage, tiny_model_dir(tmp_path / "m1", seed=1), "one")
    uri = registry_uri(storage)
    init_from, teacher = pin_model_references(
        f"models:/vitbirds@{CHALLENGER}", str(tmp_path / "m1"), tracking_uri=uri
    )
    register_model_dir(storage, tiny_model_dir(tmp_path / "m2", seed=2), "two")  # alias moves
    assert read_metadata(fetch_model(init_from).path).version == "seed1"
    assert teacher == str(tmp_path / "m1")
