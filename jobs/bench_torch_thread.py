"""Which thread runs a model decides its speed: serve/torch_thread.py's case, measured.

One forward pass on a batch of `--batch` images, timed in four set-ups, each in a fresh process
(OpenMP's thread teams live as long as the process):

- main: the model built and run on the main thread (the naive server, bench_model).
- torch_thread: built and run on the dedicated thread of `serve.torch_thread` while the main
  thread, left one torch thread, computes too (what the Serve replicas do).
- loaded_elsewhere: built on the main thread, run on one other thread.
- to_thread: built on the main thread, each batch run through `asyncio.to_thread`.

Every set-up uses all the cores as torch threads: with one thread there is no team to wake and
all four are alike. Targets: the dedicated thread is within 5 % of the main thread.

    python jobs/bench_torch_thread.py [--presets vit-s16 vit-cpu] [--batch 1] [--precision auto]
"""

import argparse
import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.benchlib.report import report, target
from serve.torch_thread import torch_thread
from vitbirds.model.vit import VisionTransformer
from vitbirds.precision import PRECISIONS, resolve_precision
from vitbirds.presets import get_recipe

SETUPS = ("main", "torch_thread", "loaded_elsewhere", "to_thread")


def build(preset: str, batch: int) -> tuple[torch.nn.Module, torch.Tensor]:
    config = get_recipe(preset).model
    torch.manual_seed(0)
    model = VisionTransformer(config).eval()
    images = torch.randn(batch, 3, config.image_size, config.image_size)
    return model, images


def forward_ms(model: torch.nn.Module, images: torch.Tensor, precision_name: str, runs: int):
    """Median milliseconds of `runs` forward passes after a warm-up."""
    precision = resolve_precision(precision_name, "cpu")
    with torch.inference_mode(), precision.autocast():
        for _ in range(5):
            model(images)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            model(images)
            times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def run_setup(setup: str, preset: str, batch: int, precision: str, runs: int) -> float:
    """One set-up in this process: the median forward ms."""
    if setup == "main":
        return forward_ms(*build(preset, batch), precision, runs)
    if setup == "torch_thread":
        thread = torch_thread("bench-model", torch.get_num_threads())
        model, images = thread.submit(build, preset, batch).result()
        # The main thread still computes (a replica deserialises tensors there), on one thread.
        torch.randn(4_000_000).mul(2).sum()
        return thread.submit(forward_ms, model, images, precision, runs).result()
    model, images = build(preset, batch)
    if setup == "loaded_elsewhere":
        result: list[float] = []
        other = threading.Thread(
            target=lambda: result.append(forward_ms(model, images, precision, runs))
        )
        other.start()
        other.join()
        return result[0]
    return asyncio.run(_per_batch_to_thread(model, images, precision, runs))


async def _per_batch_to_thread(model, images, precision: str, runs: int) -> float:
    one = functools.partial(forward_ms, model, images, precision, 1)
    for _ in range(5):
        await asyncio.to_thread(one)
    return statistics.median([await asyncio.to_thread(one) for _ in range(runs)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["vit-s16", "vit-cpu"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--setup", choices=SETUPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    if args.setup:
        (preset,) = args.presets
        ms = run_setup(args.setup, preset, args.batch, args.precision, args.runs)
        print(json.dumps({"ms": ms}))
        return

    results: dict = {
        "precision": resolve_precision(args.precision, "cpu").describe(),
        "batch": args.batch,
        "torch_threads": threads,
        "load_average_before": os.getloadavg()[0],
    }
    targets = []
    for preset in args.presets:
        ms = {}
        for setup in SETUPS:
            command = [sys.executable, __file__, "--setup", setup, "--presets", preset]
            command += ["--batch", str(args.batch), "--runs", str(args.runs)]
            command += ["--precision", args.precision]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            ms[setup] = round(json.loads(output.strip().splitlines()[-1])["ms"], 2)
        results[preset] = {"forward_ms": ms}
        targets.append(
            target(f"{preset} torch_thread / main", ms["torch_thread"] / ms["main"], 1.05, "<=")
        )
    results["load_average_after"] = os.getloadavg()[0]
    report("torch_thread", results, targets)


if __name__ == "__main__":
    main()
