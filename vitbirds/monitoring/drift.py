"""Drift statistics and label-free accuracy estimates: numpy, scipy.stats and scikit-learn only.

Every two-sample test compares a reference sample (the model on its validation set) with an
observed one (new traffic) and returns a p-value under "same distribution" together with an effect
size: with thousands of predictions a harmless shift is significant, with fifty a large one may
not be, so a decision needs both.

- `ks_test`: Kolmogorov-Smirnov on a scalar score (top-1 confidence, predictive entropy).
- `class_shift`: chi-square statistic of the 2 x K table of predicted-class counts with a
  permutation p-value (valid for sparse classes); PSI as the effect size.
- `mmd_test`: kernel two-sample test (Gretton et al. 2012) on embeddings, RBF kernel with the
  median-heuristic bandwidth, p-value by permutation.
Permutation p-values come from `scipy.stats.permutation_test`.
- `domain_classifier_auroc`: how well a cross-validated logistic regression tells observed from
  reference embeddings; 0.5 is indistinguishable, 1.0 separable. An effect size in plain words.
- `atc_threshold`/`atc_estimate`: Average Thresholded Confidence (Garg et al. 2022), the accuracy
  estimate without labels; `fit_temperature` + `scaled_confidence`: temperature scaling (Guo et al.
  2017) and the mean calibrated confidence, the other estimate reported beside it.
- `bootstrap_interval`/`bootstrap_difference`: percentile bootstrap CIs (scipy.stats.bootstrap).
- `class_drops`: per-class one-sided Fisher exact tests with Benjamini-Hochberg q-values.

The Serve log keeps only the top-k probabilities of a prediction, so scores that need the whole
distribution (`topk_entropy`, `scaled_confidence`) take the top-k and spread the remaining mass
evenly over the other classes; with every probability given they are exact.

Libraries considered and not used: alibi-detect 0.13 would downgrade numpy and Pillow and pull in
transformers, numba and OpenCV; evidently pulls ~30 packages (a web server, plotly, nltk) around the
same scipy tests. Both would cost more than the ~300 lines here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats
from scipy.optimize import minimize_scalar
from scipy.spatial.distance import pdist, squareform
from scipy.special import logsumexp
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from vitbirds.evaluation.metrics import per_class_auroc

PSI_SMOOTHING = 0.5  # pseudo-count per class, so a class absent on one side has a finite PSI


@dataclass
class DriftTestResult:
    """One two-sample test: statistic, p-value and an effect size with its name."""

    name: str
    statistic: float
    p_value: float
    effect: float
    effect_name: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Interval:
    """A point estimate with a bootstrap confidence interval.

    For a difference, `p_value` is the share of bootstrap differences at or below zero: the
    one-sided bootstrap p-value of "no drop".
    """

    estimate: float
    low: float
    high: float
    confidence: float
    p_value: float | None = None

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class ClassDrop:
    """A class whose recall fell; `q_value` is the BH-adjusted one-sided Fisher p-value."""

    index: int
    name: str
    reference_recall: float
    observed_recall: float
    reference_support: int
    observed_support: int
    p_value: float
    q_value: float


# ---------------------------------------------------------------------------------------------
# Scores from top-k probabilities


def topk_entropy(top_probs: np.ndarray, num_classes: int) -> np.ndarray:
    """Predictive entropy (nats) from the k largest probabilities [N, k] of C classes.

    The mass outside the top-k is spread evenly over the other C - k classes, which is the largest
    entropy those probabilities allow; exact when k == C.
    """
    top = np.clip(top_probs.astype(np.float64), 0.0, 1.0)
    head = -np.sum(np.where(top > 0, top * np.log(np.where(top > 0, top, 1.0)), 0.0), axis=1)
    rest_classes = num_classes - top.shape[1]
    if rest_classes <= 0:
        return head
    rest = np.clip(1.0 - top.sum(axis=1), 0.0, 1.0)
    per_class = rest / rest_classes
    tail = -np.where(rest > 0, rest * np.log(np.where(per_class > 0, per_class, 1.0)), 0.0)
    return head + tail


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) on labelled data."""
    z = logits.astype(np.float64)
    picked = z[np.arange(len(labels)), labels]

    def nll(log_t: float) -> float:
        t = np.exp(log_t)
        return float(np.mean(logsumexp(z / t, axis=1) - picked / t))

    result = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(result.x))


def scaled_confidence(top_probs: np.ndarray, num_classes: int, temperature: float) -> np.ndarray:
    """Top-1 probability after temperature scaling, from the top-k probabilities [N, k].

    softmax(z / T) equals p^(1/T) renormalised, so probabilities suffice; the classes outside the
    top-k share the remaining mass evenly, as in `topk_entropy`.
    """
    top = np.clip(top_probs.astype(np.float64), 1e-12, 1.0)
    powered = top ** (1.0 / temperature)
    normaliser = powered.sum(axis=1)
    rest_classes = num_classes - top.shape[1]
    if rest_classes > 0:
        rest = np.clip(1.0 - top_probs.sum(axis=1), 0.0, 1.0) / rest_classes
        normaliser = normaliser + rest_classes * rest ** (1.0 / temperature)
    return powered[:, 0] / normaliser


# ---------------------------------------------------------------------------------------------
# Label-free accuracy


def atc_threshold(scores: np.ndarray, correct: np.ndarray) -> float:
    """The score above which the reference holds as many samples as it has correct ones.

    Garg et al. 2022: accuracy on new data is then estimated as the fraction of its scores above
    this threshold. Any monotone calibration of the score leaves the estimate unchanged.
    """
    accuracy = float(np.mean(correct))
    return float(np.quantile(scores, 1.0 - accuracy))


def atc_estimate(scores: np.ndarray, threshold: float) -> float:
    return float(np.mean(scores > threshold))


# ---------------------------------------------------------------------------------------------
# Two-sample tests


def ks_test(name: str, reference: np.ndarray, observed: np.ndarray) -> DriftTestResult:
    """Two-sided KS; the effect is the shift of the observed mean, in the score's units."""
    result = stats.ks_2samp(reference, observed)
    return DriftTestResult(
        name=name,
        statistic=float(result.statistic),
        p_value=float(result.pvalue),
        effect=float(np.mean(observed) - np.mean(reference)),
        effect_name="mean shift",
        detail={
            "reference_mean": float(np.mean(reference)),
            "observed_mean": float(np.mean(observed)),
        },
    )


def class_shift(
    reference: np.ndarray,
    observed: np.ndarray,
    class_names: list[str],
    *,
    permutations: int = 1000,
    seed: int = 0,
    name: str = "predicted_class",
) -> DriftTestResult:
    """Class mix (predicted classes, or true labels where known): chi-square statistic of the
    2 x K count table, permutation p-value.

    The p-value comes from permuting which side each prediction belongs to, not from the
    chi-square distribution, so the many sparse classes of a small sample (expected counts below
    Cochran's 5) need no pooling and keep their power. PSI over all classes is the effect size,
    with the classes that moved most; its small-sample bias is about (K - 1)(1/n_ref + 1/n_obs),
    large for many classes, so it is reported rather than thresholded.
    """
    num_classes = len(class_names)
    n_ref = len(reference)
    pooled = np.concatenate([reference, observed]).astype(np.int64)
    totals = np.bincount(pooled, minlength=num_classes).astype(np.float64)
    present = totals > 0
    share = n_ref / len(pooled)
    expected_ref, expected_obs = totals[present] * share, totals[present] * (1 - share)

    def chi_square(ref_rows: np.ndarray, _: np.ndarray, axis: int = -1) -> np.ndarray:
        rows = np.atleast_2d(ref_rows)  # one row of reference indices per permutation
        offsets = np.arange(len(rows))[:, None] * num_classes
        counts = np.bincount((pooled[rows] + offsets).ravel(), minlength=len(rows) * num_classes)
        ref_counts = counts.reshape(len(rows), num_classes)[:, present]
        obs_counts = totals[present] - ref_counts
        value = ((ref_counts - expected_ref) ** 2 / expected_ref).sum(axis=1) + (
            (obs_counts - expected_obs) ** 2 / expected_obs
        ).sum(axis=1)
        return value if np.ndim(ref_rows) > 1 else value[0]

    result = stats.permutation_test(
        (np.arange(n_ref), np.arange(n_ref, len(pooled))),
        chi_square,
        permutation_type="independent",
        vectorized=True,
        n_resamples=permutations,
        alternative="greater",
        random_state=np.random.default_rng(seed),
    )
    ref_counts = np.bincount(reference, minlength=num_classes).astype(np.float64)
    obs_counts = np.bincount(observed, minlength=num_classes).astype(np.float64)
    ref_p = (ref_counts + PSI_SMOOTHING) / (ref_counts.sum() + PSI_SMOOTHING * num_classes)
    obs_p = (obs_counts + PSI_SMOOTHING) / (obs_counts.sum() + PSI_SMOOTHING * num_classes)
    contributions = (obs_p - ref_p) * np.log(obs_p / ref_p)
    moved = np.argsort(-contributions)[:5]
    return DriftTestResult(
        name=name,
        statistic=float(result.statistic),
        p_value=float(result.pvalue),
        effect=float(contributions.sum()),
        effect_name="PSI",
        detail={
            "classes_seen": int(present.sum()),
            "moved": [
                {
                    "class": class_names[i],
                    "reference_share": float(ref_counts[i] / max(1.0, ref_counts.sum())),
                    "observed_share": float(obs_counts[i] / max(1.0, obs_counts.sum())),
                }
                for i in moved
            ],
        },
    )


def mmd_test(
    reference: np.ndarray,
    observed: np.ndarray,
    *,
    permutations: int = 500,
    max_samples: int = 500,
    seed: int = 0,
) -> DriftTestResult:
    """Kernel two-sample test on embeddings [N, D] with an RBF kernel.

    Bandwidth: the median pairwise distance of the pooled sample (median heuristic). Statistic:
    the biased MMD^2 estimate, w^T K w with w = +1/n on one side and -1/m on the other; the
    kernel matrix is computed once and every permutation is one matrix product. The p-value is
    (1 + permutations reaching the observed MMD^2) / (1 + permutations). Each side is subsampled
    to `max_samples` (the cost is quadratic).
    """
    rng = np.random.default_rng(seed)
    x = _subsample(reference, max_samples, rng)
    y = _subsample(observed, max_samples, rng)
    squared = pdist(np.concatenate([x, y]).astype(np.float64), "sqeuclidean")
    bandwidth2 = float(np.median(squared[squared > 0])) if np.any(squared > 0) else 1.0
    kernel = np.exp(-squareform(squared) / (2.0 * bandwidth2))
    np.fill_diagonal(kernel, 1.0)
    n, m = len(x), len(y)

    def mmd2(x_rows: np.ndarray, y_rows: np.ndarray, axis: int = -1) -> np.ndarray:
        xs, ys = np.atleast_2d(x_rows), np.atleast_2d(y_rows)
        columns = np.arange(len(xs))[:, None]
        weights = np.zeros((n + m, len(xs)))
        weights[xs, columns] = 1.0 / n
        weights[ys, columns] = -1.0 / m
        value = np.einsum("ib,ib->b", weights, kernel @ weights)
        return value if np.ndim(x_rows) > 1 else value[0]

    result = stats.permutation_test(
        (np.arange(n), np.arange(n, n + m)),
        mmd2,
        permutation_type="independent",
        vectorized=True,
        n_resamples=permutations,
        alternative="greater",
        random_state=rng,
    )
    return DriftTestResult(
        name="embedding_mmd",
        statistic=float(result.statistic),
        p_value=float(result.pvalue),
        effect=float(result.statistic / max(np.median(result.null_distribution), 1e-12)),
        effect_name="MMD^2 / permutation median",
        detail={"bandwidth": float(np.sqrt(bandwidth2)), "reference_n": n, "observed_n": m},
    )


def domain_classifier_auroc(
    reference: np.ndarray, observed: np.ndarray, *, max_samples: int = 500, seed: int = 0
) -> float:
    """Out-of-fold AUROC of a logistic regression telling observed from reference rows."""
    rng = np.random.default_rng(seed)
    x = _subsample(reference, max_samples, rng)
    y = _subsample(observed, max_samples, rng)
    features = np.concatenate([x, y]).astype(np.float64)
    target = np.concatenate([np.zeros(len(x), dtype=np.int64), np.ones(len(y), dtype=np.int64)])
    folds = StratifiedKFold(n_splits=min(5, len(x), len(y)), shuffle=True, random_state=seed)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    probs = cross_val_predict(classifier, features, target, cv=folds, method="predict_proba")
    return float(per_class_auroc(target, probs)[1])


def _subsample(values: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if len(values) <= limit:
        return values
    return values[np.sort(rng.choice(len(values), size=limit, replace=False))]


# ---------------------------------------------------------------------------------------------
# Labelled metrics: bootstrap intervals and per-class drops

Statistic = Callable[[np.ndarray], np.ndarray]  # sample indices -> one value per metric


def bootstrap_interval(
    statistic: Statistic, n: int, *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> list[Interval]:
    """Percentile bootstrap CIs of each value `statistic(indices)` returns, over n samples."""
    estimate = np.atleast_1d(statistic(np.arange(n)))
    result = stats.bootstrap(
        (np.arange(n),),
        lambda idx: np.atleast_1d(statistic(idx)),
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=False,
        random_state=np.random.default_rng(seed),
    )
    low, high = np.atleast_1d(result.confidence_interval.low, result.confidence_interval.high)
    return [
        Interval(float(e), float(lo), float(hi), confidence)
        for e, lo, hi in zip(estimate, low, high, strict=True)
    ]


def bootstrap_difference(
    reference: Statistic,
    n_reference: int,
    observed: Statistic,
    n_observed: int,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[Interval]:
    """CIs of reference(...) - observed(...) per value, both samples resampled independently."""
    estimate = np.atleast_1d(reference(np.arange(n_reference))) - np.atleast_1d(
        observed(np.arange(n_observed))
    )
    result = stats.bootstrap(
        (np.arange(n_reference), np.arange(n_observed)),
        lambda i, j: np.atleast_1d(reference(i)) - np.atleast_1d(observed(j)),
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=False,
        paired=False,
        random_state=np.random.default_rng(seed),
    )
    low, high = np.atleast_1d(result.confidence_interval.low, result.confidence_interval.high)
    at_most_zero = np.mean(np.atleast_2d(result.bootstrap_distribution) <= 0, axis=-1)
    return [
        Interval(float(e), float(lo), float(hi), confidence, float(p))
        for e, lo, hi, p in zip(estimate, low, high, at_most_zero, strict=True)
    ]


def auroc_of_resamples(labels: np.ndarray, probs: np.ndarray) -> Callable[[np.ndarray], float]:
    """indices -> macro one-vs-rest AUROC of those rows, for bootstrapping without re-ranking.

    A resample holds the original rows with multiplicities, so each class's Mann-Whitney U is a
    weighted sum over the rows sorted once (ties count one half, classes without positives or
    negatives are skipped: the conventions of `vitbirds.evaluation.metrics.per_class_auroc`).
    Sorting [N, C] once instead of per resample is what makes 1000 resamples of 100 classes take
    seconds.
    """
    n, c = probs.shape
    order = np.argsort(probs, axis=0, kind="stable")
    ordered = np.take_along_axis(probs, order, axis=0)
    # Equal scores share a group id; ids of column j lie in [j * n, (j + 1) * n).
    starts = np.vstack([np.ones((1, c), dtype=bool), ordered[1:] != ordered[:-1]])
    groups = (np.cumsum(starts, axis=0) - 1 + np.arange(c) * n).ravel()
    positive = labels[order] == np.arange(c)

    def auroc(indices: np.ndarray) -> float:
        weights = np.bincount(indices, minlength=n)[order].astype(np.float64)
        pos, neg = weights * positive, weights * ~positive
        neg_in_group = np.bincount(groups, weights=neg.ravel(), minlength=n * c)
        column_base = np.repeat(np.concatenate([[0.0], np.cumsum(neg.sum(axis=0))[:-1]]), n)
        below = (np.cumsum(neg_in_group) - neg_in_group - column_base)[groups]
        u = (pos.ravel() * (below + 0.5 * neg_in_group[groups])).reshape(n, c).sum(axis=0)
        pairs = pos.sum(axis=0) * neg.sum(axis=0)
        usable = pairs > 0
        return float(np.mean(u[usable] / pairs[usable])) if usable.any() else float("nan")

    return auroc


def class_drops(
    reference_labels: np.ndarray,
    reference_correct: np.ndarray,
    observed_labels: np.ndarray,
    observed_correct: np.ndarray,
    class_names: list[str],
) -> list[ClassDrop]:
    """Classes seen on both sides whose observed recall is lower, most significant first."""
    indices, p_values, rows = [], [], []
    for c, name in enumerate(class_names):
        ref_c, obs_c = reference_labels == c, observed_labels == c
        if not ref_c.any() or not obs_c.any():
            continue
        ref_hits, obs_hits = int(reference_correct[ref_c].sum()), int(observed_correct[obs_c].sum())
        ref_n, obs_n = int(ref_c.sum()), int(obs_c.sum())
        table = [[ref_hits, ref_n - ref_hits], [obs_hits, obs_n - obs_hits]]
        indices.append(c)
        p_values.append(float(stats.fisher_exact(table, alternative="greater").pvalue))
        rows.append((name, ref_hits / ref_n, obs_hits / obs_n, ref_n, obs_n))
    if not indices:
        return []
    q_values = stats.false_discovery_control(p_values, method="bh")
    drops = [
        ClassDrop(c, name, ref_recall, obs_recall, ref_n, obs_n, p, float(q))
        for c, (name, ref_recall, obs_recall, ref_n, obs_n), p, q in zip(
            indices, rows, p_values, q_values, strict=True
        )
        if obs_recall < ref_recall
    ]
    return sorted(drops, key=lambda d: (d.p_value, d.observed_recall - d.reference_recall))
