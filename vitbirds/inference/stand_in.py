"""A stand-in model: the exported files of a network with random weights.

Tests and benchmarks that check plumbing or time it (serving, batch prediction, version swaps)
need a real model directory, not a good model; this writes one in well under a second.
"""

from pathlib import Path

import torch

from vitbirds.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from vitbirds.model.baselines import build_classifier
from vitbirds.model.files import ModelMetadata, save_model
from vitbirds.presets import get_recipe


def make_model_dir(
    model_dir: Path,
    class_names: list[str],
    *,
    preset: str = "vit-test",
    seed: int = 0,
    architecture: str = "vit",
) -> Path:
    """An exported model with random weights: enough to check that serving computes what the
    model computes, and to time it. `architecture="resnet18"`: the CNN baseline that
    `jobs/bench_accuracy.py --only resnet` exports (the distillation teacher)."""
    config = get_recipe(preset).model
    config.num_classes = len(class_names)
    torch.manual_seed(seed)
    metadata = ModelMetadata(
        model=config.to_dict(),
        class_names=class_names,
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
        image_size=config.image_size,
        name=f"{preset if architecture == 'vit' else architecture}-random",
        version=f"seed{seed}",
        data={"source": "none", "synthetic": False},
        architecture=architecture,
    )
    return save_model(model_dir, build_classifier(architecture, config), metadata)
