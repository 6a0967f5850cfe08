"""What one live-drift refresh costs to read a huge prediction log: time and Python memory.

Builds a 1 GiB log file: a hole (a sparse run of NUL bytes, as a crashed writer or a runaway log
leaves) and then more realistic records (five classes, a 64-number embedding each) than the
gauges' byte budget holds. Times `read_recent` with the budget serve/drift_gauges.py uses
(`DEFAULT_MAX_READ_BYTES`), three times, and traces the peak of the memory one read allocates.
Baseline: the same records read without a budget (the whole 1 GiB would be read; here only the
records' part is, since the hole parses to nothing, so the baseline is a lower bound).
Targets: one bounded read within 1 s and 64 MiB.

    python jobs/bench_log_read.py [--gib 1]
"""

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.benchlib.report import report, target
from serve.drift_gauges import DEFAULT_MAX_READ_BYTES
from vitbirds.monitoring.predictions import EMBEDDING_DIM, PredictionRecord, read_recent

WINDOW = timedelta(days=1)


def record_line(index: int, now: datetime, rng: random.Random) -> str:
    record = PredictionRecord(
        request_id=f"{index:032x}",
        model_name="vitbirds",
        model_version="v1",
        label="Barn_Swallow",
        confidence=rng.random(),
        top_k=[
            {"label": f"Species_{k}", "index": k, "probability": rng.random()} for k in range(5)
        ],
        embedding=[rng.gauss(0, 1) for _ in range(EMBEDDING_DIM)],
        time=(now - timedelta(seconds=index)).isoformat(),
    )
    return json.dumps(asdict(record), separators=(",", ":")) + "\n"


def write_log(path: Path, total_bytes: int, record_bytes: int) -> int:
    """A `total_bytes` file ending in `record_bytes` of records; returns how many records."""
    rng, now = random.Random(0), datetime.now(UTC)
    lines, size = [], 0
    while size < record_bytes:
        lines.append(record_line(len(lines), now, rng))
        size += len(lines[-1])
    body = ("\n" + "".join(reversed(lines))).encode()  # oldest first, as a log is written
    with path.open("wb") as handle:
        handle.truncate(total_bytes - len(body))
        handle.seek(total_bytes - len(body))
        handle.write(body)
    return len(lines)


def timed_read(path: Path, max_bytes: int | None) -> tuple[float, int, int]:
    started = time.perf_counter()
    contents = read_recent(path, WINDOW, max_bytes=max_bytes)
    return time.perf_counter() - started, len(contents.predictions), contents.bytes_read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the log file")
    args = parser.parse_args()
    budget = DEFAULT_MAX_READ_BYTES
    results: dict = {"load_average_before": os.getloadavg()[0], "budget_mib": budget / 2**20}
    with tempfile.TemporaryDirectory(prefix="bench_log_read_") as tmp:
        path = Path(tmp) / "predictions.jsonl"
        records = write_log(path, int(args.gib * 2**30), 2 * budget)
        results |= {"log_gib": path.stat().st_size / 2**30, "records_in_log": records}
        bounded = [timed_read(path, budget) for _ in range(3)]
        unbounded = [timed_read(path, None) for _ in range(3)]
        tracemalloc.start()
        read_recent(path, WINDOW, max_bytes=budget)
        peak_mib = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    seconds = statistics.median(t for t, _, _ in bounded)
    results |= {
        "bounded": {
            "seconds_median": round(seconds, 3),
            "records_read": bounded[0][1],
            "mib_read": round(bounded[0][2] / 2**20, 1),
            "python_peak_mib": round(peak_mib, 1),
        },
        "unbounded": {
            "seconds_median": round(statistics.median(t for t, _, _ in unbounded), 3),
            "records_read": unbounded[0][1],
            "mib_read": round(unbounded[0][2] / 2**20, 1),
        },
        "load_average_after": os.getloadavg()[0],
    }
    targets = [
        target("bounded read seconds", seconds, 1.0, "<="),
        target("bounded read python peak MiB", peak_mib, 64.0, "<="),
    ]
    report("log_read", results, targets)


if __name__ == "__main__":
    main()
