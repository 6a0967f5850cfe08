"""Is the deployed model still good? Decay with labels, drift without: OK / WATCH / RETRAIN.

examples:
    # Live traffic: Serve's prediction log, the decision on the latest hour(s)
    python jobs/monitor.py --model runs/cub/model --prediction-log runs/cub/predictions.jsonl \\
        --window 1h
    # New labelled photos (any split layout; classes matched to the model's by name)
    python jobs/monitor.py --model runs/cub/model \\
        --labeled-data ../shared/data/kaggle-birds525-valid
    # On RETRAIN, send jobs/train.py to the Ray cluster (token auth: RAY_AUTH_MODE=token and the
    # token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as the Ray CLI reads it)
    python jobs/monitor.py ... --submit --ray-address http://HEAD:8265 \\
        --train-args "--preset vit-cpu"
    # The closed loop: watch the registry's champion; the retrained model registers as the
    # challenger and jobs/promote.py decides whether it replaces the champion
    python jobs/monitor.py --model models:/vitbirds@champion --prediction-log LOG --submit

--model takes a directory or a registry URI (models:/NAME@ALIAS, models:/NAME/VERSION), resolved
in the registry the retraining job registers into (MLFLOW_TRACKING_URI, else the MLflow store under
--retrain-storage). The model directory needs its reference profile (reference.safetensors +
reference.json, written at the end of training); `--reference-data DIR` builds one from DIR's
valid split for older models.
Writes monitor.json and report.html under --out and logs the headline numbers to the tracker.
Without --submit a RETRAIN verdict prints the command that would be submitted. Relative paths
(--model, --out, --storage-path) are relative to the current directory, or to $VITBIRDS_HOME
(default ~/vitbirds) when the job runs through `ray job submit --working-dir`; so is the retraining
job's --storage-path on the cluster. Exit status: 0
whatever the verdict, 2 for a usage error (bad flag, missing file), 1 if the submission failed.
"""

import argparse
import json
import logging
import os
import shlex
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vitbirds.data.sources import discover_dataset, samples_for_model
from vitbirds.errors import ConfigError, DataError, VitbirdsError
from vitbirds.lifecycle.registry import CHALLENGER, RegisteredVersion, registry_uri
from vitbirds.lifecycle.store import fetch_model
from vitbirds.lifecycle.tracking import make_tracker, tracker_hint
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
from vitbirds.paths import output_note, output_path, repo_root
from vitbirds.settings import RunSettings, add_arguments

DEFAULT_RAY_ADDRESS = "http://127.0.0.1:8265"
AUTO_WINDOWS = 8  # without --window the log's span is cut into this many windows for the report
# Not uploaded with the retraining job: environments, outputs, caches.
WORKING_DIR_EXCLUDES = [
    ".git", ".venv", "venv", "runs", "mlruns", "models", "__pycache__", ".pytest_cache",
    ".ruff_cache", "*.egg-info", "*.safetensors",
]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    description, _, epilog = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--model",
        required=True,
        metavar="REF",
        help="the model: a model or run directory, gs://..., or a registry URI such as "
        "models:/vitbirds@champion (its reference profile is used when it has one)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--labeled-data",
        type=Path,
        metavar="PATH",
        help="a folder of new labelled photos (any split layout)",
    )
    source.add_argument(
        "--prediction-log", type=Path, metavar="PATH", help="Serve's predictions.jsonl"
    )
    add(
        "--out",
        type=Path,
        metavar="PATH",
        help="folder for monitor.json and report.html (default: MODEL/monitor, or "
        "STORAGE_PATH/monitor/NAME-vVERSION for a registry model)",
    )
    add(
        "--window",
        help="time windows of the log (30m, 6h, 1d); the verdict is on the latest ones "
        f"(default: the whole log, cut into {AUTO_WINDOWS} windows for the report)",
    )
    add(
        "--max-images",
        type=int,
        default=2000,
        metavar="N",
        help="seeded sample of --labeled-data (default: 2000)",
    )
    add(
        "--reference-data",
        type=Path,
        metavar="PATH",
        help="build a missing reference profile from this dataset's valid split",
    )
    _add_decision_arguments(parser.add_argument_group("decision"))
    track = parser.add_argument_group("tracking")
    add_arguments(
        track,
        RunSettings,
        ["tracker", "storage_path"],
        notes={"storage_path": "here: where the local MLflow store is"},
    )
    retrain = parser.add_argument_group("retraining")
    retrain.add_argument("--submit", action="store_true", help="on RETRAIN, submit the Ray job")
    retrain.add_argument(
        "--ray-address",
        default=default_ray_address(),
        help="the cluster's dashboard (job API) address, as `ray job submit --address` takes "
        "(default: RAY_API_SERVER_ADDRESS, an http RAY_ADDRESS, else %(default)s)",
    )
    retrain.add_argument(
        "--train-args",
        default="",
        metavar="'FLAGS'",
        help="extra jobs/train.py flags, quoted; they win over the model's",
    )
    retrain.add_argument(
        "--retrain-storage",
        default=RunSettings.storage_path,
        metavar="PATH",
        help="--storage-path of the retraining job; a relative one is under $VITBIRDS_HOME on "
        f"the cluster (default: {RunSettings.storage_path})",
    )
    retrain.add_argument(
        "--python", default="python", help="interpreter on the cluster (default: python)"
    )
    return parser.parse_args(argv)


def _add_decision_arguments(group: argparse._ArgumentGroup) -> None:
    defaults = MonitorConfig()
    group.add_argument(
        "--alpha",
        type=float,
        metavar="P",
        help=f"false-alarm rate of one assessment (default: {defaults.alpha})",
    )
    group.add_argument(
        "--retrain-drop",
        type=float,
        metavar="X",
        help="estimated accuracy drop that means RETRAIN "
        f"(default: {defaults.retrain_accuracy_drop})",
    )
    group.add_argument(
        "--min-samples",
        type=int,
        metavar="N",
        help=f"fewer predictions: no verdict (default: {defaults.min_samples})",
    )


def default_ray_address() -> str:
    """Where `ray job submit` would send the job: RAY_API_SERVER_ADDRESS, an http(s) RAY_ADDRESS,
    else the local dashboard."""
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        if os.environ.get(name, "").startswith(("http://", "https://")):
            return os.environ[name]
    return DEFAULT_RAY_ADDRESS


def resolve_model(args: argparse.Namespace) -> RegisteredVersion | None:
    """Turns --model, any model reference, into a local directory (args.model); returns the
    registry version a models:/ URI named (None for any other reference)."""
    fetched = fetch_model(args.model, tracking_uri=registry_uri(args.retrain_storage))
    if fetched.registered is not None:
        print(f"model: {args.model} -> {fetched.registered.uri}", flush=True)
    args.model = fetched.path
    return fetched.registered


def monitor_config(args: argparse.Namespace) -> MonitorConfig:
    given = {
        "alpha": args.alpha,
        "retrain_accuracy_drop": args.retrain_drop,
        "min_samples": args.min_samples,
    }
    return replace(MonitorConfig(), **{k: v for k, v in given.items() if v is not None})


# ---------------------------------------------------------------------------------------------
# Inputs


def reference_profile(args: argparse.Namespace) -> ReferenceProfile:
    """The model's profile; built from --reference-data's valid split when it has none."""
    model_dir = args.model
    if args.reference_data is None or (model_dir / REFERENCE_JSON).is_file():
        return load_reference_profile(model_dir)
    loaded = load_model(model_dir)
    splits = discover_dataset(args.reference_data)
    samples = samples_for_model(splits.valid, splits.classes, loaded.metadata.class_names)
    if not samples:
        raise DataError(f"{args.reference_data} has no valid images of the model's classes")
    profile = build_reference_profile(loaded, samples, data=splits.describe())
    save_reference_profile(model_dir, profile)
    print(f"reference profile: {len(samples)} valid images -> {model_dir}", flush=True)
    return profile


def labelled_observations(
    args: argparse.Namespace, metadata: ModelMetadata
) -> tuple[Observations, dict[str, Any]]:
    """The model run over --labeled-data (all its splits): new photos with their labels."""
    splits = discover_dataset(args.labeled_data)
    everything = splits.train + splits.valid + splits.test
    matched = samples_for_model(everything, splits.classes, metadata.class_names)
    if not matched:
        raise DataError(
            f"none of the {len(splits.classes)} classes of {args.labeled_data} is one of the "
            f"model's {len(metadata.class_names)} (names are compared ignoring case, "
            "spaces, '-' and '_')"
        )
    samples = matched
    if len(samples) > args.max_images:
        chosen = np.random.default_rng(0).choice(len(samples), args.max_images, replace=False)
        samples = [samples[i] for i in sorted(chosen)]
    loaded = load_model(args.model)
    dataset = image_dataset(samples, loaded.metadata)
    observed = Observations.from_outputs(model_outputs(loaded, dataset))
    source = {
        "kind": "labeled-data",
        "path": str(args.labeled_data),
        "images": len(everything),
        "images_of_model_classes": len(matched),
        "images_assessed": len(observed),
        "undecodable_images": len(dataset.skipped),
    }
    return observed, source


def log_observations(
    args: argparse.Namespace, metadata: ModelMetadata
) -> tuple[Observations, dict[str, Any]]:
    contents = read_log(args.prediction_log)
    if not contents.predictions:
        raise DataError(f"{args.prediction_log} holds no prediction (missing or empty)")
    observed = Observations.from_log(contents, metadata.class_names, model_version=metadata.version)
    source = {
        "kind": "prediction-log",
        "path": str(args.prediction_log),
        "predictions_of_this_version": len(observed),
        "predictions_of_other_versions": len(contents.predictions) - len(observed),
        "feedback_labels": int((observed.labels >= 0).sum()),
        "unreadable_lines": contents.skipped_lines,
    }
    return observed, source


def auto_window(observed: Observations) -> timedelta:
    span = (observed.times.max() - observed.times.min()) / np.timedelta64(1, "s")
    return timedelta(seconds=max(1.0, float(span) / AUTO_WINDOWS))


# ---------------------------------------------------------------------------------------------
# Retraining


def retrain_command(args: argparse.Namespace, metadata: ModelMetadata) -> list[str]:
    """jobs/train.py with the model's preset and data (from its metadata), then the user's
    --train-args, which win (argparse keeps the last value of a flag)."""
    data_config = metadata.extra.get("data_config", {})
    command = [args.python, "jobs/train.py"]
    if metadata.extra.get("preset"):
        command += ["--preset", str(metadata.extra["preset"])]
    if not metadata.synthetic and metadata.data.get("root"):
        command += ["--data-dir", str(metadata.data["root"])]
    for flag, key in (("--num-classes", "num_classes"), ("--images-per-class", "images_per_class")):
        if data_config.get(key) is not None:
            command += [flag, str(data_config[key])]
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    command += ["--run-name", f"retrain-{metadata.name}-{stamp}"]
    command += ["--storage-path", args.retrain_storage]
    return command + shlex.split(args.train_args)


def ray_auth_headers() -> dict[str, str]:
    """A bearer token for a cluster with token auth (Ray 2.60 `ray start --head`'s default).

    Looked up where Ray's CLI looks: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, then
    ~/.ray/auth_token. RAY_AUTH_MODE=disabled sends none; RAY_AUTH_MODE=token without a token is
    a usage error rather than a 401 from the cluster.
    """
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token and path.is_file():
        token = path.read_text().strip()
    if not token and mode == "token":
        raise ConfigError(
            "RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or "
            "run `ray get-auth-token` where the cluster was started and save it to "
            "~/.ray/auth_token"
        )
    return {"Authorization": f"Bearer {token}"} if token else {}


class SubmissionError(Exception):
    """The cluster refused the job or could not be reached."""


def submit(
    address: str,
    command: list[str],
    metadata: ModelMetadata,
    headers: dict[str, str],
    registered: RegisteredVersion | None = None,
) -> str:
    """Submits `command` with this checkout as the working dir; returns the job id.

    A shared registry (MLFLOW_TRACKING_URI) goes with the job, so the retrained model registers
    where the monitored one came from."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    runtime_env: dict[str, Any] = {
        "working_dir": str(repo_root()),
        "excludes": WORKING_DIR_EXCLUDES,
    }
    if os.environ.get("MLFLOW_TRACKING_URI"):
        runtime_env["env_vars"] = {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
    job_metadata = {"vitbirds": "retrain", "model_name": metadata.name,
                    "model_version": metadata.version}  # fmt: skip
    if registered is not None:
        job_metadata["registry_version"] = registered.uri
    try:
        client = JobSubmissionClient(address, headers=headers)
        return client.submit_job(
            entrypoint=shlex.join(command), runtime_env=runtime_env, metadata=job_metadata
        )
    except (AuthenticationError, ConnectionError, RuntimeError, ValueError) as error:
        raise SubmissionError(f"submitting to {address} failed: {error}") from error


# ---------------------------------------------------------------------------------------------
# Outputs


def log_to_tracker(args: argparse.Namespace, result: dict[str, Any], paths: list[Path]) -> None:
    model = result["model"]
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    tracker = make_tracker(
        args.tracker, run_name=f"monitor-{model['name']}-{stamp}",
        experiment="vitbirds-monitor", storage_path=args.storage_path,
    )  # fmt: skip
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
    hint = tracker_hint(tracker)
    if hint:
        print(hint, flush=True)


def promote_command(args: argparse.Namespace, metadata: ModelMetadata) -> str:
    """What to run once the retraining job has registered its challenger."""
    data = metadata.data.get("root") or "LABELLED_PHOTOS"
    return shlex.join(
        [args.python, "jobs/promote.py", "--data-dir", str(data), "--split", "test",
         "--storage-path", args.retrain_storage]
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    config = monitor_config(args)
    headers = ray_auth_headers() if args.submit else {}  # a usage error before any work
    registered = resolve_model(args)
    metadata = read_metadata(args.model)
    profile = reference_profile(args)
    windows: list[dict[str, Any]] = []
    if args.labeled_data is not None:
        if args.window:
            raise ConfigError("--window applies to --prediction-log only")
        observed, source = labelled_observations(args, metadata)
        judged = observed
    else:
        observed, source = log_observations(args, metadata)
        window = parse_window(args.window) if args.window else auto_window(observed)
        source["window_s"] = window.total_seconds()
        windows = [w.to_dict() for w in window_drift(profile, observed, window, config)]
        # With --window the verdict is about recent traffic; without, about the whole log.
        judged = recent(observed, window, config.min_samples) if args.window else observed
    assessment: Assessment = assess(profile, judged, config)
    result: dict[str, Any] = {
        "model": {
            "dir": str(args.model),
            "name": metadata.name,
            "version": metadata.version,
            "registry": registered.to_dict() if registered else None,
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
    status = 0
    print(f"decision: {assessment.decision}", flush=True)
    for reason in assessment.reasons:
        print(f"  - {reason}", flush=True)
    if assessment.decision == "RETRAIN":
        command = retrain_command(args, metadata)
        result["retrain"] = {"command": shlex.join(command), "address": args.ray_address}
        if args.submit:
            try:
                job_id = submit(args.ray_address, command, metadata, headers, registered)
            except SubmissionError as error:
                print(f"error: {error}", file=sys.stderr)
                status = 1
            else:
                result["retrain"]["job_id"] = job_id
                result["retrain"]["then"] = promote_command(args, metadata)
                print(
                    f"submitted retraining job {job_id} to {args.ray_address}; it registers "
                    f"its model as the {CHALLENGER}; when it has succeeded:\n  "
                    f"{result['retrain']['then']}",
                    flush=True,
                )
        else:
            print(f"retrain with (or rerun with --submit):\n  {shlex.join(command)}", flush=True)

    out = args.out or (
        Path(args.storage_path) / "monitor" / f"{registered.name}-v{registered.version}"
        if registered
        else args.model / "monitor"
    )
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "monitor.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    report_path = out / "report.html"
    reference = Observations.from_reference(profile)
    report_path.write_text(render_report(result, reference, judged))
    print(f"wrote {json_path} and {report_path}", flush=True)
    log_to_tracker(args, result, [json_path, report_path])
    return status


def resolve_paths(args: argparse.Namespace) -> None:
    """The outputs where every job puts them (`vitbirds.paths.output_path`)."""
    if args.out is not None:
        args.out = Path(output_path(args.out))
    args.storage_path = output_path(args.storage_path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    note = output_note()
    if note:
        print(note, flush=True)
    resolve_paths(args)
    try:
        return run(args)
    except VitbirdsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
