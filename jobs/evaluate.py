"""Evaluate an exported model directory on a dataset split: metrics.json and report.html.

    python jobs/evaluate.py --model runs/my-run/model --data-dir ../shared/data/cub100 --split valid
    python jobs/evaluate.py --model models/latest --data-dir ../shared/data/kaggle-birds525-valid \
        --split all --out runs/eval-kaggle
    python jobs/evaluate.py --model M --data-dir SYNTHETIC_DIR --split test --attention-check

`--split all` evaluates every image of the dataset (for a folder that is only an evaluation set).
Without --data-dir, the data the model was trained on (its metadata) is used. The valid split of a
dataset that has none is carved out with the model's own training seed, so it is the same images
that training held out. `--attention-check` also measures, on a synthetic dataset (which has bird
masks), how much of the attention rollout falls on the bird against the bird's share of the image.

Exit status: 0 on success, 2 for a usage error (missing model, data or split, bad flag value).
"""

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vitbirds.data.sources import SPLITS, DatasetSplits, Sample, discover_dataset
from vitbirds.data.synthetic import load_mask
from vitbirds.devices import resolve_device
from vitbirds.errors import DataError, VitbirdsError
from vitbirds.evaluation.evaluate import (
    EvaluationConfig,
    attention_check,
    evaluate_model,
    log_to_tracker,
    write_report,
)
from vitbirds.model.files import LoadedModel, load_model
from vitbirds.training.runner import data_label
from vitbirds.training.tracking import TRACKERS, make_tracker

ATTENTION_FILE = "attention_check.json"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (no usage dump), still with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = EvaluationConfig()
    parser = _Parser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--model", required=True, help="model directory (model.safetensors + metadata.json)")
    add("--data-dir", help="dataset root (default: the one in the model's metadata)")
    add("--split", choices=[*SPLITS, "all"], default="test")
    add("--out", help="output folder (default: runs/evaluation/<model folder>-<split>)")
    add("--batch-size", type=_positive_int, default=defaults.batch_size)
    add("--device", default="auto", help="auto, cpu, cuda or mps")
    add("--overlays", type=int, default=defaults.overlays, help="attention overlays in the report")
    add("--seed", type=int, help="valid-split seed (default: the model's training seed)")
    add("--tracker", choices=TRACKERS, default="none")
    add("--storage-path", default="runs", help="where a local MLflow store lives")
    add(
        "--attention-check",
        action="store_true",
        help="also measure rollout mass on the bird masks (synthetic data only)",
    )
    return parser.parse_args(argv)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


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
    known = set(metadata.class_names)
    scorable = [s for s in samples if splits.classes[s.label] in known]
    if not scorable:
        raise DataError(f"none of the classes of {splits.root} is among the model's classes")
    if len(scorable) < len(samples):
        unknown = {splits.classes[s.label] for s in samples} - known
        label += (
            f"; {len(samples) - len(scorable)} images of {len(unknown)} classes the model "
            "was not trained on left out"
        )
    return splits, scorable, label


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        device = resolve_device(args.device)
        loaded = load_model(args.model, device=device)
        splits, samples, label = load_split(args, loaded)
        config = EvaluationConfig(batch_size=args.batch_size, overlays=args.overlays)
        check = None
        if args.attention_check:
            if not splits.synthetic:
                raise DataError(
                    f"--attention-check needs a synthetic dataset; {splits.root} is not"
                )
            check = attention_check(loaded, samples, load_mask, config=config, device=device)
        result = evaluate_model(
            loaded,
            samples,
            splits.classes,
            config=config,
            split=args.split,
            data_label=label,
            data_synthetic=splits.synthetic,
            device=device,
        )
        out = Path(
            args.out or Path("runs") / "evaluation" / f"{Path(args.model).name}-{args.split}"
        )
        paths = write_report(result, out)
        if check is not None:
            paths["attention_check"] = out / ATTENTION_FILE
            paths["attention_check"].write_text(json.dumps(check.to_dict(), indent=1) + "\n")
        tracker = make_tracker(
            args.tracker,
            run_name=f"evaluate-{Path(args.model).name}-{args.split}",
            storage_path=args.storage_path,
        )
        log_to_tracker(result, paths, tracker)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
