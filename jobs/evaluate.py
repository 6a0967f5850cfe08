"""Evaluate an exported model on a dataset split: metrics.json and report.html.

examples:
    python jobs/evaluate.py --model runs/my-run/model --data-dir ../shared/data/cub100 --split valid
    python jobs/evaluate.py --model models/latest --data-dir ../shared/data/kaggle-birds525-valid \\
        --split all --out runs/eval-kaggle
    python jobs/evaluate.py --model models:/vitbirds@champion --data-dir NEW_PHOTOS --split all
    python jobs/evaluate.py --model M --data-dir SYNTHETIC_DIR --split test --attention-check

`--split all` evaluates every image of the dataset (for a folder that is only an evaluation set).
Without --data-dir, the data the model was trained on (its metadata) is used. The valid split of a
dataset that has none is carved out with the model's own training seed, so it is the same images
that training held out. `--attention-check` also measures, on a synthetic dataset (which has bird
masks), how much of the attention rollout falls on the bird against the bird's share of the image.
The outputs are those of a training run's evaluation/ folder (`vitbirds.training.export`).
Relative paths (--model, --out, --storage-path) are relative to the current directory, or to
$VITBIRDS_HOME (default ~/vitbirds) when the job runs through `ray job submit --working-dir`.

Exit status: 0 on success, 2 for a usage error (missing model, data or split, bad flag value).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.cli import OneLineErrorParser, positive_int, start_job
from vitbirds.data.sources import SPLITS, DatasetSplits, Sample, discover_dataset, model_labels
from vitbirds.data.synthetic import load_mask
from vitbirds.devices import DEVICE_CHOICES, resolve_device
from vitbirds.errors import DataError, VitbirdsError
from vitbirds.evaluation.evaluate import EvaluationConfig, attention_check
from vitbirds.lifecycle.registry import registry_uri
from vitbirds.lifecycle.store import fetch_model
from vitbirds.lifecycle.tracking import make_tracker, tracker_hint
from vitbirds.model.files import LoadedModel, load_model
from vitbirds.paths import output_path
from vitbirds.precision import resolve_precision
from vitbirds.settings import RunSettings, add_arguments
from vitbirds.training.export import evaluate_and_report
from vitbirds.training.runner import data_label

ATTENTION_FILE = "attention_check.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = EvaluationConfig()
    description, _, epilog = __doc__.partition("\n\n")
    parser = OneLineErrorParser(
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--model", required=True, metavar="REF",
        help="the model: a model or run directory, gs://..., models:/NAME@ALIAS or "
             "models:/NAME/VERSION")  # fmt: skip
    add("--data-dir", metavar="PATH", help="dataset root (default: the model's, from its metadata)")
    add("--split", choices=[*SPLITS, "all"], default="test",
        help="split to evaluate; all: every image of the dataset (default: test)")  # fmt: skip
    default_out = f"{RunSettings.storage_path}/evaluation/MODEL-SPLIT"
    add("--out", metavar="PATH", help=f"output folder (default: {default_out})")
    add("--batch-size", type=positive_int, default=defaults.batch_size, metavar="N",
        help=f"images per forward pass (default: {defaults.batch_size})")  # fmt: skip
    add("--device", choices=DEVICE_CHOICES, default="auto",
        help="auto: cuda, then mps, then cpu (default: auto)")  # fmt: skip
    add("--overlays", type=int, default=defaults.overlays, metavar="N",
        help=f"attention overlays in the report (default: {defaults.overlays})")  # fmt: skip
    add("--seed", type=int, metavar="N",
        help="seed of a carved-out valid split (default: the model's training seed)")  # fmt: skip
    # An evaluation is usually a look at a model, not an experiment: no tracker unless asked.
    add_arguments(
        parser, RunSettings, ["tracker", "storage_path"], defaults={"tracker": "none"},
        notes={"storage_path": "here: where the local MLflow store is"},
    )  # fmt: skip
    add_arguments(parser, RunSettings, ["precision"])
    add(
        "--attention-check",
        action="store_true",
        help="also measure rollout mass on the bird masks (synthetic data only)",
    )
    return parser.parse_args(argv)


def load_split(
    args: argparse.Namespace, loaded: LoadedModel
) -> tuple[DatasetSplits, list[Sample], str]:
    """The dataset, the samples of the requested split the model can score, and a data label."""
    metadata = loaded.metadata
    data_dir = args.data_dir or metadata.data.get("root")
    if not data_dir:
        raise DataError("no --data-dir given and the model's metadata names no dataset")
    trained_with = metadata.extra.get("data_config", {})
    splits = discover_dataset(
        data_dir,
        seed=args.seed if args.seed is not None else trained_with.get("seed", 0),
        valid_fraction=trained_with.get("valid_fraction", 0.2),
    )
    if args.split == "all":
        samples = splits.train + splits.valid + splits.test
    else:
        samples = splits.split(args.split)
    if not samples:
        sizes = ", ".join(f"{name} ({len(splits.split(name))})" for name in SPLITS)
        raise DataError(f"split {args.split!r} of {splits.root} is empty; splits: {sizes}")
    label = data_label(splits)
    known = model_labels(splits.classes, metadata.class_names)
    scorable = [s for s in samples if s.label in known]
    if not scorable:
        raise DataError(f"none of the classes of {splits.root} is among the model's classes")
    if len(scorable) < len(samples):
        unknown = {splits.classes[s.label] for s in samples if s.label not in known}
        label += (
            f"; {len(samples) - len(scorable)} images of {len(unknown)} classes the model "
            "was not trained on left out"
        )
    return splits, scorable, label


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_job()
    try:
        device = resolve_device(args.device)
        precision = resolve_precision(args.precision, device)
        print(f"{device.type}: {precision.describe()}", flush=True)
        fetched = fetch_model(args.model, tracking_uri=registry_uri(output_path(args.storage_path)))
        loaded = load_model(fetched.path, device=device)
        splits, samples, label = load_split(args, loaded)
        config = EvaluationConfig(batch_size=args.batch_size, overlays=args.overlays)
        check = None
        if args.attention_check:
            if not splits.synthetic:
                raise DataError(
                    f"--attention-check needs a synthetic dataset; {splits.root} is not"
                )
            check = attention_check(loaded, samples, load_mask, config=config, device=device)
        default_out = f"{RunSettings.storage_path}/evaluation/{fetched.label}-{args.split}"
        out = Path(output_path(args.out or default_out))
        tracker = make_tracker(
            args.tracker,
            run_name=f"evaluate-{fetched.label}-{args.split}",
            storage_path=output_path(args.storage_path),
        )
        try:
            result, paths = evaluate_and_report(
                loaded, samples, splits.classes, out_dir=out, split=args.split, data_label=label,
                data_synthetic=splits.synthetic, device=device, precision=precision,
                config=config, tracker=tracker,
            )  # fmt: skip
            if check is not None:
                paths["attention_check"] = out / ATTENTION_FILE
                paths["attention_check"].write_text(json.dumps(check.to_dict(), indent=1) + "\n")
                tracker.log_artifact(paths["attention_check"], "evaluation")
        except BaseException:
            tracker.close("FAILED")
            raise
        tracker.close()
    except VitbirdsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    summary = result.report.summary()
    print(
        f"{args.split}: {summary['num_samples']} images, top-1 {summary['top1_accuracy']:.4f}, "
        f"top-5 {summary['top5_accuracy']:.4f}, macro F1 {summary['macro_f1']:.4f}, "
        f"{result.timing['images_per_s']:.1f} images/s"
        + (" [SYNTHETIC]" if result.synthetic else "")
    )
    if result.no_overlays_reason:
        print(f"note: {result.no_overlays_reason}")
    if check is not None:
        print(f"attention check: {json.dumps(check.to_dict())}")
    for name, path in paths.items():
        print(f"{name}: {path}")
    hint = tracker_hint(tracker)
    if hint:
        print(hint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
