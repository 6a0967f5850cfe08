"""Ray Train adapter: the one training loop of `vitbirds.training.loop`, on N Ray workers.

With `tune.py` beside it, the only place in the library that imports Ray (tests/test_layout.py
checks). Everything a worker does besides talking to Ray
(data, model, loop, checkpoint format) comes from the Ray-free modules, so a distributed run and
the plain single-process loop train the same way.

- Workers: `ScalingConfig(num_workers, use_gpu)`; DDP over gloo on CPU, NCCL on GPU; each worker
  trains on its shard of train (a DistributedSampler) and scores its exact rank::world share of
  valid, so epoch metrics count every image once; images come decoded once into memory or
  streamed from disk (`--data-mode`, decided once by the driver; `vitbirds.ray_adapter.data`).
  Apple MPS: one worker with `use_gpu=False` that moves model and batches to `mps` itself (Ray
  has no MPS device manager).
- Every epoch all workers call `ray.train.report` with the global metrics; rank 0 attaches a
  checkpoint in the format of `vitbirds.training.loop.save_checkpoint`. `CheckpointConfig` keeps the
  best k by `val_top1` (plus the latest, which resuming needs).
- Fault tolerance: `FailureConfig(max_failures)` restarts the worker group from the latest
  checkpoint; a rerun with the same run name and storage path resumes the same way.
- The driver prints one line per epoch and feeds the tracker: a controller callback forwards
  rank 0's report to a small actor the driver drains, so only one process ever logs.
- At the end the driver loads the best checkpoint and hands it to
  `vitbirds.training.export.export_model`, which decides what the servable model directory
  contains (evaluation, report, reference profile, metadata) and publishes it; Ray has no say.
"""

import json
import logging
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.experimental import tqdm_ray

from vitbirds.config import DataConfig, ModelConfig, TrainConfig
from vitbirds.data.sources import DatasetSplits
from vitbirds.data.streaming import choose_data_mode
from vitbirds.data.transforms import batch_mixer
from vitbirds.devices import resolve_device
from vitbirds.errors import ConfigError, VitbirdsError
from vitbirds.lifecycle.registry import (
    CHALLENGER,
    RegisteredVersion,
    register_export,
    registry_uri,
)
from vitbirds.lifecycle.tracking import MlflowTracker, Tracker, make_tracker, tracker_hint
from vitbirds.model.files import ModelMetadata, load_model, read_metadata
from vitbirds.paths import is_uri
from vitbirds.precision import resolve_precision
from vitbirds.presets import Recipe
from vitbirds.progress import no_progress, set_default_progress
from vitbirds.ray_adapter.data import worker_data
from vitbirds.settings import TrainSettings
from vitbirds.training.loop import (
    TrainingRun,
    fit,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)
from vitbirds.training.runner import (
    build_metadata,
    build_run_model,
    check_teacher,
    data_label,
    fit_recipe_to_data,
    load_teacher,
    pin_model_references,
    prepare_dataset,
)

if TYPE_CHECKING:
    from vitbirds.training.export import ExportedModel

logger = logging.getLogger(__name__)

SCORE_METRIC = "val_top1"
TrainingFailedError = ray.train.TrainingFailedError


class InjectedFailure(RuntimeError):
    """Raised by a worker on purpose (`TrainJob.fail_at_epoch`) to exercise fault tolerance."""


@dataclass
class TrainJob(TrainSettings):
    """One training run on Ray: the recipe plus where and how it runs (workers, device, storage,
    tracker, checkpoints, export: `TrainSettings`, shared with sweeps and the CLIs)."""

    recipe: Recipe
    run_name: str
    # Test hook: the worker group that started from scratch fails after training this epoch and
    # before reporting it, so Ray Train must restart from the previous epoch's checkpoint.
    fail_at_epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["recipe"] = {
            "model": self.recipe.model.to_dict(),
            "data": self.recipe.data.to_dict(),
            "train": self.recipe.train.to_dict(),
            "preset": self.recipe.preset,
        }
        return values


@dataclass
class TrainOutcome:
    """What a finished run produced; `summary()` is the `--summary` JSON."""

    run_name: str
    model_dir: str
    metrics: dict[str, float]
    best_epoch: int
    history: list[dict[str, float]]
    started_at_epoch: int  # epoch the final worker group resumed from (0: from scratch)
    epochs_run: list[int]  # epochs reported by this invocation, in order (restarts included)
    worker_failures: int
    wall_time_s: float
    data: dict[str, Any]
    evaluated_split: str | None
    report_path: str | None
    export_dir: str | None = None
    tracking: dict[str, str] = field(default_factory=dict)

    @property
    def synthetic(self) -> bool:
        return bool(self.data.get("synthetic"))

    def summary(self) -> dict[str, Any]:
        values = asdict(self)
        values["synthetic"] = self.synthetic
        return values


# ---------------------------------------------------------------------------------------------
# Ray session


def cluster_is_local() -> bool:
    """True unless RAY_ADDRESS names a cluster (`ray job submit` sets it for its driver): then
    this machine's CPUs and devices decide the defaults and the device check."""
    return os.environ.get("RAY_ADDRESS", "") in ("", "local")


def check_device(device: str, *, local: bool) -> None:
    """Raises DeviceUnavailableError before any worker starts when the accelerator is missing.

    MPS always runs beside the driver (one local worker). CUDA is checked when the cluster is
    this machine; a remote cluster may still be adding GPU nodes (autoscaling), so there each
    worker checks when it starts.
    """
    if device == "mps" or (device == "cuda" and local):
        resolve_device(device)


def connect(address: str | None = None, **init_kwargs: Any) -> None:
    """Attach to the Ray cluster this process belongs to, or start a local one.

    With no `address`, Ray's own discovery decides: RAY_ADDRESS (set by `ray job submit`), a
    cluster started on this machine with `ray start`, else a new local instance; so the same
    command runs on a laptop and on a cluster. `address="local"` always starts a private one.
    A cluster with token auth (Ray 2.60's `ray start --head` default) needs RAY_AUTH_MODE=token
    and the token (~/.ray/auth_token or RAY_AUTH_TOKEN_PATH) in the submitting shell; nothing
    here turns it off. Prints the Ray dashboard's address (a local Ray starts one where
    `ray[default]` is installed), where the user follows the job.
    """
    if cluster_is_local():
        # Node preemption cannot happen to one machine; the watcher only adds log noise there.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if ray.is_initialized():
        return
    context = ray.init(address=address, logging_level=logging.WARNING, **init_kwargs)
    # Ray's own "View the dashboard at" line is an INFO log, hidden at WARNING: say it here.
    url = getattr(context, "dashboard_url", None)
    if url:
        print(f"Ray dashboard: http://{url.removeprefix('http://')}", flush=True)
    else:
        print(
            "Ray dashboard: none (this Ray was started without one, or `ray[default]` is "
            "not installed)",
            flush=True,
        )


def default_cpus_per_worker(num_workers: int, *, local: bool) -> int:
    """Locally, the machine's CPUs split between the workers; on a cluster 1 (nodes differ, so
    the user says `--cpus-per-worker` there)."""
    if not local:
        return 1
    return max(1, int(ray.available_resources().get("CPU", 1)) // num_workers)


# ---------------------------------------------------------------------------------------------
# The worker


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker: data shard, (DDP) model, the shared loop, reports."""
    job = _job_from_dict(config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(job.cpus_per_worker)
    # Rank 0 draws decoding and each epoch's batches on the driver (and in `ray job submit`).
    set_default_progress(_ray_bars if rank == 0 else no_progress)
    device = resolve_device("mps") if job.device == "mps" else ray.train.torch.get_device()
    precision = resolve_precision(job.precision, device)

    # Ray Train routes a few of its INFO lines (one per report) through the root logger.
    logging.getLogger().setLevel(logging.WARNING)
    if rank == 0:  # printed after the line above: under an INFO root logger Ray Train echoes it
        print(f"workers on {device.type}: {precision.describe()}", flush=True)
    splits = prepare_dataset(job.recipe.data, job.cache_dir, announce=False)
    recipe = fit_recipe_to_data(job.recipe, splits)
    # Per-worker batch: --batch-size stays the global batch, so the LR recipe holds at any N.
    worker_train = replace(recipe.train, batch_size=max(1, recipe.train.batch_size // world))
    data = worker_data(
        splits, recipe.data, worker_train, rank=rank, world=world, cpus=job.cpus_per_worker,
        device=device,
    )  # fmt: skip

    seed_everything(recipe.train.seed)  # identical initial weights on every rank
    checkpoint = ray.train.get_checkpoint()
    model = build_run_model(recipe, job.init_from if checkpoint is None else None)
    # prepare_model moves to Ray's device (CPU or this worker's GPU) and wraps DDP if world > 1.
    mps = job.device == "mps"
    model = model.to(device) if mps else ray.train.torch.prepare_model(model)
    run = TrainingRun(
        model,
        recipe.train,
        steps_per_epoch=data.steps_per_epoch,
        device=device,
        mixer=batch_mixer(recipe.data, recipe.model.num_classes),
        teacher=load_teacher(job.teacher, splits.classes, device) if job.teacher else None,
        precision=precision,
    )
    metadata = build_metadata(
        recipe, splits, name=job.run_name, teacher=job.teacher, precision=precision
    )
    if checkpoint is not None:
        with checkpoint.as_directory() as checkpoint_dir:
            load_checkpoint(checkpoint_dir, run)
            metadata.history = read_metadata(checkpoint_dir).history
    started_at = run.epoch
    epoch_started = time.perf_counter()

    def before_epoch(epoch: int) -> None:
        nonlocal epoch_started
        epoch_started = time.perf_counter()
        # Randomness of an epoch is a function of (seed, rank, epoch): ranks augment
        # differently, and a resumed or restarted run replays the epoch it would have run.
        seed_everything(recipe.train.seed + 1_000_003 * rank + 7_919 * epoch)
        data.set_epoch(epoch)

    def on_epoch_end(metrics: dict[str, float]) -> None:
        if job.fail_at_epoch == run.epoch and started_at == 0 and rank == world - 1:
            raise InjectedFailure(f"injected failure on rank {rank} after epoch {run.epoch}")
        metrics["epoch_wall_s"] = time.perf_counter() - epoch_started
        metrics["skipped_images"] = data.skipped_images()
        metadata.history.append(dict(metrics))
        metadata.metrics = dict(metrics)
        with tempfile.TemporaryDirectory() as staging:
            report_checkpoint = None
            if rank == 0:
                save_checkpoint(staging, run, metadata)
                report_checkpoint = ray.train.Checkpoint.from_directory(staging)
            # Named by epoch (runs/<name>/epoch_0003), not by Ray's timestamp: easy to find.
            ray.train.report(
                metrics,
                checkpoint=report_checkpoint,
                checkpoint_dir_name=f"epoch_{run.epoch:04d}",
            )

    fit(run, data.train, data.valid, on_epoch_end=on_epoch_end, before_epoch=before_epoch)
    return {"started_at_epoch": started_at}


def _ray_bars(iterable: Iterable[Any], *, desc: str, total: int | None = None) -> Iterator[Any]:
    bar = tqdm_ray.tqdm(iterable, desc=desc, total=total)
    try:
        yield from bar
    finally:
        bar.close()  # tqdm_ray leaves a finished bar open on the driver otherwise


def _job_from_dict(values: dict[str, Any]) -> TrainJob:
    values = dict(values)
    recipe = values.pop("recipe")
    return TrainJob(
        recipe=Recipe(
            ModelConfig.from_dict(recipe["model"]),
            DataConfig.from_dict(recipe["data"]),
            TrainConfig.from_dict(recipe["train"]),
            recipe.get("preset"),
        ),
        **values,
    )


# ---------------------------------------------------------------------------------------------
# Progress: controller callback -> feed actor -> driver


@ray.remote(num_cpus=0)
class _ReportFeed:
    """Holds rank 0's reports until the driver collects them."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def push(self, item: dict[str, Any]) -> None:
        self.items.append(item)

    def drain(self) -> list[dict[str, Any]]:
        items, self.items = self.items, []
        return items


class _ForwardReports(ray.train.UserCallback):
    """Runs in the Train controller: forwards each consolidated report and worker failure."""

    def __init__(self, feed: Any) -> None:
        self.feed = feed

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        self._push({"kind": "epoch", "metrics": dict(metrics[0])})

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]):
        errors = {rank: _first_line(error) for rank, error in worker_exceptions.items()}
        self._push({"kind": "failure", "errors": errors})

    def _push(self, item: dict[str, Any]) -> None:
        # Waited for, so the item is in the feed before fit() returns and the driver's last drain;
        # a lost progress line must never fail the training run, hence the broad except.
        try:
            ray.get(self.feed.push.remote(item), timeout=30)
        except Exception as error:
            logger.warning("progress report lost: %s", error)


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


class _Progress:
    """Prints one line per epoch with an ETA and logs the metrics to the tracker."""

    def __init__(self, tracker: Tracker, epochs: int, max_failures: int) -> None:
        self.tracker = tracker
        self.epochs = epochs
        self.max_failures = max_failures
        self.epoch_times: list[float] = []
        self.epochs_run: list[int] = []
        self.failures = 0

    def handle(self, item: dict[str, Any]) -> None:
        if item["kind"] == "failure":
            self.failures += 1
            errors = "; ".join(f"rank {rank}: {text}" for rank, text in item["errors"].items())
            allowed = "" if self.max_failures < 0 else f" of {self.max_failures} allowed"
            print(
                f"worker failure {self.failures}{allowed} ({errors}); Ray Train restarts the "
                "workers from the latest checkpoint if any retry is left",
                flush=True,
            )
            return
        metrics = item["metrics"]
        epoch = int(metrics["epoch"])
        self.epochs_run.append(epoch)
        self.epoch_times.append(metrics.get("epoch_wall_s", 0.0))
        eta = sum(self.epoch_times) / len(self.epoch_times) * (self.epochs - epoch)
        print(format_epoch_line(metrics, self.epochs, eta), flush=True)
        self.tracker.log_metrics(metrics, step=epoch)


def format_epoch_line(metrics: dict[str, float], epochs: int, eta_s: float) -> str:
    width = len(str(epochs))
    return (
        f"epoch {int(metrics['epoch']):>{width}}/{epochs}"
        f" | train loss {metrics['train_loss']:.3f} top1 {metrics['train_top1']:6.1%}"
        f" | val loss {metrics['val_loss']:.3f} top1 {metrics['val_top1']:6.1%}"
        f" top5 {metrics['val_top5']:6.1%}"
        f" | lr {metrics['lr']:.2e} | {metrics['images_per_s']:.0f} img/s"
        f" | {metrics.get('epoch_wall_s', 0.0):.1f} s/epoch | ETA {_duration(eta_s)}"
    )


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _follow(feed: Any, handle: Callable[[dict[str, Any]], None], stop: threading.Event) -> None:
    while True:
        stopping = stop.wait(0.5)
        try:
            items = ray.get(feed.drain.remote())
        except ray.exceptions.RayActorError:  # Ctrl-C: Ray is going down with the feed
            return
        for item in items:
            try:
                handle(item)
            except Exception:  # a tracker hiccup must not end the progress lines, nor training
                logger.exception("could not print or track %s", item)
        if stopping:
            return


# ---------------------------------------------------------------------------------------------
# The driver


def run_training(job: TrainJob) -> TrainOutcome:
    """Trains `job` on the connected Ray cluster, evaluates and exports the best checkpoint."""
    started = time.perf_counter()
    splits = prepare_dataset(job.recipe.data, job.cache_dir)
    job = replace(job, recipe=fit_recipe_to_data(job.recipe, splits))
    logger.info("data: %s", data_label(splits))
    job = _resolve_data_mode(job, splits)
    storage = _storage_path(job.storage_path)
    init_from, teacher = pin_model_references(
        job.init_from,
        job.teacher,
        tracking_uri=registry_uri(storage if not is_uri(storage) else "runs"),
    )
    job = replace(job, init_from=init_from, teacher=teacher)
    if job.teacher:
        check_teacher(job.teacher, splits.classes)  # here, before any worker starts

    if is_uri(storage) and job.tracker == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
        logger.warning("storage is %s: MLflow logs to ./runs (set MLFLOW_TRACKING_URI)", storage)
    tracker = make_tracker(
        job.tracker,
        run_name=job.run_name,
        storage_path=storage if not is_uri(storage) else "runs",
    )
    hint = tracker_hint(tracker)
    if hint:
        print(hint, flush=True)
    try:
        outcome = _train_and_export(job, splits, storage, tracker, started)
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close()
    return outcome


def _resolve_data_mode(job: TrainJob, splits: DatasetSplits) -> TrainJob:
    """`--data-mode auto` decided once, here, and said: workers of one machine share its memory
    (locally all of them; on a cluster, one Train worker per pod as cluster/ lays them out)."""
    per_node = job.num_workers if cluster_is_local() else 1
    choice = choose_data_mode(job.recipe.data, splits, workers_per_node=per_node)
    print(f"data mode: {choice.mode}, {choice.reason}", flush=True)
    recipe = job.recipe.copy()
    recipe.data = replace(recipe.data, data_mode=choice.mode)
    return replace(job, recipe=recipe)


def _train_and_export(
    job: TrainJob, splits: DatasetSplits, storage: str, tracker: Tracker, started: float
) -> TrainOutcome:
    tracker.log_params({**job.to_dict(), "system": system_info(job)})
    tracker.set_tags(
        {
            "run_name": job.run_name,
            "synthetic": str(splits.synthetic).lower(),
            "data.source": splits.source,
            "data.fingerprint": splits.fingerprint(),
        }
    )
    result, progress = _fit(job, tracker)
    # Imported here, not at the top: workers import this module too, and matplotlib/scipy
    # (evaluation figures) would only slow every worker's start; and after training, not
    # before: its ~2 s would delay the first step.
    from vitbirds.training.export import export_model

    best_checkpoint, best_metrics = max(
        result.best_checkpoints,
        key=lambda pair: (pair[1][SCORE_METRIC], -pair[1]["val_loss"]),
    )
    with result.checkpoint.as_directory() as latest_dir:
        history = read_metadata(latest_dir).history
    started_at = int((result.return_value or {}).get("started_at_epoch", 0))
    if started_at == job.recipe.train.epochs:
        print(f"run {job.run_name!r} had already trained all {started_at} epochs", flush=True)
    with best_checkpoint.as_directory() as best_dir:
        loaded = load_model(best_dir)
    metrics = {"best_epoch": int(best_metrics["epoch"])}
    metrics.update({k: float(best_metrics[k]) for k in ("val_loss", "val_top1", "val_top5")})
    device = resolve_device("mps" if job.device == "mps" else "auto")
    exported = export_model(
        loaded, splits, target=f"{storage}/{job.run_name}", history=history, metrics=metrics,
        evaluate=job.evaluate, device=device, precision=resolve_precision(job.precision, device),
        tracker=tracker, export_dir=job.export_dir,
    )  # fmt: skip
    tracker.set_tags({"started_at_epoch": str(started_at)})
    outcome = _outcome(job, exported, progress, splits, tracker, started_at, started)
    registered = _register(job, tracker, exported.metadata)
    if registered is not None:
        outcome.tracking["model_uri"] = registered.uri
    return outcome


def _fit(job: TrainJob, tracker: Tracker) -> tuple["ray.train.Result", "_Progress"]:
    """Runs the TorchTrainer, printing and tracking each epoch as it is reported."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if job.use_gpu and gpus < job.num_workers:
        logger.warning(
            "%d GPU worker(s) requested, the cluster has %d GPU(s) now: waiting for the "
            "autoscaler to add GPU nodes",
            job.num_workers,
            gpus,
        )
    feed = _ReportFeed.remote()
    progress = _Progress(tracker, job.recipe.train.epochs, job.max_failures)
    trainer = build_trainer(job, [_ForwardReports(feed)])
    stop = threading.Event()
    follower = threading.Thread(target=_follow, args=(feed, progress.handle, stop), daemon=True)
    follower.start()
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as error:
        user_error = _user_error(error)
        if user_error is None:
            raise
        raise user_error from error
    finally:
        stop.set()
        follower.join()
        ray.kill(feed)
    if result.checkpoint is None:
        raise ConfigError(f"run {job.run_name!r} reported no checkpoint; nothing to export")
    return result, progress


def _outcome(
    job: TrainJob,
    exported: "ExportedModel",
    progress: "_Progress",
    splits: DatasetSplits,
    tracker: Tracker,
    started_at: int,
    started: float,
) -> TrainOutcome:
    return TrainOutcome(
        run_name=job.run_name,
        model_dir=exported.model_dir,
        metrics=exported.metrics,
        best_epoch=int(exported.metrics["best_epoch"]),
        history=exported.metadata.history,
        started_at_epoch=started_at,
        epochs_run=progress.epochs_run,
        worker_failures=progress.failures,
        wall_time_s=time.perf_counter() - started,
        data=splits.describe(),
        evaluated_split=exported.evaluated_split,
        report_path=exported.report_path,
        export_dir=exported.export_dir,
        tracking=_tracking_info(job, tracker),
    )


def _register(job: TrainJob, tracker: Tracker, metadata: ModelMetadata) -> RegisteredVersion | None:
    """The logged model folder as the registry's new challenger (MLflow tracker only)."""
    if not (job.register and isinstance(tracker, MlflowTracker)):
        return None
    version = register_export(
        tracker.tracking_uri, tracker.run_id, metadata, name=job.registered_model
    )
    print(f"registered {version.uri} as {CHALLENGER} ({tracker.tracking_uri})", flush=True)
    return version


def build_trainer(
    job: TrainJob, callbacks: Sequence[ray.train.UserCallback] = ()
) -> ray.train.torch.TorchTrainer:
    """The TorchTrainer of `job`: workers, checkpoint policy, failure policy, storage.

    `run_training` adds its progress callback; a Tune trial adds its own and gets exactly the
    trainer `jobs/train.py` runs.
    """
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.num_workers,
            use_gpu=job.use_gpu,
            resources_per_worker={"CPU": job.cpus_per_worker},  # + 1 GPU when use_gpu
        ),
        run_config=ray.train.RunConfig(
            name=job.run_name,
            storage_path=_storage_path(job.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=job.keep_checkpoints,
                checkpoint_score_attribute=SCORE_METRIC,
                checkpoint_score_order="max",
            ),
            callbacks=list(callbacks),
            # Errors only: its warnings are routine on a busy machine (slow resource requests).
            logging_config=ray.train.LoggingConfig(log_level="ERROR"),
        ),
    )


def _user_error(error: "ray.train.WorkerGroupError") -> VitbirdsError | None:
    """A vitbirds error raised in a worker (missing device, unreadable data), re-raised as
    itself so the CLI can print it as one line."""
    for failure in error.worker_failures.values():
        for candidate in (failure, getattr(failure, "cause", None), failure.__cause__):
            if isinstance(candidate, VitbirdsError):
                return candidate
    return None


def system_info(job: TrainJob) -> dict[str, Any]:
    info = {
        "device": job.device,
        "num_workers": job.num_workers,
        "cpus_per_worker": job.cpus_per_worker,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cluster_cpus": ray.cluster_resources().get("CPU", 0),
        "cluster_gpus": ray.cluster_resources().get("GPU", 0),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        info["driver_gpu"] = torch.cuda.get_device_name()
    return info


def _tracking_info(job: TrainJob, tracker: Tracker) -> dict[str, str]:
    info = {"kind": job.tracker}
    for attribute in ("tracking_uri", "run_id", "project"):
        if hasattr(tracker, attribute):
            info[attribute] = str(getattr(tracker, attribute))
    return info


def _storage_path(path: str) -> str:
    """Ray Train wants an absolute local path; URIs (gs://, s3://) pass through."""
    return path.rstrip("/") if is_uri(path) else str(Path(path).expanduser().resolve())


def write_summary(outcome: TrainOutcome, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(outcome.summary(), indent=2, default=str) + "\n")
    return path


def describe_outcome(outcome: TrainOutcome) -> str:
    """The closing lines: where the model is and how good it is."""
    metrics = outcome.metrics
    split = outcome.evaluated_split
    lines = [f"model: {outcome.model_dir}" + (" (SYNTHETIC data)" if outcome.synthetic else "")]
    lines.append(
        f"best epoch {outcome.best_epoch}: val top1 {metrics['val_top1']:.1%} "
        f"top5 {metrics['val_top5']:.1%}"
    )
    if split:
        lines.append(
            f"{split}: top1 {metrics[f'{split}_top1_accuracy']:.1%} "
            f"top5 {metrics[f'{split}_top5_accuracy']:.1%} "
            f"macro F1 {metrics[f'{split}_macro_f1']:.3f}  report: {outcome.report_path}"
        )
    if outcome.export_dir:
        lines.append(f"exported copy: {outcome.export_dir}")
    if outcome.tracking.get("model_uri"):
        lines.append(
            f"registered: {outcome.tracking['model_uri']} ({CHALLENGER}); promote it with "
            "jobs/promote.py"
        )
    lines.append(f"wall time {_duration(outcome.wall_time_s)}")
    return "\n".join(lines)
