"""The reference profile: how the model behaved on its validation set, saved beside its weights.

Drift monitoring (`vitbirds.monitoring.assess`, `jobs/monitor.py`) compares new traffic with this
profile, so it must be what the model really did on data of the training distribution it never
trained on, and the features must be computed exactly as Serve logs them:

- images decoded and transformed as evaluation and Serve do (`load_rgb` at the short side
  `image_size * EVAL_RESIZE_SCALE`, `eval_transform`);
- embeddings are the CLS embedding (a ResNet's pooled features: `logits_and_embedding`) through
  the same seeded projection as the prediction log
  (`vitbirds.monitoring.predictions.EmbeddingProjector`), so logged and reference vectors compare.

Files in the model directory:
- `reference.safetensors`: `logits` [N, C] float32, `embeddings` [N, D] float32, `labels` [N]
  int64 (the model's class indices);
- `reference.json`: model name/version, class names, split, the projection's parameters, the
  fitted temperature, the ATC threshold and the per-class metrics (`vitbirds.evaluation.metrics`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from vitbirds.data.loading import ImageDataset
from vitbirds.data.sources import Sample
from vitbirds.data.transforms import EVAL_RESIZE_SCALE, eval_transform
from vitbirds.errors import DataError, ModelFileError
from vitbirds.evaluation.metrics import classification_report
from vitbirds.model.baselines import embedding_dim, logits_and_embedding
from vitbirds.model.files import LoadedModel, ModelMetadata
from vitbirds.monitoring.drift import atc_threshold, fit_temperature
from vitbirds.monitoring.predictions import EMBEDDING_DIM, EMBEDDING_SEED, EmbeddingProjector
from vitbirds.progress import default_progress

REFERENCE_TENSORS = "reference.safetensors"
REFERENCE_JSON = "reference.json"
FORMAT_VERSION = 1
UNKNOWN_LABEL = -1

Perturbation = Callable[[torch.Tensor], torch.Tensor]  # uint8 [3, H, W] -> uint8 [3, H, W]


@dataclass
class ModelOutputs:
    """What the model said about a set of images, in the order given."""

    logits: np.ndarray  # [N, C] float32
    embeddings: np.ndarray  # [N, D] projected CLS embeddings, as in the prediction log
    labels: np.ndarray  # [N] int64 model class indices, UNKNOWN_LABEL where unlabelled

    @property
    def probs(self) -> np.ndarray:
        z = self.logits.astype(np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def subset(self, indices: np.ndarray) -> ModelOutputs:
        return ModelOutputs(self.logits[indices], self.embeddings[indices], self.labels[indices])


@dataclass
class ReferenceProfile:
    """The model on its validation split; `summary()` is reference.json."""

    outputs: ModelOutputs
    class_names: list[str]
    model_name: str
    model_version: str
    split: str
    temperature: float  # fitted on these logits and labels (Guo et al. 2017)
    atc_threshold: float  # top-1 confidence threshold of ATC (Garg et al. 2022)
    metrics: dict[str, Any]  # classification_report(...).to_dict() without the confusion matrix
    embedding: dict[str, int] = field(default_factory=dict)  # EmbeddingProjector parameters
    data: dict[str, Any] = field(default_factory=dict)  # where the split came from
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    @property
    def accuracy(self) -> float:
        return float(self.metrics["top1_accuracy"])

    def summary(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model": {"name": self.model_name, "version": self.model_version},
            "split": self.split,
            "num_samples": len(self.outputs.labels),
            "class_names": self.class_names,
            "temperature": self.temperature,
            "atc_threshold": self.atc_threshold,
            "embedding": self.embedding,
            "data": self.data,
            "created_at": self.created_at,
            "metrics": self.metrics,
        }


def image_dataset(
    samples: Sequence[Sample], metadata: ModelMetadata, *, perturb: Perturbation | None = None
) -> ImageDataset:
    """`samples` decoded once and transformed as evaluation and Serve do.

    `perturb` runs on the decoded uint8 image before normalisation (blur, darkening...): how the
    drift benchmark and tests fake a camera or a season the model has not seen.
    """
    normalise = eval_transform(metadata.image_size, metadata.mean, metadata.std)
    transform = normalise if perturb is None else (lambda image: normalise(perturb(image)))
    decode_size = round(metadata.image_size * EVAL_RESIZE_SCALE)
    return ImageDataset(samples, transform, decode_size=decode_size)


@torch.inference_mode()
def model_outputs(
    loaded: LoadedModel,
    images: Dataset[tuple[torch.Tensor, int]],
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> ModelOutputs:
    """Logits, projected embeddings (see `logits_and_embedding`) and labels of (normalised image,
    label) pairs."""
    model = loaded.model.to(device).eval()
    metadata = loaded.metadata
    projector = EmbeddingProjector(embedding_dim(metadata.architecture, metadata.model_config))
    logits, embeddings, labels = [], [], []
    batches = DataLoader(images, batch_size=batch_size)
    for batch, batch_labels in default_progress()(batches, desc="model outputs"):
        batch_logits, batch_embeddings = logits_and_embedding(model, batch.to(device))
        logits.append(batch_logits.float().cpu())
        embeddings.append(projector(batch_embeddings))
        labels.append(torch.as_tensor(batch_labels))
    if not logits:
        raise DataError("no images to run the model on")
    return ModelOutputs(
        logits=torch.cat(logits).numpy(),
        embeddings=torch.cat(embeddings).numpy(),
        labels=torch.cat(labels).long().numpy(),
    )


def build_reference_profile(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    *,
    split: str = "valid",
    data: dict[str, Any] | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> ReferenceProfile:
    """Runs `loaded` over labelled `samples` (labels are the model's class indices).

    Call it at the end of training on the validation split the model did not train on.
    """
    metadata = loaded.metadata
    outputs = model_outputs(
        loaded, image_dataset(samples, metadata), batch_size=batch_size, device=device
    )
    return profile_from_outputs(
        outputs, metadata, split=split, data=data or {"num_samples": len(samples)}
    )


def profile_from_outputs(
    outputs: ModelOutputs, metadata: ModelMetadata, *, split: str, data: dict[str, Any]
) -> ReferenceProfile:
    """The profile of labelled model outputs (`build_reference_profile` without the images)."""
    if (outputs.labels < 0).any():
        raise DataError("a reference profile needs a label for every image")
    probs = outputs.probs
    report = classification_report(outputs.labels, probs, list(metadata.class_names)).to_dict()
    report.pop("confusion")
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == outputs.labels
    return ReferenceProfile(
        outputs=outputs,
        class_names=list(metadata.class_names),
        model_name=metadata.name,
        model_version=metadata.version,
        split=split,
        temperature=fit_temperature(outputs.logits, outputs.labels),
        atc_threshold=atc_threshold(confidence, correct),
        metrics=report,
        embedding={
            "source_dim": embedding_dim(metadata.architecture, metadata.model_config),
            "dim": EMBEDDING_DIM,
            "seed": EMBEDDING_SEED,
        },
        data=data,
    )


def save_reference_profile(model_dir: str | Path, profile: ReferenceProfile) -> Path:
    """Writes reference.safetensors and reference.json into `model_dir`; returns the JSON path."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    outputs = profile.outputs
    save_file(
        {
            "logits": np.ascontiguousarray(outputs.logits, dtype=np.float32),
            "embeddings": np.ascontiguousarray(outputs.embeddings, dtype=np.float32),
            "labels": np.ascontiguousarray(outputs.labels, dtype=np.int64),
        },
        model_dir / REFERENCE_TENSORS,
        metadata={"format": "vitbirds-reference"},
    )
    path = model_dir / REFERENCE_JSON
    path.write_text(json.dumps(profile.summary(), indent=2) + "\n")
    return path


def load_reference_profile(model_dir: str | Path) -> ReferenceProfile:
    """The profile saved by `save_reference_profile`; ModelFileError saying how to make one."""
    model_dir = Path(model_dir)
    tensors_path, json_path = model_dir / REFERENCE_TENSORS, model_dir / REFERENCE_JSON
    if not tensors_path.is_file() or not json_path.is_file():
        raise ModelFileError(
            f"{model_dir} has no reference profile ({REFERENCE_TENSORS} + {REFERENCE_JSON}); "
            "models trained before profiles existed get one with "
            "`python jobs/monitor.py --model DIR --reference-data DATA_DIR ...`"
        )
    try:
        values = json.loads(json_path.read_text())
        tensors = load_file(tensors_path)
        outputs = ModelOutputs(tensors["logits"], tensors["embeddings"], tensors["labels"])
        if values["format_version"] > FORMAT_VERSION:
            raise ModelFileError(
                f"{json_path} has format version {values['format_version']}; this vitbirds "
                f"reads up to {FORMAT_VERSION}"
            )
        return ReferenceProfile(
            outputs=outputs,
            class_names=values["class_names"],
            model_name=values["model"]["name"],
            model_version=values["model"]["version"],
            split=values["split"],
            temperature=float(values["temperature"]),
            atc_threshold=float(values["atc_threshold"]),
            metrics=values["metrics"],
            embedding=values["embedding"],
            data=values.get("data", {}),
            created_at=values["created_at"],
        )
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{model_dir}: unreadable reference profile ({error})") from error
