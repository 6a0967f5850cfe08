"""Serve's Ray-free inference code on every architecture the project exports: a ResNet-18 model
directory (the distillation teacher) is served for /predict like a ViT."""

import io

import torch
from PIL import Image

from serve.inference import BatchPredictor, ImagePreprocessor
from serve.testing import make_model_dir
from vitbirds.model.files import load_model
from vitbirds.monitoring.predictions import EMBEDDING_DIM


def _photo_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (80, 60), (120, 160, 90)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_a_resnet_model_directory_is_predicted_with_an_embedding(tmp_path):
    classes = ["a", "b", "c"]
    loaded = load_model(make_model_dir(tmp_path, classes, architecture="resnet18"))
    image = ImagePreprocessor(loaded.metadata).model_input(_photo_bytes())

    (output,) = BatchPredictor(loaded)([image])

    with torch.inference_mode():
        expected = loaded.model(image[None]).softmax(dim=-1)[0]
    torch.testing.assert_close(torch.tensor(output.probabilities), expected)
    assert len(output.embedding) == EMBEDDING_DIM


def test_a_vit_model_directory_is_predicted_as_its_forward_pass(tmp_path):
    loaded = load_model(make_model_dir(tmp_path / "vit", ["a", "b"]))
    image = ImagePreprocessor(loaded.metadata).model_input(_photo_bytes())

    (output,) = BatchPredictor(loaded)([image])

    with torch.inference_mode():
        expected = loaded.model(image[None]).softmax(dim=-1)[0]
    torch.testing.assert_close(torch.tensor(output.probabilities), expected)
