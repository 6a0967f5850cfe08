"""Named recipes: a model shape with the data and training settings that suit it, each written
over the library defaults of `vitbirds.config`.

`vit-cpu` trains on a 2-core CPU in minutes; `vit-s16` and `vit-b16` are the ViT-S/16 and ViT-B/16
shapes of the literature (224 px), for GPU workers. A run's recipe values (epochs, learning rate,
depth, ...) default to DEFAULT_PRESET's: this file is where they are set.
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
    preset: str | None = None  # the preset it started from, recorded in exported models

    def copy(self) -> "Recipe":
        return Recipe(replace(self.model), replace(self.data), replace(self.train), self.preset)


def _recipe(model: ModelConfig, **train: object) -> Recipe:
    return Recipe(model, DataConfig(image_size=model.image_size), TrainConfig(**train))


def _variant(base: Recipe, model: dict[str, object] | None = None, **train: object) -> Recipe:
    """`base` with some model and training values written over it."""
    return Recipe(
        replace(base.model, **(model or {})), replace(base.data), replace(base.train, **train)
    )


_VIT_CPU = _recipe(
    ModelConfig(image_size=64, patch_size=8, dim=192, depth=6, heads=3),
    epochs=40,
    batch_size=64,
    lr=1e-3,
    warmup_epochs=3,
)
_VIT_S16 = _recipe(
    ModelConfig(image_size=224, patch_size=16, dim=384, depth=12, heads=6),
    epochs=100,
    batch_size=128,
    lr=1e-3,
    warmup_epochs=5,
)

PRESETS: dict[str, Recipe] = {
    # Seconds per epoch: for tests and smoke runs.
    "vit-test": _recipe(
        ModelConfig(image_size=32, patch_size=8, dim=48, depth=2, heads=3, drop_path=0.0),
        epochs=3,
        batch_size=32,
        lr=2e-3,
        warmup_epochs=0.5,
    ),
    "vit-cpu": _VIT_CPU,
    # The default: vit-cpu with a convolutional stem (Xiao et al. 2021), the best small-data
    # recipe that needs no teacher on cub100 (100 species, 24 photos each): 60 epochs through
    # jobs/train.py took 31 minutes on 2 CPU cores for 48.9 % valid top-1, so 50 fit in 30. SPT +
    # LSA, stronger augmentation and EMA each scored at or below plain vit-cpu in
    # jobs/bench_accuracy.py (see the README), so they stay off.
    "vit-cpu-small-data": _variant(_VIT_CPU, {"conv_stem": True}, epochs=50),
    # The best small-data recipe, for when a CNN teacher trained on the same classes exists
    # (jobs/train.py --teacher DIR): the conv stem plus a DeiT distillation token trained on the
    # teacher's softened outputs (T = 3). On cub100 at 50 epochs it beat vit-cpu-small-data by
    # ~7 points in jobs/bench_accuracy.py (README, "Model quality"), for ~15 % more time per epoch
    # (the teacher's forward pass). Not the default: it needs the teacher first.
    "vit-cpu-distilled": _variant(
        _VIT_CPU,
        {"conv_stem": True, "distill_token": True},
        epochs=50,
        distillation="soft",
        distill_temperature=3.0,
    ),
    "vit-s16": _VIT_S16,
    "vit-b16": _variant(_VIT_S16, {"dim": 768, "heads": 12}, lr=5e-4),
}


# The best small-data recipe that needs no teacher (README, "What accuracy to expect").
DEFAULT_PRESET = "vit-cpu-small-data"


def get_recipe(name: str) -> Recipe:
    """A fresh copy of a preset, safe to modify."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    recipe = PRESETS[name].copy()
    recipe.preset = name
    return recipe
