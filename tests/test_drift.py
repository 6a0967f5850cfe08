"""The drift statistics on generated numbers, where the truth is known by construction."""

import numpy as np
import pytest
from reproducible import TEST_SEED
from scipy.special import softmax
from scipy.stats import entropy

from vitbirds.evaluation.metrics import per_class_auroc
from vitbirds.monitoring import drift

NAMES = [f"class{i}" for i in range(20)]


def _accuracy(values: np.ndarray):
    return lambda idx: np.array([values[idx].mean()])


def test_ks_false_alarm_rate_is_bounded_by_alpha_and_a_mean_shift_is_caught() -> None:
    rng = np.random.default_rng([TEST_SEED, 0])
    alarms = [drift.ks_test("x", rng.normal(size=200), rng.normal(size=100)).p_value < 0.05
              for _ in range(200)]  # fmt: skip
    assert np.mean(alarms) <= 0.09
    shifted = drift.ks_test("x", rng.normal(size=200), rng.normal(0.6, 1, size=100))
    assert shifted.p_value < 1e-3 and shifted.effect == pytest.approx(0.6, abs=0.25)


def test_class_shift_permutation_p_values_stay_valid_for_many_sparse_classes() -> None:
    rng = np.random.default_rng([TEST_SEED, 1])
    p_values = [
        drift.class_shift(
            rng.integers(0, 20, 120), rng.integers(0, 20, 60), NAMES, permutations=200, seed=i
        ).p_value
        for i in range(60)
    ]
    assert np.mean(np.array(p_values) < 0.05) <= 0.12
    assert min(p_values) >= 1 / 201


def test_class_shift_catches_skewed_class_proportions_and_names_the_classes_that_moved() -> None:
    rng = np.random.default_rng([TEST_SEED, 2])
    skewed = rng.choice(20, size=100, p=np.r_[np.full(4, 0.2), np.full(16, 0.2 / 16)])
    result = drift.class_shift(rng.integers(0, 20, 200), skewed, NAMES, seed=0)
    assert result.p_value < 0.01 and result.effect > 0.25
    assert result.detail["moved"][0]["class"] in NAMES[:4]


def test_mmd_is_quiet_on_one_distribution_and_catches_a_small_mean_shift_in_32_dims() -> None:
    rng = np.random.default_rng([TEST_SEED, 3])
    same = drift.mmd_test(rng.normal(size=(200, 32)), rng.normal(size=(100, 32)), permutations=200)
    assert same.p_value > 0.01
    moved = drift.mmd_test(rng.normal(size=(200, 32)), rng.normal(0.3, 1, size=(100, 32)),
                     permutations=200)  # fmt: skip
    assert moved.p_value == pytest.approx(1 / 201) and moved.effect > same.effect


def test_domain_classifier_auroc_is_near_half_for_one_distribution_and_one_when_separable() -> None:
    rng = np.random.default_rng([TEST_SEED, 4])
    same = drift.domain_classifier_auroc(rng.normal(size=(200, 8)), rng.normal(size=(200, 8)))
    separable = drift.domain_classifier_auroc(rng.normal(size=(200, 8)), rng.normal(3, 1, (200, 8)))
    assert abs(same - 0.5) < 0.1 and separable > 0.99


def test_atc_is_exact_when_the_model_is_right_on_exactly_its_confident_predictions() -> None:
    rng = np.random.default_rng([TEST_SEED, 5])
    ref_conf, new_conf = rng.random(4000), rng.beta(2, 3, 4000)  # new data: harder images
    threshold = drift.atc_threshold(ref_conf, ref_conf > 0.6)
    right_before, right_now = np.mean(ref_conf > 0.6), np.mean(new_conf > 0.6)
    assert drift.atc_estimate(ref_conf, threshold) == pytest.approx(right_before, abs=1e-3)
    assert drift.atc_estimate(new_conf, threshold) == pytest.approx(right_now, abs=0.01)


def test_mean_calibrated_confidence_is_the_accuracy_of_a_calibrated_model_under_shift() -> None:
    rng = np.random.default_rng(10)
    conf = 0.5 + rng.beta(2, 3, 4000) / 2  # calibrated: right with probability = confidence
    correct = rng.random(4000) < conf
    top = np.stack([conf, 1 - conf], axis=1)  # two classes: the top-2 is every probability
    assert drift.scaled_confidence(top, 2, 1.0).mean() == pytest.approx(correct.mean(), abs=0.03)


def test_temperature_scaling_finds_the_temperature_that_generated_the_labels() -> None:
    rng = np.random.default_rng([TEST_SEED, 6])
    true_logits = rng.normal(0, 2, size=(3000, 10))
    labels = np.array([rng.choice(10, p=p) for p in softmax(true_logits, axis=1)])
    assert drift.fit_temperature(true_logits * 2.5, labels) == pytest.approx(2.5, rel=0.1)


def test_scores_from_all_probabilities_are_exact_and_from_top_k_bound_the_entropy() -> None:
    rng = np.random.default_rng([TEST_SEED, 7])
    logits = rng.normal(size=(50, 12))
    probs = softmax(logits, axis=1)
    ordered = -np.sort(-probs, axis=1)
    assert np.allclose(drift.topk_entropy(ordered, 12), entropy(probs, axis=1))
    assert (drift.topk_entropy(ordered[:, :5], 12) >= entropy(probs, axis=1) - 1e-9).all()
    scaled = softmax(logits / 1.7, axis=1).max(axis=1)
    assert np.allclose(drift.scaled_confidence(ordered, 12, 1.7), scaled)


def test_bootstrap_interval_matches_the_binomial_standard_error() -> None:
    correct = (np.random.default_rng([TEST_SEED, 8]).random(400) < 0.7).astype(float)
    (interval,) = drift.bootstrap_interval(_accuracy(correct), len(correct), resamples=2000)
    half_width = 1.96 * np.sqrt(0.7 * 0.3 / 400)
    assert interval.low < correct.mean() < interval.high
    assert (interval.high - interval.low) / 2 == pytest.approx(half_width, rel=0.15)


def test_bootstrap_difference_excludes_zero_only_for_a_real_drop() -> None:
    def exactly(rate: float, n: int) -> np.ndarray:
        return (np.arange(n) < rate * n).astype(float)

    reference = _accuracy(exactly(0.7, 300))
    (same,) = drift.bootstrap_difference(reference, 300, _accuracy(exactly(0.7, 200)), 200)
    (drop,) = drift.bootstrap_difference(reference, 300, _accuracy(exactly(0.5, 200)), 200)
    assert same.low < 0 < same.high and same.estimate == pytest.approx(0.0)
    assert drop.low > 0.1 and drop.estimate == pytest.approx(0.2)


def test_class_drops_flags_the_class_whose_recall_collapsed() -> None:
    labels = np.repeat(np.arange(4), 25)
    reference_correct = np.ones(100, dtype=bool)
    observed_correct = labels != 2  # class 2: recall 100% -> 0%
    observed_correct[labels == 1] = np.arange(25) < 22  # class 1: a small, insignificant dip
    drops = drift.class_drops(labels, reference_correct, labels, observed_correct, NAMES[:4])
    assert [d.name for d in drops] == ["class2", "class1"]
    assert drops[0].q_value < 0.001 and drops[1].q_value > 0.05


def test_bootstrapped_auroc_equals_the_metrics_module_on_every_resample_ties_included() -> None:
    rng = np.random.default_rng(11)
    probs = softmax(rng.normal(size=(80, 6)), axis=1).round(2)  # rounding makes ties
    probs /= probs.sum(axis=1, keepdims=True)
    labels = rng.integers(0, 6, 80)
    auroc = drift.auroc_of_resamples(labels, probs)
    for indices in [np.arange(80), *(rng.integers(0, 80, 80) for _ in range(5))]:
        expected = [a for a in per_class_auroc(labels[indices], probs[indices]) if a is not None]
        assert auroc(indices) == pytest.approx(np.mean(expected))
