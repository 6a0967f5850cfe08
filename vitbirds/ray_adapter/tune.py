"""Ray Tune adapter: a sweep whose every trial is the jobs/train.py TorchTrainer.

Ray 2.60's Train v2 pattern: the Tune trial is a small driver function that builds the run's
TorchTrainer (`vitbirds.ray_adapter.train.build_trainer`) with a `TuneReportCallback` and calls
`fit()`.
Ray Train reports each epoch to Tune, so ASHA sees `val_top1` per epoch; a trial it stops
aborts its Train run (workers and their placement group) as it ends. One trial can use several
workers or GPUs.

- Resources: the trial driver reserves only a little memory; its Train workers reserve the CPUs
  and GPUs, and `max_concurrent_trials` is the number of trials whose workers fit at once.
  (A driver holding a CPU of its own would deadlock a 2-CPU machine: two drivers, no workers.)
- Each trial trains under `<storage>/<sweep>/train/<sweep>-<trial id>`, a normal Ray Train run:
  an interrupted trial resumes from its latest epoch checkpoint, and the best trial is exported
  by `vitbirds.ray_adapter.train.run_training` on that run (all epochs done, so it only
  evaluates and exports, exactly as jobs/train.py does).
- An interrupted sweep resumes with `Tuner.restore`: finished trials keep their results, the
  rest continue. `sweep.json` beside the experiment guards against resuming with other settings.
"""

import contextlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator

from vitbirds.errors import ConfigError
from vitbirds.paths import output_path
from vitbirds.ray_adapter import train as ray_train
from vitbirds.training.sweep import (
    METRIC,
    Dimension,
    LogUniform,
    SweepConfig,
    TrialRow,
    apply_params,
    max_concurrent_trials,
    trial_row,
)

SWEEP_FILE = "sweep.json"
TRIAL_DRIVER_MEMORY = 256 * 1024**2  # bytes: the trial only drives its TorchTrainer


def experiment_path(sweep: SweepConfig) -> Path:
    """<storage>/<sweep>; a relative storage path resolved as every job resolves its outputs."""
    return Path(output_path(sweep.storage_path)) / sweep.name


def train_storage(sweep: SweepConfig) -> str:
    """Where the trials' Ray Train runs live (absolute: trial actors run in other folders)."""
    return str(experiment_path(sweep) / "train")


def train_run_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


def per_trial_resources(sweep: SweepConfig) -> dict[str, float]:
    """What one trial's Train workers reserve together."""
    resources = {"CPU": float(sweep.num_workers * sweep.cpus_per_worker)}
    if sweep.device == "cuda":
        resources["GPU"] = float(sweep.num_workers)
    return resources


def concurrent_trials(sweep: SweepConfig) -> int:
    """`--max-concurrent`, else as many trials as the connected cluster's resources hold now."""
    if sweep.max_concurrent:
        return sweep.max_concurrent
    return max_concurrent_trials(ray.cluster_resources(), per_trial_resources(sweep))


def tune_space(space: dict[str, Dimension], search: str) -> dict[str, Any]:
    """The Ray Tune search space: lists become grid axes or categorical choices."""
    converted: dict[str, Any] = {}
    for name, dim in space.items():
        if isinstance(dim, LogUniform):
            converted[name] = tune.loguniform(dim.low, dim.high)
        elif search == "grid":
            converted[name] = tune.grid_search(list(dim.values))
        else:
            converted[name] = tune.choice(list(dim.values))
    return converted


class _AbortTrainRunOnStop:
    """Mixed into the trial actor: when Tune stops the trial (ASHA), abort its Train run first.

    Tune ends a stopped trial by ending its actor, and the Train controller it launched dies
    with it without releasing its workers' placement group. Ray Train's PlacementGroupCleaner
    would free it, but it asks the dashboard's state API, which is absent in a Ray started
    without a dashboard and ambiguous on a host running several Ray instances: the CPUs then
    stay reserved and the next trials wait forever. So the controller introduces itself at
    its first report and the trial aborts it (workers and placement group) before it ends.
    """

    _train_controller: Any = None

    def register_train_controller(self, controller: Any) -> None:
        self._train_controller = controller

    def cleanup(self) -> None:
        if self._train_controller is not None:
            # abort returns at once for a finished run and ends by exiting the controller
            exited = (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError)
            with contextlib.suppress(*exited):
                ray.get(self._train_controller.abort.remote(), timeout=120)
        super().cleanup()  # type: ignore[misc]


class _ReportToTune(TuneReportCallback):
    """Ray's TuneReportCallback, plus telling the trial which Train controller to abort."""

    def __init__(self, trial_actor: Any) -> None:
        super().__init__()
        self._trial_actor = trial_actor
        self._introduced = False

    def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
        if not self._introduced:  # runs in the controller: current_actor is the controller
            self._trial_actor.register_train_controller.remote(
                ray.get_runtime_context().current_actor
            )
            self._introduced = True
        super().after_report(run_context, metrics, checkpoint)


def _run_trial(config: dict[str, Any], base_job: ray_train.TrainJob, sweep_name: str) -> None:
    """One trial: the jobs/train.py trainer for this point of the space, reporting to Tune."""
    trial_id = tune.get_context().get_trial_id()
    job = replace(
        base_job,
        recipe=apply_params(base_job.recipe, config),
        run_name=train_run_name(sweep_name, trial_id),
    )
    report = _ReportToTune(ray.get_runtime_context().current_actor)
    ray_train.build_trainer(job, callbacks=[report]).fit()


_run_trial.__mixins__ = (_AbortTrainRunOnStop,)  # type: ignore[attr-defined]  # Tune's hook


class _TrialLines(tune.Callback):
    """One line per reported epoch and per finished trial, instead of Tune's status tables."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.started = time.monotonic()

    def _clock(self) -> str:
        minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
        return f"[{minutes:3d}:{seconds:02d}]"

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        params = " ".join(f"{k}={_short(v)}" for k, v in trial.config.items())
        epoch = int(result["epoch"])
        print(
            f"{self._clock()} trial {trial.trial_id} [{params}] epoch {epoch}/{self.epochs}"
            f" val top1 {result[METRIC]:.1%} loss {result['val_loss']:.3f}",
            flush=True,
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info):
        epoch = int((trial.last_result or {}).get("epoch", 0))
        how = "finished" if epoch >= self.epochs else f"stopped by ASHA after {epoch} epoch(s)"
        print(f"{self._clock()} trial {trial.trial_id} {how}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info):
        print(f"{self._clock()} trial {trial.trial_id} failed: see {trial.path}", flush=True)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def check_resumable(sweep: SweepConfig) -> bool:
    """True if `sweep` was started before and can be resumed; raises ConfigError if a sweep of
    that name exists with other settings (resuming it would mix two experiments)."""
    path = experiment_path(sweep)
    if not tune.Tuner.can_restore(str(path)):
        return False
    saved_file = path / SWEEP_FILE
    if not saved_file.is_file():
        raise ConfigError(f"{path} holds a Tune experiment but no {SWEEP_FILE}: not resuming it")
    saved = json.loads(saved_file.read_text())
    given = sweep.to_dict()
    changed = sorted(key for key in set(saved) | set(given) if saved.get(key) != given.get(key))
    if changed:
        details = "; ".join(
            f"{key}: {saved.get(key)!r} then, {given.get(key)!r} now" for key in changed
        )
        raise ConfigError(
            f"sweep {sweep.name!r} in {path} was started with other settings ({details}): rerun "
            "it with the same settings to resume it, or choose another --name"
        )
    return True


def run_sweep(
    sweep: SweepConfig, base_job: ray_train.TrainJob, *, epochs: int, max_concurrent: int
) -> list[TrialRow]:
    """Runs the sweep (or resumes it) on the connected Ray cluster; one row per trial.

    `base_job` is the jobs/train.py job every trial starts from (recipe fitted to the data,
    tracker off: the sweep records the trials itself).
    """
    path = experiment_path(sweep)
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, base_job=base_job, sweep_name=sweep.name),
        {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY},
    )
    if check_resumable(sweep):
        print(f"resuming sweep {sweep.name!r} from {path}", flush=True)
        tuner = tune.Tuner.restore(
            str(path), trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        path.mkdir(parents=True, exist_ok=True)
        (path / SWEEP_FILE).write_text(json.dumps(sweep.to_dict(), indent=2) + "\n")
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(sweep.space, sweep.search),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="max",
                scheduler=_asha(sweep, epochs),
                search_alg=_searcher(sweep, max_concurrent),
                num_samples=sweep.samples,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=sweep.name,
                storage_path=str(path.parent),
                callbacks=[_TrialLines(epochs)],
                verbose=0,
            ),
        )
    results = tuner.fit()
    return [_row(result, sweep, epochs) for result in results]


def _asha(sweep: SweepConfig, epochs: int) -> ASHAScheduler | None:
    """ASHA on valid top-1 per epoch; None (every trial runs to the end) when the grace
    period leaves no epoch to stop at."""
    if sweep.grace_period >= epochs:
        return None
    return ASHAScheduler(
        time_attr="epoch",  # Train's epoch: right across a resumed trial, unlike Tune's count
        max_t=epochs,
        grace_period=sweep.grace_period,
        reduction_factor=sweep.reduction_factor,
        stop_last_trials=False,  # a trial that trained every epoch ends by itself
    )


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id  # short and stable: the Train run of the trial is named after it


def _searcher(sweep: SweepConfig, max_concurrent: int) -> Any:
    """The search algorithm, limited to `max_concurrent` trials at a time (Tune ignores
    TuneConfig.max_concurrent_trials when it is handed a BasicVariantGenerator)."""
    seed = sweep.seed or 0
    if sweep.search == "optuna":
        try:
            from optuna.samplers import TPESampler
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as error:
            raise ConfigError("--search optuna needs optuna: pip install -e '.[tune]'") from error
        return ConcurrencyLimiter(OptunaSearch(sampler=TPESampler(seed=seed)), max_concurrent)
    # random and grid: Tune's generator, which enumerates grid axes and samples the rest
    return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)


def _row(result: Any, sweep: SweepConfig, epochs: int) -> TrialRow:
    trial_id = Path(result.path).name
    frame = result.metrics_dataframe
    history = [] if frame is None or frame.empty else _history(frame)
    params = {name: result.config[name] for name in sweep.space if name in result.config}
    error = "" if result.error is None else _first_line(result.error)
    return trial_row(
        trial_id=trial_id,
        params=params,
        history=history,
        max_epochs=epochs,
        train_run=train_run_name(sweep.name, trial_id),
        error=error,
    )


def _history(frame: Any) -> list[dict[str, float]]:
    columns = [c for c in frame.columns if frame[c].dtype.kind in "fiu" and "/" not in c]
    frame = frame[columns].dropna(subset=["epoch", METRIC])
    return [{k: float(v) for k, v in record.items()} for record in frame.to_dict("records")]


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def export_best(
    sweep: SweepConfig, base_job: ray_train.TrainJob, row: TrialRow, export_dir: Path
) -> ray_train.TrainOutcome:
    """Evaluates and exports the best trial's run with jobs/train.py's own driver.

    The run already trained every epoch, so Ray Train resumes it with nothing left to train and
    `run_training` evaluates its best checkpoint and writes the servable model directory.
    """
    job = replace(
        base_job,
        recipe=apply_params(base_job.recipe, row.params),
        run_name=row.train_run,
        evaluate=True,
        export_dir=str(export_dir),
    )
    return ray_train.run_training(job)
