"""vitbirds.evaluation.metrics agrees with scikit-learn on random and edge cases, and never
crashes on a split where a class is missing."""

import itertools
import json

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from vitbirds.evaluation.metrics import (
    classification_report,
    confusion_from_entries,
    evaluate_predictions,
)

NUM_CLASSES = 8


def _names(c: int) -> list[str]:
    return [f"class_{i}" for i in range(c)]


def _random_case(seed: int, n: int = 240, c: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities that lean toward the true class, so metrics are neither 0 nor 1."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, size=n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), labels] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probs


def _missing_class_case() -> tuple[np.ndarray, np.ndarray]:
    """Class 3 never occurs in the labels (but is sometimes predicted): AUROC undefined for it."""
    labels, probs = _random_case(1)
    labels = np.where(labels == 3, 4, labels)
    return labels, probs


def _absent_everywhere_case() -> tuple[np.ndarray, np.ndarray]:
    """Class 5 is neither a label nor ever the argmax."""
    labels, probs = _random_case(2)
    labels = np.where(labels == 5, 0, labels)
    probs[:, 5] = 1e-6
    return labels, probs / probs.sum(axis=1, keepdims=True)


def _perfect_case() -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(80) % NUM_CLASSES
    probs = np.full((80, NUM_CLASSES), 0.01)
    probs[np.arange(80), labels] = 1 - 0.01 * (NUM_CLASSES - 1)
    return labels, probs


def _worst_case() -> tuple[np.ndarray, np.ndarray]:
    """Confidently wrong on every sample, and the true class always gets the lowest score."""
    labels = np.arange(80) % NUM_CLASSES
    probs = np.full((80, NUM_CLASSES), 0.02)
    probs[np.arange(80), (labels + 1) % NUM_CLASSES] = 1 - 0.02 * (NUM_CLASSES - 2) - 0.005
    probs[np.arange(80), labels] = 0.005
    return labels, probs


CASES = {
    "random": lambda: _random_case(0),
    "random_many_classes": lambda: _random_case(3, n=600, c=60),
    "class_missing_from_labels": _missing_class_case,
    "class_absent_everywhere": _absent_everywhere_case,
    "perfect": _perfect_case,
    "worst": _worst_case,
}


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest) -> tuple[np.ndarray, np.ndarray]:
    return CASES[request.param]()


def test_accuracies_equal_sklearn(case):
    labels, probs = case
    c = probs.shape[1]
    report = classification_report(labels, probs, _names(c))
    assert report.top1_accuracy == pytest.approx(skm.accuracy_score(labels, probs.argmax(1)))
    expected_top5 = skm.top_k_accuracy_score(labels, probs, k=5, labels=np.arange(c))
    assert report.top5_accuracy == pytest.approx(expected_top5)


@pytest.mark.parametrize("average", ["macro", "weighted"])
def test_precision_recall_f1_averages_equal_sklearn(case, average):
    labels, probs = case
    report = classification_report(labels, probs, _names(probs.shape[1]))
    p, r, f, _ = skm.precision_recall_fscore_support(
        labels, probs.argmax(1), average=average, zero_division=0
    )
    assert getattr(report, f"{average}_precision") == pytest.approx(p)
    assert getattr(report, f"{average}_recall") == pytest.approx(r)
    assert getattr(report, f"{average}_f1") == pytest.approx(f)


def test_per_class_rows_equal_sklearn(case):
    labels, probs = case
    c = probs.shape[1]
    report = classification_report(labels, probs, _names(c))
    p, r, f, s = skm.precision_recall_fscore_support(
        labels, probs.argmax(1), labels=np.arange(c), average=None, zero_division=0
    )
    assert [row.precision for row in report.per_class] == pytest.approx(p)
    assert [row.recall for row in report.per_class] == pytest.approx(r)
    assert [row.f1 for row in report.per_class] == pytest.approx(f)
    assert [row.support for row in report.per_class] == list(s)


def test_confusion_matrix_equals_sklearn(case):
    labels, probs = case
    c = probs.shape[1]
    report = classification_report(labels, probs, _names(c))
    expected = skm.confusion_matrix(labels, probs.argmax(1), labels=np.arange(c))
    np.testing.assert_array_equal(report.confusion, expected)


def test_cohen_kappa_equals_sklearn(case):
    labels, probs = case
    report = classification_report(labels, probs, _names(probs.shape[1]))
    assert report.cohen_kappa == pytest.approx(skm.cohen_kappa_score(labels, probs.argmax(1)))


def test_auroc_is_sklearn_ovr_macro_over_classes_with_positives_and_negatives(case):
    labels, probs = case
    c = probs.shape[1]
    report = classification_report(labels, probs, _names(c))
    usable = [i for i in range(c) if 0 < (labels == i).sum() < len(labels)]
    per_class = [skm.roc_auc_score(labels == i, probs[:, i]) for i in usable]
    assert report.auroc_classes_used == len(usable)
    assert report.auroc_macro == pytest.approx(np.mean(per_class))
    assert [report.per_class[i].auroc for i in usable] == pytest.approx(per_class)
    if len(usable) == c:  # sklearn's own multiclass path only works when every class occurs
        expected = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
        assert report.auroc_macro == pytest.approx(expected)


def test_auroc_skips_the_class_missing_from_the_labels():
    labels, probs = _missing_class_case()
    report = classification_report(labels, probs, _names(NUM_CLASSES))
    assert report.per_class[3].auroc is None
    assert report.auroc_classes_used == NUM_CLASSES - 1


@pytest.mark.filterwarnings("ignore::UserWarning")  # sklearn warns that kappa is undefined
def test_single_class_split_has_undefined_auroc_and_kappa_not_a_crash():
    labels = np.zeros(10, dtype=int)
    probs = np.tile([0.7, 0.2, 0.1], (10, 1))
    report = classification_report(labels, probs, _names(3))
    assert report.auroc_macro is None
    assert report.auroc_classes_used == 0
    assert report.cohen_kappa is None  # sklearn: nan (both raters use one class only)
    assert np.isnan(skm.cohen_kappa_score(labels, probs.argmax(1)))
    assert report.top1_accuracy == 1.0


def _reference_ece(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Guo et al.'s loop over (lower, upper] bins, written the obvious way."""
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            total += abs((pred[sel] == labels[sel]).mean() - conf[sel].mean()) * sel.mean()
    return total


def test_ece_equals_reference_loop(case):
    labels, probs = case
    report = classification_report(labels, probs, _names(probs.shape[1]))
    assert report.ece == pytest.approx(_reference_ece(labels, probs))
    assert sum(b.count for b in report.reliability) == len(labels)
    assert len(report.reliability) == 15


def test_ece_is_zero_when_confidence_matches_accuracy():
    labels = np.arange(10) % 2  # predicting class 0 with confidence 0.5 is right half the time
    probs = np.tile([0.5, 0.5], (10, 1))
    assert classification_report(labels, probs, _names(2)).ece == pytest.approx(0.0)


def test_ece_of_confidently_wrong_predictions_is_their_confidence():
    labels, probs = _worst_case()
    assert classification_report(labels, probs, _names(NUM_CLASSES)).ece == pytest.approx(
        probs.max(1).mean()
    )


def test_most_confused_pairs_finds_a_planted_confusion():
    labels, probs = _perfect_case()
    swap = np.flatnonzero(labels == 2)[:7]  # 7 of class 2 predicted as class 6
    probs[swap] = probs[swap][:, [0, 1, 6, 3, 4, 5, 2, 7]]
    report = classification_report(labels, probs, _names(NUM_CLASSES))
    first = report.top_confusions[0]
    assert (first.true_name, first.predicted_name, first.count) == ("class_2", "class_6", 7)
    assert first.rate == pytest.approx(7 / 10)
    assert len(report.top_confusions) == 1


def test_torch_inputs_give_the_numpy_result():
    labels, probs = _random_case(4)
    from_numpy = evaluate_predictions(labels, probs, _names(NUM_CLASSES))
    from_torch = evaluate_predictions(
        torch.from_numpy(labels), torch.from_numpy(probs).float(), _names(NUM_CLASSES)
    )
    assert from_torch["macro_f1"] == pytest.approx(from_numpy["macro_f1"])
    assert from_torch["auroc_macro"] == pytest.approx(from_numpy["auroc_macro"])
    assert from_torch["confusion"] == from_numpy["confusion"]


def test_dict_holds_the_confusion_matrix_in_sparse_form():
    labels, probs = _random_case(7)
    report = classification_report(labels, probs, _names(NUM_CLASSES))
    sparse = json.loads(json.dumps(report.to_dict()))["confusion"]
    np.testing.assert_array_equal(confusion_from_entries(sparse), report.confusion)
    assert len(sparse["entries"]) == np.count_nonzero(report.confusion)


def test_dict_is_strict_json():
    labels = np.zeros(4, dtype=int)
    probs = np.tile([0.9, 0.1], (4, 1))
    json.dumps(evaluate_predictions(labels, probs, _names(2)), allow_nan=False)


def test_logits_are_rejected_with_a_hint():
    labels, probs = _random_case(5)
    with pytest.raises(ValueError, match="softmax"):
        classification_report(labels, np.log(probs), _names(NUM_CLASSES))


def test_labels_outside_the_class_range_are_rejected():
    labels, probs = _random_case(6)
    labels[0] = NUM_CLASSES
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        classification_report(labels, probs, _names(NUM_CLASSES))
