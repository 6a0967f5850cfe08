"""Requests/s and latency of the Serve app on /predict, beside what the machine allows.

Three systems answer the same multipart uploads of real JPEGs (../shared/data/cub100/valid):

- limit: no HTTP at all: decode + eval transform + one forward per batch of `--batch`, in this
  process on every core. No server can beat it, so it is the yardstick.
- naive: one uvicorn process holding the model, a plain FastAPI endpoint, one forward per request.
  Two ways to write it: `def` (FastAPI's thread pool overlaps requests on every core) and
  `async def` (the model blocks the event loop, so requests run one at a time, with no thread
  hand-offs). Which is faster depends on the machine and its load; the target takes the faster.
- serve: serve/app.py with the deployment options of serve/config.yaml (batching, queues), in
  each `--serve-modes`, each in its own process and fresh local Ray, started with the mode's
  switches (Serve reads them when it is imported, in the driver as in every replica):
  `proxy`, Serve's default (HTTP -> Python proxy actor -> Ingress -> Classifier over actor
  calls), and `haproxy`, Serve's throughput-optimised mode (RAY_SERVE_ENABLE_HA_PROXY=1 and
  RAY_SERVE_THROUGHPUT_OPTIMIZED=1: HAProxy forwards HTTP straight to the Ingress replica's own
  server and replicas call each other over gRPC). The targets score the mode the deployment
  uses (the first of `--serve-modes`, default haproxy, as cluster/ sets it up).

Each runs at concurrency 1, 8 and 32 for `--seconds` after a warm-up; /explain is timed at
concurrency 1 beside /predict; then `--slow-senders` clients (140) connect and trickle their
bodies a byte a second while normal photos are sent one at a time (a slow-client attack).
The model is a `--preset` with random weights: speed does not depend on what the weights say.
Targets (at concurrency 32): Serve >= 0.6x limit and >= 1.5x naive, or, with a model that
dominates (vit-s16), >= 0.8x limit and >= 1.0x naive; /explain p50 <= 2x /predict p50; a lone
client's p50 <= 1.2x the faster naive server's; a normal photo answered within 2 s (p95) while
the slow senders are connected. Each /predict answer's Server-Timing header splits the lone
client's latency into its stages (`c1_where_the_time_goes_ms`).

`--precision` (default auto: bf16 on a CPU with AMX-BF16 or AVX512-BF16) applies to the
Classifier replicas, the naive servers and the limit alike, so every ratio compares like with
like. The Classifier's torch threads and precision are recorded from inside the replica
(/healthz): Ray sets a replica's OMP_NUM_THREADS to its num_cpus rounded down, so
`--classifier-threads 1` reproduces the configuration that ran vit-s16 at the one-thread rate.

    python jobs/bench_serve.py [--preset vit-cpu] [--seconds 10] [--concurrency 1 8 32]
                               [--serve-modes haproxy proxy] [--classifier-threads N]
"""

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import ray
import requests
import yaml

from vitbirds.inference.stand_in import make_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ray import serve

from jobs.benchlib.data import add_data_argument, require_data
from jobs.benchlib.limit import limit_images_per_second
from jobs.benchlib.report import report, target
from serve.schemas import ServeSettings
from serve.server_timing import parse_server_timing
from serve.testing import (
    SERVE_MODES,
    answer_status,
    free_port,
    photo_classes,
    private_haproxy_env,
    slow_sender,
    start_app,
)
from vitbirds.inference.scoring import BatchPredictor, ImagePreprocessor, top_k
from vitbirds.model.files import load_model
from vitbirds.paths import repo_root
from vitbirds.precision import PRECISIONS, Precision, resolve_precision

CONFIG = repo_root() / "serve" / "config.yaml"
# (serve / limit, serve / naive) at the top concurrency: a model that dominates leaves Serve's
# HTTP hops little to add, so it must come close to the limit and never lose to one process.
TARGETS = {"vit-s16": (0.8, 1.0)}
DEFAULT_TARGETS = (0.6, 1.5)


def load_photos(valid_dir: Path, count: int) -> list[bytes]:
    """`count` JPEGs spread over the classes (one per class, round after round)."""
    per_class = [sorted((valid_dir / name).glob("*.jpg")) for name in photo_classes(valid_dir)]
    photos: list[bytes] = []
    for round_ in range(max(len(files) for files in per_class)):
        for files in per_class:
            if round_ < len(files) and len(photos) < count:
                photos.append(files[round_].read_bytes())
    return photos


NAIVE_STYLES = ("threadpool", "async")


def naive_server(model_dir: str, port: int, style: str, precision: Precision) -> None:
    """The baseline: a FastAPI endpoint calling the model once per request, in one process."""
    import uvicorn
    from fastapi import FastAPI, UploadFile

    loaded = load_model(model_dir)
    preprocessor = ImagePreprocessor(loaded.metadata)
    predictor = BatchPredictor(loaded, "cpu", precision)
    api = FastAPI()

    def predict_bytes(data: bytes) -> dict[str, Any]:
        output = predictor([preprocessor.model_input(data)])[0]
        return {"predictions": top_k(output.probabilities, loaded.metadata.class_names, 5)}

    if style == "async":

        @api.post("/predict")
        async def predict_async(file: UploadFile) -> dict[str, Any]:
            return predict_bytes(await file.read())
    else:

        @api.post("/predict")
        def predict(file: UploadFile) -> dict[str, Any]:
            return predict_bytes(file.file.read())

    uvicorn.run(api, host="127.0.0.1", port=port, log_level="warning")


async def _load(url: str, photos: list[bytes], concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    timings: list[dict[str, float]] = []  # each answer's Server-Timing (Serve's only)
    failures: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker(offset: int, deadline: float) -> None:
            index = offset
            while time.perf_counter() < deadline:
                form = aiohttp.FormData()
                form.add_field("file", photos[index % len(photos)], filename="photo.jpg")
                started = time.perf_counter()
                async with session.post(url, data=form) as response:
                    await response.read()
                    status = response.status
                    timing = parse_server_timing(response.headers.get("Server-Timing", ""))
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                    if timing:
                        timings.append(timing)
                else:
                    failures[status] = failures.get(status, 0) + 1
                index += concurrency

        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*[worker(i, deadline) for i in range(concurrency)])
        elapsed = time.perf_counter() - started
    return _summary(latencies, failures, elapsed) | _stage_medians(timings)


def _summary(latencies: list[float], failures: dict[int, int], elapsed: float) -> dict:
    if len(latencies) < 2:
        return {"requests_per_s": 0.0, "ok": len(latencies), "failures": failures}
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p95_ms": round(1000 * cuts[94], 1),
        "p99_ms": round(1000 * cuts[98], 1),
        "ok": len(latencies),
        "failures": failures,
    }


def _stage_medians(timings: list[dict[str, float]]) -> dict:
    """The median of each Server-Timing stage, where the answers carried one."""
    if not timings:
        return {}
    stages = {stage: [t[stage] for t in timings if stage in t] for stage in timings[0]}
    return {"stage_p50_ms": {s: round(statistics.median(ms), 1) for s, ms in stages.items()}}


def measure(url: str, photos: list[bytes], concurrency: int, seconds: float, warmup: float):
    asyncio.run(_load(url, photos, concurrency, warmup))
    return asyncio.run(_load(url, photos, concurrency, seconds))


def _process_group(process: psutil.Process) -> str:
    """A Ray Serve replica by its deployment; other processes by their name."""
    title = process.name()
    if process.pid == os.getpid():
        return "load generator (this process)"
    if title.startswith("ray::ServeReplica:"):
        return title.rsplit(":", 1)[-1]
    parent = process.parent()
    if parent is not None and parent.name().startswith("ray::ServeReplica:"):
        return parent.name().rsplit(":", 1)[-1] + "'s decode workers"
    if title.startswith("ray::") or "ray" in " ".join(process.cmdline()[:2]):
        return "Ray's own processes"
    return "other"


def _cpu_seconds() -> dict[int, tuple[str, float]]:
    seconds = {}
    for process in psutil.process_iter():
        try:
            times = process.cpu_times()
            seconds[process.pid] = (_process_group(process), times.user + times.system)
        except psutil.Error:
            continue
    return seconds


def _classifier_rss_mib() -> list[int]:
    """Resident memory of each Classifier replica, after every measurement: what a replica at
    this precision holds once it has run batches of every size the load produced."""
    sizes = []
    for process in psutil.process_iter():
        try:
            if _process_group(process) == "Classifier":
                sizes.append(round(process.memory_info().rss / 2**20))
        except psutil.Error:
            continue
    return sorted(sizes)


def measure_with_cpu(
    url: str, photos: list[bytes], concurrency: int, seconds: float, warmup: float
):
    """`measure`, plus the cores each group of processes used meanwhile: where Serve's CPU goes
    besides the model."""
    asyncio.run(_load(url, photos, concurrency, warmup))
    before, started = _cpu_seconds(), time.perf_counter()
    result = asyncio.run(_load(url, photos, concurrency, seconds))
    after, elapsed = _cpu_seconds(), time.perf_counter() - started
    cores: dict[str, float] = {}
    for pid, (group, total) in after.items():
        if pid in before:
            cores[group] = cores.get(group, 0.0) + (total - before[pid][1]) / elapsed
    result["cpu_cores_by_process"] = {g: round(c, 3) for g, c in sorted(cores.items())}
    return result


async def _with_slow_senders(
    url: str, port: int, photos: list[bytes], senders: int, requests_: int
) -> dict[str, Any]:
    """Latency of `requests_` normal uploads, one at a time, while `senders` slow clients hold
    connections; and what the slow clients were answered."""
    stop = asyncio.Event()
    slow = asyncio.gather(*[slow_sender(port, stop) for _ in range(senders)])
    await asyncio.sleep(3)  # connected and trickling
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for index in range(requests_):
            form = aiohttp.FormData()
            form.add_field("file", photos[index % len(photos)], filename="photo.jpg")
            started = time.perf_counter()
            async with session.post(url, data=form) as response:
                await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1
            latencies.append(time.perf_counter() - started)
    stop.set()
    answers = await slow
    slow_statuses: dict[str, int] = {}
    for answer in answers:
        status = answer_status(answer)
        slow_statuses[status] = slow_statuses.get(status, 0) + 1
    return {
        "slow_senders": senders,
        "normal_statuses": statuses,
        "normal_p50_ms": round(1000 * statistics.median(latencies), 1),
        "normal_max_ms": round(1000 * max(latencies), 1),
        "normal_p95_ms": round(1000 * statistics.quantiles(latencies, n=20)[18], 1),
        "slow_sender_answers": slow_statuses,
    }


def wait_until_up(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            requests.get(url, timeout=2)
            return
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def deployment_options(classifier_replicas: int | None) -> dict[str, dict[str, Any]]:
    """serve/config.yaml's per-deployment options as Deployment.options() keywords; optionally a
    fixed number of Classifier replicas sharing the CPUs one replica asks for there (autoscaling
    reacts in tens of seconds, longer than one measurement)."""
    (application,) = yaml.safe_load(CONFIG.read_text())["applications"]
    options = {
        d["name"]: {k: v for k, v in d.items() if k != "name"} for d in application["deployments"]
    }
    if classifier_replicas:
        classifier = options["Classifier"]
        classifier.pop("autoscaling_config", None)
        classifier["num_replicas"] = classifier_replicas
        actor = classifier.setdefault("ray_actor_options", {})
        actor["num_cpus"] = actor.get("num_cpus", 1) / classifier_replicas
    return options


def bench_naive(args, model_dir: Path, photos: list[bytes], style: str) -> dict[str, dict]:
    port = free_port()
    command = [sys.executable, __file__, "--naive-server", str(model_dir), "--port", str(port)]
    command += ["--naive-style", style, "--precision", args.precision]
    server = subprocess.Popen(command)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/docs")
        url = f"http://127.0.0.1:{port}/predict"
        return {
            f"c{c}": measure(url, photos, c, args.seconds, args.warmup) for c in args.concurrency
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def bench_serve(args, model_dir: Path, work: Path, mode: str) -> dict[str, Any]:
    """One Serve mode in a child process started with the mode's switches in its environment.

    Serve reads them when `ray.serve` is imported, in the driver too: a handle built by a driver
    that imported Serve without them calls its replicas by reference (a 600-KB tensor through
    the object store) where `serve run` and the RayService, which have them from the start, use
    gRPC. Setting them in this process after its imports measured that slower path."""
    env = {**os.environ, **SERVE_MODES[mode]}
    # HAProxy gets its own files and ports, beside any other HAProxy on the machine (in a short
    # directory: its unix socket paths must stay under 97 characters).
    haproxy_dir = Path(tempfile.mkdtemp(prefix="vbhap-", dir="/tmp"))
    if mode == "haproxy":
        env |= private_haproxy_env(haproxy_dir)
    result = work / f"serve-{mode}.json"
    command = [
        sys.executable, __file__, "--serve-child", mode, "--model-dir", str(model_dir),
        "--result", str(result), "--seconds", str(args.seconds), "--warmup", str(args.warmup),
        "--concurrency", *map(str, args.concurrency), "--photos", str(args.photos),
        "--slow-senders", str(args.slow_senders),
        "--slow-sender-requests", str(args.slow_sender_requests),
        "--precision", args.precision,
    ]  # fmt: skip
    for flag, value in (
        ("--classifier-replicas", args.classifier_replicas),
        ("--classifier-threads", args.classifier_threads),
    ):
        command += [flag, str(value)] if value else []
    try:
        subprocess.run(command, env=env, check=True)
    finally:
        shutil.rmtree(haproxy_dir, ignore_errors=True)
    return json.loads(result.read_text())


def serve_child(args, photos: list[bytes]) -> None:
    """The `bench_serve` child: a fresh local Ray, the app, the measurements, into `--result`."""
    model_dir, work = Path(args.model_dir), Path(args.result).parent
    settings = ServeSettings(
        model_dir=str(model_dir),
        prediction_log=str(work / f"predictions-{args.serve_child}.jsonl"),
        torch_threads=args.classifier_threads,
        precision=args.precision,
    )
    # A small object store: only small tensors travel, and a big one is slow to set up.
    ray.init(object_store_memory=300 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        url = start_app(settings, deployment_options(args.classifier_replicas), port=port)
        health = requests.get(url + "/healthz", timeout=30).json()["classifier"]
        results: dict[str, Any] = {
            "classifier_torch_threads": health["torch_threads"],
            "classifier_precision": health["precision"],
        }
        results |= {
            f"c{c}": (measure_with_cpu if c == max(args.concurrency) else measure)(
                url + "/predict", photos, c, args.seconds, args.warmup
            )
            for c in args.concurrency
        }
        results["explain_c1"] = measure(url + "/explain", photos, 1, args.seconds, args.warmup)
        if args.slow_senders:
            results["slow_senders"] = asyncio.run(
                _with_slow_senders(
                    url + "/predict", port, photos, args.slow_senders, args.slow_sender_requests
                )
            )
        results["classifier_rss_mib"] = _classifier_rss_mib()
        Path(args.result).write_text(json.dumps(results))
    finally:
        serve.shutdown()
        ray.shutdown()


def c1_breakdown(c1: dict[str, Any]) -> dict[str, float]:
    """A lone client's median latency split by the stages' medians (Server-Timing): the forward
    pass, the wait and hops inside the Classifier replica, the Ingress→Classifier call around
    it, the Ingress's own stages, and what none of them saw (HTTP, HAProxy or the proxy)."""
    stages = c1.get("stage_p50_ms", {})
    if not stages:
        return {}
    ingress = sum(stages[s] for s in ("read", "decode", "classifier", "record"))
    return {
        "forward_batch": stages["classifier-batch"],
        "in_classifier_replica_besides_batch": round(
            stages["classifier-replica"] - stages["classifier-batch"], 1
        ),
        "ingress_to_classifier_call_besides_replica": round(
            stages["classifier"] - stages["classifier-replica"], 1
        ),
        "ingress_read_decode_record": round(
            stages["read"] + stages["decode"] + stages["record"], 1
        ),
        "outside_the_ingress": round(c1["p50_ms"] - ingress, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vit-cpu")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32, help="batch of the limit measurement")
    parser.add_argument(
        "--classifier-replicas", type=int, help="fixed Classifier replicas (default: config's)"
    )
    parser.add_argument(
        "--classifier-threads",
        type=int,
        help="torch threads per Classifier replica (default: its num_cpus rounded up)",
    )
    parser.add_argument(
        "--slow-senders", type=int, default=140, help="slow clients connected (0: skip)"
    )
    parser.add_argument(
        "--slow-sender-requests", type=int, default=10, help="normal uploads meanwhile"
    )
    parser.add_argument(
        "--serve-modes",
        nargs="+",
        choices=list(SERVE_MODES),
        default=list(SERVE_MODES),
        help="Serve set-ups to measure; the first is scored against the targets",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=ServeSettings.precision,
        help="of the Classifier replicas, the naive servers and the limit alike "
        f"(default: {ServeSettings.precision})",
    )
    add_data_argument(parser, help="real photos (its valid split) sent as uploads")
    parser.add_argument("--naive-server", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--serve-child", choices=list(SERVE_MODES), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--naive-style", choices=NAIVE_STYLES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    precision = resolve_precision(args.precision, "cpu")
    if args.naive_server:
        naive_server(args.naive_server, args.port, args.naive_style, precision)
        return
    if 1 not in args.concurrency:
        parser.error("--concurrency must include 1: /explain is compared at concurrency 1")

    valid = require_data(parser, args.data_dir) / "valid"
    photos = load_photos(valid, args.photos)
    if args.serve_child:
        serve_child(args, photos)
        return
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        work = Path(tmp)
        model_dir = make_model_dir(work / "model", photo_classes(valid), preset=args.preset)
        # The best of one thread and every core: more threads lose on a busy machine.
        limits = {
            threads: limit_images_per_second(
                model_dir, photos, args.batch, args.seconds, threads, precision
            )
            for threads in sorted({1, os.cpu_count() or 1})
        }
        limit = max(limits.values())
        naive = {style: bench_naive(args, model_dir, photos, style) for style in NAIVE_STYLES}
        # Ray runs only under the Serve measurements: the limit and the naive server get the
        # machine to themselves, which can only favour them.
        served = {mode: bench_serve(args, model_dir, work, mode) for mode in args.serve_modes}

    top = f"c{max(args.concurrency)}"
    scored_mode = args.serve_modes[0]
    serve_rps = served[scored_mode][top]["requests_per_s"]
    naive_rps = {style: max(naive[style][top]["requests_per_s"], 1e-9) for style in NAIVE_STYLES}
    predict_p50 = served[scored_mode]["c1"]["p50_ms"]
    naive_c1_p50 = min(naive[style]["c1"]["p50_ms"] for style in NAIVE_STYLES)
    results = {
        "preset": args.preset,
        "precision": precision.describe(),
        "photos": len(photos),
        "seconds": args.seconds,
        # Other work on the machine skews every number: its load, before and after.
        "load_average_1min": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],
        "limit_images_per_s": round(limit, 2),
        "limit_images_per_s_by_threads": {t: round(v, 2) for t, v in limits.items()},
        "serve_classifier": {
            "replicas": args.classifier_replicas or "config (autoscaling)",
            "torch_threads": args.classifier_threads or "num_cpus rounded up",
        },
        "serve_mode_scored": scored_mode,
        "serve": served,
        "naive": naive,
        f"serve_{top}_over_limit": round(serve_rps / limit, 3),
        f"serve_{top}_over_naive": round(serve_rps / max(naive_rps.values()), 3),
        f"serve_{top}_over_naive_threadpool": round(serve_rps / naive_rps["threadpool"], 3),
        f"serve_{top}_over_naive_async": round(serve_rps / naive_rps["async"], 3),
        "explain_p50_over_predict_p50": round(
            served[scored_mode]["explain_c1"]["p50_ms"] / predict_p50, 3
        ),
        "c1_p50_over_naive_c1_p50": round(predict_p50 / naive_c1_p50, 3),
        "c1_where_the_time_goes_ms": c1_breakdown(served[scored_mode]["c1"]),
    }
    over_limit, over_naive = TARGETS.get(args.preset, DEFAULT_TARGETS)
    targets = [
        target(f"serve {top} / limit", results[f"serve_{top}_over_limit"], over_limit),
        target(f"serve {top} / naive", results[f"serve_{top}_over_naive"], over_naive),
        target("explain p50 / predict p50", results["explain_p50_over_predict_p50"], 2.0, "<="),
        target("c1 p50 / naive c1 p50", results["c1_p50_over_naive_c1_p50"], 1.2, "<="),
    ]
    if args.slow_senders:
        slow = served[scored_mode]["slow_senders"]
        targets.append(
            target(
                f"photo p95 s with {args.slow_senders} slow senders",
                slow["normal_p95_ms"] / 1000,
                2.0,
                "<=",
            )
        )
    report("serve", results, targets)


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()
