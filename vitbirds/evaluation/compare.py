"""Is a challenger model not worse than the champion? A paired comparison on the same photos.

"Not worse" means: the lower end of the two-sided `confidence` interval of
top-1(challenger) - top-1(champion) is at least `-margin` (default: 95 % and one point of
accuracy). It is a non-inferiority test at level (1 - confidence) / 2: a challenger that is truly
`margin` worse passes at most 2.5 % of the time, and one that is as good passes more often the more
photos there are.

Why a paired bootstrap of the difference and not McNemar's test: McNemar tests "equally accurate"
and a non-significant result is not evidence of "not worse" (with few photos everything passes);
the gate needs an interval on the difference, compared with a margin. Pairing matters: both models
see the same photos, so only the photos on which they disagree move the difference, and the
interval is much narrower than two independent ones. Resampling photos with replacement equals
drawing the counts of (challenger-only right, champion-only right, rest) from a multinomial, which
is what is done here: exact, seeded, and cheap for any number of photos.
"""

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vitbirds.errors import ConfigError, DataError


@dataclass(frozen=True)
class GateConfig:
    margin: float = 0.01  # accuracy the challenger may lose, as a fraction (0.01 = 1 point)
    confidence: float = 0.95  # of the two-sided interval of the difference
    resamples: int = 10_000  # bootstrap resamples
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.margin < 1.0:
            raise ConfigError(f"margin must be in [0, 1), got {self.margin}")
        if not 0.5 <= self.confidence < 1.0:
            raise ConfigError(f"confidence must be in [0.5, 1), got {self.confidence}")
        if self.resamples < 100:
            raise ConfigError(f"resamples must be at least 100, got {self.resamples}")


@dataclass(frozen=True)
class Comparison:
    """Top-1 of both models on the same `images`, and the interval of their difference."""

    images: int
    challenger_top1: float
    champion_top1: float
    only_challenger_right: int
    only_champion_right: int
    ci_low: float
    ci_high: float
    margin: float
    confidence: float

    @property
    def difference(self) -> float:
        return self.challenger_top1 - self.champion_top1

    @property
    def not_worse(self) -> bool:
        return self.ci_low >= -self.margin

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "difference": self.difference, "not_worse": self.not_worse}


def paired_bootstrap(
    challenger_correct: np.ndarray, champion_correct: np.ndarray, config: GateConfig
) -> Comparison:
    """Compares two boolean arrays (one entry per photo, same order): was each model right?"""
    challenger_correct = np.asarray(challenger_correct, dtype=bool)
    champion_correct = np.asarray(champion_correct, dtype=bool)
    if challenger_correct.shape != champion_correct.shape or challenger_correct.ndim != 1:
        raise DataError(
            f"paired comparison needs two equal-length vectors, got {challenger_correct.shape} "
            f"and {champion_correct.shape}"
        )
    n = len(challenger_correct)
    if n == 0:
        raise DataError("no photo scored by both models: nothing to compare")
    gains = int((challenger_correct & ~champion_correct).sum())
    losses = int((champion_correct & ~challenger_correct).sum())
    counts = np.random.default_rng(config.seed).multinomial(
        n, [gains / n, losses / n, (n - gains - losses) / n], size=config.resamples
    )
    differences = (counts[:, 0] - counts[:, 1]) / n
    tail = (1.0 - config.confidence) / 2
    low, high = np.quantile(differences, [tail, 1.0 - tail])
    return Comparison(
        images=n,
        challenger_top1=float(challenger_correct.mean()),
        champion_top1=float(champion_correct.mean()),
        only_challenger_right=gains,
        only_champion_right=losses,
        ci_low=float(low),
        ci_high=float(high),
        margin=config.margin,
        confidence=config.confidence,
    )
