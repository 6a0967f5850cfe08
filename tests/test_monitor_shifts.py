"""The monitor on real photos: a small ViT trained on the 100 CUB species, judged without labels
on photos it never saw (jobs/bench_drift.py prints the full shift x strength table)."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from reproducible import TEST_SEED, reproducible
from torch.utils.data import Subset

from jobs.benchlib.shifts import (
    SHIFTS,
    Subject,
    get_shift,
    label_shift,
    noise_images,
    run_scenario,
    subject_recipe,
    train_subject,
)
from vitbirds.data.sources import discover_dataset, samples_for_model
from vitbirds.model.files import load_model
from vitbirds.monitoring.reference import image_dataset, load_reference_profile

ROOT = Path(__file__).resolve().parent.parent
SUBSETS = 4
# What a model of real birds does on real photos of other cameras: a generated stand-in cannot
# show it (tests/test_monitor.py runs the same monitor on synthetic birds everywhere).
pytestmark = pytest.mark.real_photos


@pytest.fixture(scope="module")
def kaggle(real_photos: Path) -> Path:
    return real_photos / "kaggle-birds525-valid"


@pytest.fixture(scope="module")
def cub_subject(real_photos: Path, tmp_path_factory) -> Subject:
    """~13% top-1 on 100 species at 32 px (chance 1%) after 10 epochs, ~1 min of 2-core CPU; a
    quarter of each species' training photos (600) is held out as new same-distribution data,
    the 599 valid photos are the reference."""
    out = tmp_path_factory.mktemp("cub") / "model"
    recipe = subject_recipe(epochs=10)
    recipe.data = replace(recipe.data, seed=TEST_SEED)
    recipe.train = replace(recipe.train, seed=TEST_SEED)
    with reproducible():
        return train_subject(real_photos / "cub100", recipe, out)


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
        subset = Subset(held, rng.choice(len(held), 200, replace=False).tolist())
        row, _ = run_scenario(loaded, profile, subset, scenario=f"same {i}")
        decisions.append(row.decision)
    # alpha = 1% per assessment: even one WATCH in four would be unlucky; a RETRAIN is a bug
    assert "RETRAIN" not in decisions and decisions.count("WATCH") <= 1, decisions


@pytest.mark.parametrize("shift", list(SHIFTS))
def test_image_shifts_are_caught_and_their_evidence_grows_with_strength(
    cub_subject, model, shift
) -> None:
    loaded, profile = model
    photos = cub_subject.held_out[::2]  # 300 photos, every species
    rows = [
        run_scenario(
            loaded, profile, image_dataset(photos, loaded.metadata, perturb=get_shift(shift, s)),
            scenario=shift, strength=s,
        )[0]
        for s in (0.25, 1.0)
    ]  # fmt: skip
    assert rows[-1].decision != "OK", rows[-1].reasons
    assert rows[-1].domain_auroc > rows[0].domain_auroc
    assert min(rows[-1].p_values.values()) <= min(rows[0].p_values.values())


def test_kaggle_photos_of_the_same_species_are_caught_without_labels(model, kaggle) -> None:
    loaded, profile = model
    other = discover_dataset(kaggle)
    photos = samples_for_model(other.train + other.valid + other.test, other.classes,
                               profile.class_names)  # fmt: skip
    row, assessment = run_scenario(
        loaded, profile, image_dataset(photos, loaded.metadata), scenario="kaggle"
    )
    assert row.decision != "OK", row
    assert "embedding_mmd" in assessment.significant


def test_a_label_shift_is_caught_from_the_labels_when_the_predictions_cannot_show_it(
    cub_subject, model
) -> None:
    loaded, profile = model
    skewed = image_dataset(label_shift(cub_subject.held_out, 1.0), loaded.metadata)
    row, _ = run_scenario(loaded, profile, skewed, scenario="label shift", labelled=True)
    # Half the species, 300 photos: a 13 %-accurate model's predictions barely move (100 classes,
    # 3 photos each), but the true labels' mix is plainly not the reference's.
    assert row.labelled_decision == "WATCH"


def test_noise_images_mean_retrain(model) -> None:
    loaded, profile = model
    row, assessment = run_scenario(loaded, profile, noise_images(200, loaded), scenario="noise")
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
    assert source["images"] > 2500 and 150 < source["images_of_model_classes"] < 400  # 36 species
    assert labelled["num_labelled"] == source["images_assessed"]
    accuracy = labelled["observed"]["accuracy"]
    assert accuracy["low"] < accuracy["estimate"] < accuracy["high"]
    # the model is no worse on Kaggle's photos of its species: drift, but nothing to retrain
    assert result["assessment"]["decision"] != "RETRAIN"
