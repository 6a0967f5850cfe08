"""The model directory: safetensors + JSON round trip, checks, and no unpickling ever."""

import json
import pickle

import pytest
import torch

from vitbirds.config import ModelConfig
from vitbirds.errors import ModelFileError, UnsafeModelFileError
from vitbirds.model.files import (
    ModelMetadata,
    load_model,
    read_metadata,
    save_model,
)
from vitbirds.model.vit import VisionTransformer

CONFIG = ModelConfig(image_size=32, patch_size=8, dim=48, depth=2, heads=3, num_classes=3)


def _metadata(**overrides) -> ModelMetadata:
    values = dict(
        model=CONFIG.to_dict(),
        class_names=["ALBATROSS", "BLUE JAY", "CARDINAL"],
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        image_size=32,
        metrics={"val_top1": 0.5},
        data={"source": "synthetic", "synthetic": True, "fingerprint": "abc"},
    )
    return ModelMetadata(**{**values, **overrides})


def test_round_trip_gives_identical_logits_and_metadata(tmp_path) -> None:
    model = VisionTransformer(CONFIG).eval()
    save_model(tmp_path / "model", model, _metadata())
    loaded = load_model(tmp_path / "model")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert not loaded.model.training
    assert loaded.metadata.class_names == ["ALBATROSS", "BLUE JAY", "CARDINAL"]
    assert loaded.metadata.synthetic
    assert loaded.metadata.model_config == CONFIG
    assert loaded.metadata.code_version


def test_pickle_file_is_refused_before_anything_is_unpickled(tmp_path) -> None:
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps(Boom(), protocol=4))
    with pytest.raises(UnsafeModelFileError, match="arbitrary code"):
        load_model(path)
    directory = tmp_path / "old"
    directory.mkdir()
    torch.save(VisionTransformer(CONFIG), directory / "model.pth")
    with pytest.raises(UnsafeModelFileError):
        load_model(directory)


def test_weights_that_do_not_match_the_metadata_are_refused(tmp_path) -> None:
    save_model(tmp_path, VisionTransformer(CONFIG), _metadata())
    other = CONFIG.to_dict() | {"dim": 96}
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    metadata["model"] = other
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelFileError, match="do not match the metadata"):
        load_model(tmp_path)


def test_class_count_must_match_the_head(tmp_path) -> None:
    save_model(tmp_path, VisionTransformer(CONFIG), _metadata(class_names=["A", "B"]))
    with pytest.raises(ModelFileError, match="2 class names but the model has 3 outputs"):
        read_metadata(tmp_path)


def test_missing_directory_and_missing_files_are_clear_errors(tmp_path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelFileError, match=r"has no model\.safetensors"):
        load_model(tmp_path)
    save_model(tmp_path / "m", VisionTransformer(CONFIG), _metadata())
    (tmp_path / "m" / "metadata.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid model metadata"):
        load_model(tmp_path / "m")
