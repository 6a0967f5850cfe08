"""Is the model still good? OK / WATCH / RETRAIN, with the reasons, from its reference profile and
new traffic, labelled or not.

Inputs are `Observations`: what the model predicted for new images, either from running it on a
labelled folder (`Observations.from_outputs`) or from Serve's prediction log
(`Observations.from_log`, feedback labels joined on). `assess` compares them with the model's
`ReferenceProfile` (vitbirds.monitoring.reference) using the tests of `vitbirds.monitoring.drift`:

- label-free drift: top-1 confidence and entropy (KS), predicted-class mix (chi-square, PSI),
  embeddings (MMD permutation test), Bonferroni-corrected (see below);
- effect sizes: the ATC accuracy estimate (Garg et al. 2022) and the mean temperature-scaled
  confidence against the reference accuracy; a domain classifier's AUROC on the embeddings;
- with labels: accuracy, macro F1 and one-vs-rest AUROC with bootstrap CIs, their drop from the
  reference with a CI, the classes whose recall fell (Fisher exact, BH q-values), and the mix of
  true labels against the reference's (the class-shift test on labels): a label shift leaves
  accuracy and the inputs of each class as they were, so only the labels show it at these
  sample sizes (100 classes, a few hundred images: the predicted-class test lacks the power).

Decision rules (thresholds in `MonitorConfig`):
- RETRAIN: accuracy fell by at least `retrain_accuracy_drop` — measured (the drop significant by
  bootstrap) when labels are there; otherwise estimated (calibrated confidence or ATC) while the
  confidence distribution moved significantly — or, without labels, the inputs left the training
  domain (domain AUROC at least `severe_domain_auroc` and significant MMD), where confidence no
  longer estimates accuracy.
- WATCH: any drift test significant (the label mix included), or a significant but smaller
  measured accuracy drop, or a class whose recall fell significantly (BH q-value below the
  per-test alpha).
Every alarm is a test at alpha / (number of tests): 4 without labels, 7 with them (the accuracy
drop, the class drops and the label mix), so data like the reference raises one with probability
<= alpha.
- OK: none of these. Fewer than `min_samples` predictions get OK with a note: no test has power.

A log is cut into time windows for the report's "drift over time"; the decision uses the latest
windows, merged backwards until they hold `min_samples` predictions, so old traffic does not
dilute a recent shift.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import numpy as np

from vitbirds.errors import ConfigError, DataError
from vitbirds.evaluation.metrics import confusion_matrix, precision_recall_f1
from vitbirds.monitoring.drift import (
    ClassDrop,
    DriftTestResult,
    Interval,
    atc_estimate,
    auroc_of_resamples,
    bootstrap_difference,
    bootstrap_interval,
    class_drops,
    class_shift,
    domain_classifier_auroc,
    ks_test,
    mmd_test,
    scaled_confidence,
    topk_entropy,
)
from vitbirds.monitoring.predictions import PredictionLogContents
from vitbirds.monitoring.reference import UNKNOWN_LABEL, ModelOutputs, ReferenceProfile

LABEL_FREE_TESTS = ("confidence", "entropy", "predicted_class", "embedding_mmd")
# With labels: the accuracy drop, the per-class recall drops and the label mix ("label_class").
LABELLED_EXTRA_TESTS = 3
_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class Decision(StrEnum):
    OK = "OK"
    WATCH = "WATCH"
    RETRAIN = "RETRAIN"

    @property
    def level(self) -> int:
        """0, 1, 2: what a Prometheus gauge can hold."""
        return list(Decision).index(self)


@dataclass
class MonitorConfig:
    """Thresholds of the decision and sizes of the statistics."""

    alpha: float = 0.01  # false-alarm rate of one assessment, split over the 4 drift tests
    retrain_accuracy_drop: float = 0.10  # absolute top-1 drop (measured or estimated)
    severe_domain_auroc: float = 0.90  # embeddings this separable: out of the training domain
    min_samples: int = 50  # fewer predictions: no verdict
    min_labelled: int = 30  # fewer labelled predictions: labelled metrics are skipped
    window_min_samples: int = 20  # a time window with fewer predictions is shown, not tested
    permutations: int = 1000  # of the MMD and class tests: p-values resolve down to 1/1001
    max_samples: int = 1000  # per side, for MMD and the domain classifier (quadratic cost)
    bootstrap_resamples: int = 1000
    confidence: float = 0.95  # of the bootstrap intervals
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0.0 < self.retrain_accuracy_drop < 1.0:
            raise ConfigError(
                f"retrain_accuracy_drop must be in (0, 1), got {self.retrain_accuracy_drop}"
            )
        if not 0.5 < self.severe_domain_auroc <= 1.0:
            raise ConfigError(
                f"severe_domain_auroc must be in (0.5, 1], got {self.severe_domain_auroc}"
            )
        for name in ("min_samples", "min_labelled", "window_min_samples", "permutations"):
            if getattr(self, name) < 2:
                raise ConfigError(f"{name} must be at least 2, got {getattr(self, name)}")
        strictest = self.alpha / (len(LABEL_FREE_TESTS) + LABELLED_EXTRA_TESTS)
        if 1.0 / (self.permutations + 1) >= strictest:
            raise ConfigError(
                f"{self.permutations} permutations cannot give a p-value below the strictest "
                f"per-test alpha {strictest:.2g}: use more"
            )

    @property
    def alpha_per_test(self) -> float:
        return self.alpha / len(LABEL_FREE_TESTS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Observations:
    """Predictions on new images; row i of every array is the same image."""

    predicted: np.ndarray  # [N] int64 model class index
    top_probs: np.ndarray  # [N, k] the k largest probabilities, descending
    embeddings: np.ndarray  # [N, D] projected CLS embeddings
    labels: np.ndarray  # [N] int64, UNKNOWN_LABEL where no label is known
    num_classes: int
    probs: np.ndarray | None = None  # [N, C] when the model ran here (AUROC needs them)
    times: np.ndarray | None = None  # [N] datetime64[us] (UTC) from the log

    def __len__(self) -> int:
        return len(self.predicted)

    @property
    def confidence(self) -> np.ndarray:
        return self.top_probs[:, 0]

    @property
    def entropy(self) -> np.ndarray:
        return topk_entropy(self.top_probs, self.num_classes)

    @property
    def top_k(self) -> int:
        return self.top_probs.shape[1]

    def truncated(self, k: int) -> Observations:
        """The same predictions seen through a log that keeps the top k probabilities."""
        return Observations(
            self.predicted, self.top_probs[:, :k], self.embeddings, self.labels,
            self.num_classes, self.probs, self.times,
        )  # fmt: skip

    def subset(self, indices: np.ndarray) -> Observations:
        return Observations(
            self.predicted[indices],
            self.top_probs[indices],
            self.embeddings[indices],
            self.labels[indices],
            self.num_classes,
            None if self.probs is None else self.probs[indices],
            None if self.times is None else self.times[indices],
        )

    @classmethod
    def from_outputs(cls, outputs: ModelOutputs) -> Observations:
        probs = outputs.probs
        return cls(
            predicted=probs.argmax(axis=1),
            top_probs=-np.sort(-probs, axis=1),
            embeddings=outputs.embeddings.astype(np.float64),
            labels=outputs.labels.astype(np.int64),
            num_classes=probs.shape[1],
            probs=probs,
        )

    @classmethod
    def from_reference(cls, profile: ReferenceProfile) -> Observations:
        return cls.from_outputs(profile.outputs)

    @classmethod
    def from_log(
        cls, contents: PredictionLogContents, class_names: list[str], *, model_version: str
    ) -> Observations:
        """The predictions `model_version` logged, with any feedback label joined on.

        Records of other versions share the log and are left out; so are records whose top-k
        names classes this model does not have (a log from another model).
        """
        index = {name: i for i, name in enumerate(class_names)}
        records = [
            r for r in contents.predictions
            if r.model_version == model_version and r.top_k
            and all(entry.get("label") in index for entry in r.top_k)
        ]  # fmt: skip
        if not records:
            versions = sorted({r.model_version for r in contents.predictions})
            raise DataError(
                f"the prediction log has no prediction of model version {model_version!r} "
                f"(versions in the log: {versions[:5]})"
            )
        k = min(len(r.top_k) for r in records)
        top_probs = np.array([[e["probability"] for e in r.top_k[:k]] for r in records])
        dims = {len(r.embedding) for r in records}
        if len(dims) != 1:
            raise DataError(f"prediction log embeddings have several sizes: {sorted(dims)}")
        labels = [index.get(contents.true_labels.get(r.request_id, ""), UNKNOWN_LABEL)
                  for r in records]  # fmt: skip
        return cls(
            predicted=np.array([index[r.top_k[0]["label"]] for r in records], dtype=np.int64),
            top_probs=top_probs,
            embeddings=np.array([r.embedding for r in records], dtype=np.float64),
            labels=np.array(labels, dtype=np.int64),
            num_classes=len(class_names),
            times=np.array([_utc(r.time) for r in records], dtype="datetime64[us]"),
        )


@dataclass
class LabelledMetrics:
    """Measured quality on the labelled part of the observations, against the reference."""

    num_labelled: int
    observed: dict[str, Interval]  # accuracy, macro_f1[, auroc]
    reference: dict[str, Interval]
    drop: dict[str, Interval]  # reference - observed, independent bootstraps
    dropped_classes: list[ClassDrop]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_labelled": self.num_labelled,
            "observed": {k: v.to_dict() for k, v in self.observed.items()},
            "reference": {k: v.to_dict() for k, v in self.reference.items()},
            "drop": {k: v.to_dict() for k, v in self.drop.items()},
            "dropped_classes": [asdict(d) for d in self.dropped_classes],
        }


@dataclass
class Assessment:
    """One verdict; `to_dict()` is the body of monitor.json."""

    decision: Decision
    reasons: list[str]
    num_observed: int
    num_reference: int
    tests: dict[str, DriftTestResult]
    alpha_per_test: float
    reference_accuracy: float
    estimated_accuracy: float  # mean temperature-scaled top-1 probability (DoC)
    atc_accuracy: float  # Average Thresholded Confidence
    domain_auroc: float | None
    labelled: LabelledMetrics | None = None
    period: dict[str, str] = field(default_factory=dict)  # first/last prediction time (a log)

    @property
    def significant(self) -> list[str]:
        return [name for name, t in self.tests.items() if t.p_value < self.alpha_per_test]

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": str(self.decision),
            "reasons": self.reasons,
            "num_observed": self.num_observed,
            "num_reference": self.num_reference,
            "period": self.period,
            "alpha_per_test": self.alpha_per_test,
            "significant": self.significant,
            "tests": {name: t.to_dict() for name, t in self.tests.items()},
            "reference_accuracy": self.reference_accuracy,
            "estimated_accuracy": self.estimated_accuracy,
            "atc_accuracy": self.atc_accuracy,
            "domain_auroc": self.domain_auroc,
            "labelled": None if self.labelled is None else self.labelled.to_dict(),
        }


def headline_gauges(assessment: dict[str, Any]) -> dict[str, float]:
    """The numbers worth a Prometheus gauge, from monitor.json's `assessment`.

    One definition for the monitor's tracker metrics and Serve's exported gauges.
    """
    gauges = {
        "vitbirds_monitor_decision": float(Decision(assessment["decision"]).level),
        "vitbirds_monitor_observed": float(assessment["num_observed"]),
        "vitbirds_monitor_reference_accuracy": assessment["reference_accuracy"],
        "vitbirds_monitor_estimated_accuracy": assessment["estimated_accuracy"],
        "vitbirds_monitor_atc_accuracy": assessment["atc_accuracy"],
    }
    for name, test in assessment["tests"].items():
        gauges[f"vitbirds_monitor_p_{name}"] = test["p_value"]
    if "predicted_class" in assessment["tests"]:
        gauges["vitbirds_monitor_class_psi"] = assessment["tests"]["predicted_class"]["effect"]
    if assessment.get("domain_auroc") is not None:
        gauges["vitbirds_monitor_domain_auroc"] = assessment["domain_auroc"]
    labelled = assessment.get("labelled")
    if labelled:
        gauges["vitbirds_monitor_accuracy"] = labelled["observed"]["accuracy"]["estimate"]
    return {name: float(value) for name, value in gauges.items()}


# ---------------------------------------------------------------------------------------------
# The assessment


def drift_tests(
    reference: Observations, observed: Observations, class_names: list[str], config: MonitorConfig
) -> dict[str, DriftTestResult]:
    """The four label-free tests, reference seen through the observed top-k."""
    reference = reference.truncated(observed.top_k)
    tests = [
        ks_test("confidence", reference.confidence, observed.confidence),
        ks_test("entropy", reference.entropy, observed.entropy),
        class_shift(
            reference.predicted,
            observed.predicted,
            class_names,
            permutations=config.permutations,
            seed=config.seed,
        ),
        mmd_test(
            reference.embeddings,
            observed.embeddings,
            permutations=config.permutations,
            max_samples=config.max_samples,
            seed=config.seed,
        ),
    ]
    return {t.name: t for t in tests}


def assess(
    profile: ReferenceProfile, observed: Observations, config: MonitorConfig | None = None
) -> Assessment:
    """Compares `observed` with the model's reference profile and decides."""
    config = config or MonitorConfig()
    reference = Observations.from_reference(profile)
    _check_compatible(reference, observed)
    assessment = Assessment(
        decision=Decision.OK,
        reasons=[],
        num_observed=len(observed),
        num_reference=len(reference),
        tests={},
        alpha_per_test=config.alpha_per_test,  # labelled data adds two tests: see below
        reference_accuracy=profile.accuracy,
        estimated_accuracy=calibrated_accuracy(observed, profile.temperature),
        atc_accuracy=atc_estimate(observed.confidence, profile.atc_threshold),
        domain_auroc=None,
        period=_period(observed),
    )
    if len(observed) < config.min_samples:
        assessment.reasons = [
            f"only {len(observed)} predictions (< min_samples={config.min_samples}): too few "
            "for any test to have power; no drift tests run"
        ]
        return assessment
    assessment.tests = drift_tests(reference, observed, profile.class_names, config)
    assessment.domain_auroc = domain_classifier_auroc(
        reference.embeddings, observed.embeddings, max_samples=config.max_samples,
        seed=config.seed,
    )  # fmt: skip
    labelled = observed.subset(np.flatnonzero(observed.labels != UNKNOWN_LABEL))
    if len(labelled) >= config.min_labelled:
        assessment.labelled = labelled_metrics(reference, labelled, profile.class_names, config)
        assessment.tests["label_class"] = class_shift(
            reference.labels, labelled.labels, profile.class_names,
            permutations=config.permutations, seed=config.seed, name="label_class",
        )  # fmt: skip
        assessment.alpha_per_test = config.alpha / (len(LABEL_FREE_TESTS) + LABELLED_EXTRA_TESTS)
    assessment.decision, assessment.reasons = decide(assessment, config)
    return assessment


def decide(assessment: Assessment, config: MonitorConfig) -> tuple[Decision, list[str]]:
    """The decision and its reasons, RETRAIN reasons first."""
    retrain: list[str] = []
    watch: list[str] = []
    tests = assessment.tests
    alpha = assessment.alpha_per_test
    for name in assessment.significant:
        watch.append(f"{_describe(tests[name])} (p={tests[name].p_value:.2g} < {alpha:.2g})")
    reference_accuracy = assessment.reference_accuracy
    labelled = assessment.labelled
    if labelled is not None:
        drop = labelled.drop["accuracy"]
        observed = labelled.observed["accuracy"].estimate
        measured = (
            f"measured accuracy fell from {reference_accuracy:.1%} to {observed:.1%} "
            f"(drop {drop.estimate:.1%}, {drop.confidence:.0%} CI {drop.low:.1%}..{drop.high:.1%}"
            f", {labelled.num_labelled} labelled)"
        )
        dropped = drop.p_value is not None and drop.p_value < alpha
        if dropped and drop.estimate >= config.retrain_accuracy_drop:
            retrain.append(f"{measured} >= {config.retrain_accuracy_drop:.0%}")
        elif dropped:
            watch.append(f"{measured}, bootstrap p={drop.p_value:.2g} < {alpha:.2g}")
        fallen = [d.name for d in labelled.dropped_classes if d.q_value < alpha]
        if fallen:
            watch.append(f"recall fell significantly (q < {alpha:.2g}) for: {', '.join(fallen)}")
    else:
        confidence_moved = tests["confidence"].p_value < alpha
        estimates = {
            "calibrated confidence": assessment.estimated_accuracy,
            "ATC": assessment.atc_accuracy,
        }
        for name, estimate in estimates.items():
            drop = reference_accuracy - estimate
            if confidence_moved and drop >= config.retrain_accuracy_drop:
                retrain.append(
                    f"estimated accuracy ({name}) fell from {reference_accuracy:.1%} to "
                    f"{estimate:.1%} (drop {drop:.1%} >= {config.retrain_accuracy_drop:.0%}) "
                    "while the confidence distribution moved"
                )
        auroc = assessment.domain_auroc
        if (
            auroc is not None
            and auroc >= config.severe_domain_auroc
            and tests["embedding_mmd"].p_value < alpha
        ):
            retrain.append(
                f"new inputs are separable from the reference (domain classifier AUROC "
                f"{auroc:.2f} >= {config.severe_domain_auroc:.2f}): out of the training domain, "
                "where confidence does not estimate accuracy"
            )
    if retrain:
        return Decision.RETRAIN, retrain + watch
    if watch:
        return Decision.WATCH, watch
    return Decision.OK, [
        f"no drift test significant at {alpha:.2g} each; estimated accuracy "
        f"{assessment.estimated_accuracy:.1%} vs reference {reference_accuracy:.1%}"
    ]


def calibrated_accuracy(observed: Observations, temperature: float) -> float:
    """Mean temperature-scaled top-1 probability: the accuracy a model calibrated on its
    reference expects of itself (DoC, Guillory et al. 2021)."""
    return float(np.mean(scaled_confidence(observed.top_probs, observed.num_classes, temperature)))


def _describe(test: DriftTestResult) -> str:
    if test.name in ("confidence", "entropy"):
        before, after = test.detail["reference_mean"], test.detail["observed_mean"]
        return (
            f"{test.name} distribution moved (mean {before:.3f} -> {after:.3f}, "
            f"KS {test.statistic:.2f})"
        )
    if test.name == "predicted_class":
        return (
            f"predicted-class mix changed (PSI {test.effect:.2f}, chi-square {test.statistic:.1f})"
        )
    if test.name == "label_class":
        return (
            f"label shift: the true classes' mix changed (PSI {test.effect:.2f}, chi-square "
            f"{test.statistic:.1f})"
        )
    return f"embedding distribution moved (MMD^2 {test.effect:.1f}x its permutation median)"


def labelled_metrics(
    reference: Observations, observed: Observations, class_names: list[str], config: MonitorConfig
) -> LabelledMetrics:
    """Accuracy, macro F1 (and AUROC when full probabilities exist) with bootstrap CIs."""
    names = ["accuracy", "macro_f1"]
    with_auroc = observed.probs is not None and reference.probs is not None
    if with_auroc:
        names.append("auroc")
    ref_stat = _quality_statistic(reference, len(class_names), with_auroc)
    obs_stat = _quality_statistic(observed, len(class_names), with_auroc)
    kwargs = {
        "resamples": config.bootstrap_resamples,
        "confidence": config.confidence,
        "seed": config.seed,
    }
    observed_ci = bootstrap_interval(obs_stat, len(observed), **kwargs)
    reference_ci = bootstrap_interval(ref_stat, len(reference), **kwargs)
    drop = bootstrap_difference(ref_stat, len(reference), obs_stat, len(observed), **kwargs)
    drops = class_drops(
        reference.labels, reference.predicted == reference.labels,
        observed.labels, observed.predicted == observed.labels, class_names,
    )  # fmt: skip
    return LabelledMetrics(
        num_labelled=len(observed),
        observed=dict(zip(names, observed_ci, strict=True)),
        reference=dict(zip(names, reference_ci, strict=True)),
        drop=dict(zip(names, drop, strict=True)),
        dropped_classes=drops,
    )


def _quality_statistic(
    observations: Observations, num_classes: int, with_auroc: bool
) -> Callable[[np.ndarray], np.ndarray]:
    """indices -> [accuracy, macro F1(, macro AUROC)] of those rows, metrics.py's conventions."""
    labels, predicted = observations.labels, observations.predicted
    auroc = auroc_of_resamples(labels, observations.probs) if with_auroc else None

    def statistic(indices: np.ndarray) -> np.ndarray:
        confusion = confusion_matrix(labels[indices], predicted[indices], num_classes)
        values = [np.trace(confusion) / len(indices), precision_recall_f1(confusion)["macro_f1"]]
        if auroc is not None:
            values.append(auroc(indices))
        return np.array(values)

    return statistic


def _check_compatible(reference: Observations, observed: Observations) -> None:
    if reference.num_classes != observed.num_classes:
        raise DataError(
            f"observations have {observed.num_classes} classes, the reference "
            f"{reference.num_classes}: another model's predictions?"
        )
    if reference.embeddings.shape[1] != observed.embeddings.shape[1]:
        raise DataError(
            f"observed embeddings have {observed.embeddings.shape[1]} dimensions, the "
            f"reference {reference.embeddings.shape[1]}: logged with another projection?"
        )


# ---------------------------------------------------------------------------------------------
# Time windows


@dataclass
class WindowDrift:
    """Drift of one time window of the log, for the report's charts and the tracker."""

    start: str
    end: str
    num_observed: int
    estimated_accuracy: float  # mean temperature-scaled confidence
    atc_accuracy: float
    mean_confidence: float
    p_values: dict[str, float]  # empty when the window is too small to test
    class_psi: float | None
    significant: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_window(text: str) -> timedelta:
    """'30m', '6h', '1d', '2w', '45s' -> timedelta."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"window must look like 30m, 6h, 1d or 2w, got {text!r}")
    return timedelta(seconds=float(match.group(1)) * _WINDOW_UNITS[match.group(2)])


def window_bounds(times: np.ndarray, window: timedelta) -> list[tuple[np.datetime64, np.ndarray]]:
    """(window start, row indices) of consecutive windows from the first prediction on;
    empty windows are left out."""
    step = np.timedelta64(int(window.total_seconds() * 1e6), "us")
    first = times.min()
    slots = ((times - first) // step).astype(np.int64)
    return [(first + slot * step, np.flatnonzero(slots == slot)) for slot in np.unique(slots)]


def window_drift(
    profile: ReferenceProfile, observed: Observations, window: timedelta, config: MonitorConfig
) -> list[WindowDrift]:
    """The label-free tests in each window (without bootstrap or domain classifier)."""
    if observed.times is None:
        raise DataError("time windows need prediction times (a prediction log)")
    reference = Observations.from_reference(profile)
    step = np.timedelta64(int(window.total_seconds() * 1e6), "us")
    rows = []
    for start, indices in window_bounds(observed.times, window):
        part = observed.subset(indices)
        tests = (
            drift_tests(reference, part, profile.class_names, config)
            if len(part) >= config.window_min_samples
            else {}
        )
        rows.append(
            WindowDrift(
                start=_iso(start),
                end=_iso(start + step),
                num_observed=len(part),
                estimated_accuracy=calibrated_accuracy(part, profile.temperature),
                atc_accuracy=atc_estimate(part.confidence, profile.atc_threshold),
                mean_confidence=float(part.confidence.mean()),
                p_values={name: t.p_value for name, t in tests.items()},
                class_psi=tests["predicted_class"].effect if tests else None,
                significant=[n for n, t in tests.items() if t.p_value < config.alpha_per_test],
            )
        )
    return rows


def recent(observed: Observations, window: timedelta, min_samples: int) -> Observations:
    """The latest windows, merged backwards until they hold `min_samples` predictions."""
    if observed.times is None:
        return observed
    chosen: list[np.ndarray] = []
    for _, indices in reversed(window_bounds(observed.times, window)):
        chosen.append(indices)
        if sum(len(c) for c in chosen) >= min_samples:
            break
    return observed.subset(np.sort(np.concatenate(chosen)))


def _period(observed: Observations) -> dict[str, str]:
    if observed.times is None or len(observed) == 0:
        return {}
    return {"first": _iso(observed.times.min()), "last": _iso(observed.times.max())}


def _utc(text: str) -> np.datetime64:
    """ISO 8601 with an offset -> naive UTC datetime64 (numpy keeps no time zones)."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return np.datetime64(moment, "us")


def _iso(moment: np.datetime64) -> str:
    return f"{np.datetime_as_string(moment, unit='s')}Z"
