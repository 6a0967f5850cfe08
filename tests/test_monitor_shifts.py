"""The monitor on real photos: a small ViT trained on the 36 CUB species that the Kaggle dataset
also has, judged without labels on data it never saw (jobs/bench_drift.py prints the full table).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import Subset

from vitbirds.data.sources import Sample, discover_dataset
from vitbirds.modelfile import load_model
from vitbirds.monitoring import MonitorConfig
from vitbirds.reference import UNKNOWN_LABEL, image_dataset, load_reference_profile
from vitbirds.shifts import (
    SHIFTS,
    Subject,
    get_shift,
    noise_images,
    run_scenario,
    shared_species,
    subject_recipe,
    train_subject,
)

ROOT = Path(__file__).resolve().parent.parent
SUBSETS = 6
STRENGTHS = (0.25, 0.5, 1.0)


@pytest.fixture(scope="module")
def kaggle(shared_data: Path) -> Path:
    return shared_data / "kaggle-birds525-valid"


@pytest.fixture(scope="module")
def cub_subject(shared_data: Path, kaggle: Path, tmp_path_factory) -> Subject:
    """~30% top-1 on 36 species at 32 px: ~1 min of 2-core CPU. A quarter of each species'
    training photos is held out as new data of the training distribution."""
    cub = shared_data / "cub100"
    species = shared_species(discover_dataset(cub).classes, discover_dataset(kaggle).classes)
    assert len(species) == 36
    out = tmp_path_factory.mktemp("cub") / "model"
    return train_subject(cub, subject_recipe(epochs=20), out, classes=species)


@pytest.fixture(scope="module")
def model(cub_subject: Subject):
    return load_model(cub_subject.model_dir), load_reference_profile(cub_subject.model_dir)


def test_random_subsets_of_the_training_distribution_raise_no_false_retrain(
    cub_subject, model
) -> None:
    loaded, profile = model
    held = image_dataset(cub_subject.held_out, loaded.metadata)
    rng = np.random.default_rng(0)
    decisions = []
    for i in range(SUBSETS):
        subset = Subset(held, rng.choice(len(held), 100, replace=False).tolist())
        row, _ = run_scenario(loaded, profile, subset, scenario=f"same {i}")
        decisions.append(row.decision)
    # alpha = 1% per assessment: even one WATCH in six would be unlucky; a RETRAIN is a bug
    assert "RETRAIN" not in decisions and decisions.count("WATCH") <= 1, decisions


@pytest.mark.parametrize("shift", list(SHIFTS))
def test_image_shifts_are_caught_and_their_evidence_grows_with_strength(
    cub_subject, model, shift
) -> None:
    loaded, profile = model
    rows = [
        run_scenario(
            loaded, profile,
            image_dataset(cub_subject.held_out, loaded.metadata, perturb=get_shift(shift, s)),
            scenario=shift, strength=s,
        )[0]
        for s in STRENGTHS
    ]  # fmt: skip
    assert rows[-1].decision != "OK", rows[-1].reasons
    smallest_p = [min(r.p_values.values()) for r in rows]
    assert smallest_p[-1] <= smallest_p[0]
    assert rows[-1].domain_auroc > rows[0].domain_auroc


def test_photos_from_another_dataset_are_caught(model, kaggle) -> None:
    loaded, profile = model
    other = discover_dataset(kaggle)
    photos = other.train + other.valid + other.test
    picked = np.random.default_rng(0).choice(len(photos), 216, replace=False)
    samples = [Sample(photos[i].path, UNKNOWN_LABEL) for i in sorted(picked)]
    row, _ = run_scenario(
        loaded, profile, image_dataset(samples, loaded.metadata), scenario="kaggle"
    )
    assert row.decision != "OK", row


def test_noise_images_mean_retrain(model) -> None:
    loaded, profile = model
    row, assessment = run_scenario(loaded, profile, noise_images(216, loaded), scenario="noise")
    assert row.decision == "RETRAIN"
    assert any("separable" in reason for reason in assessment.reasons)


def test_the_job_measures_a_cub_model_on_kaggle_photos_of_the_same_species(
    cub_subject, kaggle, tmp_path
) -> None:
    out = tmp_path / "monitor"
    done = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "monitor.py"), "--model", str(cub_subject.model_dir),
         "--labeled-data", str(kaggle), "--out", str(out), "--tracker", "none"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "monitor.json").read_text())
    source, labelled = result["source"], result["assessment"]["labelled"]
    assert source["images"] > 3000 and 150 < source["images_of_model_classes"] < 400
    accuracy = labelled["observed"]["accuracy"]
    assert accuracy["low"] < accuracy["estimate"] < accuracy["high"]
    assert labelled["num_labelled"] == source["images_assessed"]
    assert MonitorConfig().min_labelled <= labelled["num_labelled"]
