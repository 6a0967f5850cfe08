"""Hyperparameter sweeps without Ray: the search space, each trial's recipe, the results table,
the plot, the tracker record and the jobs/train.py command that reproduces a trial.

`vitbirds.ray_adapter.tune` turns a `SweepConfig` into a Ray Tune run and hands back one
`TrialRow` per trial; everything here is plain data in, plain data out, so it is testable
without a cluster.

A space dimension is a `Choice` (a list: grid search enumerates it, the samplers pick from it) or
a `LogUniform` range (learning rates, weight decay), sampled per trial even in a grid search:
`--search grid --depth 4 6 8 12 --lr 3e-4 3e-3 --num-samples 2` trains every depth twice, each
time with its own learning rate. Only fields that jobs/train.py has a flag for can be swept,
because every sweep ends with the exact training command of its best trial.
"""

import csv
import io
import math
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from vitbirds.config import ModelConfig
from vitbirds.errors import ConfigError
from vitbirds.lifecycle.tracking import Tracker
from vitbirds.model.vit import build_model, count_parameters
from vitbirds.presets import Recipe
from vitbirds.settings import RecipeSettings, RunSettings, recipe_setting, setting

METRIC = "val_top1"  # what ASHA stops on and the table is sorted by (higher is better)
SEARCHES = ("grid", "random", "optuna")
DEFAULT_RANDOM_SAMPLES = 8


@dataclass(frozen=True)
class Param:
    """A sweepable field of the recipe and the jobs/train.py flag that sets it."""

    section: str  # "model" or "train" (the Recipe attribute)
    field: str
    flag: str
    type: type  # int or float; floats may be ranges


PARAMS: dict[str, Param] = {
    "depth": Param("model", "depth", "--depth", int),
    "dim": Param("model", "dim", "--dim", int),
    "heads": Param("model", "heads", "--heads", int),
    "patch_size": Param("model", "patch_size", "--patch-size", int),
    "lr": Param("train", "lr", "--lr", float),
    "weight_decay": Param("train", "weight_decay", "--weight-decay", float),
}


@dataclass(frozen=True)
class Choice:
    """A list of values: enumerated by grid search, sampled uniformly otherwise."""

    values: tuple[Any, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"choice": list(self.values)}

    def describe(self) -> str:
        return "{" + ", ".join(_number(value) for value in self.values) + "}"


@dataclass(frozen=True)
class LogUniform:
    """A range sampled uniformly on a log scale (learning rate, weight decay)."""

    low: float
    high: float

    def to_dict(self) -> dict[str, Any]:
        return {"loguniform": [self.low, self.high]}

    def describe(self) -> str:
        return f"log-uniform [{_number(self.low)}, {_number(self.high)}]"


Dimension = Choice | LogUniform

# The sweep: model depth and learning rate. Flags and YAML replace dimensions one by one.
DEFAULT_SPACE: dict[str, Dimension] = {
    "depth": Choice((4, 6, 8, 12)),
    "lr": LogUniform(3e-4, 3e-3),
}


def parse_dimension(name: str, value: Any) -> Dimension:
    """A YAML/JSON value -> a dimension: a list or {"choice": [...]} is a Choice,
    {"loguniform": [low, high]} a range, a scalar a fixed value."""
    param = _param(name)
    if isinstance(value, Mapping):
        if set(value) == {"choice"}:
            return _choice(name, param, value["choice"])
        if set(value) == {"loguniform"}:
            bounds = value["loguniform"]
            if not isinstance(bounds, Sequence) or isinstance(bounds, str) or len(bounds) != 2:
                raise ConfigError(f"{name}: loguniform takes [low, high], got {bounds!r}")
            return log_uniform(name, *(_cast(name, param, bound) for bound in bounds))
        raise ConfigError(
            f"{name}: expected a list, {{choice: [...]}} or {{loguniform: [low, high]}}"
        )
    if isinstance(value, Sequence) and not isinstance(value, str):
        return _choice(name, param, value)
    return _choice(name, param, [value])


def log_uniform(name: str, low: float, high: float) -> LogUniform:
    param = _param(name)
    if param.type is not float:
        raise ConfigError(f"{name} is an integer: give a list of values, not a range")
    if not 0 < low < high:
        raise ConfigError(f"{name}: a log-uniform range needs 0 < low < high, got {low}, {high}")
    return LogUniform(float(low), float(high))


def _choice(name: str, param: Param, values: Sequence[Any]) -> Choice:
    if not values:
        raise ConfigError(f"{name}: empty list of values")
    cast = tuple(dict.fromkeys(_cast(name, param, value) for value in values))
    if any(value <= 0 for value in cast):
        raise ConfigError(f"{name}: values must be positive, got {list(cast)}")
    return Choice(cast)


def _cast(name: str, param: Param, value: Any) -> Any:
    try:
        number = float(value)  # YAML reads 3e-4 as a string
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a number") from None
    if param.type is int:
        if not number.is_integer():
            raise ConfigError(f"{name}: {value!r} is not an integer")
        return int(number)
    return number


def _param(name: str) -> Param:
    if name not in PARAMS:
        raise ConfigError(f"cannot sweep {name!r}; sweepable: {', '.join(PARAMS)}")
    return PARAMS[name]


@dataclass
class SweepConfig(RunSettings, RecipeSettings):
    """Everything that defines a sweep; saved beside the Tune experiment so a rerun with the same
    name either resumes this sweep or refuses to mix it with different settings.

    Preset, data, workers (per trial), device, storage, tracker and cache are the shared
    `RecipeSettings` and `RunSettings`; the fields below are the sweep's own, with their
    jobs/tune.py help text.
    """

    name: str
    epochs: int | None = recipe_setting("epochs", "every trial's full schedule; ASHA's max_t")
    batch_size: int | None = recipe_setting("batch_size", "every trial's")
    seed: int | None = recipe_setting("seed", "also seeds the searcher")
    space: dict[str, Dimension] = field(default_factory=lambda: dict(DEFAULT_SPACE))
    search: str = setting("random", "search algorithm", choices=SEARCHES)
    num_samples: int | None = setting(
        None,
        "trials of random/optuna search; repeats of the grid (ranges sampled anew in each)",
        default_text=f"{DEFAULT_RANDOM_SAMPLES} trials; grid: 1 repeat",
    )
    grace_period: int = setting(2, "ASHA: epochs every trial gets before it can be stopped")
    reduction_factor: int = setting(2, "ASHA: keeps the top 1/this of the trials at each rung")
    max_concurrent: int | None = setting(
        None, "trials at a time", default_text="as many as the cluster's resources hold"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"sweep name must be a plain folder name, got {self.name!r}")
        if self.search not in SEARCHES:
            raise ConfigError(f"search must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        if not self.space:
            raise ConfigError("the search space is empty")
        for name in self.space:
            _param(name)
        positive = {
            "num_samples": self.num_samples, "epochs": self.epochs, "batch_size": self.batch_size,
            "grace_period": self.grace_period, "max_concurrent": self.max_concurrent,
        }  # fmt: skip
        for name, value in positive.items():
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if self.reduction_factor < 2:
            raise ConfigError(f"reduction_factor must be at least 2, got {self.reduction_factor}")

    @property
    def samples(self) -> int:
        return self.num_samples or (1 if self.search == "grid" else DEFAULT_RANDOM_SAMPLES)

    @property
    def swept(self) -> list[str]:
        """Parameters that take more than one value, in PARAMS order."""
        return [
            name
            for name in PARAMS
            if name in self.space
            and not (isinstance(self.space[name], Choice) and len(self.space[name].values) == 1)
        ]

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["space"] = {name: dim.to_dict() for name, dim in self.space.items()}
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SweepConfig":
        """Builds a sweep from YAML/JSON values; the space is merged over DEFAULT_SPACE."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown sweep settings {unknown}; known: {sorted(known)}")
        values = dict(values)
        space = values.pop("space", None) or {}
        if not isinstance(space, Mapping):
            raise ConfigError(f"space must be a mapping of parameter to values, got {space!r}")
        parsed = {name: parse_dimension(name, value) for name, value in space.items()}
        return cls(**values, space={**DEFAULT_SPACE, **parsed})


def describe_space(space: Mapping[str, Dimension]) -> str:
    return ", ".join(f"{name} {dim.describe()}" for name, dim in space.items())


def check_space(base: Recipe, space: Mapping[str, Dimension]) -> None:
    """Raises ConfigError before any trial starts if some combination of the listed model values
    cannot build a model (dim not divisible by heads, image not divisible by patch)."""
    lists = {
        name: dim.values
        for name, dim in space.items()
        if PARAMS[name].section == "model" and isinstance(dim, Choice)
    }
    combos: list[dict[str, Any]] = [{}]
    for name, values in lists.items():
        combos = [{**combo, name: value} for combo in combos for value in values]
    for combo in combos:
        try:
            apply_params(base, combo)
        except ConfigError as error:
            raise ConfigError(f"the space holds an impossible model ({combo}): {error}") from None


def apply_params(recipe: Recipe, params: Mapping[str, Any]) -> Recipe:
    """The recipe of one trial: `recipe` with the trial's values (validated again)."""
    changes: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for name, value in params.items():
        param = _param(name)
        changes[param.section][param.field] = param.type(value)
    trial = recipe.copy()
    trial.model = replace(trial.model, **changes["model"])
    trial.train = replace(trial.train, **changes["train"])
    return trial


def train_argv(sweep: SweepConfig, params: Mapping[str, Any] | None = None) -> list[str]:
    """jobs/train.py arguments for `params` on this sweep's data, schedule and workers.

    With no params this is the sweep's base recipe; jobs/tune.py builds the base from it with
    jobs/train.py's own parser, so a trial and its reproduce command cannot drift apart.
    """
    argv = ["--preset", sweep.preset]
    optional = {
        "--data-dir": sweep.data_dir, "--num-classes": sweep.num_classes,
        "--images-per-class": sweep.images_per_class, "--cache-dir": sweep.cache_dir,
        "--epochs": sweep.epochs,
        "--batch-size": sweep.batch_size, "--seed": sweep.seed,
    }  # fmt: skip
    for flag, value in optional.items():
        if value is not None:
            argv += [flag, str(value)]
    for name, value in (params or {}).items():
        argv += [_param(name).flag, repr(_param(name).type(value))]
    argv += ["--num-workers", str(sweep.num_workers)]
    argv += ["--cpus-per-worker", str(sweep.cpus_per_worker), "--device", sweep.device]
    argv += ["--precision", sweep.precision]
    return argv


def reproduce_command(sweep: SweepConfig, params: Mapping[str, Any], *, run_name: str) -> str:
    """The shell command that trains the trial `params` again, from scratch, under `run_name`."""
    argv = ["python", "jobs/train.py", *train_argv(sweep, params), "--run-name", run_name]
    return shlex.join(argv)


def max_concurrent_trials(cluster: Mapping[str, float], per_trial: Mapping[str, float]) -> int:
    """How many trials the cluster can run at once: the scarcest resource decides.

    A trial's Train run starts only when all its workers fit, so launching more trials than this
    just parks Train drivers waiting for CPUs or GPUs.
    """
    limits = [
        int(cluster.get(resource, 0) // amount)
        for resource, amount in per_trial.items()
        if amount > 0
    ]
    return max(1, min(limits, default=1))


def model_cost(config: ModelConfig) -> tuple[int, int]:
    """(parameters, forward FLOPs for one image): the x-axes of the cost plot."""
    model = build_model(config).eval()
    image = torch.zeros(1, config.in_chans, config.image_size, config.image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image)
    return count_parameters(model), int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class TrialRow:
    """One trial of a finished sweep, as the table, plot and tracker see it."""

    trial_id: str
    params: dict[str, Any]
    status: str  # completed | stopped (ASHA) | error
    epochs: int  # epochs it reported
    max_epochs: int
    val_top1: float  # best epoch's (what the run exports), nan if it reported nothing
    val_top5: float
    val_loss: float
    best_epoch: int
    last_val_top1: float
    train_run: str  # the Ray Train run (name under the sweep's train/ folder)
    parameters: int = 0
    flops: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    error: str = ""


def trial_row(
    *,
    trial_id: str,
    params: Mapping[str, Any],
    history: Sequence[Mapping[str, float]],
    max_epochs: int,
    train_run: str,
    error: str = "",
) -> TrialRow:
    """Summarises a trial's reported epochs (a resumed trial may report an epoch twice: the
    later report wins)."""
    by_epoch = {int(item["epoch"]): dict(item) for item in history if "epoch" in item}
    epochs = [by_epoch[epoch] for epoch in sorted(by_epoch)]
    nan = float("nan")
    best = max(epochs, key=lambda item: (item[METRIC], -item["val_loss"]), default=None)
    done = len(epochs)
    status = "error" if error else "completed" if done >= max_epochs else "stopped"
    return TrialRow(
        trial_id=trial_id,
        params=dict(params),
        status=status,
        epochs=done,
        max_epochs=max_epochs,
        val_top1=best[METRIC] if best else nan,
        val_top5=best["val_top5"] if best else nan,
        val_loss=best["val_loss"] if best else nan,
        best_epoch=int(best["epoch"]) if best else 0,
        last_val_top1=epochs[-1][METRIC] if epochs else nan,
        train_run=train_run,
        history=epochs,
        error=error,
    )


def sort_rows(rows: Iterable[TrialRow]) -> list[TrialRow]:
    """Best first; trials that reported nothing last."""
    return sorted(rows, key=lambda row: -row.val_top1 if row.epochs else math.inf)


def best_trial(rows: Sequence[TrialRow]) -> TrialRow | None:
    """The trial to export: the best of those that trained the whole schedule.

    A trial ASHA stopped was worse than its peers at its last rung; its exported model and the
    reproduce command (which trains all epochs) would not match it. It wins only if no trial
    finished (an interrupted sweep).
    """
    completed = [row for row in rows if row.status == "completed"]
    candidates = completed or [row for row in rows if row.epochs]
    return sort_rows(candidates)[0] if candidates else None


def compute_saved(rows: Sequence[TrialRow]) -> dict[str, float]:
    """Trial-epochs trained against the trial-epochs of running every trial to the end."""
    used = sum(row.epochs for row in rows)
    full = sum(row.max_epochs for row in rows)
    return {
        "trial_epochs_used": used,
        "trial_epochs_full": full,
        "fraction_used": used / full if full else 0.0,
        "stopped_early": sum(row.status == "stopped" for row in rows),
    }


TABLE_COLUMNS = (
    "rank", "trial", "status", "epochs", "val_top1", "val_top5", "val_loss", "best_epoch",
    "last_val_top1",
)  # fmt: skip


def table_records(rows: Sequence[TrialRow], swept: Sequence[str]) -> list[dict[str, Any]]:
    """One flat dict per trial, best first: the CSV rows."""
    records = []
    for rank, row in enumerate(sort_rows(rows), start=1):
        record: dict[str, Any] = {
            "rank": rank, "trial": row.trial_id, "status": row.status,
            "epochs": f"{row.epochs}/{row.max_epochs}", "val_top1": row.val_top1,
            "val_top5": row.val_top5, "val_loss": row.val_loss, "best_epoch": row.best_epoch,
            "last_val_top1": row.last_val_top1,
        }  # fmt: skip
        record.update({name: row.params.get(name) for name in swept})
        record["params_M"] = row.parameters / 1e6
        record["gflops"] = row.flops / 1e9
        record["train_run"] = row.train_run
        records.append(record)
    return records


def write_table(rows: Sequence[TrialRow], swept: Sequence[str], out_dir: Path) -> list[Path]:
    """results.csv (exact values) and results.md (rounded, for notes and PRs)."""
    records = table_records(rows, swept)
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    if records:
        writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    csv_path = out_dir / "results.csv"
    csv_path.write_text(buffer.getvalue())
    md_path = out_dir / "results.md"
    md_path.write_text(markdown_table(records) + "\n")
    return [csv_path, md_path]


def markdown_table(records: Sequence[Mapping[str, Any]]) -> str:
    if not records:
        return "(no trials)"
    header = list(records[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in records:
        lines.append("| " + " | ".join(_cell(key, record[key]) for key in header) + " |")
    return "\n".join(lines)


def _cell(key: str, value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if key in ("val_top1", "val_top5", "last_val_top1"):
            return f"{value:.1%}"
        if key in ("params_M", "gflops", "val_loss"):
            return f"{value:.3f}"
        return _number(value)
    return "" if value is None else str(value)


def _number(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def plot_png(rows: Sequence[TrialRow], best: TrialRow | None = None) -> bytes:
    """Best valid top-1 of each trial against depth, learning rate, parameters and FLOPs.

    Filled markers trained the whole schedule, hollow ones were stopped by ASHA; the star is the
    exported trial. Colour is the learning rate on the depth panel and depth elsewhere.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import NullFormatter, PercentFormatter

    shown = [row for row in rows if row.epochs]
    figure, axes = plt.subplots(2, 2, figsize=(10, 8), constrained_layout=True)
    panels = (
        (axes[0, 0], "depth", lambda r: r.params.get("depth"), "lr"),
        (axes[0, 1], "learning rate", lambda r: r.params.get("lr"), "depth"),
        (axes[1, 0], "parameters (M)", lambda r: r.parameters / 1e6, "depth"),
        (axes[1, 1], "forward GFLOPs per image", lambda r: r.flops / 1e9, "depth"),
    )
    for axis, label, x_of, colour_by in panels:
        points = [(x_of(row), row) for row in shown if x_of(row) is not None]
        colours = [row.params.get(colour_by, 0.0) or 0.0 for _, row in points]
        norm = _colour_norm(colours, log=colour_by == "lr")
        for (x, row), colour in zip(points, colours, strict=True):
            edge = plt.cm.viridis(norm(colour))
            face = edge if row.status == "completed" else "none"
            axis.scatter(x, row.val_top1, s=60, facecolors=face, edgecolors=edge, linewidths=1.5)
        if best is not None and best.epochs and x_of(best) is not None:
            axis.scatter(x_of(best), best.val_top1, marker="*", s=300, facecolors="none",
                         edgecolors="crimson", linewidths=1.5, zorder=3)  # fmt: skip
        if label == "learning rate":
            axis.set_xscale("log")
            axis.xaxis.set_minor_formatter(NullFormatter())  # crowded on a narrow range
        if label == "depth" and points:
            axis.set_xticks(sorted({x for x, _ in points}))
        mappable = plt.cm.ScalarMappable(norm=norm, cmap="viridis")
        figure.colorbar(mappable, ax=axis, label=colour_by)
        axis.set_xlabel(label)
        axis.set_ylabel("best valid top-1")
        axis.yaxis.set_major_formatter(PercentFormatter(1.0))
        axis.grid(alpha=0.3)
    figure.suptitle("filled: full schedule, hollow: stopped by ASHA, red star: exported trial")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def _colour_norm(values: Sequence[float], *, log: bool) -> Any:
    from matplotlib.colors import LogNorm, Normalize

    positive = [value for value in values if value > 0] or [1.0]
    low, high = min(positive), max(positive)
    if low == high:
        high = low * 1.01
    return LogNorm(low, high) if log else Normalize(low, high)


def log_sweep(
    tracker: Tracker,
    sweep: SweepConfig,
    rows: Sequence[TrialRow],
    *,
    best: TrialRow | None,
    summary: Mapping[str, Any],
    artifacts: Iterable[Path] = (),
) -> None:
    """The sweep as one parent run with a child run per trial (params, per-epoch metrics,
    status), recorded when the sweep ends so a resumed sweep still gives one parent run."""
    tracker.log_params({"sweep": sweep.to_dict()})
    tracker.set_tags({"kind": "sweep", "sweep": sweep.name})
    for row in sort_rows(rows):
        child = tracker.child(f"{sweep.name}/{row.trial_id}")
        child.log_params({**row.params, "trial_id": row.trial_id, "train_run": row.train_run})
        for item in row.history:
            child.log_metrics(item, step=int(item["epoch"]))
        child.set_tags({"status": row.status, "sweep": sweep.name})
        child.log_metrics({"best_val_top1": row.val_top1, "epochs_trained": row.epochs})
        child.close("FAILED" if row.status == "error" else "FINISHED")
    numbers = {k: v for k, v in summary.items() if isinstance(v, int | float)}
    tracker.log_metrics(numbers)
    if best is not None:
        tracker.set_tags({"best_trial": best.trial_id, "best_params": str(best.params)})
    for path in artifacts:
        tracker.log_artifact(path, "sweep")
