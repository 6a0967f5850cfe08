"""Write a Kaggle-layout stand-in for the "525 bird species" dataset, for benchmarks and tests.

    python jobs/make_dataset.py --out data/birds525-synthetic                  # 525 x 160, 224 px
    python jobs/make_dataset.py --out /tmp/small --classes 20 --per-class 40 --image-size 64

Writes `train|valid|test/<CLASS>/<n>.jpg` and `birds.csv` with Kaggle's columns (`class id`,
`filepaths`, `labels`, `data set`, `scientific name`), so `vitbirds.data.sources` reads it exactly
as it reads the real download; valid and test hold 5 photos per class, as Kaggle's do. The birds
come from `vitbirds.data.synthetic.many_species` (learnable: colour, beak, wing and size differ
between classes), drawn on all cores, one class per task. A SYNTHETIC.json marker records the
parameters: models trained on it say they are synthetic, and a rerun with the same parameters
reuses the folder. Every image is a function of (seed, class, index): same flags, same bytes.
Exit status: 0 done, 2 for a bad flag value or an output folder that holds something else.
"""

import argparse
import csv
import json
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vitbirds.data.sources import KAGGLE_CSV, SPLITS, SYNTHETIC_MARKER
from vitbirds.data.synthetic import MAX_SPECIES, Species, many_species, render_bird
from vitbirds.errors import DataError

HELD_OUT_PER_CLASS = 5  # valid and test photos per class, as in Kaggle's download
JPEG_QUALITY = 90
GENERATOR = "jobs/make_dataset.py"
VERSION = 1


def _bounded_int(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            upper = f" and {high}" if high is not None else ""
            raise argparse.ArgumentTypeError(
                f"{value} is out of range: must be {'between ' if upper else 'at least '}{low}"
                f"{upper}"
            )
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output folder (created; must be empty)")
    parser.add_argument("--classes", type=_bounded_int(1, MAX_SPECIES), default=525)
    parser.add_argument(
        "--per-class", type=_bounded_int(1), default=160, help="training photos per class"
    )
    parser.add_argument("--image-size", type=_bounded_int(16, 4096), default=224, help="pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workers", type=_bounded_int(1), default=os.cpu_count() or 1, help="processes"
    )
    return parser.parse_args(argv)


def split_counts(per_class: int) -> dict[str, int]:
    return {"train": per_class, "valid": HELD_OUT_PER_CLASS, "test": HELD_OUT_PER_CLASS}


def _write_class(task: tuple[Path, int, Species, int, int, int]) -> list[tuple[str, str]]:
    """Renders one class's photos in every split; returns its (relative path, split) rows."""
    root, class_index, spec, per_class, image_size, seed = task
    supersample = 2 if image_size >= 128 else 4  # 2 is smooth enough at 224 px and 3x faster
    rows, index = [], 0
    for split in SPLITS:
        folder = root / split / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(split_counts(per_class)[split]):
            rng = np.random.default_rng([seed, class_index, index])
            image, _ = render_bird(spec, rng, image_size, supersample=supersample)
            relative = f"{split}/{spec.name}/{index + 1}.jpg"
            image.save(root / relative, "JPEG", quality=JPEG_QUALITY)
            rows.append((relative, split))
            index += 1
    return rows


def make_dataset(
    out: Path, *, classes: int, per_class: int, image_size: int, seed: int, workers: int
) -> bool:
    """Writes the dataset; returns False when `out` already holds this exact one."""
    params = {
        "generator": GENERATOR, "version": VERSION, "classes": classes, "per_class": per_class,
        "image_size": image_size, "seed": seed, "splits": split_counts(per_class),
    }  # fmt: skip
    marker = out / SYNTHETIC_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return False
    if out.is_dir() and any(out.iterdir()):
        raise DataError(
            f"--out {out} is not empty (and not this dataset): choose an empty or new folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    species = many_species(classes)
    tasks = [(out, i, s, per_class, image_size, seed) for i, s in enumerate(species)]
    with Pool(processes=min(workers, classes)) as pool:
        class_rows = pool.map(_write_class, tasks, chunksize=1)
    with open(out / KAGGLE_CSV, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class id", "filepaths", "labels", "data set", "scientific name"])
        for class_index, (spec, rows) in enumerate(zip(species, class_rows, strict=True)):
            for relative, split in rows:
                writer.writerow([float(class_index), relative, spec.name, split, spec.name])
    marker.write_text(json.dumps(params, indent=2) + "\n")  # last: marks a complete dataset
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).expanduser().resolve()
    started = time.perf_counter()
    try:
        written = make_dataset(
            out, classes=args.classes, per_class=args.per_class, image_size=args.image_size,
            seed=args.seed, workers=args.workers,
        )  # fmt: skip
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    total = args.classes * sum(split_counts(args.per_class).values())
    if not written:
        print(f"{out} already holds this dataset ({total} photos): nothing to do", flush=True)
        return 0
    elapsed = time.perf_counter() - started
    print(
        f"wrote {total} photos ({args.classes} classes, {args.image_size} px) to {out} in "
        f"{elapsed:.1f} s with {min(args.workers, args.classes)} processes (SYNTHETIC birds)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
