"""Sweep the bird ViT's hyperparameters with Ray Tune; every trial is a jobs/train.py run.

examples:
    python jobs/tune.py                          # depth {4,6,8,12} x lr 3e-4..3e-3, synthetic data
    python jobs/tune.py --data-dir ../shared/data/cub100 --epochs 10 --num-samples 8 --name cub
    python jobs/tune.py --search grid --depth 4 8 --lr-choices 3e-4 1e-3
    python jobs/tune.py --config sweep.yaml --search optuna

`--lr LOW HIGH` is a log-uniform range, `--lr-choices A B C` a list. Grid search runs every
combination of the lists, `--num-samples` times, sampling the ranges anew for each trial.
ASHA stops weak trials after each rung (`--grace-period` epochs, then x`--reduction-factor`).
Outputs in --out (default <storage>/<name>/results): results.csv and results.md sorted by valid
top-1, sweep.png, best_model/ (servable, as jobs/train.py exports it), reproduce.txt (the
jobs/train.py command of the best trial) and summary.json. Rerunning the same command (same
--name) resumes an interrupted sweep. Relative output paths are relative to the current directory,
or to $VITBIRDS_HOME (default ~/vitbirds) when the sweep runs through `ray job submit
--working-dir`. Exit status: 0 on success, 2 for a usage error, 1 if no
trial finished an epoch or the export failed.

A sweep.yaml holds the same settings by their long names, and a `space` mapping:

    name: cub-depth-lr
    data_dir: ../shared/data/cub100
    epochs: 10
    search: optuna
    num_samples: 8
    space:
      depth: [4, 6, 8, 12]
      lr: {loguniform: [3.0e-4, 3.0e-3]}
"""

import argparse
import contextlib
import io
import json
import logging
import shlex
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs import train as train_job
from jobs.cli import start_job
from vitbirds.errors import ConfigError, VitbirdsError
from vitbirds.lifecycle.tracking import make_tracker, tracker_hint
from vitbirds.paths import output_path
from vitbirds.presets import Recipe
from vitbirds.settings import DEFAULT_PRESET, add_arguments, presets_table
from vitbirds.training.sweep import (
    DEFAULT_SPACE,
    PARAMS,
    Choice,
    SweepConfig,
    TrialRow,
    apply_params,
    best_trial,
    check_space,
    compute_saved,
    describe_space,
    log_sweep,
    markdown_table,
    model_cost,
    plot_png,
    reproduce_command,
    table_records,
    train_argv,
    write_table,
)

if TYPE_CHECKING:
    from vitbirds.ray_adapter.train import TrainOutcome

SEARCH_SETTINGS = ["search", "num_samples", "grace_period", "reduction_factor", "max_concurrent"]
# Flags that are sweep settings (SweepConfig fields); the space flags are built from PARAMS.
SETTINGS = (
    "name", "preset", "data_dir", "num_classes", "images_per_class", "cache_dir", "epochs",
    "batch_size", "seed", *SEARCH_SETTINGS, "num_workers", "cpus_per_worker", "device",
    "precision", "storage_path", "tracker",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    description, _, epilog = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"{epilog}\npresets:\n{presets_table()}",
    )
    add = parser.add_argument
    add("--config", metavar="YAML", help="sweep.yaml (see below); flags override its values")
    add("--name", help="experiment name; the same name resumes (default: tune-PRESET-DATE-TIME)")
    # Every setting defaults to None here so that sweep.yaml can fill it; the help shows the
    # SweepConfig default that applies when neither gives it.
    add_arguments(parser, SweepConfig, ["preset"], unset=True)
    data = parser.add_argument_group("data")
    add_arguments(data, SweepConfig, ["data_dir", "num_classes", "images_per_class", "cache_dir"],
                  unset=True)  # fmt: skip
    trials = parser.add_argument_group("every trial")
    add_arguments(trials, SweepConfig, ["epochs", "batch_size", "seed"], unset=True)
    _add_space_arguments(parser)
    search = parser.add_argument_group("search")
    add_arguments(search, SweepConfig, SEARCH_SETTINGS, unset=True)
    ray_group = parser.add_argument_group("Ray (per trial)")
    add_arguments(
        ray_group, SweepConfig, ["num_workers", "cpus_per_worker", "device", "precision"],
        unset=True,
    )  # fmt: skip
    ray_group.add_argument("--use-gpu", action="store_true", help="same as --device cuda")
    out = parser.add_argument_group("outputs")
    add_arguments(out, SweepConfig, ["storage_path", "tracker"], unset=True,
                  notes={"tracker": "one parent run, a child run per trial"})  # fmt: skip
    out.add_argument(
        "--out", metavar="PATH",
        help="results table, plot, best model (default: STORAGE_PATH/NAME/results)",
    )  # fmt: skip
    return parser.parse_args(argv)


def _add_space_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ", ".join(f"{name} {dim.describe()}" for name, dim in DEFAULT_SPACE.items())
    space = parser.add_argument_group(
        f"search space (default: {defaults}); one value fixes a parameter"
    )
    for name, param in PARAMS.items():
        what = f"{param.section} {param.field}"
        if param.type is int:
            space.add_argument(
                param.flag, type=int, nargs="+", metavar="N", dest=f"space_{name}",
                help=f"{what}: the values to try",
            )  # fmt: skip
            continue
        space.add_argument(
            param.flag, type=float, nargs="+", metavar=("LOW", "HIGH"), dest=f"space_{name}",
            help=f"{what}: a log-uniform range (one value: fixed)",
        )  # fmt: skip
        space.add_argument(
            f"{param.flag}-choices", type=float, nargs="+", metavar="X",
            dest=f"space_{name}_choices", help=f"{what}: a list of values instead of a range",
        )  # fmt: skip


def build_sweep(args: argparse.Namespace) -> SweepConfig:
    """YAML values, then the flags given, over SweepConfig's defaults."""
    values: dict[str, Any] = _read_yaml(args.config) if args.config else {}
    values.update({k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None})
    if args.use_gpu:
        values["device"] = "cuda"
    space = dict(values.get("space") or {})
    for name, param in PARAMS.items():
        given = getattr(args, f"space_{name}")
        choices = getattr(args, f"space_{name}_choices", None)
        if given is not None and choices is not None:
            raise ConfigError(f"give {param.flag} or {param.flag}-choices, not both")
        if choices is not None:
            space[name] = choices
        elif given is not None and param.type is float:
            if len(given) > 2:
                raise ConfigError(
                    f"{param.flag} takes LOW HIGH (a log-uniform range) or one value; "
                    f"use {param.flag}-choices for a list"
                )
            space[name] = {"loguniform": given} if len(given) == 2 else given
        elif given is not None:
            space[name] = given
    values["space"] = space
    values.setdefault(
        "name", f"tune-{values.get('preset', DEFAULT_PRESET)}-{datetime.now():%Y%m%d-%H%M%S}"
    )
    # Trials run in other folders than this process: inputs absolute from here, outputs where
    # the user looks (vitbirds.paths.output_path).
    if values.get("data_dir"):
        values["data_dir"] = str(Path(values["data_dir"]).expanduser().resolve())
    if values.get("cache_dir"):
        values["cache_dir"] = output_path(values["cache_dir"])
    return SweepConfig.from_dict(values)


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"cannot read --config {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must hold a mapping of settings")
    return values


def recipe_of(argv: list[str]) -> Recipe:
    """The recipe `python jobs/train.py ARGV` trains (its own parser and build_recipe define what
    a trial trains); ConfigError if it refuses the arguments."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            args = train_job.parse_args(argv)
        except SystemExit:
            reason = stderr.getvalue().strip().splitlines()[-1:] or ["?"]
            raise ConfigError(
                f"jobs/train.py cannot reproduce this sweep ({reason[0]}): sweep only "
                "parameters it has flags for"
            ) from None
    return train_job.build_recipe(args)


def check_reproducible(sweep: SweepConfig, base: Recipe, params: dict) -> None:
    """The jobs/train.py command for `params` must train exactly the trial's recipe."""
    if recipe_of(train_argv(sweep, params)) != apply_params(base, params):
        raise ConfigError(f"jobs/train.py {shlex.join(train_argv(sweep, params))} trains "
                          "another recipe than the sweep's trial")  # fmt: skip


def sample_point(sweep: SweepConfig) -> dict[str, Any]:
    return {
        name: dim.values[0] if isinstance(dim, Choice) else dim.low
        for name, dim in sweep.space.items()
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_job(logging.INFO)
    try:
        from vitbirds.ray_adapter import train as ray_train
        from vitbirds.ray_adapter import tune as ray_tune
        from vitbirds.training.runner import data_label, fit_recipe_to_data, prepare_dataset

        sweep = build_sweep(args)
        base = recipe_of(train_argv(sweep))
        check_reproducible(sweep, base, sample_point(sweep))
        check_space(base, sweep.space)
        ray_train.check_device(sweep.device, local=ray_train.cluster_is_local())
        ray_train.connect()
        splits = prepare_dataset(base.data, sweep.cache_dir)
        fitted = fit_recipe_to_data(base, splits)
        base_job = ray_train.TrainJob(
            recipe=fitted,
            run_name=sweep.name,
            storage_path=ray_tune.train_storage(sweep),
            num_workers=sweep.num_workers,
            device=sweep.device,
            precision=sweep.precision,
            cpus_per_worker=sweep.cpus_per_worker,
            tracker="none",  # the sweep records every trial in its own tracker run
            evaluate=False,
            cache_dir=sweep.cache_dir,
        )
        epochs = fitted.train.epochs
        concurrent = ray_tune.concurrent_trials(sweep)
        stopping = (
            f"ASHA grace {sweep.grace_period} reduction {sweep.reduction_factor}"
            if sweep.grace_period < epochs
            else "no early stopping (grace period >= epochs)"
        )
        print(
            f"sweep {sweep.name}: {sweep.search} search, {sweep.samples} sample(s) of "
            f"{describe_space(sweep.space)}; {epochs} epochs per trial, {stopping}; "
            f"{concurrent} trial(s) at a time, {sweep.num_workers} worker(s) each; "
            f"data: {data_label(splits)}",
            flush=True,
        )
        rows = ray_tune.run_sweep(sweep, base_job, epochs=epochs, max_concurrent=concurrent)
        costs: dict[str, tuple[int, int]] = {}
        for row in rows:
            model = apply_params(fitted, row.params).model
            key = json.dumps(model.to_dict(), sort_keys=True)
            row.parameters, row.flops = costs.setdefault(key, model_cost(model))
        best = best_trial(rows)
        if best is None:
            print("error: no trial finished an epoch; see the trials' error.txt", file=sys.stderr)
            return 1
        out = Path(output_path(args.out) or ray_tune.experiment_path(sweep) / "results")
        outcome = ray_tune.export_best(sweep, base_job, best, out / "best_model")
        command = reproduce_command(sweep, best.params, run_name=f"{sweep.name}-best")
        check_reproducible(sweep, base, best.params)
    except VitbirdsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ray_train.TrainingFailedError as error:
        print(f"error: exporting the best trial failed: {error}", file=sys.stderr)
        return 1
    return report(sweep, rows, best, outcome, command, out)


def report(
    sweep: SweepConfig,
    rows: list[TrialRow],
    best: TrialRow,
    outcome: "TrainOutcome",
    command: str,
    out: Path,
) -> int:
    """Writes the table, plot, command and summary; records the sweep in the tracker."""
    swept = sweep.swept
    paths = write_table(rows, swept, out)
    plot = out / "sweep.png"
    plot.write_bytes(plot_png(rows, best))
    (out / "reproduce.txt").write_text(command + "\n")
    saved = compute_saved(rows)
    summary = {
        "sweep": sweep.name,
        "trials": len(rows),
        "errors": sum(row.status == "error" for row in rows),
        "best_trial": best.trial_id,
        "best_params": best.params,
        "best_val_top1": best.val_top1,
        "best_model": str(out / "best_model"),
        "evaluated_split": outcome.evaluated_split,  # valid when the data has no test split
        "evaluation": outcome.metrics,
        "reproduce": command,
        **saved,
    }
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    try:
        tracker = make_tracker(
            sweep.tracker, run_name=sweep.name, storage_path=output_path(sweep.storage_path)
        )
    except VitbirdsError as error:
        print(f"error: {error} (the results are in {out})", file=sys.stderr)
        return 2
    log_sweep(
        tracker, sweep, rows, best=best, summary=summary,
        artifacts=[*paths, plot, summary_path, out / "best_model"],
    )  # fmt: skip
    tracker.close()
    hint = tracker_hint(tracker)
    if hint:
        print(hint, flush=True)

    print(markdown_table(table_records(rows, swept)), flush=True)
    for row in rows:
        if row.error:
            print(f"trial {row.trial_id} failed: {row.error}", flush=True)
    print(
        f"best trial {best.trial_id} ({best.params}): valid top-1 {best.val_top1:.1%} "
        f"at epoch {best.best_epoch}",
        flush=True,
    )
    print(
        f"ASHA: {saved['trial_epochs_used']} of {saved['trial_epochs_full']} trial-epochs "
        f"trained ({saved['fraction_used']:.0%}), {saved['stopped_early']} trial(s) stopped early",
        flush=True,
    )
    print(f"results: {paths[1]}  plot: {plot}", flush=True)
    print(f"best model: {out / 'best_model'}", flush=True)
    print(f"reproduce: {command}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
