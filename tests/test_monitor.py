"""The monitor on a small model of the synthetic birds: reference profile, the decision rules, the
prediction log, and jobs/monitor.py end to end (real photos: tests/test_monitor_shifts.py)."""

import json
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from reproducible import TEST_SEED, reproducible

from jobs.benchlib.shifts import Subject, label_shift, noise_images, train_subject
from serve.drift_gauges import DriftWatcher
from vitbirds.data import make_synthetic_dataset
from vitbirds.errors import ConfigError, ModelFileError
from vitbirds.lifecycle.tracking import default_mlflow_uri
from vitbirds.model.files import load_model
from vitbirds.monitoring.assess import (
    Assessment,
    Decision,
    LabelledMetrics,
    MonitorConfig,
    Observations,
    assess,
    decide,
    headline_gauges,
    parse_window,
    recent,
)
from vitbirds.monitoring.drift import DriftTestResult, Interval
from vitbirds.monitoring.predictions import (
    EmbeddingProjector,
    FeedbackRecord,
    PredictionLog,
    PredictionRecord,
    read_log,
)
from vitbirds.monitoring.reference import (
    REFERENCE_JSON,
    ModelOutputs,
    image_dataset,
    load_reference_profile,
    model_outputs,
)
from vitbirds.presets import get_recipe

ROOT = Path(__file__).resolve().parent.parent
START = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Subject:
    """vit-test on 6 synthetic species (~60% valid top-1, ~20 s of CPU), 210 held-out images.

    200 images a species: with 120 (126 held out), the predicted-class test on half the species
    (63 images) sat at p ~ 0.0015 for some seeds, just above its alpha of 0.0014 (0.01 over 7
    tests): a shift it should catch, caught or not by chance. With 105 images it has margin."""
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("data") / "birds", images_per_class=200, image_size=37,
        seed=TEST_SEED,
    )  # fmt: skip
    recipe = get_recipe("vit-test")
    # colour tells the species apart
    recipe.data = replace(recipe.data, color_jitter=0.0, seed=TEST_SEED)
    recipe.train = replace(recipe.train, epochs=30, batch_size=16, device="cpu", seed=TEST_SEED)
    with reproducible():
        return train_subject(root, recipe, tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def held_out(subject: Subject) -> ModelOutputs:
    loaded = load_model(subject.model_dir)
    return model_outputs(loaded, image_dataset(subject.held_out, loaded.metadata))


@pytest.fixture(scope="module")
def noise(subject: Subject) -> ModelOutputs:
    loaded = load_model(subject.model_dir)
    return model_outputs(loaded, noise_images(80, loaded))


def write_log(path: Path, outputs: ModelOutputs, version: str, start: datetime, names: list[str],
              *, every: timedelta = timedelta(minutes=1), k: int = 5) -> None:  # fmt: skip
    """Log lines as Serve writes them, one prediction every `every` from `start`."""
    log = PredictionLog(path)
    for i, (probs, embedding) in enumerate(zip(outputs.probs, outputs.embeddings, strict=True)):
        order = np.argsort(-probs)[:k]
        top = [{"label": names[j], "index": int(j), "probability": float(probs[j])} for j in order]
        log.append(
            PredictionRecord(
                request_id=f"{start:%H%M}-{i}", model_name="vitbirds", model_version=version,
                label=top[0]["label"], confidence=top[0]["probability"], top_k=top,
                embedding=embedding.tolist(), time=(start + i * every).isoformat(),
            )
        )  # fmt: skip


def monitor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "monitor.py"), *args, "--tracker", "none"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The reference profile


def test_the_reference_profile_is_the_models_validation_split_saved_beside_it(subject) -> None:
    profile = load_reference_profile(subject.model_dir)
    summary = json.loads((subject.model_dir / REFERENCE_JSON).read_text())
    n = summary["num_samples"]
    assert profile.outputs.logits.shape == (n, 6) and profile.outputs.embeddings.shape == (n, 32)
    assert summary["split"] == "valid" and summary["class_names"] == subject.classes
    assert len(summary["metrics"]["per_class"]) == 6 and profile.accuracy > 0.4
    correct = profile.outputs.probs.argmax(1) == profile.outputs.labels
    assert profile.accuracy == pytest.approx(correct.mean())
    # ATC's threshold puts exactly the reference accuracy above it
    above = (profile.outputs.probs.max(1) > profile.atc_threshold).mean()
    assert above == pytest.approx(profile.accuracy, abs=1 / n)


def test_reference_embeddings_are_projected_as_the_prediction_log_projects_them(subject) -> None:
    loaded = load_model(subject.model_dir)
    images = image_dataset(subject.held_out[:8], loaded.metadata)
    batch = torch.stack([images[i][0] for i in range(8)])
    with torch.inference_mode():
        logged = EmbeddingProjector(loaded.metadata.model_config.dim)(loaded.model.embed(batch))
    assert np.allclose(model_outputs(loaded, images).embeddings, logged.numpy(), atol=1e-5)


def test_a_model_without_a_profile_is_refused_with_the_way_to_make_one(tmp_path) -> None:
    with pytest.raises(ModelFileError, match="--reference-data"):
        load_reference_profile(tmp_path)


# ---------------------------------------------------------------------------------------------
# Decisions on the synthetic model


def test_held_out_data_of_the_training_distribution_is_ok(subject, held_out) -> None:
    profile = load_reference_profile(subject.model_dir)
    assessment = assess(profile, Observations.from_outputs(held_out))
    assert assessment.decision == Decision.OK, assessment.reasons
    assert not assessment.significant


def test_skewed_class_proportions_are_caught_by_the_predicted_class_test(subject) -> None:
    loaded = load_model(subject.model_dir)
    skewed = label_shift(subject.held_out, 1.0)  # half of the species, all of their images
    outputs = model_outputs(loaded, image_dataset(skewed, loaded.metadata))
    assessment = assess(
        load_reference_profile(subject.model_dir), Observations.from_outputs(outputs)
    )
    assert assessment.decision != Decision.OK
    assert "predicted_class" in assessment.significant
    assert assessment.tests["predicted_class"].p_value < 0.01
    assert "label_class" in assessment.significant  # the labels themselves show it
    assert any(reason.startswith("label shift") for reason in assessment.reasons)


def test_noise_images_mean_retrain(subject, noise) -> None:
    assessment = assess(load_reference_profile(subject.model_dir), Observations.from_outputs(noise))
    assert assessment.decision == Decision.RETRAIN
    assert assessment.domain_auroc > 0.9


def test_labelled_data_reports_metrics_with_intervals_against_the_reference(
    subject, held_out
) -> None:
    assessment = assess(
        load_reference_profile(subject.model_dir), Observations.from_outputs(held_out)
    )
    labelled = assessment.labelled
    assert labelled is not None and labelled.num_labelled == len(held_out.labels)
    for name in ("accuracy", "macro_f1", "auroc"):
        interval = labelled.observed[name]
        assert interval.low <= interval.estimate <= interval.high
        assert labelled.drop[name].low < 0.05  # no significant drop on the same distribution
    true_accuracy = (held_out.probs.argmax(1) == held_out.labels).mean()
    assert labelled.observed["accuracy"].estimate == pytest.approx(true_accuracy)


def test_too_few_predictions_get_no_verdict_but_a_note(subject, noise) -> None:
    profile = load_reference_profile(subject.model_dir)
    few = Observations.from_outputs(noise).subset(np.arange(10))
    assessment = assess(profile, few)
    assert assessment.decision == Decision.OK and "too few" in assessment.reasons[0]


def _assessment(p: dict[str, float], *, estimated: float = 0.8, domain: float = 0.6,
                labelled: LabelledMetrics | None = None) -> Assessment:  # fmt: skip
    tests = {
        name: DriftTestResult(name, 0.0, p.get(name, 0.5), 0.1, "effect",
                              {"reference_mean": 0.7, "observed_mean": 0.6})
        for name in ("confidence", "entropy", "predicted_class", "embedding_mmd")
    }  # fmt: skip
    return Assessment(
        Decision.OK, [], 500, 500, tests, 0.0025, 0.8, estimated, estimated, domain, labelled
    )


def _labelled(drop: float, p_value: float) -> LabelledMetrics:
    interval = Interval(drop, drop - 0.05, drop + 0.05, 0.95, p_value)
    return LabelledMetrics(300, {"accuracy": Interval(0.8 - drop, 0, 1, 0.95)}, {},
                           {"accuracy": interval}, [])  # fmt: skip


@pytest.mark.parametrize(
    ("assessment", "expected"),
    [
        (_assessment({}), Decision.OK),
        (_assessment({"predicted_class": 1e-4}), Decision.WATCH),
        (_assessment({"confidence": 0.01}), Decision.OK),  # not below alpha / 4
        (_assessment({"confidence": 1e-4}, estimated=0.65), Decision.RETRAIN),
        (_assessment({"confidence": 1e-4}, estimated=0.75), Decision.WATCH),
        (_assessment({"embedding_mmd": 1e-3}, domain=0.95), Decision.RETRAIN),
        (_assessment({"embedding_mmd": 1e-3}, domain=0.95, labelled=_labelled(0.0, 0.5)),
         Decision.WATCH),
        (_assessment({}, labelled=_labelled(0.15, 1e-4)), Decision.RETRAIN),
        (_assessment({}, labelled=_labelled(0.05, 1e-4)), Decision.WATCH),
        (_assessment({}, labelled=_labelled(0.15, 0.01)), Decision.OK),  # not significant
    ],
)  # fmt: skip
def test_decision_rules(assessment, expected) -> None:
    decision, reasons = decide(assessment, MonitorConfig())
    assert decision == expected, reasons
    assert reasons


def test_headline_gauges_hold_the_decision_level_and_every_p_value() -> None:
    assessment = _assessment({"confidence": 1e-4}, estimated=0.65)
    assessment.decision, _ = decide(assessment, MonitorConfig())
    gauges = headline_gauges(assessment.to_dict())
    assert gauges["vitbirds_monitor_decision"] == 2.0
    assert gauges["vitbirds_monitor_p_confidence"] == pytest.approx(1e-4)


def test_config_and_window_values_are_checked() -> None:
    with pytest.raises(ConfigError, match="alpha"):
        MonitorConfig(alpha=1.5)
    assert parse_window("90m") == timedelta(minutes=90)
    with pytest.raises(ConfigError, match="window"):
        parse_window("soon")


# ---------------------------------------------------------------------------------------------
# The prediction log


def test_the_log_gives_this_versions_predictions_with_their_feedback(
    subject, held_out, tmp_path
) -> None:
    path = tmp_path / "predictions.jsonl"
    version = load_model(subject.model_dir).metadata.version
    write_log(path, held_out.subset(np.arange(20)), version, START, subject.classes)
    write_log(path, held_out.subset(np.arange(5)), "older", START, subject.classes, k=3)
    log = PredictionLog(path)
    log.append(FeedbackRecord(request_id=f"{START:%H%M}-3", label=subject.classes[2]))
    with path.open("a") as handle:
        handle.write('{"kind": "prediction", "cut off mid-li\n')
    observed = Observations.from_log(read_log(path), subject.classes, model_version=version)
    assert len(observed) == 20 and observed.top_k == 5
    assert list(np.flatnonzero(observed.labels >= 0)) == [3] and observed.labels[3] == 2
    assert observed.times[1] - observed.times[0] == np.timedelta64(60, "s")


def test_recent_merges_the_latest_windows_until_they_hold_enough_predictions(held_out) -> None:
    observed = Observations.from_outputs(held_out).subset(np.arange(30))
    minutes = np.arange(30) * 60_000_000  # one per minute, in microseconds
    observed.times = np.datetime64("2026-01-01T00:00:00", "us") + minutes.astype("timedelta64[us]")
    latest = recent(observed, timedelta(minutes=10), min_samples=15)
    assert len(latest) == 20  # the last two 10-minute windows


# ---------------------------------------------------------------------------------------------
# jobs/monitor.py


def test_the_job_on_a_log_whose_last_hour_is_noise_says_retrain_and_reports_over_time(
    subject, held_out, noise, tmp_path
) -> None:
    log = tmp_path / "predictions.jsonl"
    version = load_model(subject.model_dir).metadata.version
    shuffled = held_out.subset(np.random.default_rng(0).permutation(len(held_out.labels)))
    # 210 held-out predictions over 105 minutes, then an hour's gap, then the noise hour
    write_log(log, shuffled, version, START, subject.classes, every=timedelta(seconds=30))
    write_log(log, noise, version, START + timedelta(hours=2), subject.classes,
              every=timedelta(seconds=30))  # fmt: skip
    out = tmp_path / "monitor"
    done = monitor("--model", str(subject.model_dir), "--prediction-log", str(log),
                   "--window", "1h", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "monitor.json").read_text())
    assert result["assessment"]["decision"] == "RETRAIN"
    assert result["assessment"]["num_observed"] == len(noise.labels)  # the noise hour only
    windows = result["windows"]
    assert len(windows) == 3 and not windows[0]["significant"] and windows[-1]["significant"]
    assert "jobs/train.py" in result["retrain"]["command"] and "job_id" not in result["retrain"]
    assert "retrain with" in done.stdout and "jobs/train.py" in done.stdout
    page = (out / "report.html").read_text()
    assert 'class="verdict RETRAIN"' in page and 'id="windows"' in page


def test_serves_live_gauges_are_the_jobs_numbers_for_the_same_window(
    subject, held_out, noise, tmp_path
) -> None:
    log = tmp_path / "predictions.jsonl"
    version = load_model(subject.model_dir).metadata.version
    published: list[dict[str, float]] = []
    watcher = DriftWatcher(
        subject.model_dir, log, model_version=version, class_names=subject.classes,
        window="1h", interval_s=0, publish=published.append,
    )  # fmt: skip
    assert watcher.assess_once()["status"] == "pending" and not published  # nothing logged yet
    now = datetime.now(UTC)
    write_log(log, held_out, version, now - timedelta(hours=5), subject.classes)  # to now - 1.5 h
    write_log(log, noise, version, now - timedelta(minutes=50), subject.classes,
              every=timedelta(seconds=30))  # fmt: skip
    latest = watcher.assess_once()
    out = tmp_path / "monitor"
    done = monitor("--model", str(subject.model_dir), "--prediction-log", str(log),
                   "--window", "1h", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    job = json.loads((out / "monitor.json").read_text())
    assert latest["decision"] == job["assessment"]["decision"] == "RETRAIN"
    assert latest["num_observed"] == len(noise.labels)
    assert published == [latest["gauges"]]
    assert latest["gauges"] == pytest.approx(job["gauges"])


def test_live_gauges_read_at_most_their_byte_budget_and_say_so(subject, noise, tmp_path) -> None:
    log = tmp_path / "predictions.jsonl"
    version = load_model(subject.model_dir).metadata.version
    write_log(log, noise, version, datetime.now(UTC) - timedelta(minutes=50), subject.classes,
              every=timedelta(seconds=30))  # fmt: skip
    budget = log.stat().st_size // 2
    watcher = DriftWatcher(subject.model_dir, log, model_version=version,
                           class_names=subject.classes, window="1h", interval_s=0,
                           publish=lambda gauges: None, max_read_bytes=budget)  # fmt: skip
    latest = watcher.assess_once()
    assert latest["status"] == "ok"
    assert 0 < latest["num_observed"] < len(noise.labels)
    assert any("newest" in reason and "MiB only" in reason for reason in latest["reasons"])


def test_live_gauges_report_a_log_that_does_not_fit_the_reference_as_an_error(
    subject, held_out, tmp_path
) -> None:
    log = tmp_path / "predictions.jsonl"
    version = load_model(subject.model_dir).metadata.version
    narrow = replace(held_out, embeddings=held_out.embeddings[:, :3])  # another projection
    write_log(log, narrow, version, datetime.now(UTC) - timedelta(hours=1), subject.classes)
    published: list[dict[str, float]] = []
    watcher = DriftWatcher(subject.model_dir, log, model_version=version,
                           class_names=subject.classes, window="1h", interval_s=0,
                           publish=published.append)  # fmt: skip
    latest = watcher.assess_once()
    assert latest["status"] == "error" and "dimensions" in latest["reasons"][0]
    assert not published


def test_live_gauges_are_disabled_with_the_reason_for_a_model_without_a_profile(
    subject, tmp_path
) -> None:
    bare = tmp_path / "model"
    bare.mkdir()
    for name in ("model.safetensors", "metadata.json"):
        (bare / name).write_bytes((subject.model_dir / name).read_bytes())
    watcher = DriftWatcher(bare, tmp_path / "log.jsonl", model_version="v", class_names=["a"],
                           window="1h", interval_s=1, publish=print)  # fmt: skip
    watcher.start()  # a no-op: there is nothing to compare with
    assert watcher.latest["status"] == "disabled" and not watcher.running
    assert "reference profile" in watcher.latest["reasons"][0]


def test_the_job_builds_a_missing_profile_measures_labelled_photos_and_logs_to_mlflow(
    subject, tmp_path
) -> None:
    model = tmp_path / "model"  # the subject's weights without their reference profile
    model.mkdir()
    for name in ("model.safetensors", "metadata.json"):
        (model / name).write_bytes((subject.model_dir / name).read_bytes())
    log = tmp_path / "predictions.jsonl"
    log.write_text("")
    refused = monitor("--model", str(model), "--prediction-log", str(log))
    assert refused.returncode == 2 and "--reference-data" in refused.stderr

    data = next(p for p in subject.held_out[0].path.parents if (p / "SYNTHETIC.json").is_file())
    out = tmp_path / "monitor"
    done = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "monitor.py"), "--model", str(model),
         "--labeled-data", str(data), "--reference-data", str(data), "--out", str(out),
         "--tracker", "mlflow", "--storage-path", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (model / REFERENCE_JSON).is_file()
    result = json.loads((out / "monitor.json").read_text())
    labelled = result["assessment"]["labelled"]
    assert labelled["observed"]["accuracy"]["low"] <= labelled["observed"]["accuracy"]["estimate"]
    assert result["source"]["images_assessed"] == result["source"]["images"]
    client = MlflowClient(default_mlflow_uri(tmp_path / "runs"))
    (run,) = client.search_runs([client.get_experiment_by_name("vitbirds-monitor").experiment_id])
    decision = result["assessment"]["decision"]
    assert run.data.metrics["vitbirds_monitor_decision"] == Decision(decision).level
    assert run.data.tags["decision"] == decision
