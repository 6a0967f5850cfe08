"""Data benchmark at Kaggle scale: node memory, time to the first step, streaming throughput.

    python jobs/make_dataset.py --out data/birds525-synthetic            # 525 x 160, 224 px
    python jobs/bench_data.py --data-dir data/birds525-synthetic

In one run, on the dataset given (224-px photos, Kaggle layout):
1. Data-only candidates over the same training files (`--sample` a round) and cores, each in a
   fresh process, in `--rounds` interleaved rounds (each round a different slice of the set, the
   candidates' order alternating), so that this VM's speed, which drifts by 10-20 % within a
   minute, weighs on every candidate alike: the raw decode + augment rate (a process pool
   running the whole per-image transform, normalisation included, no batching), the streaming
   DataLoader this project uses (`vitbirds.data.streaming`: uint8 crops, normalised per batch in
   the consuming process, which is counted), and the Ray Data pipeline it was measured against
   (file list -> `map_batches` decode + augment -> `iter_torch_batches`); images/s
   and peak memory (PSS of the whole process tree, so shared pages count once).
2. `jobs/train.py --data-mode stream` over the whole set with two Train workers and a small model
   that still takes 224-px input (vit-s16 cut to one 48-wide block, so the data path is the real
   one and the model's own memory stays small): peak PSS of the whole local Ray node (driver,
   GCS, raylet, workers, DataLoader processes; the object store's shared memory counted once),
   seconds from start to the first training batch, and the epoch's wall time.
3. The same run with the training split halved: memory must stay flat, not halve.
The baseline, the decode-once cache, is given as its size estimate (`choose_data_mode`): at this
scale it does not fit the machine, which is the point. Last line: the JSON of
`jobs/benchlib/report.py`; figures taken on a loaded machine are labelled so by the caller.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.benchlib.report import report, target
from vitbirds.config import DataConfig, TrainConfig
from vitbirds.data.images import load_rgb
from vitbirds.data.sources import DatasetSplits, discover_dataset
from vitbirds.data.streaming import cache_bytes, make_stream_loaders
from vitbirds.data.transforms import train_transform

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3
FIRST_BATCH = re.compile(r"first training batch ready at unix time ([0-9.]+)")
EPOCH_DONE = re.compile(r"epoch\s+1/1 \|")
# A model with vit-s16's 224-px input and a negligible size of its own (see the docstring).
SMALL_224 = ["--preset", "vit-s16", "--depth", "1", "--dim", "48", "--heads", "3"]


def tree_pss(root: psutil.Process) -> int:
    """Proportional set size of `root` and all its descendants: shared pages (the object
    store's /dev/shm, forked DataLoader workers) are split between their users, so the sum
    counts them once."""
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


class PeakSampler:
    """Samples `tree_pss(pid)` every `interval` seconds in a thread; `.peak` is the maximum."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.peak_while_training = 0  # frozen by `training_done()`
        self.training = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def training_done(self) -> None:
        self.training = False

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                pss = tree_pss(self.root)
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, pss)
            if self.training:
                self.peak_while_training = max(self.peak_while_training, pss)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------
# 1. Data-only candidates (each runs in its own process: `--candidate NAME`)


_WORKER: dict[str, Any] = {}  # per pool process: the transform and decode size, built once


def _init_raw_worker(data_cfg: DataConfig) -> None:
    torch.set_num_threads(1)
    _WORKER["transform"] = train_transform(data_cfg)
    _WORKER["decode_size"] = round(data_cfg.image_size * data_cfg.decode_scale)


def _decode_augment(path: str) -> int:
    image = load_rgb(path, short_side=_WORKER["decode_size"], resize=False)  # as the stream
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    return int(_WORKER["transform"](tensor).shape[-1])


def candidate_raw(splits: DatasetSplits, data_cfg: DataConfig, cpus: int, batch: int) -> int:
    paths = [str(sample.path) for sample in splits.train]
    with Pool(cpus, initializer=_init_raw_worker, initargs=(data_cfg,)) as pool:
        return len(pool.map(_decode_augment, paths, chunksize=16))


def candidate_stream(splits: DatasetSplits, data_cfg: DataConfig, cpus: int, batch: int) -> int:
    config = DataConfig(**{**data_cfg.to_dict(), "stream_workers": cpus})
    train, _, _ = make_stream_loaders(
        splits, config, TrainConfig(batch_size=batch), reuse_batches=True
    )  # as the Ray Train worker streams
    return sum(labels.numel() for _, labels in train)


def candidate_ray_data(splits: DatasetSplits, data_cfg: DataConfig, cpus: int, batch: int) -> int:
    import ray
    import ray.data

    ray.init(
        address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
        object_store_memory=512 * 1024**2,
    )  # fmt: skip
    decode_size = round(data_cfg.image_size * data_cfg.decode_scale)
    transform = train_transform(data_cfg)

    def decode(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [
            transform(
                torch.from_numpy(
                    np.array(load_rgb(p, short_side=decode_size, resize=False))
                ).permute(2, 0, 1)
            ).numpy()
            for p in rows["path"]
        ]
        return {"image": np.stack(images), "label": rows["label"]}

    items = [{"path": str(s.path), "label": s.label} for s in splits.train]
    dataset = ray.data.from_items(items).map_batches(decode, batch_size=batch)
    seen = 0
    for rows in dataset.iter_torch_batches(batch_size=batch):
        seen += int(rows["label"].numel())
    ray.shutdown()
    return seen


CANDIDATES = {"raw": candidate_raw, "stream": candidate_stream, "ray_data": candidate_ray_data}


def run_candidate(args: argparse.Namespace) -> None:
    """In a child process: one candidate over the sample; prints {images, seconds} as JSON."""
    splits = _sample(discover_dataset(args.data_dir), args.sample, args.round)
    data_cfg = DataConfig(image_size=args.image_size)
    torch.set_num_threads(1)
    started = time.perf_counter()
    images = CANDIDATES[args.candidate](splits, data_cfg, args.cpus, args.batch_size)
    print(json.dumps({"images": images, "seconds": time.perf_counter() - started}), flush=True)


def _sample(splits: DatasetSplits, count: int, offset: int = 0) -> DatasetSplits:
    """`count` training files spread over the set (every class, not the first few); another
    `offset` gives other files."""
    step = max(1, len(splits.train) // count)
    splits.train = splits.train[offset % step :: step][:count]
    return splits


def measure_candidates(names: list[str], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Every candidate once per round, rounds interleaved and the order alternating; each
    candidate's rate is its images over its seconds summed over the rounds."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            runs[name].append(measure_candidate(name, args, round_))
    return {
        name: {
            "images_per_s": sum(r["images"] for r in done) / sum(r["seconds"] for r in done),
            "images_per_s_by_round": [round(r["images"] / r["seconds"], 1) for r in done],
            "peak_pss_gib": max(r["peak_pss_gib"] for r in done),
            "images": sum(r["images"] for r in done),
        }
        for name, done in runs.items()
    }


def measure_candidate(name: str, args: argparse.Namespace, round_: int) -> dict[str, float]:
    command = [
        sys.executable, __file__, "--data-dir", args.data_dir, "--candidate", name,
        "--sample", str(args.sample), "--round", str(round_), "--cpus", str(args.cpus),
        "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    with PeakSampler(process.pid) as sampler:
        out, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"candidate {name} failed with exit status {process.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    return {
        "seconds": result["seconds"],
        "peak_pss_gib": sampler.peak / GIB,
        "images": result["images"],
    }


# ---------------------------------------------------------------------------------------------
# 2./3. jobs/train.py over the whole set, and over half of it


def measure_training(args: argparse.Namespace, extra: list[str], name: str) -> dict[str, Any]:
    """One jobs/train.py run; retried when a loaded machine's local Ray misses its 30 s
    start-up deadline (Ray's, not ours), which says nothing about the data path."""
    for attempt in range(1, 4):
        try:
            return _measure_training(args, extra, name)
        except RayStartFailed:
            print(f"[{name}] local Ray did not start (attempt {attempt} of 3)", flush=True)
    raise RuntimeError(f"jobs/train.py ({name}): local Ray did not start in 3 attempts")


class RayStartFailed(RuntimeError):
    pass


def _measure_training(args: argparse.Namespace, extra: list[str], name: str) -> dict[str, Any]:
    storage = Path(tempfile.mkdtemp(prefix="bench-data-"))
    summary = storage / "summary.json"
    command = [
        sys.executable, str(ROOT / "jobs" / "train.py"), "--data-dir", args.data_dir, *SMALL_224,
        "--epochs", "1", "--num-workers", str(args.num_workers), "--data-mode", "stream",
        "--batch-size", str(args.batch_size), "--tracker", "none", "--no-evaluate",
        "--storage-path", str(storage), "--run-name", name, "--summary", str(summary), *extra,
    ]  # fmt: skip
    # A private local Ray, never a `ray start` cluster of someone else on this machine.
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_DEDUP_LOGS": "0"}
    started = time.time()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env
    )
    first_batch, ray_start_failed = None, False
    with PeakSampler(process.pid) as sampler:
        for line in process.stdout:
            ray_start_failed |= "node timed out during startup" in line
            sys.stdout.write(f"[{name}] {line}")
            match = FIRST_BATCH.search(line)
            if match and first_batch is None:
                first_batch = float(match.group(1))
            if EPOCH_DONE.match(line):  # then come evaluation and export, on the driver
                sampler.training_done()
        process.wait()
    if process.returncode != 0 and ray_start_failed:
        raise RayStartFailed(name)
    if process.returncode != 0:
        raise RuntimeError(f"jobs/train.py ({name}) failed with exit status {process.returncode}")
    outcome = json.loads(summary.read_text())
    epoch = outcome["history"][-1]
    return {
        "peak_node_pss_gib": sampler.peak_while_training / GIB,
        "peak_node_pss_whole_run_gib": sampler.peak / GIB,
        "first_step_s": (first_batch - started) if first_batch else float("nan"),
        "epoch_wall_s": epoch.get("epoch_wall_s"),
        "train_images_per_s": epoch["images_per_s"],
        "train_images": outcome["data"]["sizes"]["train"],
        "skipped_images": epoch.get("skipped_images"),
        "run_wall_s": time.time() - started,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", required=True, help="Kaggle layout (jobs/make_dataset.py)")
    parser.add_argument("--num-workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224, help="model input of candidates")
    parser.add_argument("--sample", type=int, default=3000, help="files a candidate reads a round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved candidate rounds")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="candidates' cores")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["candidates", "ray_data", "halved"],
        help="parts to leave out (the full run always runs)",
    )  # fmt: skip
    parser.add_argument("--candidate", choices=list(CANDIDATES), help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.data_dir = str(Path(args.data_dir).expanduser().resolve())
    if args.candidate:
        run_candidate(args)
        return 0
    splits = discover_dataset(args.data_dir)
    per_class = max(1, max(_per_class(splits).values()) // 2)
    results: dict[str, Any] = {
        "dataset": {name: len(splits.split(name)) for name in ("train", "valid", "test")},
        "classes": len(splits.classes),
        "cache_baseline_estimate_gib": cache_bytes(
            len(splits.train) + len(splits.valid), DataConfig(image_size=args.image_size)
        ) * args.num_workers / GIB,
    }  # fmt: skip
    names = [] if "candidates" in args.skip else ["raw", "stream"]
    names += [] if {"candidates", "ray_data"} & set(args.skip) else ["ray_data"]
    results["candidates"] = measure_candidates(names, args)
    print(json.dumps(results["candidates"]), flush=True)
    results["full"] = measure_training(args, [], "full")
    if "halved" not in args.skip:
        half = ["--images-per-class", str(per_class)]
        results["halved"] = measure_training(args, half, "halved")
    full = results["full"]
    targets = [
        target("node_peak_memory_gib", full["peak_node_pss_gib"], 6.0, "<="),
        target("first_training_step_s", full["first_step_s"], 60.0, "<="),
    ]
    if "raw" in results["candidates"]:
        raw = results["candidates"]["raw"]["images_per_s"]
        stream = results["candidates"]["stream"]["images_per_s"]
        targets.append(target("stream_over_raw_decode_augment", stream / raw, 0.8, ">="))
    if "halved" in results:
        ratio = full["peak_node_pss_gib"] / results["halved"]["peak_node_pss_gib"]
        targets.append(target("memory_full_over_halved_dataset", ratio, 1.2, "<="))
    report("data", results, targets)
    return 0


def _per_class(splits: DatasetSplits) -> dict[int, int]:
    counts: dict[int, int] = {}
    for sample in splits.train:
        counts[sample.label] = counts.get(sample.label, 0) + 1
    return counts


if __name__ == "__main__":
    sys.exit(main())
