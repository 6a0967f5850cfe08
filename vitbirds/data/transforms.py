"""Augmentations for training, the deterministic view for evaluation, and batch-level mixing.

All transforms are torchvision.transforms.v2 pipelines that accept a PIL image or a uint8 tensor
[3, H, W] (the in-memory cache of `loading.py`) and return a float tensor [3, H, W], normalised
with the mean/std that the model's metadata records, so Serve normalises exactly as training did.
"""

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torchvision.transforms import v2

from vitbirds.config import DataConfig
from vitbirds.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Eval resizes the short side to image_size * this, then centre-crops image_size (the usual
# 0.875 crop ratio); DataConfig.decode_scale has the same default so cached images need no resize.
EVAL_RESIZE_SCALE = 1.15
# Smallest crop of RandomResizedCrop. The usual 0.08 often crops a bird out of the frame entirely
# at 64 px; 0.25 still varies scale and position a lot.
CROP_SCALE = (0.25, 1.0)

Transform = Callable[..., torch.Tensor]


def eval_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    resize_scale: float = EVAL_RESIZE_SCALE,
) -> Transform:
    """Resize the short side, centre-crop `image_size`, normalise: the same output every call."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(round(image_size * resize_scale), antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
            v2.ToPureTensor(),
        ]
    )


def train_transform(
    config: DataConfig,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Transform:
    """Random resized crop and flip, then the options `config` enables, then normalisation."""
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RandomResizedCrop(config.image_size, scale=CROP_SCALE, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if config.randaugment:
        steps.append(v2.RandAugment())
    if config.trivialaugment:
        steps.append(v2.TrivialAugmentWide())
    if config.color_jitter > 0:
        # No hue jitter: plumage colour is what tells many species apart.
        jitter = config.color_jitter
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if config.random_erasing > 0:
        steps.append(v2.RandomErasing(p=config.random_erasing, value=0))
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)


def mix_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    mixup: float = 0.0,
    cutmix: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp or CutMix (chosen at random when both are on) of a normalised float batch.

    `mixup`/`cutmix` are the Beta(alpha, alpha) parameters, 0 disables. Returns the mixed images
    and soft targets [B, num_classes] (class probabilities, which F.cross_entropy accepts).
    """
    choices = []
    if mixup > 0:
        choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not choices:
        raise ConfigError(f"mix_batch needs mixup > 0 or cutmix > 0, got {mixup} and {cutmix}")
    mixer = choices[int(torch.randint(len(choices), ()).item())]
    return mixer(images, labels)


def batch_mixer(
    config: DataConfig, num_classes: int
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """`mix_batch` bound to `config`'s alphas, or None when neither mixup nor cutmix is on."""
    if config.mixup <= 0 and config.cutmix <= 0:
        return None
    return partial(mix_batch, num_classes=num_classes, mixup=config.mixup, cutmix=config.cutmix)
