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

--model takes any model reference (a model or run directory, gs://..., models:/NAME@ALIAS,
models:/NAME/VERSION); a registry URI is resolved in the registry the retraining job registers into
(MLFLOW_TRACKING_URI, else the MLflow store under --retrain-storage). The model directory needs
its reference profile (reference.safetensors + reference.json, written at the end of training);
`--reference-data DIR` builds one from DIR's valid split for older models.
Writes monitor.json and report.html under --out and logs the headline numbers to the tracker.
Without --submit a RETRAIN verdict prints the command that would be submitted. Relative paths
(--model, --out, --storage-path) are relative to the current directory, or to $VITBIRDS_HOME
(default ~/vitbirds) when the job runs through `ray job submit --working-dir`; so is the retraining
job's --storage-path on the cluster. Exit status: 0
whatever the verdict, 2 for a usage error (bad flag, missing file), 1 if the submission failed.
"""

import argparse
import shlex
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.cli import start_job
from vitbirds.errors import VitbirdsError
from vitbirds.lifecycle.registry import CHALLENGER, RegisteredVersion, registry_uri
from vitbirds.lifecycle.store import fetch_model
from vitbirds.lifecycle.tracking import make_tracker, tracker_hint
from vitbirds.monitoring.assess import MonitorConfig
from vitbirds.monitoring.run import (
    AUTO_WINDOWS,
    Monitoring,
    MonitorInputs,
    log_to_tracker,
    monitor,
    promote_command,
    retrain_command,
    write_outputs,
)
from vitbirds.paths import output_path
from vitbirds.ray_adapter.submit import (
    SubmissionError,
    default_ray_address,
    ray_auth_headers,
    submit_job,
)
from vitbirds.settings import RunSettings, add_arguments


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


def retrain(args: argparse.Namespace, monitoring: Monitoring, headers: dict[str, str]) -> int:
    """On RETRAIN: print the retraining command, or submit it (--submit); 1 if that failed."""
    metadata = monitoring.metadata
    command = retrain_command(
        metadata, python=args.python, storage_path=args.retrain_storage, train_args=args.train_args
    )
    record = {"command": shlex.join(command), "address": args.ray_address}
    monitoring.result["retrain"] = record
    if not args.submit:
        print(f"retrain with (or rerun with --submit):\n  {record['command']}", flush=True)
        return 0
    job_metadata = {"vitbirds": "retrain", "model_name": metadata.name,
                    "model_version": metadata.version}  # fmt: skip
    registered = monitoring.result["model"]["registry"]
    if registered:
        job_metadata["registry_version"] = registered["uri"]
    try:
        record["job_id"] = submit_job(
            args.ray_address, command, headers=headers, job_metadata=job_metadata
        )
    except SubmissionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    record["then"] = promote_command(
        metadata, python=args.python, storage_path=args.retrain_storage
    )
    print(
        f"submitted retraining job {record['job_id']} to {args.ray_address}; it registers its "
        f"model as the {CHALLENGER}; when it has succeeded:\n  {record['then']}",
        flush=True,
    )
    return 0


def run(args: argparse.Namespace) -> int:
    config = monitor_config(args)
    headers = ray_auth_headers() if args.submit else {}  # a usage error before any work
    registered = resolve_model(args)
    inputs = MonitorInputs(
        model_dir=args.model, labeled_data=args.labeled_data, prediction_log=args.prediction_log,
        window=args.window, max_images=args.max_images, reference_data=args.reference_data,
        registered=registered,
    )  # fmt: skip
    monitoring = monitor(inputs, config)
    assessment = monitoring.assessment
    print(f"decision: {assessment.decision}", flush=True)
    for reason in assessment.reasons:
        print(f"  - {reason}", flush=True)
    status = retrain(args, monitoring, headers) if assessment.decision == "RETRAIN" else 0

    out = args.out or (
        Path(args.storage_path) / "monitor" / f"{registered.name}-v{registered.version}"
        if registered
        else args.model / "monitor"
    )
    paths = write_outputs(monitoring, out)
    print(f"wrote {paths[0]} and {paths[1]}", flush=True)
    tracker = make_tracker(
        args.tracker, run_name=f"monitor-{monitoring.metadata.name}-{stamp()}",
        experiment="vitbirds-monitor", storage_path=args.storage_path,
    )  # fmt: skip
    log_to_tracker(tracker, monitoring.result, paths)
    hint = tracker_hint(tracker)
    if hint:
        print(hint, flush=True)
    return status


def stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def resolve_paths(args: argparse.Namespace) -> None:
    """The outputs where every job puts them (`vitbirds.paths.output_path`)."""
    if args.out is not None:
        args.out = Path(output_path(args.out))
    args.storage_path = output_path(args.storage_path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_job()
    resolve_paths(args)
    try:
        return run(args)
    except VitbirdsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
