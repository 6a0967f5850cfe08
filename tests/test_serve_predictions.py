"""The prediction log (vitbirds.monitoring.predictions) that Serve writes and the monitoring
job reads."""

import time
from pathlib import Path

import pytest
import torch

from vitbirds.monitoring.predictions import (
    EMBEDDING_DIM,
    LOG_PATH_ENV,
    BackgroundPredictionLog,
    EmbeddingProjector,
    FeedbackRecord,
    PredictionLog,
    PredictionRecord,
    log_path,
    read_log,
)


def _prediction(request_id: str, label: str = "Barn_Swallow") -> PredictionRecord:
    return PredictionRecord(
        request_id=request_id,
        model_name="vitbirds",
        model_version="v1",
        label=label,
        confidence=0.9,
        top_k=[{"label": label, "index": 3, "probability": 0.9}],
        embedding=[0.0] * EMBEDDING_DIM,
    )


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
