"""Scoring without Ray: photo bytes -> model input, a batch -> outputs, one image -> attention
overlay. Serve's deployments (serve/model_deployments.py) and batch prediction's Ray Data stages
(vitbirds/ray_adapter/predict.py) wrap these, and the benchmarks' naive baselines and throughput
limits run the very same code without either.

Photos are decoded exactly as training and evaluation decode them (`load_rgb` at the short side
`image_size * EVAL_RESIZE_SCALE`, then `eval_transform`), so a served prediction is the prediction
`jobs/evaluate.py` would make for the same file. The transform is split where it is cheapest to
ship: the decoding side (Serve's ingress, batch prediction's decode stage) resizes and crops to a
uint8 image, and the model side normalises it (the same ops, per image): 150 KB instead of 600 KB
per 224-px photo on every hop.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vitbirds.data.images import DEFAULT_MAX_PIXELS, load_rgb
from vitbirds.data.transforms import EVAL_RESIZE_SCALE, Transform, eval_transform
from vitbirds.model.baselines import embedding_dim, logits_and_embedding
from vitbirds.model.explain import denormalize, explain_image, render_overlay
from vitbirds.model.files import LoadedModel, ModelMetadata
from vitbirds.monitoring.predictions import EmbeddingProjector
from vitbirds.precision import FP32, Precision

_IDENTITY_MEAN = (0.0, 0.0, 0.0)
_IDENTITY_STD = (1.0, 1.0, 1.0)


Decoder = Callable[..., Image.Image]  # load_rgb's signature for bytes: (data, *, max_pixels, ...)


def model_normaliser(metadata: ModelMetadata) -> Transform:
    """uint8 [3, H, W] from `ImagePreprocessor.model_input` -> the float model input: the second
    half of the eval transform, as evaluation runs it on each image."""
    return eval_transform(metadata.image_size, metadata.mean, metadata.std).per_batch


class ImagePreprocessor:
    """Decodes uploads for one model; raises ImageDecodeError saying why a file is refused.

    `decoder` is `load_rgb` (in this process) by default; Serve passes a sandboxed pool's
    `decode` (vitbirds/data/sandbox.py), which runs the same function under time/memory limits.
    """

    def __init__(
        self,
        metadata: ModelMetadata,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        display_size: int = 224,
        decoder: Decoder = load_rgb,
    ) -> None:
        self.max_pixels = max_pixels
        self.decoder = decoder
        self.decode_size = round(metadata.image_size * EVAL_RESIZE_SCALE)
        self.crop = eval_transform(metadata.image_size, metadata.mean, metadata.std).per_image
        self.display_decode_size = round(display_size * EVAL_RESIZE_SCALE)
        # The same resize and crop at display resolution, left unnormalised: what the model saw,
        # sharp enough to see a bird in.
        self.display_transform = eval_transform(display_size, _IDENTITY_MEAN, _IDENTITY_STD)

    def model_input(self, data: bytes) -> torch.Tensor:
        """uint8 [3, image_size, image_size]: the crop the model sees, before `model_normaliser`."""
        image = self.decoder(data, max_pixels=self.max_pixels, short_side=self.decode_size)
        return self.crop(image).as_subclass(torch.Tensor)

    def display_image(self, data: bytes) -> np.ndarray:
        """uint8 [display_size, display_size, 3]: the model's crop at display resolution."""
        image = self.decoder(data, max_pixels=self.max_pixels, short_side=self.display_decode_size)
        return denormalize(self.display_transform(image), _IDENTITY_MEAN, _IDENTITY_STD)


@dataclass
class ClassifierOutput:
    probabilities: list[float]  # softmax over the classes, in output order
    embedding: list[float]  # the head's input (ViT: CLS token) through `EmbeddingProjector`
    batch_ms: float = 0.0  # the whole batch's call, normalisation to the lists above
    replica_ms: float = 0.0  # in the Classifier replica: waiting for the model, then the batch


class BatchPredictor:
    """One forward pass for a list of `ImagePreprocessor.model_input` images, at `precision`."""

    def __init__(
        self,
        loaded: LoadedModel,
        device: torch.device | str = "cpu",
        precision: Precision = FP32,
    ) -> None:
        self.model = loaded.model
        self.device = torch.device(device)
        self.precision = precision
        metadata = loaded.metadata
        self.normalise = model_normaliser(metadata)
        self.projector = EmbeddingProjector(
            embedding_dim(metadata.architecture, metadata.model_config)
        )

    @torch.inference_mode()
    def __call__(self, images: list[torch.Tensor]) -> list[ClassifierOutput]:
        started = time.perf_counter()
        # Each uint8 crop goes to the device and is normalised there, per image as evaluation
        # does it: a quarter of the bytes to copy to a GPU, and exactly evaluation's input.
        batch = torch.stack(
            [self.normalise(image.to(self.device, non_blocking=True)) for image in images]
        )
        with self.precision.autocast():
            logits, embedding = logits_and_embedding(self.model, batch)
        probabilities = logits.float().softmax(dim=-1).cpu()
        embeddings = self.projector(embedding)
        outputs = [
            ClassifierOutput(p.tolist(), e.tolist())
            for p, e in zip(probabilities, embeddings, strict=True)
        ]
        batch_ms = 1000 * (time.perf_counter() - started)
        for output in outputs:
            output.batch_ms = batch_ms
        return outputs


def top_k(probabilities: list[float], class_names: list[str], k: int) -> list[dict[str, object]]:
    """The k most probable classes as {"label", "index", "probability"}, most probable first."""
    values, indices = torch.tensor(probabilities).topk(min(k, len(class_names)))
    return [
        {"label": class_names[i], "index": i, "probability": v}
        for v, i in zip(values.tolist(), indices.tolist(), strict=True)
    ]


def render_explanation(
    loaded: LoadedModel,
    image: torch.Tensor,
    display: np.ndarray,
    device: torch.device | str,
    precision: Precision = FP32,
) -> bytes:
    """PNG of photo | attention rollout | overlay, captioned with the model's top-1 guess.
    `image` is the normalised model input (`model_normaliser` of a `model_input`)."""
    explanation = explain_image(loaded.model, image.to(device), precision=precision)
    label = loaded.metadata.class_names[explanation.predicted]
    probability = float(explanation.probs[explanation.predicted])
    caption = f"{label} ({probability:.1%}), attention rollout"
    return render_overlay(display, explanation.heatmap, caption=caption)
