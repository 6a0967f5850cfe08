"""Run settings: what a run trains on and where and how it runs, defined once.

`RunSettings` (workers, device, storage, tracker, cache) is the base of the Ray adapter's
`TrainJob` and of `SweepConfig`; `RecipeSettings` (preset, data) is the part of a sweep that names
what every trial trains. The job CLIs (`jobs/train.py`, `tune.py`, `evaluate.py`, `monitor.py`)
build their flags from these fields with `add_arguments`, so a default and its help text exist
in one place: change a default here and every CLI, its `--help` and the library agree.
"""

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from vitbirds.devices import DEVICES
from vitbirds.errors import ConfigError
from vitbirds.lifecycle.registry import DEFAULT_MODEL_NAME
from vitbirds.lifecycle.tracking import TRACKERS
from vitbirds.precision import DEFAULT_PRECISION, PRECISIONS, check_precision
from vitbirds.presets import PRESETS, get_recipe

# The best small-data recipe that needs no teacher (README, "What accuracy to expect").
DEFAULT_PRESET = "vit-cpu-small-data"


def setting(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field whose metadata carries its CLI help (and `choices`, `default_text`
    for a default that is decided later, e.g. None meaning "the generated synthetic birds")."""
    return field(default=default, metadata={"help": help, **extra})


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
        None, "timm ViT weights (.safetensors) to start from", default_text="random init"
    )
    teacher: str | None = setting(
        None,
        "model directory to distil from, trained on the same classes (presets with a "
        "distillation token need one; e.g. a ResNet-18 from jobs/bench_accuracy.py --only resnet)",
        default_text="none",
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
) -> None:
    """One `--flag-name` per field: type, choices, default and help come from the field.

    `unset`: the flags default to None (a sweep.yaml fills what the user did not give) while the
    help still names the field's default. `defaults`: another default for one CLI, stated in its
    help. `notes`: a sentence appended to a flag's help.
    """
    for name in names:
        spec = settings_field(settings_type, name)
        default = (defaults or {}).get(name, spec.default)
        shown = spec.metadata.get("default_text") if default is None else default
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
            default_metavar = "N" if kwargs["type"] is int else "PATH"
            kwargs["metavar"] = spec.metadata.get("metavar", default_metavar)
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def _flag_type(spec: Field) -> type:
    example = spec.default if spec.default is not MISSING else None
    if isinstance(example, int) or "int" in str(spec.type):
        return int
    return str


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
