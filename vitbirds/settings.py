"""Run settings and the command-line flags built from them.

Where a default is set:
- where and how a run runs (workers, device, precision, storage, tracker, checkpoints, export):
  the fields below. `RunSettings` is the base of the Ray adapter's `TrainJob` and of
  `SweepConfig`; `RecipeSettings` (preset, data) names what a run or every trial trains.
- what a run trains (epochs, batch, learning rate, depth, ...): the default preset
  (`vitbirds.presets.DEFAULT_PRESET`), written over `vitbirds.config`'s fields, which carry
  each flag's help. `RECIPE_FLAGS` lists the fields a flag may write over.

The job CLIs (`jobs/train.py`, `tune.py`, `evaluate.py`, `monitor.py`) build their flags from
these fields (`add_arguments`, `add_recipe_arguments`), so a default and its help text exist in
one place: change one and every CLI, its `--help` and the library agree.
"""

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, fields, replace
from typing import Any

from vitbirds.config import DataConfig, ModelConfig, TrainConfig, setting
from vitbirds.devices import DEVICES
from vitbirds.errors import ConfigError
from vitbirds.lifecycle.registry import DEFAULT_MODEL_NAME
from vitbirds.lifecycle.tracking import TRACKERS
from vitbirds.precision import DEFAULT_PRECISION, PRECISIONS, check_precision
from vitbirds.presets import DEFAULT_PRESET, PRESETS, Recipe, get_recipe

# The recipe fields a flag writes over, and the recipe sections each writes (`--seed` seeds the
# data split and the training alike). Their type, choices and help are the fields' own.
RECIPE_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
RECIPE_FLAGS: dict[str, tuple[str, ...]] = {
    "epochs": ("train",), "batch_size": ("train",), "lr": ("train",),
    "weight_decay": ("train",), "depth": ("model",), "dim": ("model",), "heads": ("model",),
    "patch_size": ("model",), "seed": ("train", "data"), "data_mode": ("data",),
}  # fmt: skip


@dataclass(kw_only=True)
class RunSettings:
    """Where and how a run runs: shared by training, sweeps, evaluation and monitoring."""

    num_workers: int = setting(1, "Ray Train workers (one DDP process each)")
    device: str = setting(
        "cpu",
        "cpu; cuda (one GPU per worker, same as --use-gpu); mps (Apple GPU, one worker)",
        choices=DEVICES,
    )
    cpus_per_worker: int = setting(1, "CPUs (and torch threads) per worker")
    precision: str = setting(
        DEFAULT_PRECISION,
        "compute precision of the forward passes: auto picks bf16 where the device runs it "
        "natively (a CUDA GPU with bf16, an x86 CPU with AMX-BF16 or AVX512-BF16), else fp32; "
        "weights, optimiser state, loss and metrics stay fp32",
        choices=PRECISIONS,
    )
    storage_path: str = setting(
        "runs",
        "checkpoints, Tune experiments and the local MLflow store: a folder or a gs:// URI",
    )
    tracker: str = setting("mlflow", "experiment tracker", choices=TRACKERS)
    cache_dir: str | None = setting(
        None, "where generated synthetic data is kept", default_text="~/.cache/vitbirds"
    )

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.num_workers < 1:
            raise ConfigError(f"num_workers must be at least 1, got {self.num_workers}")
        if self.device == "mps" and self.num_workers != 1:
            raise ConfigError(
                "device 'mps' trains on one worker (one Apple GPU), "
                f"got num_workers={self.num_workers}"
            )
        if self.cpus_per_worker < 1:
            raise ConfigError(f"cpus_per_worker must be at least 1, got {self.cpus_per_worker}")
        check_precision(self.precision)
        if self.tracker not in TRACKERS:
            raise ConfigError(f"tracker must be one of {', '.join(TRACKERS)}, got {self.tracker!r}")

    @property
    def use_gpu(self) -> bool:
        return self.device == "cuda"


@dataclass(kw_only=True)
class TrainSettings(RunSettings):
    """A training run's own settings besides the recipe: failures, checkpoints, start, export."""

    max_failures: int = setting(0, "worker-group restarts from the latest checkpoint")
    keep_checkpoints: int = setting(2, "checkpoints kept: the best k by valid top-1 (+ the latest)")
    init_from: str | None = setting(
        None,
        "weights to start from: a timm ViT .safetensors file, or a ViT of ours by any model "
        "reference (a model or run directory, gs://..., models:/NAME@ALIAS)",
        default_text="random init",
        metavar="REF",
    )
    teacher: str | None = setting(
        None,
        "model to distil from (any model reference), trained on the same classes (presets with "
        "a distillation token need one; e.g. a ResNet-18 from jobs/bench_accuracy.py --only "
        "resnet)",
        default_text="none",
        metavar="REF",
    )
    evaluate: bool = setting(
        True, "evaluate the best checkpoint on the test split (valid when there is none)"
    )
    export_dir: str | None = setting(
        None, "also copy the exported model directory here, e.g. models/latest", default_text="none"
    )
    register: bool = setting(
        True,
        "register the export as a version of the MLflow registered model, aliased challenger "
        "(MLflow tracker only; jobs/promote.py decides whether it becomes the champion)",
    )
    registered_model: str = setting(
        DEFAULT_MODEL_NAME, "MLflow registered model name", metavar="NAME"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be at least 1, got {self.keep_checkpoints}")


@dataclass(kw_only=True)
class RecipeSettings:
    """What a run trains: a preset, and the data (flags of the recipe write over the preset)."""

    preset: str = setting(DEFAULT_PRESET, "model + training recipe", choices=tuple(PRESETS))
    data_dir: str | None = setting(
        None,
        "Kaggle bird-species layout or any ImageFolder tree",
        default_text="the generated synthetic birds",
    )
    num_classes: int | None = setting(None, "seeded subset of the classes", default_text="all")
    images_per_class: int | None = setting(
        None, "seeded subset of images per class and split", default_text="all"
    )


def settings_field(settings_type: type, name: str) -> Field:
    for candidate in fields(settings_type):
        if candidate.name == name:
            return candidate
    raise KeyError(f"{settings_type.__name__} has no setting {name!r}")


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    settings_type: type,
    names: Sequence[str],
    *,
    unset: bool = False,
    defaults: Mapping[str, Any] | None = None,
    notes: Mapping[str, str] | None = None,
    default_texts: Mapping[str, str] | None = None,
) -> None:
    """One `--flag-name` per field: type, choices, default and help come from the field.

    `unset`: the flags default to None (a sweep.yaml or a preset fills what the user did not
    give) while the help still names the default that applies. `defaults`: another default for
    one CLI, stated in its help. `notes`: a sentence appended to a flag's help.
    `default_texts`: what the help names as the default instead of the field's.
    """
    for name in names:
        spec = settings_field(settings_type, name)
        default = (defaults or {}).get(name, spec.default)
        shown = spec.metadata.get("default_text") if default is None else default
        if default_texts and name in default_texts:
            shown = default_texts[name]
        help_text = spec.metadata["help"]
        if notes and name in notes:
            help_text += f"; {notes[name]}"
        kwargs: dict[str, Any] = {
            "default": None if unset else default,
            # None without a text: the note says what happens instead
            "help": help_text if shown is None else f"{help_text} (default: {shown})",
        }
        if isinstance(spec.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "choices" in spec.metadata:
            kwargs["choices"] = spec.metadata["choices"]
        else:
            kwargs["type"] = _flag_type(spec)
            default_metavar = {int: "N", float: "X"}.get(kwargs["type"], "PATH")
            kwargs["metavar"] = spec.metadata.get("metavar", default_metavar)
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def _flag_type(spec: Field) -> type:
    example = spec.default if spec.default is not MISSING else None
    if isinstance(example, int) or "int" in str(spec.type):
        return int
    if isinstance(example, float) or "float" in str(spec.type):
        return float
    return str


def add_recipe_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    names: Sequence[str],
    *,
    notes: Mapping[str, str] | None = None,
) -> None:
    """`--epochs`, `--lr`, ...: flags that write over the preset's values (None when not given).
    Type, choices and help are the recipe field's; the help names the default preset's value."""
    for name in names:
        section = RECIPE_FLAGS[name][0]
        add_arguments(
            parser,
            RECIPE_SECTIONS[section],
            [name],
            unset=True,
            notes=notes,
            default_texts={name: preset_default(section, name)},
        )


def recipe_setting(name: str, note: str) -> Any:
    """A settings field that writes over the preset's `name` (e.g. a sweep's epochs): the recipe
    field's help with `note` appended, None unless given."""
    section = RECIPE_FLAGS[name][0]
    spec = settings_field(RECIPE_SECTIONS[section], name)
    return setting(
        None, f"{spec.metadata['help']}; {note}", default_text=preset_default(section, name)
    )


def preset_with_overrides(preset: str, overrides: Mapping[str, Any]) -> Recipe:
    """`preset` with every given (not None) recipe value written over it and validated again:
    a RECIPE_FLAGS name, a `RecipeSettings` data field (data_dir, num_classes,
    images_per_class), or `device`."""
    recipe = get_recipe(preset)
    sections: dict[str, dict[str, Any]] = {"model": {}, "data": {}, "train": {}}
    for name, value in overrides.items():
        if value is None:
            continue
        if name in RECIPE_FLAGS:
            for section in RECIPE_FLAGS[name]:
                sections[section][name] = value
        elif name in ("data_dir", "num_classes", "images_per_class"):
            sections["data"][name] = value
        elif name == "device":
            sections["train"][name] = value
        else:
            raise ConfigError(f"{name!r} is not a recipe setting")
    return Recipe(
        model=replace(recipe.model, **sections["model"]),
        data=replace(recipe.data, **sections["data"]),
        train=replace(recipe.train, **sections["train"]),
        preset=preset,
    )


def preset_default(section: str, name: str, preset: str = DEFAULT_PRESET) -> str:
    """`from the preset (vit-cpu-small-data: 50)`: the default of a flag that writes over a
    preset, with the default preset's value."""
    value = getattr(getattr(get_recipe(preset), section), name)
    return f"from the preset ({preset}: {value})"


PRESET_COLUMNS = (
    ("model", "image_size", "image"), ("model", "patch_size", "patch"), ("model", "dim", "dim"),
    ("model", "depth", "depth"), ("model", "heads", "heads"), ("train", "epochs", "epochs"),
    ("train", "batch_size", "batch"), ("train", "lr", "lr"),
)  # fmt: skip


def presets_table() -> str:
    """The presets' main values, one line each, for the epilog of `--help`."""
    header = f"  {'preset':<20}" + "".join(f"{label:>7}" for *_, label in PRESET_COLUMNS)
    lines = [header]
    for name in PRESETS:
        recipe = get_recipe(name)
        values = "".join(
            f"{getattr(getattr(recipe, section), key)!s:>7}" for section, key, _ in PRESET_COLUMNS
        )
        mark = "  (default)" if name == DEFAULT_PRESET else ""
        lines.append(f"  {name:<20}{values}{mark}")
    return "\n".join(lines)
