"""The prediction log (vitbirds.monitoring.predictions) that Serve writes and the monitoring
job reads."""

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch

from vitbirds.monitoring import predictions
from vitbirds.monitoring.predictions import (
    EMBEDDING_DIM,
    LOG_PATH_ENV,
    BackgroundPredictionLog,
    EmbeddingProjector,
    FeedbackRecord,
    LogRotation,
    PredictionLog,
    PredictionRecord,
    log_files,
    log_path,
    read_log,
    read_recent,
    rotated_files,
)
from vitbirds.monitoring.request_index import RequestIndex


def _prediction(
    request_id: str, label: str = "Barn_Swallow", time: datetime | None = None
) -> PredictionRecord:
    record = PredictionRecord(
        request_id=request_id,
        model_name="vitbirds",
        model_version="v1",
        label=label,
        confidence=0.9,
        top_k=[{"label": label, "index": 3, "probability": 0.9}],
        embedding=[0.0] * EMBEDDING_DIM,
    )
    if time is not None:
        record.time = time.isoformat()
    return record


def test_feedback_joins_its_prediction_and_the_last_label_wins(tmp_path):
    log = PredictionLog(tmp_path / "predictions.jsonl")
    log.append(_prediction("a"), _prediction("b"))
    log.append(FeedbackRecord("a", "Cliff_Swallow"))
    log.append(FeedbackRecord("a", "Tree_Swallow"))
    contents = read_log(log.path)
    assert [r.request_id for r in contents.predictions] == ["a", "b"]
    assert [(r.request_id, label) for r, label in contents.labelled()] == [("a", "Tree_Swallow")]


def test_lines_cut_off_or_foreign_are_skipped_and_counted(tmp_path):
    log = PredictionLog(tmp_path / "predictions.jsonl")
    log.append(_prediction("a"))
    with log.path.open("a") as handle:
        handle.write('[1, 2]\n{"kind": "mystery"}\n{"kind": "prediction", "request_id": "x"}\n')
        handle.write('{"kind": "predic')  # a writer killed mid-line
    contents = read_log(log.path)
    assert [r.request_id for r in contents.predictions] == ["a"]
    assert contents.skipped_lines == 4


def test_an_absent_log_reads_as_empty(tmp_path):
    contents = read_log(tmp_path / "none.jsonl")
    assert contents.predictions == [] and contents.skipped_lines == 0


def test_background_log_writes_every_record_in_order(tmp_path):
    log = BackgroundPredictionLog(PredictionLog(tmp_path / "sub" / "predictions.jsonl"))
    for i in range(200):
        log.submit(_prediction(str(i)))
    deadline = time.monotonic() + 10
    while len(read_log(log.path).predictions) < 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [r.request_id for r in read_log(log.path).predictions] == [str(i) for i in range(200)]


def test_closing_the_background_log_writes_everything_submitted_before_it(tmp_path):
    log = BackgroundPredictionLog(PredictionLog(tmp_path / "predictions.jsonl"))
    for i in range(500):
        log.submit(_prediction(str(i)))
    assert log.close()  # no waiting for the writer to catch up first
    assert [r.request_id for r in read_log(log.path).predictions] == [str(i) for i in range(500)]
    log.submit(_prediction("late"))  # after close: counted, not written, not an error
    assert log.dropped == 1 and len(read_log(log.path).predictions) == 500


class _StalledLog(PredictionLog):
    """A log whose writes wait for `release` (a disk or a bucket mount that stalls)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.release = threading.Event()

    def append(self, *records) -> None:
        self.release.wait(timeout=30)
        super().append(*records)


def test_a_stalled_log_drops_and_counts_past_its_queue_bound_then_writes_the_rest(tmp_path):
    stalled = _StalledLog(tmp_path / "predictions.jsonl")
    counted: list[int] = []
    log = BackgroundPredictionLog(stalled, max_queued=10, on_drop=counted.append)
    log.submit(_prediction("first"))  # taken by the writer, which then stalls on it
    deadline = time.monotonic() + 10
    while not log._queue.empty():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for i in range(25):
        log.submit(_prediction(str(i)))  # 10 fit in the queue; 15 are dropped at once
    assert log.dropped == 15 and sum(counted) == 15
    stalled.release.set()
    assert log.close()
    written = [r.request_id for r in read_log(stalled.path).predictions]
    assert written == ["first"] + [str(i) for i in range(10)]


def test_embedding_projection_is_the_same_everywhere_and_keeps_distances():
    embeddings = torch.randn(50, 192, generator=torch.Generator().manual_seed(1))
    first, second = EmbeddingProjector(192), EmbeddingProjector(192)
    projected = first(embeddings)
    assert projected.shape == (50, EMBEDDING_DIM)
    torch.testing.assert_close(projected, second(embeddings))
    assert not torch.allclose(projected, EmbeddingProjector(192, seed=1)(embeddings))
    ratio = torch.pdist(projected) / torch.pdist(embeddings)
    assert 0.5 < ratio.median() < 1.5  # Johnson-Lindenstrauss: distances roughly kept


def test_log_path_prefers_the_environment_then_the_setting(tmp_path, monkeypatch):
    model_dir = tmp_path / "models" / "v1"
    monkeypatch.delenv(LOG_PATH_ENV, raising=False)
    assert log_path(model_dir) == (tmp_path / "models" / "predictions.jsonl").resolve()
    assert log_path(model_dir, "/data/log.jsonl") == Path("/data/log.jsonl")
    monkeypatch.setenv(LOG_PATH_ENV, "/env/log.jsonl")
    assert log_path(model_dir, "/data/log.jsonl") == Path("/env/log.jsonl")


@pytest.mark.parametrize("bad", ["not json", "[]", "null"])
def test_reader_never_raises_on_garbage(tmp_path, bad):
    path = tmp_path / "predictions.jsonl"
    path.write_text(bad + "\n")
    assert read_log(path).skipped_lines == 1


# --- a bounded log -----------------------------------------------------------------------------

_RECORD_BYTES = len(json.dumps(_prediction("0000").__dict__)) + 40  # one line, with margin


def test_the_log_rotates_by_size_and_keeps_only_the_newest_files(tmp_path):
    rotation = LogRotation(max_bytes=3 * _RECORD_BYTES, max_age_s=1e9, keep=2)
    log = PredictionLog(tmp_path / "predictions.jsonl", rotation)
    for i in range(20):
        log.append(_prediction(f"{i:04d}"))
    assert len(rotated_files(log.path)) == 2
    assert all(p.stat().st_size <= rotation.max_bytes for p in log_files(log.path))
    kept = [r.request_id for r in read_log(log.path).predictions]
    assert kept == [f"{i:04d}" for i in range(20 - len(kept), 20)]  # the newest, in order
    assert len(kept) < 20


def test_the_log_rotates_by_age_on_the_wall_clock(tmp_path, monkeypatch):
    log = PredictionLog(tmp_path / "predictions.jsonl", LogRotation(max_age_s=3600))
    log.append(_prediction("first"))
    log.append(_prediction("back-dated", time=datetime.now(UTC) - timedelta(days=30)))
    assert rotated_files(log.path) == []  # old record times alone do not rotate
    real_time = time.time()
    monkeypatch.setattr(predictions.time, "time", lambda: real_time + 7200)
    log.append(_prediction("two hours later"))
    assert len(rotated_files(log.path)) == 1
    assert [r.request_id for r in read_log(log.path).predictions] == [
        "first",
        "back-dated",
        "two hours later",
    ]


def test_read_recent_stops_at_the_files_older_than_the_window(tmp_path):
    """Three rotated files a day apart; a one-hour window reads only the newest file, unless
    it must reach back for `min_predictions`."""
    log = PredictionLog(tmp_path / "predictions.jsonl", LogRotation(max_bytes=4 * _RECORD_BYTES))
    now = datetime.now(UTC)
    for day in (3, 2, 1):
        log.append(*[_prediction(f"d{day}-{i}", time=now - timedelta(days=day)) for i in range(3)])
    log.append(*[_prediction(f"now-{i}", time=now - timedelta(minutes=i)) for i in range(3)])
    assert len(log_files(log.path)) == 4
    recent = read_recent(log.path, timedelta(hours=1))
    assert {r.request_id for r in recent.predictions} == {
        "now-0",
        "now-1",
        "now-2",
        "d1-0",
        "d1-1",
        "d1-2",
    }
    wider = read_recent(log.path, timedelta(hours=1), min_predictions=8)
    assert len(wider.predictions) == 9  # one more file: 3 + 3 + 3
    assert len(read_log(log.path).predictions) == 12


def test_read_recent_reads_at_most_its_byte_budget_newest_first(tmp_path):
    """Six files of three records: a budget of four records' bytes reads the newest file whole
    and the tail of the one before it, and says it stopped short."""
    log = PredictionLog(tmp_path / "predictions.jsonl", LogRotation(max_bytes=4 * _RECORD_BYTES))
    now = datetime.now(UTC)
    for file in range(6):
        log.append(
            *[_prediction(f"{file}-{i}", time=now - timedelta(seconds=6 - file)) for i in range(3)]
        )
    assert len(log_files(log.path)) == 6
    budget = 4 * _RECORD_BYTES
    recent = read_recent(log.path, timedelta(days=1), max_bytes=budget)
    assert recent.truncated and recent.bytes_read <= budget
    ids = [r.request_id for r in recent.predictions]
    assert ids[-3:] == ["5-0", "5-1", "5-2"] and 1 <= len(ids) - 3 <= 2
    assert all(i.startswith("4-") for i in ids[:-3])  # whole lines of the file before, its newest
    assert recent.skipped_lines == 0  # the line the budget cut into is left out, not misread
    whole = read_recent(log.path, timedelta(days=1))
    assert len(whole.predictions) == 18 and not whole.truncated


def test_read_recent_of_a_gigabyte_log_reads_only_its_budget(tmp_path):
    """A 1 GiB log file (sparse: a crashed writer's hole, then real records) costs a refresh its
    byte budget, not the file: the newest records come back, the rest is never read."""
    path = tmp_path / "predictions.jsonl"
    with path.open("wb") as handle:
        handle.truncate(2**30)
        handle.seek(2**30)
        now = datetime.now(UTC)
        lines = [json.dumps(_prediction(f"r{i}", time=now).__dict__) for i in range(100)]
        handle.write(("\n" + "\n".join(lines) + "\n").encode())
    budget = 64 * 2**20
    recent = read_recent(path, timedelta(hours=1), max_bytes=budget)
    assert recent.bytes_read == budget and recent.truncated
    assert [r.request_id for r in recent.predictions] == [f"r{i}" for i in range(100)]


def test_a_log_line_that_is_not_utf8_is_skipped_and_counted(tmp_path):
    path = tmp_path / "predictions.jsonl"
    good = json.dumps(_prediction("ok").__dict__)
    path.write_bytes(b"\xff\xfe{broken\n" + good.encode() + b"\n")
    contents = read_log(path)
    assert [r.request_id for r in contents.predictions] == ["ok"]
    assert contents.skipped_lines == 1


def test_feedback_in_a_newer_file_joins_a_prediction_in_an_older_one(tmp_path):
    log = PredictionLog(tmp_path / "predictions.jsonl", LogRotation(max_bytes=_RECORD_BYTES))
    log.append(_prediction("a"))
    log.append(FeedbackRecord("a", "Cliff_Swallow"))
    assert len(log_files(log.path)) == 2
    assert read_log(log.path).labelled()[0][1] == "Cliff_Swallow"
    assert read_recent(log.path, timedelta(hours=1)).true_labels == {"a": "Cliff_Swallow"}


# --- the request index behind POST /feedback ---------------------------------------------------


def test_request_index_follows_the_log_through_rotation(tmp_path):
    log = PredictionLog(tmp_path / "predictions.jsonl", LogRotation(max_bytes=2 * _RECORD_BYTES))
    log.append(_prediction("before"))
    index = RequestIndex(log.path, timedelta(hours=1))
    assert index.lookup("before") is not None
    for i in range(5):  # several rotations after the index opened the file
        log.append(_prediction(f"after-{i}"))
    assert len(rotated_files(log.path)) >= 2
    assert all(index.lookup(f"after-{i}") is not None for i in range(5))
    assert index.lookup("never") is None


def test_request_index_knows_labelled_ids_and_labels_only_once(tmp_path):
    log = PredictionLog(tmp_path / "predictions.jsonl")
    log.append(_prediction("a"), _prediction("b"), FeedbackRecord("a", "Tree_Swallow"))
    index = RequestIndex(log.path, timedelta(hours=1))
    assert index.lookup("a").labelled and not index.lookup("b").labelled
    assert not index.mark_labelled("a")
    assert index.mark_labelled("b") and not index.mark_labelled("b")


def test_request_index_forgets_old_and_excess_predictions(tmp_path):
    log = PredictionLog(tmp_path / "predictions.jsonl")
    log.append(_prediction("stale", time=datetime.now(UTC) - timedelta(hours=2)))
    log.append(*[_prediction(f"p{i}") for i in range(10)])
    index = RequestIndex(log.path, timedelta(hours=1), max_entries=4)
    assert index.lookup("stale") is None
    assert len(index) == 4 and index.lookup("p9") is not None and index.lookup("p0") is None
