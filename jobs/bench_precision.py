"""Does a model answer at bf16 as at fp32? Photo by photo, on real photos, as Serve answers.

Every photo of `--split` is decoded as evaluation and Serve decode it and run through the model
at fp32 and under bf16 autocast (`vitbirds.evaluation.agreement`): the largest difference of a
top-5 probability, the top-1 flips and whether each was a near-tie at fp32, and how well the
attention-rollout maps correlate. Runs without Ray; bf16 runs emulated (slower, same numbers)
on a CPU without native bf16.

    python jobs/bench_precision.py --model models/latest [--data-dir ../shared/data/cub100]
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.benchlib.data import add_data_argument, require_data
from jobs.benchlib.report import report, target
from vitbirds.data import ImageDataset, discover_dataset, eval_transform
from vitbirds.data.sources import SPLITS, model_labels
from vitbirds.data.transforms import EVAL_RESIZE_SCALE
from vitbirds.evaluation.agreement import (
    MIN_ROLLOUT_CORRELATION,
    NEAR_TIE,
    PROBABILITY_TOLERANCE,
    precision_agreement,
)
from vitbirds.lifecycle.store import fetch_model
from vitbirds.model.files import load_model
from vitbirds.precision import FP32, resolve_precision


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help="a model or run directory, gs://..., or models:/..."
    )
    add_data_argument(parser, help="photos of the model's classes")
    parser.add_argument("--split", choices=SPLITS, default="valid")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    require_data(parser, args.data_dir)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(fetch_model(args.model).path)
    metadata = loaded.metadata
    splits = discover_dataset(args.data_dir)
    known = model_labels(splits.classes, metadata.class_names)
    samples = [s for s in splits.split(args.split) if s.label in known]
    if not samples:
        raise SystemExit(f"no photo of {args.data_dir} ({args.split}) is of the model's classes")
    transform = eval_transform(metadata.image_size, metadata.mean, metadata.std)
    decode_size = round(metadata.image_size * EVAL_RESIZE_SCALE)
    photos = ImageDataset(samples, transform, decode_size=decode_size)
    batches = [images for images, _ in DataLoader(photos, batch_size=args.batch_size)]
    bf16 = resolve_precision("bf16", "cpu")
    started = time.perf_counter()
    agreement = precision_agreement(loaded, batches, reference=FP32, candidate=bf16)
    results = {
        "model": str(args.model),
        "model_precision": metadata.extra.get("precision", {}),
        "data": f"{args.data_dir} ({args.split})",
        "skipped_photos": len(photos.skipped),
        "bf16": bf16.reason,
        "agreement": agreement.to_dict(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    targets = [
        target(
            "max top-5 probability diff",
            agreement.max_top5_probability_diff,
            PROBABILITY_TOLERANCE,
            "<=",
        ),
        target(
            f"top-1 flips not within a {NEAR_TIE} near-tie", agreement.flips_not_near_tie, 0, "<="
        ),
    ]
    if agreement.min_rollout_correlation is not None:
        targets.append(
            target(
                "min rollout correlation",
                agreement.min_rollout_correlation,
                MIN_ROLLOUT_CORRELATION,
            )
        )
    report("precision", results, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
