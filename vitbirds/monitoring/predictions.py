"""The prediction log: what Serve predicted, and the true labels users sent back.

Serve appends one JSON object per line (JSON Lines, UTF-8); the monitoring job reads the file to
watch the confidence, class mix and embedding drift of live traffic. Two kinds of line:

    {"kind": "prediction", "time": "2025-01-31T12:00:00.123456+00:00", "request_id": "3f2a...",
     "model_name": "vitbirds", "model_version": "2025-01-30T10:00:00+00:00", "endpoint": "predict",
     "label": "Barn_Swallow", "confidence": 0.91,
     "top_k": [{"label": "Barn_Swallow", "index": 7, "probability": 0.91}, ...],
     "embedding": [0.12, -0.40, ...]}        # EMBEDDING_DIM floats, see `EmbeddingProjector`
    {"kind": "feedback", "time": "...", "request_id": "3f2a...", "label": "Cliff_Swallow"}

`time` is UTC ISO 8601. `label`/`confidence` are the top-1 prediction. `embedding` is the model's
CLS embedding projected to a few dimensions by a fixed seeded random matrix (Johnson-Lindenstrauss:
distances survive, the log stays small); anyone who wants comparable vectors (e.g. a reference
profile from the training set) projects with `EmbeddingProjector(dim)` and the same seed. A feedback
line attaches a true label to an earlier prediction by its request id; the last one wins.

Each append is one `write` to a file opened for appending, so several writers on one host do not
interleave; the reader skips lines it cannot parse (a writer killed mid-line) and counts them.
Serve appends from a background thread (`BackgroundPredictionLog`) so a slow disk or a FUSE
bucket mount never stalls a request, and records that queue up meanwhile go out in one write;
the queue is bounded, and what it drops is counted.

The log is bounded (`LogRotation`): when the file would pass `max_bytes`, or was begun more than
`max_age_s` ago, it is renamed `predictions.<UTC time of the rename>.jsonl` and a new one
begun; only the newest `keep` renamed files are kept. Serve stores a fixed `LOGGED_TOP_K` classes
per record whatever the client asked. `read_log` reads the whole set in time order (the monitoring
job); `read_recent` reads newest-first only the files that cover the window being assessed.
"""

import fcntl
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import torch

EMBEDDING_DIM = 32
EMBEDDING_SEED = 0
LOG_FILE_NAME = "predictions.jsonl"
LOG_PATH_ENV = "VITBIRDS_PREDICTION_LOG"
LOGGED_TOP_K = 5  # classes stored per prediction, however many the client asked for
_ROTATED_STAMP = "%Y%m%dT%H%M%S%fZ"

logger = logging.getLogger(__name__)


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class PredictionRecord:
    request_id: str
    model_name: str
    model_version: str
    label: str
    confidence: float
    top_k: list[dict[str, Any]]  # {"label", "index", "probability"}, most probable first
    embedding: list[float]
    endpoint: str = "predict"
    time: str = field(default_factory=now_iso)
    kind: str = "prediction"


@dataclass
class FeedbackRecord:
    request_id: str
    label: str
    time: str = field(default_factory=now_iso)
    kind: str = "feedback"


@dataclass
class PredictionLogContents:
    """A log read back: predictions in file order with any feedback label joined on."""

    predictions: list[PredictionRecord]
    true_labels: dict[str, str]  # request_id -> the last feedback label
    skipped_lines: int  # unparseable lines (e.g. cut off by a crash)
    bytes_read: int = 0
    truncated: bool = False  # a byte budget cut the reading short of what was asked

    def labelled(self) -> list[tuple[PredictionRecord, str]]:
        """Predictions that received feedback, with their true label."""
        return [
            (record, self.true_labels[record.request_id])
            for record in self.predictions
            if record.request_id in self.true_labels
        ]


class EmbeddingProjector:
    """A fixed random projection dim -> EMBEDDING_DIM; the same seed gives the same matrix on every
    machine (torch's CPU generator is deterministic), so logs from several replicas compare."""

    def __init__(self, dim: int, out_dim: int = EMBEDDING_DIM, seed: int = EMBEDDING_SEED) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.matrix = torch.randn(dim, out_dim, generator=generator) / out_dim**0.5

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[B, dim] -> [B, out_dim] (float32, on the CPU)."""
        return embeddings.detach().float().cpu() @ self.matrix


def log_path(model_dir: str | Path, configured: str | Path | None = None) -> Path:
    """Where the log of a model directory goes: `$VITBIRDS_PREDICTION_LOG` (containers set it),
    else `configured`, else `predictions.jsonl` beside the model directory (one log for every
    version: each record names its model version)."""
    chosen = os.environ.get(LOG_PATH_ENV) or configured
    return Path(chosen) if chosen else Path(model_dir).resolve().parent / LOG_FILE_NAME


Record = PredictionRecord | FeedbackRecord


@dataclass
class LogRotation:
    max_bytes: int = 64 * 1024 * 1024  # about 60,000 predictions
    max_age_s: float = 24 * 3600.0  # a file begun longer ago than this (wall clock): rotate
    keep: int = 14  # rotated files kept; older ones are deleted


def rotated_files(path: str | Path) -> list[tuple[datetime, Path]]:
    """The log's rotated files with the time each was closed, oldest first."""
    path = Path(path)
    found = []
    for candidate in path.parent.glob(f"{path.stem}.*{path.suffix}"):
        stamp = candidate.name[len(path.stem) + 1 : len(candidate.name) - len(path.suffix)]
        try:
            closed = datetime.strptime(stamp, _ROTATED_STAMP).replace(tzinfo=UTC)
        except ValueError:
            continue
        found.append((closed, candidate))
    return sorted(found)


def log_files(path: str | Path) -> list[Path]:
    """Every file of the log, oldest first: the rotated ones, then the one being written."""
    path = Path(path)
    return [p for _, p in rotated_files(path)] + ([path] if path.exists() else [])


class PredictionLog:
    """Appends records as JSON lines, rotating the file as `rotation` says; safe to share between
    threads of one process, and between processes on one host (rotation takes a file lock)."""

    def __init__(self, path: str | Path, rotation: LogRotation | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rotation = rotation or LogRotation()
        self._lock = threading.Lock()
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._current: tuple[int, float] | None = None  # (inode, wall-clock time it was begun)

    def append(self, *records: Record) -> None:
        text = "".join(json.dumps(asdict(r), separators=(",", ":")) + "\n" for r in records)
        with self._lock, self._lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._rotate_if_due(len(text.encode()))
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(text)

    def _rotate_if_due(self, incoming: int) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return
        if stat.st_size == 0:
            return
        too_big = stat.st_size + incoming > self.rotation.max_bytes
        too_old = time.time() - self._began(stat.st_ino) > self.rotation.max_age_s
        if not (too_big or too_old):
            return
        stamp = datetime.now(UTC).strftime(_ROTATED_STAMP)
        self.path.rename(self.path.with_name(f"{self.path.stem}.{stamp}{self.path.suffix}"))
        for _, old in rotated_files(self.path)[: -self.rotation.keep or None]:
            old.unlink(missing_ok=True)

    def _began(self, inode: int) -> float:
        """When the current file was begun, by the wall clock (records may carry other times):
        the last rotation's time, else when this process first saw the file."""
        if self._current is None or self._current[0] != inode:
            rotated = rotated_files(self.path)
            began = rotated[-1][0].timestamp() if rotated else time.time()
            self._current = (inode, began)
        return self._current[1]


def parse_time(text: object) -> datetime | None:
    """A record's `time` as an aware UTC datetime; None if it is not ISO 8601."""
    try:
        moment = datetime.fromisoformat(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class BackgroundPredictionLog:
    """`submit` returns at once; a thread appends everything queued so far in one write.

    The queue holds at most `max_queued` records, so a disk or bucket mount that stalls costs
    bounded memory: past it a record is dropped, not the request. Dropped records (queue full,
    or a failed write, which is logged) are counted in `dropped` and reported to `on_drop`, for
    a metric. `close()` writes what is queued and stops the thread: a graceful shutdown loses
    nothing that was answered.
    """

    def __init__(
        self,
        log: PredictionLog,
        *,
        max_queued: int = 10_000,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        self.log = log
        self.on_drop = on_drop
        self.dropped = 0
        self._drop_lock = threading.Lock()  # submit (event loop) and the writer both count
        self._queue: queue.Queue[Record | None] = queue.Queue(maxsize=max_queued)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    @property
    def path(self) -> Path:
        return self.log.path

    def submit(self, record: Record) -> None:
        if self._closed:
            self._drop(1)
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._drop(1)

    def close(self, timeout_s: float = 10.0) -> bool:
        """Writes what is queued, then stops; False if that took longer than `timeout_s`."""
        if not self._closed:
            self._closed = True
            try:
                self._queue.put(None, timeout=timeout_s)  # the writer stops when it reaches this
            except queue.Full:  # the writer is stuck on a write
                return False
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _drop(self, count: int) -> None:
        with self._drop_lock:
            self.dropped += count
        if self.on_drop is not None:
            self.on_drop(count)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = None in batch
            records = [r for r in batch if r is not None]
            if not records:
                continue
            try:
                self.log.append(*records)
            except OSError:
                logger.exception("dropped %d records for %s", len(records), self.log.path)
                self._drop(len(records))


def iter_log(path: str | Path, start: int = 0) -> Iterator[dict[str, Any] | None]:
    """Each line's object, or None for a line that is not a JSON object. From `start` (a byte
    offset), the line it falls in is skipped: reading begins at the next whole line."""
    with Path(path).open("rb") as handle:
        if start > 0:
            handle.seek(start - 1)
            handle.readline()  # the rest of the line that `start` falls in (or its newline)
        for line in handle:
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                yield None
                continue
            yield value if isinstance(value, dict) else None


def read_log(path: str | Path) -> PredictionLogContents:
    """Reads the whole log, rotated files included, in time order; an absent log reads as empty
    (no traffic yet)."""
    return _read_files(log_files(path))


def read_recent(
    path: str | Path,
    window: timedelta,
    *,
    min_predictions: int = 0,
    model_version: str | None = None,
    max_bytes: int | None = None,
) -> PredictionLogContents:
    """The log's newest files, read newest-first until what was read reaches back `window` before
    the newest prediction and holds at least `min_predictions` (of `model_version`, if given).

    What `recent()` of vitbirds.monitoring.assess then keeps is the same as from the whole log,
    while the cost stays that of the files covering the window, however long the log. With
    `max_bytes`, at most that many bytes are read (the newest ones: the oldest file reached is
    read from its tail) and `truncated` says when the budget, not the window, ended the reading:
    however large the files, one read costs a bounded time and memory.
    """
    parts: list[PredictionLogContents] = []
    newest: datetime | None = None
    count = 0
    budget = max_bytes
    for file in reversed(log_files(path)):
        try:
            size = file.stat().st_size
        except FileNotFoundError:  # rotated away or deleted while we listed
            continue
        start = max(0, size - budget) if budget is not None else 0
        part = _read_files([file], start)
        part.bytes_read = size - start
        part.truncated = start > 0
        parts.append(part)
        if budget is not None:
            budget -= part.bytes_read
            if part.truncated or budget <= 0:
                part.truncated = True
                break
        times = [
            moment
            for r in part.predictions
            if (model_version is None or r.model_version == model_version)
            and (moment := parse_time(r.time)) is not None
        ]
        if not times:
            continue
        count += len(times)
        newest = newest or max(times)
        if count >= min_predictions and min(times) <= newest - window:
            break
    merged = PredictionLogContents(predictions=[], true_labels={}, skipped_lines=0)
    for part in reversed(parts):
        merged.predictions.extend(part.predictions)
        merged.true_labels.update(part.true_labels)
        merged.skipped_lines += part.skipped_lines
        merged.bytes_read += part.bytes_read
        merged.truncated |= part.truncated
    return merged


def _read_files(paths: list[Path], start: int = 0) -> PredictionLogContents:
    contents = PredictionLogContents(predictions=[], true_labels={}, skipped_lines=0)
    for path in paths:
        try:
            _read_into(contents, path, start)
        except FileNotFoundError:  # rotated away or deleted while we listed
            continue
    return contents


def _read_into(contents: PredictionLogContents, path: Path, start: int = 0) -> None:
    for value in iter_log(path, start):
        try:
            if value is None:
                raise TypeError("not a JSON object")
            if value.get("kind") == "prediction":
                contents.predictions.append(PredictionRecord(**value))
            elif value.get("kind") == "feedback":
                feedback = FeedbackRecord(**value)
                contents.true_labels[feedback.request_id] = feedback.label
            else:
                raise TypeError(f"unknown kind {value.get('kind')!r}")
        except (TypeError, ValueError):
            contents.skipped_lines += 1
