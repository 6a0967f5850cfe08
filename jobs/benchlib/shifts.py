"""Synthetic distribution shifts, and the small model they are measured on.

Each shift is a `Perturbation` of a decoded uint8 image [3, H, W] (applied before normalisation,
where a camera or the weather would act) at a strength in (0, 1]. The drift benchmark
(`jobs/bench_drift.py`) and tests/test_monitor_shifts.py train a small ViT on CUB, keep part of
its training split aside as same-distribution new data, and compare the monitor's label-free
verdict on shifted versions of it with the true accuracy.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from vitbirds.data.sources import (
    DatasetSplits,
    Sample,
    class_key,
    discover_dataset,
    stratified_split,
)
from vitbirds.data.transforms import EVAL_RESIZE_SCALE, eval_transform
from vitbirds.errors import ConfigError
from vitbirds.model.files import LoadedModel, load_model, save_model
from vitbirds.monitoring.assess import Assessment, MonitorConfig, Observations, assess
from vitbirds.monitoring.reference import (
    UNKNOWN_LABEL,
    Perturbation,
    ReferenceProfile,
    build_reference_profile,
    model_outputs,
    save_reference_profile,
)
from vitbirds.presets import Recipe, get_recipe
from vitbirds.training.runner import build_metadata, train_in_process

MAX_BLUR_SIGMA = 0.1  # at strength 1: sigma is a tenth of the image side
# Channel gains at strength 1: a strong warm cast (tungsten light, a sepia filter).
WARM_GAINS = (1.35, 1.0, 0.55)


def blur(strength: float) -> Perturbation:
    """Gaussian blur with sigma = strength * MAX_BLUR_SIGMA * image side (out of focus)."""

    def apply(image: torch.Tensor) -> torch.Tensor:
        sigma = max(1e-3, strength * MAX_BLUR_SIGMA * min(image.shape[-2:]))
        kernel = 2 * round(3 * sigma) + 1
        return TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma])

    return apply


def darken(strength: float) -> Perturbation:
    """Brightness scaled by 1 - 0.9 * strength (dusk, under-exposure)."""
    return lambda image: TF.adjust_brightness(image, 1.0 - 0.9 * strength)


def colour_cast(strength: float) -> Perturbation:
    """Per-channel gains moving from 1 toward WARM_GAINS (white balance gone wrong)."""
    gains = torch.tensor([1.0 + strength * (g - 1.0) for g in WARM_GAINS]).view(3, 1, 1)
    return lambda image: (image.float() * gains).round().clamp(0, 255).to(torch.uint8)


SHIFTS: dict[str, Callable[[float], Perturbation]] = {
    "blur": blur,
    "darken": darken,
    "colour": colour_cast,
}


def get_shift(name: str, strength: float) -> Perturbation:
    if name not in SHIFTS:
        raise ConfigError(f"unknown shift {name!r}; known shifts: {', '.join(SHIFTS)}")
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"shift strength must be in (0, 1], got {strength}")
    return SHIFTS[name](strength)


def label_shift(samples: Sequence[Sample], strength: float, *, seed: int = 0) -> list[Sample]:
    """Skewed class proportions: half the classes (a seeded choice) keep every image, the other
    half keep a fraction 1 - strength of theirs (none at strength 1)."""
    classes = sorted({s.label for s in samples})
    rare = set(random.Random(f"label-shift:{seed}").sample(classes, len(classes) // 2))
    rng = random.Random(f"label-shift-keep:{seed}")
    return [s for s in samples if s.label not in rare or rng.random() >= strength]


def noise_images(count: int, loaded: LoadedModel, *, seed: int = 0) -> list[tuple[Any, int]]:
    """Uniform RGB noise as (normalised image, UNKNOWN_LABEL) pairs: a broken camera."""
    metadata = loaded.metadata
    size = round(metadata.image_size * EVAL_RESIZE_SCALE)
    normalise = eval_transform(metadata.image_size, metadata.mean, metadata.std)
    generator = torch.Generator().manual_seed(seed)
    return [
        (normalise(torch.randint(0, 256, (3, size, size), generator=generator, dtype=torch.uint8)),
         UNKNOWN_LABEL)
        for _ in range(count)
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The subject: a small CUB model with a held-out split


@dataclass
class Subject:
    """A trained model directory (with its reference profile) and data it never saw."""

    model_dir: Path
    held_out: list[Sample]  # same distribution as training, model class indices
    classes: list[str]


def subject_recipe(epochs: int = 20, image_size: int = 32) -> Recipe:
    """vit-test widened a little, at 32 px: on the 100 CUB species ~14% top-1 after 20 epochs
    (chance: 1%), ~2 minutes of 2-core CPU. Drift detection needs its embeddings, not accuracy."""
    recipe = get_recipe("vit-test")
    recipe.model = replace(recipe.model, image_size=image_size, patch_size=8, dim=96, depth=4)
    recipe.data = replace(recipe.data, image_size=image_size)
    recipe.train = replace(recipe.train, epochs=epochs, warmup_epochs=1.0, device="cpu")
    return recipe


def shared_species(cub_classes: Sequence[str], other_classes: Sequence[str]) -> list[str]:
    """CUB class names whose species the other dataset also has (matched by `class_key`)."""
    other = {class_key(name) for name in other_classes}
    return [name for name in cub_classes if class_key(name) in other]


def train_subject(
    data_dir: str | Path,
    recipe: Recipe,
    out_dir: str | Path,
    *,
    classes: Sequence[str] | None = None,
    held_out_fraction: float = 0.25,
) -> Subject:
    """Trains `recipe` on `classes` of `data_dir` minus a held-out share of each class's training
    images, then saves the model and its reference profile (the valid split) to `out_dir`."""
    full = discover_dataset(data_dir, seed=recipe.data.seed)
    chosen = sorted(classes) if classes is not None else full.classes
    index = {name: i for i, name in enumerate(chosen)}

    def pick(samples: list[Sample]) -> dict[str, list[Path]]:
        by_class: dict[str, list[Path]] = {}
        for s in samples:
            if full.classes[s.label] in index:
                by_class.setdefault(full.classes[s.label], []).append(s.path)
        return by_class

    train, held = stratified_split(pick(full.train), held_out_fraction, recipe.data.seed)

    def flat(by_class: dict[str, list[Path]]) -> list[Sample]:
        return [Sample(p, index[name]) for name in chosen for p in by_class.get(name, [])]

    splits = DatasetSplits(
        chosen, flat(train), flat(pick(full.valid)), [], full.source, full.root, full.synthetic
    )
    trained = train_in_process(recipe, splits)
    metadata = build_metadata(trained.recipe, splits, name="drift-subject")
    metadata.history = trained.history
    metadata.metrics = dict(trained.history[-1])
    out_dir = Path(out_dir)
    save_model(out_dir, trained.run.evaluation_model(), metadata)
    profile = build_reference_profile(load_model(out_dir), splits.valid, data=splits.describe())
    save_reference_profile(out_dir, profile)
    return Subject(out_dir, flat(held), chosen)


# ---------------------------------------------------------------------------------------------
# One scenario


@dataclass
class ScenarioResult:
    """One row of the shift table: the label-free verdict next to the truth."""

    scenario: str
    strength: float | None
    num_images: int
    decision: str  # label-free
    labelled_decision: str | None  # with the true labels, where known
    p_values: dict[str, float]
    class_psi: float | None
    domain_auroc: float | None
    reference_accuracy: float
    estimated_accuracy: float  # mean temperature-scaled confidence
    atc_accuracy: float
    true_accuracy: float | None
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_scenario(
    loaded: LoadedModel,
    profile: ReferenceProfile,
    images: Any,
    *,
    scenario: str,
    strength: float | None = None,
    config: MonitorConfig | None = None,
    labelled: bool = False,
) -> tuple[ScenarioResult, Assessment]:
    """Runs the model on `images` ((normalised image, label) pairs, e.g. `image_dataset`) and
    assesses the predictions without their labels (and with them when `labelled`)."""
    outputs = model_outputs(loaded, images)
    observed = Observations.from_outputs(outputs)
    known = outputs.labels != UNKNOWN_LABEL
    true_accuracy = (
        float(np.mean(observed.predicted[known] == outputs.labels[known])) if known.any() else None
    )
    unlabelled = replace(observed, labels=np.full_like(observed.labels, UNKNOWN_LABEL))
    assessment = assess(profile, unlabelled, config)
    labelled_decision = None
    if labelled and known.any():
        labelled_decision = str(
            assess(profile, observed.subset(np.flatnonzero(known)), config).decision
        )
    result = ScenarioResult(
        scenario=scenario,
        strength=strength,
        num_images=len(observed),
        decision=str(assessment.decision),
        labelled_decision=labelled_decision,
        p_values={name: t.p_value for name, t in assessment.tests.items()},
        class_psi=assessment.tests["predicted_class"].effect if assessment.tests else None,
        domain_auroc=assessment.domain_auroc,
        reference_accuracy=assessment.reference_accuracy,
        estimated_accuracy=assessment.estimated_accuracy,
        atc_accuracy=assessment.atc_accuracy,
        true_accuracy=true_accuracy,
        reasons=assessment.reasons,
    )
    return result, assessment
