"""Does a model answer the same at bf16 as at fp32? Per photo: probabilities, top-1, attention.

The check a bf16 Serve replica must pass against an fp32 one (and the test pins it on a small
model): the top-5 probabilities of each photo within `PROBABILITY_TOLERANCE` of fp32's; a top-1
that differs only where fp32's own top-1 and top-2 were a near-tie (within `NEAR_TIE`); and the
attention-rollout map of each photo correlating with fp32's (Pearson, over the patches).
"""

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from vitbirds.model.baselines import logits_and_embedding
from vitbirds.model.explain import attention_maps
from vitbirds.model.files import LoadedModel
from vitbirds.precision import Precision

PROBABILITY_TOLERANCE = 0.02
NEAR_TIE = 0.02
MIN_ROLLOUT_CORRELATION = 0.98


@dataclass(frozen=True)
class Agreement:
    """How `candidate` precision's answers differ from `reference`'s on the same photos."""

    photos: int
    reference: str
    candidate: str
    top1_agreement: float
    max_top5_probability_diff: float  # over each photo's reference top-5 classes
    flips: int  # photos whose top-1 differs
    flips_not_near_tie: int  # of those, photos whose reference top-1/top-2 gap was >= NEAR_TIE
    largest_flipped_gap: float  # the reference top-1/top-2 gap of the least tied flip
    min_rollout_correlation: float | None  # None: the model has no attention maps
    median_rollout_correlation: float | None

    @property
    def within_tolerances(self) -> bool:
        rollout_ok = (
            self.min_rollout_correlation is None
            or self.min_rollout_correlation >= MIN_ROLLOUT_CORRELATION
        )
        return (
            self.max_top5_probability_diff <= PROBABILITY_TOLERANCE
            and self.flips_not_near_tie == 0
            and rollout_ok
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "within_tolerances": self.within_tolerances}


def _probabilities(loaded: LoadedModel, images: torch.Tensor, precision: Precision) -> torch.Tensor:
    """Softmax [B, C] as Serve's BatchPredictor computes it at `precision`."""
    with torch.inference_mode(), precision.autocast():
        logits, _ = logits_and_embedding(loaded.model, images)
    return logits.float().softmax(dim=-1).cpu()


def _rollout_correlations(
    loaded: LoadedModel, images: torch.Tensor, reference: Precision, candidate: Precision
) -> torch.Tensor:
    """Pearson correlation of each photo's rollout map at the two precisions."""
    _, want = attention_maps(loaded.model, images, precision=reference)
    _, got = attention_maps(loaded.model, images, precision=candidate)
    want = want.flatten(1).double().cpu()
    got = got.flatten(1).double().cpu()
    want = want - want.mean(dim=1, keepdim=True)
    got = got - got.mean(dim=1, keepdim=True)
    return (want * got).sum(dim=1) / (want.norm(dim=1) * got.norm(dim=1)).clamp_min(1e-12)


def precision_agreement(
    loaded: LoadedModel,
    batches: Iterable[torch.Tensor],
    *,
    reference: Precision,
    candidate: Precision,
) -> Agreement:
    """Compares `loaded`'s answers at two precisions over `batches` of normalised model inputs
    (already on the model's device)."""
    top1_same = flips = flips_not_near_tie = photos = 0
    max_diff = largest_flipped_gap = 0.0
    correlations: list[torch.Tensor] = []
    for images in batches:
        want = _probabilities(loaded, images, reference)
        got = _probabilities(loaded, images, candidate)
        k = min(5, want.shape[1])
        top = want.topk(k, dim=1)
        diff = (got.gather(1, top.indices) - top.values).abs()
        max_diff = max(max_diff, float(diff.max()))
        flipped = got.argmax(dim=1) != top.indices[:, 0]
        gaps = top.values[:, 0] - top.values[:, 1] if k > 1 else torch.ones(len(want))
        flips += int(flipped.sum())
        flips_not_near_tie += int((flipped & (gaps >= NEAR_TIE)).sum())
        if flipped.any():
            largest_flipped_gap = max(largest_flipped_gap, float(gaps[flipped].max()))
        top1_same += int((~flipped).sum())
        photos += len(want)
        if loaded.metadata.attention_maps:
            correlations.append(_rollout_correlations(loaded, images, reference, candidate))
    rollout = torch.cat(correlations) if correlations else None
    return Agreement(
        photos=photos,
        reference=reference.name,
        candidate=candidate.name,
        top1_agreement=top1_same / max(photos, 1),
        max_top5_probability_diff=max_diff,
        flips=flips,
        flips_not_near_tie=flips_not_near_tie,
        largest_flipped_gap=largest_flipped_gap,
        min_rollout_correlation=float(rollout.min()) if rollout is not None else None,
        median_rollout_correlation=float(rollout.median()) if rollout is not None else None,
    )
