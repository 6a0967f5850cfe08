"""Experiment tracking behind one small interface.

MLflow is the default (a local file store, nothing to start). Neptune is optional (`neptune`
extra; offline mode needs no token, and the hosted service closed in March 2026). `none` logs
nothing. Code that trains or evaluates takes a `Tracker` and never asks which one it is.
"""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from vitbirds.errors import ConfigError

TRACKERS = ("mlflow", "neptune", "none")


class Tracker(Protocol):
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, folder: str | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def child(self, name: str) -> "Tracker": ...
    def close(self, status: str = "FINISHED") -> None: ...


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"dim": 192}} -> {"model.dim": 192}: trackers want flat keys."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class NullTracker:
    """Logs nothing: non-zero ranks and `--tracker none`."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def child(self, name: str) -> "NullTracker":
        return self

    def close(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker:
    """One MLflow run; `child` opens a nested run (a Tune trial under its sweep)."""

    def __init__(
        self, tracking_uri: str, experiment: str, run_name: str, parent_run_id: str | None = None
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        found = self.client.get_experiment_by_name(experiment)
        # A SQLite store would put artifacts under ./mlruns of the *current* directory.
        artifacts = None
        if tracking_uri.startswith("sqlite:///"):
            store = Path(tracking_uri.removeprefix("sqlite:///"))
            artifacts = (store.parent / "mlartifacts").as_uri()
        experiment_id = (
            found.experiment_id
            if found
            else self.client.create_experiment(experiment, artifact_location=artifacts)
        )
        self.experiment_id = experiment_id
        tags = {"mlflow.runName": run_name}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        self.run_id = self.client.create_run(
            experiment_id, tags=tags, run_name=run_name
        ).info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in flatten(metrics).items()
            if isinstance(v, int | float)
        ]
        self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), folder or path.name)
        else:
            self.client.log_artifact(self.run_id, str(path), folder)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def child(self, name: str) -> "MlflowTracker":
        return MlflowTracker(self.tracking_uri, self.experiment, name, parent_run_id=self.run_id)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


class NeptuneTracker:
    """A Neptune run (`pip install vitbirds[neptune]`); offline unless NEPTUNE_API_TOKEN is set."""

    def __init__(
        self, project: str, run_name: str, data_directory: str | Path | None = None
    ) -> None:
        try:
            import neptune
        except ImportError as error:
            raise ConfigError(
                "--tracker neptune needs the neptune extra: pip install -e '.[neptune]'"
            ) from error
        mode = "async" if os.environ.get("NEPTUNE_API_TOKEN") else "offline"
        if data_directory is not None:  # where offline runs land (`neptune sync` uploads them)
            os.environ.setdefault("NEPTUNE_DATA_DIRECTORY", str(data_directory))
        self._neptune = neptune
        self.project = project
        self.run = neptune.init_run(project=project, name=run_name, mode=mode)
        self.base = ""

    def _key(self, name: str) -> str:
        return f"{self.base}{name}"

    def log_params(self, params: Mapping[str, Any]) -> None:
        for key, value in flatten(params).items():
            self.run[self._key(f"parameters/{key}")] = value if value is not None else "None"

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key, value in flatten(metrics).items():
            if isinstance(value, int | float):
                self.run[self._key(f"metrics/{key}")].append(float(value), step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        path = Path(path)
        target = self._key(f"artifacts/{folder or ''}{'/' if folder else ''}{path.name}")
        if path.is_dir():
            self.run[target].upload_files(str(path / "*"))
        else:
            self.run[target].upload(str(path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.run[self._key(f"tags/{key}")] = str(value)

    def child(self, name: str) -> "NeptuneTracker":
        child = object.__new__(NeptuneTracker)
        child._neptune, child.project, child.run = self._neptune, self.project, self.run
        child.base = f"{self.base}trials/{name}/"
        return child

    def close(self, status: str = "FINISHED") -> None:
        if not self.base:
            self.run["sys/state_reason"] = status
            self.run.stop()


def default_mlflow_uri(storage_path: str | Path) -> str:
    """A local MLflow store under the run's storage folder (`mlflow ui --backend-store-uri ...`).

    SQLite, not ./mlruns files: MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE.
    """
    return f"sqlite:///{Path(storage_path).expanduser().resolve() / 'mlflow.db'}"


def make_tracker(
    kind: str,
    *,
    run_name: str,
    experiment: str = "vitbirds",
    tracking_uri: str | None = None,
    storage_path: str | Path = "runs",
) -> Tracker:
    """The tracker named by `--tracker`; MLFLOW_TRACKING_URI overrides the local store."""
    if kind == "mlflow":
        uri = (
            tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or default_mlflow_uri(storage_path)
        )
        return MlflowTracker(uri, experiment, run_name)
    if kind == "neptune":
        project = os.environ.get("NEPTUNE_PROJECT", f"vitbirds/{experiment}")
        return NeptuneTracker(project, run_name, Path(storage_path) / "neptune")
    if kind == "none":
        return NullTracker()
    raise ConfigError(f"unknown tracker {kind!r}; choose one of {', '.join(TRACKERS)}")


def tracker_hint(tracker: Tracker) -> str | None:
    """How to look at the run: the `mlflow ui` command and the run's id (None for no tracker)."""
    uri, run_id = getattr(tracker, "tracking_uri", None), getattr(tracker, "run_id", None)
    if uri and run_id:
        return f"MLflow run {run_id}: mlflow ui --backend-store-uri '{uri}'"
    project = getattr(tracker, "project", None)
    return f"Neptune project {project}" if project else None
