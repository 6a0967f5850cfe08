"""Hostile uploads by the thousand: what the decode budget (vitbirds/data/images.py) and the
sandboxed decoder (vitbirds/data/sandbox.py) let through, what it costs, and whether normal
requests are answered meanwhile.

Inputs: real photos (../shared/data/cub100/valid) and the first of them re-encoded in every allowed
format (JPEG, progressive JPEG, PNG, WebP, GIF, BMP, TIFF), mutated with jobs/benchlib/mutate.py
(truncations, header bit flips, rewritten dimension fields, lying chunk lengths, garbage), plus
hand-made hostile files (an extreme aspect ratio PNG of 138 bytes, RLE BMP, FITS, declared-size
bombs, a legitimate 64 MP PNG at the budget's edge).

1. decode path, side by side: `load_rgb` in this process (the baseline: same checks, no time or
   memory limit) and `DecodePool.decode` (ours): outcomes by exception type, worst time per file,
   and the sandbox's overhead on a normal photo (p50 of both).
2. the running service (serve/testing.py's start_app on a free port, a random-weight model):
   `--service-uploads` mutants and hostile files to /predict, a normal photo every
   `--normal-every` uploads with its latency; statuses, 4xx by reason, the Serve processes'
   RSS (replicas + their decode workers) sampled every 0.2 s.

Targets: any upload answered within 10 s; Serve processes' memory growth <= 1.5 GiB; 0 x 5xx;
a normal photo answered within 2 s after every hostile upload.

    python jobs/bench_fuzz.py [--decode-mutations 3000] [--service-uploads 300]
"""

import argparse
import collections
import io
import random
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import ray
import requests
from PIL import Image

from vitbirds.inference.stand_in import make_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ray import serve

from jobs.benchlib.data import add_data_argument, require_data
from jobs.benchlib.mutate import encode, mutations, png_header_only, seed_images
from jobs.benchlib.report import report, target
from serve.schemas import ServeSettings
from serve.testing import deployment_options, photo_classes, start_app
from vitbirds.data.images import load_rgb
from vitbirds.data.sandbox import DecodePool
from vitbirds.errors import ImageDecodeError

SHORT_SIDE = 258  # the vit-cpu/vit-test decode size: 224 * 1.15
GIB = 1024**3


def hostile_files() -> dict[str, bytes]:
    """Hand-made hostile files: declared-size bombs, extreme aspect ratios, refused formats and
    a flat 64 MP image."""
    rle = bytearray(encode(Image.new("P", (64, 64)), "BMP"))
    rle[30:34] = struct.pack("<I", 1)
    return {
        "aspect_1x5M_png": png_header_only(1, 5_000_000),
        "aspect_60Mx1_png": png_header_only(60_000_000, 1),
        "declared_40000x40000_png": png_header_only(40_000, 40_000),
        "declared_8500x8500_png": png_header_only(8500, 8500),
        "rle8_bmp": bytes(rle),
        "fits": b"SIMPLE  =                    T" + b" " * 2850,
        "flat_64MP_png": encode(Image.new("RGB", (8000, 8000), (30, 90, 40)), "PNG"),
    }


def corpus(photos: list[bytes], count: int, seed: int) -> list[tuple[str, str, bytes]]:
    """(source, kind, bytes): `count` mutants spread over the seed files, then the hostile files."""
    rng = random.Random(seed)
    sources = {f"photo{i}": p for i, p in enumerate(photos)}
    base = Image.open(io.BytesIO(photos[0])).convert("RGB")
    sources.update({f"seed_{k}": v for k, v in seed_images(base).items()})
    per_source = max(1, count // len(sources))
    items = [
        (name, kind, mutant)
        for name, data in sources.items()
        for kind, mutant in mutations(data, rng, per_source)
    ]
    items += [(name, "hostile", data) for name, data in hostile_files().items()]
    return items


def _decode_outcome(decode: Any, data: bytes) -> str:
    try:
        decode(data, short_side=SHORT_SIDE)
    except ImageDecodeError as error:
        return type(error).__name__
    except Exception as error:  # what the budget must never let out: a 5xx at the edge
        return f"UNEXPECTED {type(error).__name__}"
    return "decoded"


def _rss(processes: list[psutil.Process]) -> int:
    total = 0
    for p in processes:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def bench_decode(items: list[tuple[str, str, bytes]], photo: bytes) -> dict[str, Any]:
    """The sandbox first, then in-process: this process's RSS only grows, so the in-process
    run's peak would otherwise hide the sandbox's."""
    pool = DecodePool()
    me = psutil.Process()
    results: dict[str, Any] = {"inputs": len(items)}
    try:
        for name, decode in (("sandbox", pool.decode), ("in_process", load_rgb)):
            outcomes: collections.Counter[str] = collections.Counter()
            worst, worst_input = 0.0, ""
            started = time.perf_counter()
            with RssSampler(lambda: [me]) as parent, RssSampler(me.children) as workers:
                for source, kind, data in items:
                    t0 = time.perf_counter()
                    outcomes[_decode_outcome(decode, data)] += 1
                    elapsed = time.perf_counter() - t0
                    if elapsed > worst:
                        worst, worst_input = elapsed, f"{source}/{kind}"
            times = []
            for _ in range(50):
                t0 = time.perf_counter()
                decode(photo, short_side=SHORT_SIDE)
                times.append(time.perf_counter() - t0)
            results[name] = {
                "outcomes": dict(outcomes.most_common()),
                "unexpected": sum(v for k, v in outcomes.items() if k.startswith("UNEXPECTED")),
                "total_s": round(time.perf_counter() - started, 2),
                "worst_s": round(worst, 3),
                "worst_input": worst_input,
                "normal_photo_p50_ms": round(statistics.median(times) * 1e3, 2),
                "this_process_rss_growth_gib": round(parent.growth / GIB, 3),
                "decode_workers_peak_rss_gib": round(workers.peak / GIB, 3),
            }
            print(name, results[name], flush=True)
    finally:
        pool.close()
    return results


def serve_processes() -> list[psutil.Process]:
    """The Serve replicas and proxy started under this process (with their decode workers)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any("ServeReplica" in part or "ProxyActor" in part for part in p.cmdline()):
                found += [p, *p.children(recursive=True)]
        except psutil.Error:
            continue
    return found


class RssSampler:
    """Peak RSS of the processes `select` returns, sampled in a thread every `interval_s`."""

    def __init__(self, select: Any, interval_s: float = 0.05) -> None:
        self.select = select
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.baseline)

    def __enter__(self) -> "RssSampler":
        self.baseline = self.peak = _rss(self.select())
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, _rss(self.select()))


def bench_service(
    items: list[tuple[str, str, bytes]],
    photo: bytes,
    classes: list[str],
    uploads: int,
    normal_every: int,
    seed: int,
) -> dict[str, Any]:
    rng = random.Random(seed)
    chosen = [i for i in items if i[1] == "hostile"]
    chosen += rng.sample(items, min(len(items), uploads - len(chosen)))
    rng.shuffle(chosen)
    work = Path(tempfile.mkdtemp(prefix="bench_fuzz_"))
    model_dir = make_model_dir(work / "model", classes)
    settings = ServeSettings(
        model_dir=str(model_dir), prediction_log=str(work / "predictions.jsonl"), drift_interval_s=0
    )
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=300 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
    )
    statuses: collections.Counter[int] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    upload_times, normal_times, normal_failures = [], [], 0
    worst_input = ""
    try:
        url = start_app(settings, deployment_options(0.2))
        session = requests.Session()
        for _ in range(5):  # warm-up
            session.post(url + "/predict", files={"file": ("a.jpg", photo)}, timeout=60)
        with RssSampler(serve_processes, interval_s=0.2) as rss:
            for n, (source, kind, data) in enumerate(chosen):
                t0 = time.perf_counter()
                try:
                    response = session.post(
                        url + "/predict", files={"file": ("upload", data)}, timeout=60
                    )
                    status = response.status_code
                    reason = response.json().get("reason", "") if status != 200 else "ok"
                except (requests.RequestException, ValueError) as error:
                    status, reason = 599, f"no answer: {type(error).__name__}"
                elapsed = time.perf_counter() - t0
                if not upload_times or elapsed > max(upload_times):
                    worst_input = f"{source}/{kind}"
                upload_times.append(elapsed)
                statuses[status] += 1
                reasons[f"{status} {reason}"] += 1
                if n % normal_every == 0:
                    t0 = time.perf_counter()
                    good = session.post(
                        url + "/predict", files={"file": ("a.jpg", photo)}, timeout=60
                    )
                    normal_times.append(time.perf_counter() - t0)
                    normal_failures += good.status_code != 200
        return {
            "uploads": len(chosen),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "by_reason": dict(reasons.most_common()),
            "server_errors": sum(v for k, v in statuses.items() if k >= 500),
            "upload_max_s": round(max(upload_times), 3),
            "upload_p50_s": round(statistics.median(upload_times), 4),
            "worst_input": worst_input,
            "normal_requests": len(normal_times),
            "normal_failures": normal_failures,
            "normal_p50_s": round(statistics.median(normal_times), 4),
            "normal_max_s": round(max(normal_times), 3),
            "serve_rss_baseline_gib": round(rss.baseline / GIB, 3),
            "serve_rss_peak_gib": round(rss.peak / GIB, 3),
            "serve_rss_growth_gib": round(rss.growth / GIB, 3),
        }
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode-mutations", type=int, default=3000)
    parser.add_argument("--service-uploads", type=int, default=300)
    parser.add_argument("--normal-every", type=int, default=5)
    parser.add_argument("--photos", type=int, default=20, help="real photos used as seeds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-service", action="store_true")
    add_data_argument(parser, help="real photos (its valid split) seeding the mutations")
    args = parser.parse_args()

    valid = require_data(parser, args.data_dir) / "valid"
    photos = [
        sorted((valid / name).glob("*.jpg"))[0].read_bytes()
        for name in photo_classes(valid)[: args.photos]
    ]
    items = corpus(photos, args.decode_mutations, args.seed)
    results: dict[str, Any] = {"decode": bench_decode(items, photos[0])}
    decode = results["decode"]
    targets = [
        target("decode: unexpected exceptions (sandbox)", decode["sandbox"]["unexpected"], 0, "<="),
        target("decode: worst file seconds (sandbox)", decode["sandbox"]["worst_s"], 10.0, "<="),
    ]
    service: dict[str, Any] | None = None
    if not args.skip_service:
        try:
            service = bench_service(
                items, photos[0], photo_classes(valid), args.service_uploads, args.normal_every,
                args.seed,
            )  # fmt: skip
        except Exception as error:  # e.g. Ray cannot start on an overloaded machine: say so
            results["service"] = {"not_run": f"{type(error).__name__}: {error}"}
    if service is not None:
        results["service"] = service
        targets += [
            target("service: 5xx responses", service["server_errors"], 0, "<="),
            target("service: slowest upload seconds", service["upload_max_s"], 10.0, "<="),
            target("service: memory growth GiB", service["serve_rss_growth_gib"], 1.5, "<="),
            target("service: slowest normal photo seconds", service["normal_max_s"], 2.0, "<="),
            target("service: normal photos failed", service["normal_failures"], 0, "<="),
        ]
    results["note"] = "measured on a loaded machine" if psutil.getloadavg()[0] > 1 else "quiet"
    results["load_average_1m"] = round(psutil.getloadavg()[0], 2)
    report("fuzz", results, targets)


if __name__ == "__main__":
    main()
