"""Training images/s: the plain single-process loop against Ray Train with 1 and 2 workers.

One run, same data and recipe for all three:
- plain: `vitbirds.training.loop` called directly, torch using every CPU of the machine, measured
  before and after the Ray runs (the mean is the baseline: load drifts on a shared machine);
- Ray Train, 1 worker holding every CPU (target: >= 0.9x plain, i.e. the adapter costs little);
- Ray Train, 2 workers of 1 CPU/thread each (DDP over gloo), scaling as measured.
Images/s is the median over epochs after the first (warm-up), as `TrainingRun.train_epoch`
measures it: the loop alone, so Ray's start-up is reported apart. Prints one JSON line last.

    python jobs/bench_train.py [--preset vit-cpu] [--epochs 4] [--images-per-class 100]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.benchlib.report import report, target
from vitbirds.presets import PRESETS, Recipe, get_recipe
from vitbirds.training.runner import fit_recipe_to_data, prepare_dataset, train_in_process


def steady_images_per_s(history: list[dict[str, float]]) -> float:
    """Median over the epochs after the first, which pays for warm-up and allocation."""
    return statistics.median(row["images_per_s"] for row in history[1:] or history)


def plain_loop(recipe: Recipe, splits, threads: int) -> float:
    torch.set_num_threads(threads)
    return steady_images_per_s(train_in_process(recipe, splits).history)


def ray_train(recipe: Recipe, storage: str, workers: int, cpus: int, cache_dir: str):
    from vitbirds.ray_adapter.train import TrainJob, run_training

    job = TrainJob(
        recipe=recipe,
        run_name=f"bench-{workers}x{cpus}",
        storage_path=storage,
        num_workers=workers,
        cpus_per_worker=cpus,
        tracker="none",
        evaluate=False,
        cache_dir=cache_dir,
    )
    started = time.perf_counter()
    outcome = run_training(job)
    wall = time.perf_counter() - started
    loop = sum(row["epoch_wall_s"] for row in outcome.history)
    return steady_images_per_s(outcome.history), wall - loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vit-cpu", choices=list(PRESETS))
    parser.add_argument("--data-dir", help="default: the synthetic birds")
    parser.add_argument("--images-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()

    cpus = os.cpu_count() or 1
    recipe = get_recipe(args.preset)
    recipe.data = replace(
        recipe.data, data_dir=args.data_dir, images_per_class=args.images_per_class
    )
    recipe.train = replace(recipe.train, epochs=args.epochs)
    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = str(Path(scratch) / "cache")
        splits = prepare_dataset(recipe.data, cache_dir)
        recipe = fit_recipe_to_data(recipe, splits)
        plain_before = plain_loop(recipe, splits, cpus)

        from vitbirds.ray_adapter.train import connect

        connect("local", num_cpus=cpus, include_dashboard=False)  # lighter start on 2 cores
        one, one_startup = ray_train(recipe, f"{scratch}/runs", 1, cpus, cache_dir)
        two, two_startup = ray_train(recipe, f"{scratch}/runs", 2, max(1, cpus // 2), cache_dir)
        # Measured again after the Ray runs: on a shared machine the load drifts, and the mean
        # of a before and an after brackets the Ray runs in between.
        plain_after = plain_loop(recipe, splits, cpus)
    plain = (plain_before + plain_after) / 2

    results = {
        "preset": args.preset,
        "train_images": len(splits.train),
        "batch_size": recipe.train.batch_size,
        "epochs": args.epochs,
        "synthetic": splits.synthetic,
        "plain_images_per_s": round(plain, 1),
        "plain_before_after_images_per_s": [round(plain_before, 1), round(plain_after, 1)],
        "ray_1_worker_images_per_s": round(one, 1),
        "ray_2_workers_images_per_s": round(two, 1),
        "ray_1_worker_vs_plain": round(one / plain, 3),
        "ray_2_workers_vs_plain": round(two / plain, 3),
        "ray_1_worker_overhead_s": round(one_startup, 1),
        "ray_2_workers_overhead_s": round(two_startup, 1),
        "data_loading": "DataLoader over decoded-once tensors, sharded by prepare_data_loader",
    }
    report("train", results, [target("ray_1_worker_vs_plain", one / plain, 0.9)])


if __name__ == "__main__":
    main()
