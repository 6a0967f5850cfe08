"""Evaluate a model on a split: predictions, metrics, attention overlays
(`vitbirds.evaluation.report` writes them as metrics.json and report.html).

`jobs/evaluate.py`, the training job's final evaluation and `jobs/promote.py` all call
`evaluate_model`, so there is one implementation of what "the model's test metrics" means.

The forward pass uses the fused attention path (no weights), so evaluating costs what decoding
plus inference costs; only the handful of images drawn in the report run a second forward pass
that returns attention weights. A model without attention maps (the ResNet-18 baseline) is
evaluated the same way, and its report says that it has no overlays instead of drawing them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from vitbirds.data.images import load_rgb
from vitbirds.data.loading import ImageDataset, SkippedImage
from vitbirds.data.sources import Sample, model_labels
from vitbirds.data.transforms import EVAL_RESIZE_SCALE, eval_transform
from vitbirds.errors import ConfigError, DataError
from vitbirds.evaluation.metrics import ClassificationReport, classification_report
from vitbirds.model.explain import (
    HeadFusion,
    Method,
    attention_maps,
    denormalize,
    render_overlay,
)
from vitbirds.model.files import LoadedModel
from vitbirds.precision import FP32, Precision
from vitbirds.progress import default_progress


@dataclass
class EvaluationConfig:
    """How to run the model over a split and what the report shows."""

    batch_size: int = 64
    chunk_size: int = 2048  # images decoded and held in memory at once
    overlays: int = 12  # attention overlays in the report, half right and half wrong if possible
    overlay_size: int = 160  # display side of each overlay panel (decoded sharp, same crop)
    attention_method: Method = "rollout"
    head_fusion: HeadFusion = "mean"
    discard_ratio: float = 0.0
    seed: int = 0  # which images get overlays


@dataclass
class Overlay:
    """One attention overlay of the report."""

    path: Path
    true_name: str
    predicted_name: str
    confidence: float
    png: bytes

    @property
    def correct(self) -> bool:
        return self.true_name == self.predicted_name


@dataclass
class EvaluationResult:
    """Everything `write_report` needs; `labels`/`probs` are in the model's class order."""

    report: ClassificationReport
    labels: np.ndarray
    probs: np.ndarray
    samples: list[Sample]  # the evaluated ones, in the order of `labels`
    skipped: list[SkippedImage]
    overlays: list[Overlay]
    split: str
    model_name: str
    model_version: str
    data_label: str  # where the images came from, for the reader
    data_synthetic: bool
    model_trained_on_synthetic: bool
    history: list[dict[str, float]] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    no_overlays_reason: str | None = None  # set when the model cannot draw attention overlays
    precision: str = "fp32"  # what the forward passes computed in

    @property
    def synthetic(self) -> bool:
        return self.data_synthetic or self.model_trained_on_synthetic

    def to_dict(self) -> dict[str, Any]:
        """metrics.json: the metrics plus what was evaluated, for machines and trackers."""
        return {
            "split": self.split,
            "model": {"name": self.model_name, "version": self.model_version},
            "data": {
                "label": self.data_label,
                "synthetic": self.data_synthetic,
                "model_trained_on_synthetic": self.model_trained_on_synthetic,
                "evaluated": len(self.samples),
                "skipped": [{"path": str(s.path), "reason": s.reason} for s in self.skipped],
            },
            "timing": self.timing,
            "precision": self.precision,
            "overlays": {"count": len(self.overlays), "unavailable": self.no_overlays_reason},
            "metrics": self.report.to_dict(),
        }


def evaluate_model(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    class_names: Sequence[str],
    *,
    config: EvaluationConfig | None = None,
    split: str = "test",
    data_label: str = "",
    data_synthetic: bool = False,
    device: torch.device | str = "cpu",
    precision: Precision = FP32,
) -> EvaluationResult:
    """Run `loaded` over `samples` (labels index `class_names`, the dataset's classes), its
    forward passes and attention overlays at `precision` (probabilities are fp32 softmaxes).

    Dataset classes are matched to the model's by name, so a dataset subset or another class
    order works; a class the model does not know is a DataError naming it.
    """
    config = config or EvaluationConfig()
    if not samples:
        raise DataError(f"split {split!r} has no images to evaluate")
    metadata = loaded.metadata
    to_model = _label_mapping(class_names, metadata.class_names, samples)
    model = loaded.model.to(device).eval()
    transform = eval_transform(metadata.image_size, metadata.mean, metadata.std)
    decode_size = round(metadata.image_size * EVAL_RESIZE_SCALE)

    started = time.perf_counter()
    decode_s = 0.0
    evaluated: list[Sample] = []
    skipped: list[SkippedImage] = []
    probs: list[torch.Tensor] = []
    for start in range(0, len(samples), config.chunk_size):
        chunk_started = time.perf_counter()
        dataset = ImageDataset(
            samples[start : start + config.chunk_size], transform, decode_size=decode_size
        )
        decode_s += time.perf_counter() - chunk_started
        evaluated += dataset.samples
        skipped += dataset.skipped
        with torch.inference_mode():
            batches = DataLoader(dataset, batch_size=config.batch_size)
            for images, _ in default_progress()(batches, desc=f"evaluate {split}"):
                with precision.autocast():
                    logits = model(images.to(device))
                probs.append(logits.float().softmax(dim=-1).cpu())
    inference_s = time.perf_counter() - started

    started = time.perf_counter()
    labels = np.array([to_model[s.label] for s in evaluated], dtype=np.int64)
    prob_array = torch.cat(probs).numpy()
    report = classification_report(labels, prob_array, list(metadata.class_names))
    metrics_s = time.perf_counter() - started

    started = time.perf_counter()
    no_overlays = no_attention_reason(loaded)
    overlays = (
        []
        if no_overlays
        else _overlays(loaded, evaluated, labels, prob_array, config, device, precision)
    )
    overlays_s = time.perf_counter() - started
    return EvaluationResult(
        report=report,
        labels=labels,
        probs=prob_array,
        samples=evaluated,
        skipped=skipped,
        overlays=overlays,
        split=split,
        model_name=metadata.name,
        model_version=metadata.version,
        data_label=data_label,
        data_synthetic=data_synthetic,
        model_trained_on_synthetic=metadata.synthetic,
        history=list(metadata.history),
        timing={
            "decode_s": decode_s,
            "decode_and_forward_s": inference_s,
            "metrics_s": metrics_s,
            "overlays_s": overlays_s,
            "images_per_s": len(evaluated) / (inference_s + metrics_s + overlays_s),
        },
        no_overlays_reason=no_overlays,
        precision=precision.name,
    )


def no_attention_reason(loaded: LoadedModel) -> str | None:
    """Why `loaded` cannot draw attention overlays (a CNN has no attention), else None."""
    if loaded.metadata.attention_maps:
        return None
    return (
        f"architecture {loaded.metadata.architecture!r} has no attention maps, so this report "
        "has no attention overlays"
    )


def _label_mapping(
    dataset_classes: Sequence[str], model_classes: Sequence[str], samples: Sequence[Sample]
) -> dict[int, int]:
    """Dataset label -> model output index, for the labels that occur in `samples` (names
    matched by `vitbirds.data.sources.class_key`, as every scorer matches them)."""
    known = model_labels(dataset_classes, model_classes)
    used = sorted({s.label for s in samples})
    unknown = [dataset_classes[label] for label in used if label not in known]
    if unknown:
        raise DataError(
            f"{len(unknown)} class(es) of the data are not among the model's "
            f"{len(model_classes)} classes, e.g. {unknown[:5]}"
        )
    return {label: known[label] for label in used}


def _overlays(
    loaded: LoadedModel,
    samples: list[Sample],
    labels: np.ndarray,
    probs: np.ndarray,
    config: EvaluationConfig,
    device: torch.device | str,
    precision: Precision,
) -> list[Overlay]:
    """Attention overlays of a seeded choice of images, right and wrong ones mixed."""
    if config.overlays <= 0:
        return []
    predicted = probs.argmax(axis=1)
    rng = np.random.default_rng(config.seed)
    right = rng.permutation(np.flatnonzero(predicted == labels))
    wrong = rng.permutation(np.flatnonzero(predicted != labels))
    take_wrong = min(len(wrong), max(config.overlays // 2, config.overlays - len(right)))
    chosen = [*wrong[:take_wrong], *right[: config.overlays - take_wrong]]
    if not chosen:
        return []
    metadata = loaded.metadata
    model_input = eval_transform(metadata.image_size, metadata.mean, metadata.std)
    display = eval_transform(config.overlay_size, metadata.mean, metadata.std)
    inputs, shown = [], []
    for i in chosen:
        # Same resize-and-centre-crop at two sizes: the map of the small input lands on the
        # same region of the sharp display image.
        image = load_rgb(samples[i].path, short_side=round(config.overlay_size * EVAL_RESIZE_SCALE))
        inputs.append(model_input(image))
        shown.append(denormalize(display(image), metadata.mean, metadata.std))
    _, maps = attention_maps(
        loaded.model,
        torch.stack(inputs).to(device),
        method=config.attention_method,
        head_fusion=config.head_fusion,
        discard_ratio=config.discard_ratio,
        precision=precision,
    )
    names = metadata.class_names
    return [
        Overlay(
            path=samples[i].path,
            true_name=names[labels[i]],
            predicted_name=names[predicted[i]],
            confidence=float(probs[i, predicted[i]]),
            png=render_overlay(image, patch_map.cpu()),
        )
        for i, image, patch_map in zip(chosen, shown, maps, strict=True)
    ]


# ---------------------------------------------------------------------------------------------
# Does attention point at the object? (synthetic data with known masks)


@dataclass
class AttentionCheck:
    """Rollout mass inside the object masks against the masks' share of the image.

    `ratio` = mean mass inside / mean area fraction: 1 is what a uniform map gives.
    """

    images: int
    mass_inside: float
    area_fraction: float
    ratio: float
    median_image_ratio: float

    def to_dict(self) -> dict[str, float | int]:
        return {
            "images": self.images,
            "mass_inside": self.mass_inside,
            "area_fraction": self.area_fraction,
            "ratio": self.ratio,
            "median_image_ratio": self.median_image_ratio,
        }


def attention_check(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    mask_of: Callable[[Path], Any],
    *,
    config: EvaluationConfig | None = None,
    device: torch.device | str = "cpu",
) -> AttentionCheck:
    """Rollout (per `config`) of each image vs its object mask (`mask_of(path)`: a mask image or
    array the size of the image, nonzero inside the object), both seen through the eval crop."""
    config = config or EvaluationConfig()
    reason = no_attention_reason(loaded)
    if reason:
        raise ConfigError(f"the attention check needs attention maps: {reason.split(',')[0]}")
    metadata = loaded.metadata
    size = metadata.image_size
    transform = eval_transform(size, metadata.mean, metadata.std)
    decode_size = round(size * EVAL_RESIZE_SCALE)
    crop = v2.Compose([v2.Resize(decode_size, antialias=True), v2.CenterCrop(size)])
    model = loaded.model.to(device).eval()
    inside, area, per_image = [], [], []
    for start in range(0, len(samples), config.batch_size):
        batch = samples[start : start + config.batch_size]
        decoded = [load_rgb(s.path, short_side=decode_size) for s in batch]
        images = torch.stack([transform(image) for image in decoded]).to(device)
        _, maps = attention_maps(
            model,
            images,
            method=config.attention_method,
            head_fusion=config.head_fusion,
            discard_ratio=config.discard_ratio,
        )
        maps = maps.cpu()
        masks = torch.stack([_mask_tensor(mask_of(s.path)) for s in batch])
        fractions = F.adaptive_avg_pool2d(crop(masks), maps.shape[-2:])[:, 0]
        mass = maps / maps.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
        batch_inside = (mass * fractions).sum(dim=(-2, -1))
        batch_area = fractions.mean(dim=(-2, -1))
        inside += batch_inside.tolist()
        area += batch_area.tolist()
        per_image += (batch_inside / batch_area.clamp_min(1e-12)).tolist()
    mass_inside, area_fraction = float(np.mean(inside)), float(np.mean(area))
    return AttentionCheck(
        images=len(inside),
        mass_inside=mass_inside,
        area_fraction=area_fraction,
        ratio=mass_inside / area_fraction,
        median_image_ratio=float(np.median(per_image)),
    )


def _mask_tensor(mask: Any) -> torch.Tensor:
    """[1, H, W] float in {0, 1} from a PIL mask, a numpy array or a tensor."""
    array = np.asarray(mask)
    if array.ndim == 3:
        array = array[..., 0]
    return torch.from_numpy((array > 0).astype(np.float32))[None]
