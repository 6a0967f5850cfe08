"""Classification metrics from integer labels and class probabilities.

Everything is computed from one confusion matrix and one probability matrix in numpy, so a
525-class split is evaluated in milliseconds and every number can be checked against scikit-learn
(tests/test_metrics.py does). Conventions follow scikit-learn where it has one:

- precision/recall/F1 averages run over the classes that occur in the labels or the predictions
  (scikit-learn's default label set); an undefined ratio (no predictions, no support) counts as 0.
- AUROC is one-vs-rest on probabilities (never logits: a softmax changes the ranking across
  classes). A class with no positives or no negatives in the split has no ROC curve; it is skipped
  and `auroc_classes_used` says how many classes the macro average covers.
- Undefined scalars (kappa when both raters use a single class, AUROC with no usable class) are
  None, so metrics.json stays strict JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.stats import rankdata

ECE_BINS = 15
TOP_CONFUSIONS = 20
_PROB_SUM_TOLERANCE = 1e-3


@dataclass
class ClassMetrics:
    """One row of the per-class report."""

    index: int
    name: str
    support: int  # true samples of this class in the split
    predicted: int  # samples predicted as this class
    precision: float
    recall: float
    f1: float
    auroc: float | None  # None when the class has no positives or no negatives in the split


@dataclass
class ReliabilityBin:
    """One bin of the reliability diagram: confidences in (lower, upper]."""

    lower: float
    upper: float
    count: int
    accuracy: float | None  # None for an empty bin
    confidence: float | None


@dataclass
class ConfusedPair:
    """A (true, predicted) pair off the diagonal; `rate` is count / support of the true class."""

    true_index: int
    true_name: str
    predicted_index: int
    predicted_name: str
    count: int
    rate: float


@dataclass
class ClassificationReport:
    """All metrics of one split. `confusion[i, j]` counts samples of class i predicted as j."""

    num_samples: int
    num_classes: int
    top1_accuracy: float
    top5_accuracy: float  # top-min(5, num_classes)
    macro_precision: float
    macro_recall: float
    macro_f1: float
    weighted_precision: float
    weighted_recall: float
    weighted_f1: float
    cohen_kappa: float | None
    auroc_macro: float | None
    auroc_classes_used: int
    ece: float
    reliability: list[ReliabilityBin]
    per_class: list[ClassMetrics]
    top_confusions: list[ConfusedPair]
    confusion: np.ndarray = field(repr=False)

    def summary(self) -> dict[str, float | int | None]:
        """The scalar metrics only: what a tracker or a table shows."""
        return {
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "top1_accuracy": self.top1_accuracy,
            "top5_accuracy": self.top5_accuracy,
            "macro_precision": self.macro_precision,
            "macro_recall": self.macro_recall,
            "macro_f1": self.macro_f1,
            "weighted_precision": self.weighted_precision,
            "weighted_recall": self.weighted_recall,
            "weighted_f1": self.weighted_f1,
            "cohen_kappa": self.cohen_kappa,
            "auroc_macro": self.auroc_macro,
            "auroc_classes_used": self.auroc_classes_used,
            "ece": self.ece,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: scalars, lists of plain dicts, and the confusion matrix in sparse form
        (`confusion_entries`): at 525 classes the dense matrix is 99% zeros and megabytes of
        JSON; `confusion_from_entries` rebuilds it."""
        return {
            **self.summary(),
            "reliability": [asdict(b) for b in self.reliability],
            "per_class": [asdict(c) for c in self.per_class],
            "top_confusions": [asdict(p) for p in self.top_confusions],
            "confusion": confusion_entries(self.confusion),
        }


def evaluate_predictions(labels: Any, probs: Any, class_names: list[str]) -> dict[str, Any]:
    """All metrics as a JSON-ready dict (see `classification_report` for the dataclass)."""
    return classification_report(labels, probs, class_names).to_dict()


def classification_report(labels: Any, probs: Any, class_names: list[str]) -> ClassificationReport:
    """Compute every metric of a split from labels [N] and probabilities [N, C] (numpy or torch)."""
    y, p = _validated(labels, probs, class_names)
    n, c = p.shape
    pred = p.argmax(axis=1)
    confusion = confusion_matrix(y, pred, c)
    prf = precision_recall_f1(confusion)
    aurocs = per_class_auroc(y, p)
    used = [a for a in aurocs if a is not None]
    ece, bins = expected_calibration_error(y, p)
    per_class = [
        ClassMetrics(
            index=i,
            name=class_names[i],
            support=int(confusion[i].sum()),
            predicted=int(confusion[:, i].sum()),
            precision=float(prf["precision"][i]),
            recall=float(prf["recall"][i]),
            f1=float(prf["f1"][i]),
            auroc=aurocs[i],
        )
        for i in range(c)
    ]
    return ClassificationReport(
        num_samples=n,
        num_classes=c,
        top1_accuracy=float((pred == y).mean()),
        top5_accuracy=top_k_accuracy(y, p, min(5, c)),
        macro_precision=prf["macro_precision"],
        macro_recall=prf["macro_recall"],
        macro_f1=prf["macro_f1"],
        weighted_precision=prf["weighted_precision"],
        weighted_recall=prf["weighted_recall"],
        weighted_f1=prf["weighted_f1"],
        cohen_kappa=cohen_kappa(confusion),
        auroc_macro=float(np.mean(used)) if used else None,
        auroc_classes_used=len(used),
        ece=ece,
        reliability=bins,
        per_class=per_class,
        top_confusions=most_confused_pairs(confusion, class_names),
        confusion=confusion,
    )


def top_k_accuracy(labels: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Fraction of samples whose true class is among the k highest probabilities.

    Ties are broken toward the lower class index, as `argmax` does, so top-1 here equals
    `(probs.argmax(1) == labels).mean()`.
    """
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] int64 counts; rows are true classes, columns predicted classes."""
    flat = labels.astype(np.int64) * num_classes + predictions.astype(np.int64)
    counts = np.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def confusion_entries(confusion: np.ndarray) -> dict[str, Any]:
    """{"num_classes": C, "entries": [[true, predicted, count], ...]} for the nonzero cells."""
    rows, cols = np.nonzero(confusion)
    entries = [[int(i), int(j), int(confusion[i, j])] for i, j in zip(rows, cols, strict=True)]
    return {"num_classes": len(confusion), "entries": entries}


def confusion_from_entries(sparse: dict[str, Any]) -> np.ndarray:
    """The dense [C, C] matrix back from `confusion_entries`."""
    c = sparse["num_classes"]
    confusion = np.zeros((c, c), dtype=np.int64)
    for i, j, count in sparse["entries"]:
        confusion[i, j] = count
    return confusion


def cohen_kappa(confusion: np.ndarray) -> float | None:
    """Agreement beyond chance between labels and predictions; None when chance agreement is 1."""
    n = confusion.sum()
    observed = np.trace(confusion) / n
    expected = float(confusion.sum(axis=1) @ confusion.sum(axis=0)) / (n * n)
    if np.isclose(expected, 1.0):
        return None
    return float((observed - expected) / (1.0 - expected))


def per_class_auroc(labels: np.ndarray, probs: np.ndarray) -> list[float | None]:
    """One-vs-rest AUROC of each class's probability column (Mann-Whitney U with tied ranks).

    None for a class with no positives or no negatives in `labels`: its ROC curve is undefined.
    """
    n, c = probs.shape
    ranks = rankdata(probs, axis=0)  # average ranks, so ties count one half as in the ROC area
    positives = labels[:, None] == np.arange(c)[None, :]
    n_pos = positives.sum(axis=0)
    n_neg = n - n_pos
    rank_sum = (ranks * positives).sum(axis=0)
    result: list[float | None] = []
    for i in range(c):
        if n_pos[i] == 0 or n_neg[i] == 0:
            result.append(None)
            continue
        u = rank_sum[i] - n_pos[i] * (n_pos[i] + 1) / 2.0
        result.append(float(u / (n_pos[i] * n_neg[i])))
    return result


def expected_calibration_error(
    labels: np.ndarray, probs: np.ndarray, num_bins: int = ECE_BINS
) -> tuple[float, list[ReliabilityBin]]:
    """Top-label ECE (Guo et al. 2017) over equal-width confidence bins (lower, upper].

    Returns the ECE and the bins, which are the reliability diagram's data.
    """
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    # Bin b holds (edges[b], edges[b+1]]; a confidence of exactly 0 cannot occur for a max prob.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
    ece = 0.0
    bins = []
    for b in range(num_bins):
        in_bin = which == b
        count = int(in_bin.sum())
        if count == 0:
            bins.append(ReliabilityBin(float(edges[b]), float(edges[b + 1]), 0, None, None))
            continue
        accuracy = float(correct[in_bin].mean())
        mean_conf = float(confidence[in_bin].mean())
        ece += abs(accuracy - mean_conf) * count / len(labels)
        bins.append(
            ReliabilityBin(float(edges[b]), float(edges[b + 1]), count, accuracy, mean_conf)
        )
    return float(ece), bins


def most_confused_pairs(
    confusion: np.ndarray, class_names: list[str], top: int = TOP_CONFUSIONS
) -> list[ConfusedPair]:
    """The `top` largest off-diagonal counts, largest first (ties: lower true index first)."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    flat = off.ravel()
    order = np.argsort(-flat, kind="stable")[:top]
    support = confusion.sum(axis=1)
    pairs = []
    for idx in order:
        count = int(flat[idx])
        if count == 0:
            break
        i, j = divmod(int(idx), confusion.shape[0])
        pairs.append(ConfusedPair(i, class_names[i], j, class_names[j], count, count / support[i]))
    return pairs


def precision_recall_f1(confusion: np.ndarray) -> dict[str, Any]:
    """Per-class P/R/F1 plus macro and support-weighted averages, scikit-learn's conventions."""
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    precision = _safe_divide(tp, predicted)
    recall = _safe_divide(tp, support)
    f1 = _safe_divide(2 * tp, support + predicted)
    present = (support > 0) | (predicted > 0)
    weights = support / support.sum()
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "macro_precision": float(precision[present].mean()),
        "macro_recall": float(recall[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "weighted_precision": float(precision @ weights),
        "weighted_recall": float(recall @ weights),
        "weighted_f1": float(f1 @ weights),
    }


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _validated(labels: Any, probs: Any, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Convert to numpy and reject inputs that would give silently wrong numbers."""
    y = _to_numpy(labels)
    p = _to_numpy(probs).astype(np.float64)
    if p.ndim != 2 or y.ndim != 1 or len(y) != len(p):
        raise ValueError(f"need labels [N] and probs [N, C], got {y.shape} and {p.shape}")
    if len(y) == 0:
        raise ValueError("no samples to evaluate")
    c = p.shape[1]
    if len(class_names) != c:
        raise ValueError(f"{len(class_names)} class names for {c} probability columns")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= c:
        raise ValueError(f"labels must lie in [0, {c}), got min {y.min()} max {y.max()}")
    if not np.isfinite(p).all() or p.min() < 0:
        raise ValueError("probs must be finite and non-negative: pass softmax(logits)")
    worst = float(np.abs(p.sum(axis=1) - 1.0).max())
    if worst > _PROB_SUM_TOLERANCE:
        raise ValueError(
            f"probability rows must sum to 1 (off by up to {worst:.3g}): pass softmax(logits)"
        )
    return y.astype(np.int64), p


def _to_numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch here
        values = values.detach().cpu()
        return (values.float() if values.is_floating_point() else values).numpy()
    return np.asarray(values)
