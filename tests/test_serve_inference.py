"""Serve's Ray-free inference code on every architecture the project exports: a ResNet-18 model
directory (the distillation teacher) is served for /predict like a ViT."""

import io

import torch
from PIL import Image

from vitbirds.data.images import load_rgb
from vitbirds.data.transforms import EVAL_RESIZE_SCALE, eval_transform
from vitbirds.inference.scoring import BatchPredictor, ImagePreprocessor, model_normaliser
from vitbirds.inference.stand_in import make_model_dir
from vitbirds.model.files import LoadedModel, load_model
from vitbirds.monitoring.predictions import EMBEDDING_DIM


def _photo_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (80, 60), (120, 160, 90)).save(buffer, "JPEG")
    return buffer.getvalue()


def _evaluation_input(loaded: LoadedModel, data: bytes) -> torch.Tensor:
    """The model input `jobs/evaluate.py` makes of the file."""
    meta = loaded.metadata
    image = load_rgb(data, short_side=round(meta.image_size * EVAL_RESIZE_SCALE))
    return eval_transform(meta.image_size, meta.mean, meta.std)(image)


def test_the_uint8_crop_normalised_is_exactly_the_evaluation_input(tmp_path):
    loaded = load_model(make_model_dir(tmp_path, ["a", "b"]))
    crop = ImagePreprocessor(loaded.metadata).model_input(_photo_bytes())

    size = loaded.metadata.image_size
    assert crop.dtype == torch.uint8 and crop.shape == (3, size, size)
    evaluated = _evaluation_input(loaded, _photo_bytes())
    assert torch.equal(model_normaliser(loaded.metadata)(crop), evaluated)


def test_a_resnet_model_directory_is_predicted_with_an_embedding(tmp_path):
    classes = ["a", "b", "c"]
    loaded = load_model(make_model_dir(tmp_path, classes, architecture="resnet18"))
    image = ImagePreprocessor(loaded.metadata).model_input(_photo_bytes())

    (output,) = BatchPredictor(loaded)([image])

    with torch.inference_mode():
        expected = loaded.model(_evaluation_input(loaded, _photo_bytes())[None]).softmax(-1)[0]
    torch.testing.assert_close(torch.tensor(output.probabilities), expected)
    assert len(output.embedding) == EMBEDDING_DIM


def test_a_vit_model_directory_is_predicted_as_its_forward_pass(tmp_path):
    loaded = load_model(make_model_dir(tmp_path / "vit", ["a", "b"]))
    image = ImagePreprocessor(loaded.metadata).model_input(_photo_bytes())

    (output,) = BatchPredictor(loaded)([image])

    with torch.inference_mode():
        expected = loaded.model(_evaluation_input(loaded, _photo_bytes())[None]).softmax(-1)[0]
    torch.testing.assert_close(torch.tensor(output.probabilities), expected)
