"""What a served answer must equal: the model's own answer to the same file, computed here
without Serve, at the precision the replicas run at (shared by the Serve test modules)."""

import pytest
import torch

from serve.schemas import ServeSettings
from vitbirds.data.images import load_rgb
from vitbirds.data.transforms import EVAL_RESIZE_SCALE, eval_transform
from vitbirds.model.files import LoadedModel
from vitbirds.precision import FP32, Precision, resolve_precision

ATOL = 1e-5
# What a replica computes in with the default settings on this machine (bf16 on a CPU with
# AMX-BF16): the apps that keep the default are checked against an offline answer at the same
# precision. bf16 answers of one image alone and in a batch of 8 differed by up to 8e-5 (random
# vit-cpu weights, 1 and 2 threads alike), hence the looser tolerance there.
SERVED_PRECISION = resolve_precision(ServeSettings.precision, "cpu")
TOLERANCE = {"fp32": ATOL, "bf16": 1e-3}


def offline_probabilities(
    loaded: LoadedModel, data: bytes, precision: Precision = FP32
) -> torch.Tensor:
    """What the model says about the file, computed here without Serve: decoded as training
    decodes (short side image_size * 1.15), eval transform, softmax of the forward pass at
    `precision`."""
    meta = loaded.metadata
    image = load_rgb(data, short_side=round(meta.image_size * EVAL_RESIZE_SCALE))
    x = eval_transform(meta.image_size, meta.mean, meta.std)(image)
    with torch.inference_mode(), precision.autocast():
        logits = loaded.model(x[None])
    return logits.float().softmax(-1)[0]


def assert_matches_offline(
    predictions: list[dict], expected: torch.Tensor, k: int = 5, atol: float = ATOL
) -> None:
    """The returned classes are the offline top-k, with the offline probabilities."""
    assert len(predictions) == k
    returned = [p["index"] for p in predictions]
    for p in predictions:
        assert p["probability"] == pytest.approx(float(expected[p["index"]]), abs=atol)
    others = torch.ones_like(expected, dtype=torch.bool)
    others[returned] = False
    assert min(p["probability"] for p in predictions) >= float(expected[others].max()) - atol
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)
