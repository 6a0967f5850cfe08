"""Assemble a training run from a Recipe: dataset on disk, model, metadata. No Ray here.

The Ray Train adapter (`vitbirds.ray_adapter.train`), the plain-loop benchmark and the tests
build their runs from these helpers, so "which images, which model, what the model file says
about them" has one definition whether a run is distributed or not.
"""

import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from vitbirds.config import DataConfig
from vitbirds.data.loading import make_loaders
from vitbirds.data.sources import DatasetSplits, discover_dataset
from vitbirds.data.synthetic import GENERATOR_VERSION, make_synthetic_dataset
from vitbirds.data.transforms import IMAGENET_MEAN, IMAGENET_STD, batch_mixer
from vitbirds.errors import ConfigError
from vitbirds.lifecycle.store import fetch_model
from vitbirds.model.baselines import build_classifier
from vitbirds.model.files import WEIGHTS_FILE, ModelMetadata, load_model, read_metadata
from vitbirds.model.pretrained import init_from_timm
from vitbirds.model.vit import build_model
from vitbirds.paths import cache_root
from vitbirds.precision import FP32, Precision
from vitbirds.presets import Recipe
from vitbirds.training.loop import TrainingRun, fit, seed_everything

logger = logging.getLogger(__name__)

# Size of the generated dataset when the user names neither: 6 species, 60 images each.
SYNTHETIC_CLASSES = 6
SYNTHETIC_IMAGES_PER_CLASS = 60


def prepare_dataset(
    data_cfg: DataConfig, cache_dir: str | Path | None = None, *, announce: bool = True
) -> DatasetSplits:
    """The labelled splits of `data_cfg.data_dir`, or of the synthetic dataset when it is None.

    The synthetic dataset is generated once per parameter set under `cache_dir` and announced
    with a warning (`announce`; workers leave it to the driver): a model trained on it must never
    pass for a model of real birds.
    """
    if data_cfg.data_dir is not None:
        return discover_dataset(
            data_cfg.data_dir,
            num_classes=data_cfg.num_classes,
            images_per_class=data_cfg.images_per_class,
            seed=data_cfg.seed,
            valid_fraction=data_cfg.valid_fraction,
        )
    root = synthetic_dataset(data_cfg, Path(cache_dir or cache_root()))
    if announce:
        logger.warning(
            "SYNTHETIC DATA: no data directory given, using generated synthetic birds at %s "
            "(their metrics say nothing about real photos)",
            root,
        )
    return discover_dataset(root, seed=data_cfg.seed, valid_fraction=data_cfg.valid_fraction)


def synthetic_dataset(data_cfg: DataConfig, cache_dir: Path) -> Path:
    """Generates (or reuses) the synthetic dataset `data_cfg` asks for; safe to call from several
    processes at once: each writes a private folder and the first rename wins."""
    num_classes = data_cfg.num_classes or SYNTHETIC_CLASSES
    per_class = data_cfg.images_per_class or SYNTHETIC_IMAGES_PER_CLASS
    # Rendered a little larger than the model input, as real photos are, so crops have pixels.
    size = max(32, round(data_cfg.image_size * data_cfg.decode_scale))
    name = f"synthetic-v{GENERATOR_VERSION}-c{num_classes}-n{per_class}-{size}px-s{data_cfg.seed}"
    root = cache_dir / name
    options = {
        "num_classes": num_classes,
        "images_per_class": per_class,
        "image_size": size,
        "seed": data_cfg.seed,
    }
    if root.is_dir():
        return make_synthetic_dataset(root, **options)
    private = cache_dir / f".{name}.{os.getpid()}"
    shutil.rmtree(private, ignore_errors=True)
    make_synthetic_dataset(private, **options)
    try:
        private.rename(root)
    except OSError:  # another process finished first; its copy is byte-identical
        shutil.rmtree(private, ignore_errors=True)
    return root


def fit_recipe_to_data(recipe: Recipe, splits: DatasetSplits) -> Recipe:
    """A copy of `recipe` whose classifier has one output per class of `splits`."""
    fitted = recipe.copy()
    fitted.model = replace(fitted.model, num_classes=len(splits.classes))
    return fitted


def build_run_model(recipe: Recipe, init_from: str | Path | None = None) -> nn.Module:
    """The recipe's ViT, optionally starting from weights: a timm ViT `.safetensors` file the
    user has on disk, or a vitbirds ViT named by any model reference (fine-tuning the champion);
    the classifier is fresh when the class count differs."""
    model = build_model(recipe.model)
    if init_from is not None:
        init_from_timm(model, starting_weights(init_from))
    return model


def starting_weights(init_from: str | Path) -> Path:
    """The `.safetensors` file `--init-from` names: itself, or a ViT model's weights file."""
    path = Path(init_from)
    if path.suffix == ".safetensors":
        return path
    model_dir = fetch_model(init_from).path
    architecture = read_metadata(model_dir).architecture
    if architecture != "vit":
        raise ConfigError(
            f"--init-from {init_from} is a {architecture} model; a ViT can start from a ViT only"
        )
    return model_dir / WEIGHTS_FILE


def pin_model_references(
    init_from: str | None, teacher: str | None, *, tracking_uri: str | None = None
) -> tuple[str | None, str | None]:
    """`--init-from` and `--teacher` as every worker can fetch them: each model reference fetched
    once here (a bad one fails before any worker starts) and replaced by the files it names now,
    so an alias moved mid-run cannot give workers different weights."""

    def pin(reference: str | None) -> str | None:
        if reference is None:
            return None
        if Path(reference).suffix == ".safetensors":  # timm weights: a file on this machine
            return str(Path(reference).expanduser().resolve())
        return fetch_model(reference, tracking_uri=tracking_uri).location

    return pin(init_from), pin(teacher)


def check_teacher(model_dir: str, class_names: list[str]) -> None:
    """Refuses a distillation teacher whose outputs are not this dataset's classes in this order:
    its argmax would then name the wrong species, silently."""
    teacher_classes = read_metadata(fetch_model(model_dir).path).class_names
    if teacher_classes != list(class_names):
        shared = len(set(teacher_classes) & set(class_names))
        raise ConfigError(
            f"teacher {model_dir} predicts {len(teacher_classes)} classes, the dataset has "
            f"{len(class_names)} ({shared} shared): train the teacher on the same classes"
        )


def load_teacher(model_dir: str, class_names: list[str], device: torch.device) -> nn.Module:
    """The frozen classifier a distilled run learns from (e.g. a ResNet-18 model directory)."""
    local = fetch_model(model_dir).path  # a gs:// teacher is copied once per node
    check_teacher(str(local), class_names)
    return load_model(local, device=device).model


@dataclass
class InProcessRun:
    """A finished `train_in_process`: the run (its model trained), the per-epoch metrics, the
    recipe as fitted to the data, and the valid batches (to evaluate other weights on)."""

    run: TrainingRun
    history: list[dict[str, float]]
    recipe: Recipe
    valid_loader: Iterable


def train_in_process(
    recipe: Recipe,
    splits: DatasetSplits,
    *,
    architecture: str = "vit",
    device: torch.device | str = "cpu",
    precision: Precision = FP32,
    teacher: nn.Module | None = None,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
) -> InProcessRun:
    """One run of the training loop in this process, without Ray: `recipe` (its classifier fitted
    to `splits`' classes) on `splits`' train images, validated on its valid ones. The benchmarks
    that train models (and the tests through them) train this way; the Ray workers run the same
    `TrainingRun` on their shard."""
    recipe = fit_recipe_to_data(recipe, splits)
    device = torch.device(device)
    seed_everything(recipe.train.seed)
    train_loader, valid_loader, _ = make_loaders(
        replace(splits, test=[]), recipe.data, recipe.train
    )
    run = TrainingRun(
        build_classifier(architecture, recipe.model).to(device),
        recipe.train,
        steps_per_epoch=len(train_loader),
        device=device,
        mixer=batch_mixer(recipe.data, recipe.model.num_classes),
        teacher=teacher,
        precision=precision,
    )
    history = fit(run, train_loader, valid_loader, on_epoch_end=on_epoch_end)
    return InProcessRun(run, history, recipe, valid_loader)


def data_label(splits: DatasetSplits) -> str:
    """One human line naming the data, with SYNTHETIC up front when it is."""
    sizes = ", ".join(f"{len(splits.split(name))} {name}" for name in ("train", "valid", "test"))
    what = "SYNTHETIC birds generated" if splits.synthetic else f"{splits.source} dataset"
    return f"{what} at {splits.root} ({len(splits.classes)} classes: {sizes})"


def build_metadata(
    recipe: Recipe,
    splits: DatasetSplits,
    *,
    name: str,
    teacher: str | None = None,
    precision: Precision = FP32,
) -> ModelMetadata:
    """What the exported model directory records about itself besides the weights (`precision`:
    what the training's forward passes computed in; the weights are fp32 either way)."""
    return ModelMetadata(
        model=recipe.model.to_dict(),
        class_names=list(splits.classes),
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
        image_size=recipe.model.image_size,
        name=name,
        data=splits.describe(),
        extra={
            "preset": recipe.preset,
            "data_config": recipe.data.to_dict(),
            "train_config": recipe.train.to_dict(),
            "teacher": teacher,
            "precision": precision.to_dict(),
        },
    )
