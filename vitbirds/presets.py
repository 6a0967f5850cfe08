"""Named recipes: a model shape with the data and training settings that suit it.

`vit-cpu` trains on a 2-core CPU in minutes; `vit-s16` and `vit-b16` are the ViT-S/16 and ViT-B/16
shapes of the literature (224 px), for GPU workers.
"""

from dataclasses import dataclass, field, replace

from vitbirds.config import DataConfig, ModelConfig, TrainConfig
from vitbirds.errors import ConfigError


@dataclass
class Recipe:
    """Everything a run needs besides the dataset location and the cluster shape."""

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def copy(self) -> "Recipe":
        return Recipe(replace(self.model), replace(self.data), replace(self.train))


def _recipe(model: ModelConfig, **train: object) -> Recipe:
    return Recipe(model, DataConfig(image_size=model.image_size), TrainConfig(**train))


PRESETS: dict[str, Recipe] = {
    # Seconds per epoch: for tests and smoke runs.
    "vit-test": _recipe(
        ModelConfig(image_size=32, patch_size=8, dim=48, depth=2, heads=3, drop_path=0.0),
        epochs=3,
        batch_size=32,
        lr=2e-3,
        warmup_epochs=0.5,
    ),
    "vit-cpu": _recipe(
        ModelConfig(image_size=64, patch_size=8, dim=192, depth=6, heads=3),
        epochs=40,
        batch_size=64,
        lr=1e-3,
        warmup_epochs=3,
    ),
    # vit-cpu plus a DeiT distillation token (Touvron et al. 2021), to learn from a ResNet-18
    # teacher trained by jobs/bench_accuracy.py (pass its model directory). In that job's ablation
    # (cub100, 20-class subset, 15 epochs) SPT + LSA, TrivialAugment + random erasing and EMA
    # each scored lower than plain vit-cpu, so they stay off; distillation scored level with it.
    "vit-cpu-small-data": _recipe(
        ModelConfig(image_size=64, patch_size=8, dim=192, depth=6, heads=3, distill_token=True),
        epochs=40,
        batch_size=64,
        lr=1e-3,
        warmup_epochs=3,
    ),
    "vit-s16": _recipe(
        ModelConfig(image_size=224, patch_size=16, dim=384, depth=12, heads=6),
        epochs=100,
        batch_size=128,
        lr=1e-3,
        warmup_epochs=5,
    ),
    "vit-b16": _recipe(
        ModelConfig(image_size=224, patch_size=16, dim=768, depth=12, heads=12),
        epochs=100,
        batch_size=128,
        lr=5e-4,
        warmup_epochs=5,
    ),
}


def get_recipe(name: str) -> Recipe:
    """A fresh copy of a preset, safe to modify."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name].copy()
