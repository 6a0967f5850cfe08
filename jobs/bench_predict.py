"""Benchmark batch prediction (jobs/predict.py) against the batched-forward limit of the same cores.

    python jobs/bench_predict.py                   # the 84,000-photo generated set, half then all
    python jobs/bench_predict.py --photos 8400     # a quick look

- data: jobs/make_dataset.py's Kaggle-layout stand-in, 525 classes x 160 photos at 224 px
  (84,000), generated once into the cache ($VITBIRDS_CACHE/bench/birds525-84k, ~1.5 GB, ~12 min
  on 2 cores) and reused;
- model: the default preset with random weights (speed does not depend on the weights);
- limit: no Ray at all: decode + eval transform + one forward per batch of `--batch`, back to
  back in one process on every core (jobs/benchlib/limit.py, what jobs/bench_serve.py calls the
  limit), at the precision batch prediction chooses;
- ours: `jobs/predict.py`'s own job (its default actors for this machine) over half the photos,
  then over all of them, each into a fresh Parquet file, on one local Ray started once. Photos/s
  is end to end as a user waits for it: listing, model fetch, actor start-up, writing included.
  Each run starts its own local Ray; memory is the whole node's (total - available, sampled
  every 0.25 s) above what it used once that Ray was up (its own processes in the baseline), so the
  two runs' peaks show whether memory grows with the number of photos.

Targets: photos/s over all photos >= 0.85 x the limit; peak node memory of a run <= 4 GiB; the
peak over all photos within 10 % of the peak over half of them (streaming: nothing accumulates).
"""

import argparse
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs import predict as predict_cli
from jobs.benchlib.limit import limit_images_per_second
from jobs.benchlib.report import report, target
from jobs.make_dataset import make_dataset
from vitbirds.inference.batch_files import list_inputs
from vitbirds.inference.stand_in import make_model_dir
from vitbirds.paths import cache_root
from vitbirds.precision import resolve_precision
from vitbirds.presets import DEFAULT_PRESET
from vitbirds.ray_adapter.predict import predict
from vitbirds.ray_adapter.train import connect

CLASSES, PER_CLASS = 525, 150  # + 5 valid + 5 test per class = 84,000 photos
GIB = 1024**3


class NodeMemory:
    """Peak of the whole node's used memory (total - available) above a baseline, sampled, and
    which processes held what at that peak (RSS by kind), to see where memory goes."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.baseline = self._used()
        self.peak = self.baseline
        self.at_peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _used() -> int:
        memory = psutil.virtual_memory()
        return memory.total - memory.available

    @staticmethod
    def _by_process_kind() -> dict[str, float]:
        """RSS in GiB per kind of process: Ray's own name for its workers, else the program."""
        found: dict[str, float] = {}
        for process in psutil.process_iter(["cmdline", "memory_info"]):
            command = process.info["cmdline"] or []
            memory = process.info["memory_info"]
            if not command or memory is None:
                continue
            kind = command[0] if command[0].startswith("ray::") else Path(command[0]).name
            if "-c" in command and "worker_main" in " ".join(command):
                kind = "decode process"
            found[kind] = found.get(kind, 0.0) + memory.rss / GIB
        return {k: round(v, 3) for k, v in sorted(found.items(), key=lambda kv: -kv[1])[:8]}

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            used = self._used()
            if used > self.peak:
                self.peak, self.at_peak = used, self._by_process_kind()

    def __enter__(self) -> "NodeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def above_baseline_gib(self) -> float:
        return (self.peak - self.baseline) / GIB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--photos", type=int, default=CLASSES * (PER_CLASS + 10), help="photos of the set to score"
    )
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="model architecture")
    parser.add_argument("--batch", type=int, default=64, help="photos per forward pass")
    parser.add_argument("--limit-seconds", type=float, default=30.0)
    return parser.parse_args(argv)


def generated_photos(count: int) -> tuple[list[str], list[str]]:
    """The first `count` photos of the 84,000-photo set (made on first use) and its classes."""
    root = cache_root() / "bench" / "birds525-84k"
    if make_dataset(root, classes=CLASSES, per_class=PER_CLASS, image_size=224, seed=0,
                    workers=psutil.cpu_count() or 1):  # fmt: skip
        print(f"generated {root}", flush=True)
    photos = list_inputs(str(root))[:count]
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    return photos, classes


def timed_run(work: Path, model_dir: Path, photos: list[str], name: str) -> dict[str, float]:
    """One `jobs/predict.py` job over `photos` on a fresh local Ray, with the node's memory
    above what it used once Ray was up."""
    listing = work / f"{name}.txt"
    listing.write_text("\n".join(photos) + "\n")
    args = predict_cli.parse_args(
        ["--model", str(model_dir), "--input", str(listing), "--output",
         str(work / f"{name}.parquet"), "--overwrite"]
    )  # fmt: skip
    connect(address="local", include_dashboard=False)
    try:
        job = predict_cli.build_job(args, int(ray.cluster_resources()["CPU"]), local=True)
        with NodeMemory() as memory:
            summary = predict(job)
    finally:
        ray.shutdown()
    if summary.rows != len(photos) or summary.errors:
        raise RuntimeError(f"expected {len(photos)} rows without errors: {summary}")
    return {
        "photos": len(photos),
        "seconds": round(summary.seconds, 1),
        "photos_per_s": round(summary.images_per_s, 1),
        "peak_node_memory_gib": round(memory.above_baseline_gib, 3),
        "rss_gib_at_peak": memory.at_peak,
        "actors": f"{job.workers} model x {job.cpus_per_worker} CPU, "
        f"{job.decoders} decode x {job.decode_cpus:g} CPU",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    photos, classes = generated_photos(args.photos)
    cores = psutil.cpu_count() or 1
    precision = resolve_precision("auto", "cpu")
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        work = Path(tmp)
        model_dir = make_model_dir(work / "model", classes, preset=args.preset)
        sample = [Path(p).read_bytes() for p in photos[:: max(1, len(photos) // 512)]]
        limit = limit_images_per_second(
            model_dir, sample, args.batch, args.limit_seconds, cores, precision
        )
        print(f"limit: {limit:.1f} photos/s on {cores} threads, {precision.describe()}", flush=True)
        half = timed_run(work, model_dir, photos[: len(photos) // 2], "half")
        print(f"half: {half}", flush=True)
        full = timed_run(work, model_dir, photos, "all")
        print(f"all: {full}", flush=True)
    growth = full["peak_node_memory_gib"] / max(half["peak_node_memory_gib"], 1e-9) - 1
    results = {
        "preset": args.preset,
        "precision": precision.name,
        "limit_photos_per_s": round(limit, 1),
        "half": half,
        "all": full,
        "ours_over_limit": round(full["photos_per_s"] / limit, 3),
        "memory_growth_half_to_all": round(growth, 3),
    }
    targets = [
        target("photos/s over all / limit", results["ours_over_limit"], 0.85),
        target("peak node memory GiB (all)", full["peak_node_memory_gib"], 4.0, "<="),
        target("memory growth half -> all", abs(growth), 0.10, "<="),
    ]
    report("predict", results, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
