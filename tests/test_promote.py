"""The promotion gate: `champion` moves to the challenger only when it is not worse on the same
labelled photos (paired bootstrap interval of the top-1 difference against a margin)."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_registry import CLASSES, register_model_dir, tiny_model_dir

from jobs import promote
from vitbirds.data import make_synthetic_dataset
from vitbirds.data.sources import discover_dataset
from vitbirds.evaluation.compare import GateConfig, paired_bootstrap
from vitbirds.lifecycle.registry import CHALLENGER, CHAMPION, Registry
from vitbirds.lifecycle.tracking import default_mlflow_uri
from vitbirds.model.files import load_model, read_metadata, save_model
from vitbirds.monitoring.reference import image_dataset

# ---------------------------------------------------------------------------------------------
# The statistics


def correctness(right_both: int, only_challenger: int, only_champion: int, wrong_both: int):
    challenger = [True] * right_both + [True] * only_challenger + [False] * only_champion
    champion = [True] * right_both + [False] * only_challenger + [True] * only_champion
    challenger += [False] * wrong_both
    champion += [False] * wrong_both
    return np.array(challenger), np.array(champion)


def test_models_that_agree_on_every_photo_have_a_zero_width_interval_and_pass() -> None:
    result = paired_bootstrap(*correctness(150, 0, 0, 50), GateConfig())
    assert (result.ci_low, result.ci_high, result.difference) == (0.0, 0.0, 0.0)
    assert result.not_worse


def test_a_challenger_clearly_worse_than_the_margin_fails() -> None:
    result = paired_bootstrap(*correctness(120, 5, 35, 40), GateConfig(margin=0.01))
    assert result.difference == pytest.approx(-0.15)
    assert result.ci_high < 0 and not result.not_worse


def test_a_small_loss_inside_the_margin_passes_when_the_interval_is_tight() -> None:
    # 2,000 photos, the challenger loses 4 of them: -0.2 points, interval well inside -1 point.
    result = paired_bootstrap(*correctness(1500, 0, 4, 496), GateConfig(margin=0.01))
    assert -0.01 < result.ci_low < result.difference < 0 and result.not_worse


def test_a_better_challenger_on_too_few_photos_still_fails_a_zero_margin() -> None:
    # +2 photos of 20 but 3 disagreements each way: the interval reaches below zero.
    result = paired_bootstrap(*correctness(8, 5, 3, 4), GateConfig(margin=0.0))
    assert result.difference > 0 and result.ci_low < 0 and not result.not_worse


def test_the_interval_is_the_same_on_every_run_with_the_same_seed() -> None:
    pair = correctness(60, 12, 9, 19)
    assert paired_bootstrap(*pair, GateConfig(seed=3)) == paired_bootstrap(
        *pair, GateConfig(seed=3)
    )


def test_the_interval_holds_the_difference_at_its_confidence() -> None:
    result = paired_bootstrap(*correctness(60, 12, 9, 19), GateConfig(confidence=0.9))
    assert result.ci_low < result.difference < result.ci_high


# ---------------------------------------------------------------------------------------------
# jobs/promote.py on a registry


@pytest.fixture(scope="module")
def photos_and_models(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Photos labelled by what model `right` predicts (so it is right on all of them) and model
    `wrong`: the same weights with the class names rotated, so it is wrong on every one."""
    root = tmp_path_factory.mktemp("promote")
    right = tiny_model_dir(root / "right", seed=1)
    loaded = load_model(right)
    wrong_metadata = read_metadata(right)
    wrong_metadata.class_names = CLASSES[1:] + CLASSES[:1]
    wrong_metadata.version = "rotated"
    wrong = save_model(root / "wrong", loaded.model, wrong_metadata)

    birds = discover_dataset(make_synthetic_dataset(root / "birds", images_per_class=20))
    samples = birds.train + birds.valid + birds.test
    with torch.inference_mode():
        images = torch.stack([image for image, _ in image_dataset(samples, loaded.metadata)])
        predicted = loaded.model(images).argmax(dim=1).tolist()
    for index, (sample, label) in enumerate(zip(samples, predicted, strict=True)):
        folder = root / "photos" / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample.path, folder / f"{index:04d}{sample.path.suffix}")
    return root / "photos", right, wrong


def run_promote(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = promote.main([*argv, "--resamples", "2000"])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def gate(photos_and_models, tmp_path_factory) -> dict:
    """One registry through three rounds: a first challenger, a better one, a worse one."""
    photos, right, wrong = photos_and_models
    storage = tmp_path_factory.mktemp("gate") / "runs"
    flags = ["--data-dir", str(photos), "--split", "all", "--storage-path", str(storage)]
    rounds = {}
    for name, model_dir in (("first", wrong), ("better", right), ("worse", wrong)):
        register_model_dir(storage, model_dir, name)
        rounds[name] = run_promote(*flags)
    rounds["again"] = run_promote(*flags)
    return {"rounds": rounds, "registry": Registry(default_mlflow_uri(storage)), "flags": flags}


def test_the_first_challenger_becomes_champion_when_there_is_none(gate) -> None:
    code, out = gate["rounds"]["first"]
    assert code == 0 and "no champion yet" in out
    assert gate["registry"].get(1).tags["promotion.decision"] == "promoted"


def test_a_better_challenger_is_promoted_and_the_old_champion_says_by_whom(gate) -> None:
    code, out = gate["rounds"]["better"]
    assert code == 0 and "decision: PROMOTED" in out
    assert "challenger 100.00%, champion 0.00%" in out
    tags = gate["registry"].get(2).tags
    assert tags["promotion.champion_version"] == "1" and float(tags["promotion.ci_low"]) > 0.9
    assert gate["registry"].get(1).tags["promotion.replaced_by"] == "2"


def test_a_worse_challenger_is_refused_with_exit_3_and_the_champion_stays(gate) -> None:
    code, out = gate["rounds"]["worse"]
    assert code == promote.REFUSED and "decision: REFUSED" in out
    registry = gate["registry"]
    assert registry.by_alias(CHAMPION).version == 2 and registry.by_alias(CHALLENGER).version == 3
    assert registry.get(3).tags["promotion.decision"] == "refused"


def test_a_refused_challenger_stays_refused_when_the_gate_runs_again(gate) -> None:
    code, _ = gate["rounds"]["again"]
    assert code == promote.REFUSED and gate["registry"].by_alias(CHAMPION).version == 2


def test_a_dry_run_decides_but_moves_no_alias_and_writes_no_tag(
    photos_and_models, tmp_path
) -> None:
    photos, _, wrong = photos_and_models
    register_model_dir(tmp_path / "runs", wrong, "only")
    flags = ["--data-dir", str(photos), "--split", "all", "--storage-path", str(tmp_path / "runs")]
    code, out = run_promote(*flags, "--dry-run", "--out", str(tmp_path / "d.json"))
    registry = Registry(default_mlflow_uri(tmp_path / "runs"))
    assert code == 0 and "decision: PROMOTED" in out
    assert registry.by_alias(CHAMPION) is None and "promotion.decision" not in registry.get(1).tags
    assert json.loads((tmp_path / "d.json").read_text())["promoted"] is True


def test_a_registry_without_a_challenger_is_a_usage_error(tmp_path, photos_and_models) -> None:
    code, out = run_promote("--data-dir", str(photos_and_models[0]), "--storage-path",
                            str(tmp_path / "runs"))  # fmt: skip
    assert code == 2 and "has no 'challenger' version" in out


@pytest.mark.parametrize("flag", [["--margin", "-0.1"], ["--confidence", "1.5"]])
def test_a_bad_gate_setting_is_a_usage_error_naming_it(flag, tmp_path) -> None:
    code, out = run_promote("--data-dir", str(tmp_path), *flag)
    assert code == 2 and flag[0].strip("-") in out
