"""One monitoring run, as `jobs/monitor.py` performs it: the model's reference profile, what the
model sees now (new labelled photos, or Serve's prediction log cut into time windows), the
OK / WATCH / RETRAIN assessment, and its record (monitor.json, report.html, the tracker).

What to do about a RETRAIN (the retraining command, its submission) is the caller's.
"""

import json
import shlex
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from vitbirds.data.sources import discover_dataset, samples_for_model
from vitbirds.errors import ConfigError, DataError
from vitbirds.lifecycle.registry import RegisteredVersion
from vitbirds.lifecycle.tracking import Tracker
from vitbirds.model.files import ModelMetadata, load_model, read_metadata
from vitbirds.monitoring.assess import (
    Assessment,
    MonitorConfig,
    Observations,
    assess,
    headline_gauges,
    parse_window,
    recent,
    window_drift,
)
from vitbirds.monitoring.predictions import read_log
from vitbirds.monitoring.reference import (
    REFERENCE_JSON,
    ReferenceProfile,
    build_reference_profile,
    image_dataset,
    load_reference_profile,
    model_outputs,
    save_reference_profile,
)
from vitbirds.monitoring.report import render_report

AUTO_WINDOWS = 8  # without a window the log's span is cut into this many windows for the report
SAMPLE_SEED = 0  # which labelled photos are assessed when there are more than max_images


@dataclass(frozen=True)
class MonitorInputs:
    """What one run looks at: a model, and either labelled photos or a prediction log."""

    model_dir: Path
    labeled_data: Path | None = None
    prediction_log: Path | None = None
    window: str | None = None  # the verdict on the latest such span of the log
    max_images: int = 2000
    reference_data: Path | None = None  # builds a missing reference profile from its valid split
    registered: RegisteredVersion | None = None  # the registry version model_dir was fetched as

    def __post_init__(self) -> None:
        if (self.labeled_data is None) == (self.prediction_log is None):
            raise ConfigError("give labelled photos or a prediction log, one of the two")
        if self.window and self.labeled_data is not None:
            raise ConfigError("--window applies to --prediction-log only")


@dataclass
class Monitoring:
    """A finished assessment: `result` is monitor.json; the rest draws the report."""

    result: dict[str, Any]
    assessment: Assessment
    profile: ReferenceProfile
    judged: Observations
    metadata: ModelMetadata


def reference_profile(model_dir: Path, reference_data: Path | None = None) -> ReferenceProfile:
    """The model's profile; built from `reference_data`'s valid split (and saved beside the
    model) when it has none."""
    if reference_data is None or (model_dir / REFERENCE_JSON).is_file():
        return load_reference_profile(model_dir)
    loaded = load_model(model_dir)
    splits = discover_dataset(reference_data)
    samples = samples_for_model(splits.valid, splits.classes, loaded.metadata.class_names)
    if not samples:
        raise DataError(f"{reference_data} has no valid images of the model's classes")
    profile = build_reference_profile(loaded, samples, data=splits.describe())
    save_reference_profile(model_dir, profile)
    print(f"reference profile: {len(samples)} valid images -> {model_dir}", flush=True)
    return profile


def labelled_observations(
    model_dir: Path, data_dir: Path, max_images: int
) -> tuple[Observations, dict[str, Any]]:
    """The model run over `data_dir` (all its splits): new photos with their labels."""
    loaded = load_model(model_dir)
    model_classes = loaded.metadata.class_names
    splits = discover_dataset(data_dir)
    everything = splits.train + splits.valid + splits.test
    matched = samples_for_model(everything, splits.classes, model_classes)
    if not matched:
        raise DataError(
            f"none of the {len(splits.classes)} classes of {data_dir} is one of the "
            f"model's {len(model_classes)} (names are compared ignoring case, "
            "spaces, '-' and '_')"
        )
    samples = matched
    if len(samples) > max_images:
        chosen = np.random.default_rng(SAMPLE_SEED).choice(len(samples), max_images, False)
        samples = [samples[i] for i in sorted(chosen)]
    dataset = image_dataset(samples, loaded.metadata)
    observed = Observations.from_outputs(model_outputs(loaded, dataset))
    source = {
        "kind": "labeled-data",
        "path": str(data_dir),
        "images": len(everything),
        "images_of_model_classes": len(matched),
        "images_assessed": len(observed),
        "undecodable_images": len(dataset.skipped),
    }
    return observed, source


def log_observations(
    log_path: Path, metadata: ModelMetadata
) -> tuple[Observations, dict[str, Any]]:
    """This model version's predictions in Serve's log, with any feedback labels."""
    contents = read_log(log_path)
    if not contents.predictions:
        raise DataError(f"{log_path} holds no prediction (missing or empty)")
    observed = Observations.from_log(contents, metadata.class_names, model_version=metadata.version)
    source = {
        "kind": "prediction-log",
        "path": str(log_path),
        "predictions_of_this_version": len(observed),
        "predictions_of_other_versions": len(contents.predictions) - len(observed),
        "feedback_labels": int((observed.labels >= 0).sum()),
        "unreadable_lines": contents.skipped_lines,
    }
    return observed, source


def auto_window(observed: Observations) -> timedelta:
    span = (observed.times.max() - observed.times.min()) / np.timedelta64(1, "s")
    return timedelta(seconds=max(1.0, float(span) / AUTO_WINDOWS))


def log_verdict(
    profile: ReferenceProfile,
    observed: Observations,
    config: MonitorConfig,
    window: timedelta | None = None,
) -> tuple[Assessment, Observations]:
    """The assessment of the log's latest `window` (the whole log when None), and the
    predictions it judged: what the monitoring job and Serve's drift gauges both decide on."""
    judged = recent(observed, window, config.min_samples) if window else observed
    return assess(profile, judged, config), judged


def monitor(inputs: MonitorInputs, config: MonitorConfig) -> Monitoring:
    """Assesses the model on what it sees now against its reference profile."""
    metadata = read_metadata(inputs.model_dir)
    profile = reference_profile(inputs.model_dir, inputs.reference_data)
    windows: list[dict[str, Any]] = []
    if inputs.labeled_data is not None:
        judged, source = labelled_observations(
            inputs.model_dir, inputs.labeled_data, inputs.max_images
        )
        assessment = assess(profile, judged, config)
    else:
        observed, source = log_observations(inputs.prediction_log, metadata)
        window = parse_window(inputs.window) if inputs.window else auto_window(observed)
        source["window_s"] = window.total_seconds()
        windows = [w.to_dict() for w in window_drift(profile, observed, window, config)]
        # With a window the verdict is about recent traffic; without, about the whole log.
        assessment, judged = log_verdict(
            profile, observed, config, window if inputs.window else None
        )
    result: dict[str, Any] = {
        "model": {
            "dir": str(inputs.model_dir),
            "name": metadata.name,
            "version": metadata.version,
            "registry": inputs.registered.to_dict() if inputs.registered else None,
        },
        "source": source,
        "config": config.to_dict(),
        "assessment": assessment.to_dict(),
        "windows": windows,
        "gauges": {},
        "retrain": None,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    result["gauges"] = headline_gauges(result["assessment"])
    return Monitoring(result, assessment, profile, judged, metadata)


def retrain_command(
    metadata: ModelMetadata, *, python: str, storage_path: str, train_args: str = ""
) -> list[str]:
    """jobs/train.py with the model's preset and data (from its metadata), then `train_args`,
    which win (argparse keeps the last value of a flag)."""
    data_config = metadata.extra.get("data_config", {})
    command = [python, "jobs/train.py"]
    if metadata.extra.get("preset"):
        command += ["--preset", str(metadata.extra["preset"])]
    if not metadata.synthetic and metadata.data.get("root"):
        command += ["--data-dir", str(metadata.data["root"])]
    for flag, key in (("--num-classes", "num_classes"), ("--images-per-class", "images_per_class")):
        if data_config.get(key) is not None:
            command += [flag, str(data_config[key])]
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    command += ["--run-name", f"retrain-{metadata.name}-{stamp}"]
    command += ["--storage-path", storage_path]
    return command + shlex.split(train_args)


def promote_command(metadata: ModelMetadata, *, python: str, storage_path: str) -> str:
    """What to run once the retraining job has registered its challenger."""
    data = metadata.data.get("root") or "LABELLED_PHOTOS"
    return shlex.join(
        [python, "jobs/promote.py", "--data-dir", str(data), "--split", "test",
         "--storage-path", storage_path]
    )  # fmt: skip


def write_outputs(monitoring: Monitoring, out: Path) -> list[Path]:
    """monitor.json and report.html under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "monitor.json"
    json_path.write_text(json.dumps(monitoring.result, indent=2) + "\n")
    report_path = out / "report.html"
    reference = Observations.from_reference(monitoring.profile)
    report_path.write_text(render_report(monitoring.result, reference, monitoring.judged))
    return [json_path, report_path]


def log_to_tracker(tracker: Tracker, result: dict[str, Any], paths: list[Path]) -> None:
    """The decision as tags, the headline gauges, each window's numbers by step, the files."""
    model = result["model"]
    try:
        tracker.set_tags(
            {"decision": result["assessment"]["decision"], "model_version": model["version"],
             "source": result["source"]["kind"]}
        )  # fmt: skip
        tracker.log_params({"config": result["config"], "source": result["source"], "model": model})
        tracker.log_metrics(result["gauges"])
        for step, window in enumerate(result["windows"]):
            values = {"window_observed": window["num_observed"],
                      "window_estimated_accuracy": window["estimated_accuracy"]}  # fmt: skip
            values.update({f"window_p_{k}": v for k, v in window["p_values"].items()})
            tracker.log_metrics(values, step=step)
        for path in paths:
            tracker.log_artifact(path, "monitor")
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close()
