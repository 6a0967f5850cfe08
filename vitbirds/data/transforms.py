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
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 grayscale weights, as torchvision uses
_LUMA = torch.tensor(LUMA)


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
            ToNormalizedFloat(mean, std),
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
    steps.append(ToNormalizedFloat(mean, std, jitter=config.color_jitter))
    if config.random_erasing > 0:
        steps.append(v2.RandomErasing(p=config.random_erasing, value=0))
    return v2.Compose(steps)


class ToNormalizedFloat:
    """uint8 image [3, H, W] -> float, colour-jittered if asked, then normalised by mean/std.

    `jitter` draws brightness, contrast and saturation factors from [1 - jitter, 1 + jitter].
    No hue: plumage colour is what tells many species apart. Scaling to [0, 1], the three
    adjustments and normalisation are all affine in RGB, so they run as one 3x3 matmul plus an
    offset; torchvision's ToDtype + ColorJitter + Normalize run ~20 dispatched ops instead, which
    on 64 px images cost more than the crop and resize together.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, jitter: float = 0.0) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.jitter = jitter

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 image, got {image.dtype}")
        image = image.as_subclass(torch.Tensor).float()  # a new tensor: in-place ops below are safe
        image = self._jitter(image) if self.jitter > 0 else image.div_(255.0)
        return image.sub_(self.mean).div_(self.std)

    def _jitter(self, image: torch.Tensor) -> torch.Tensor:
        """Jittered image in [0, 1] from one in [0, 255]."""
        low, high = 1 - self.jitter, 1 + self.jitter
        brightness, contrast, saturation = torch.empty(3).uniform_(low, high).tolist()
        # contrast blends towards the image's mean gray, saturation towards each pixel's gray
        mean_gray = float(image.mean(dim=(-2, -1)) @ _LUMA) / 255.0 * brightness
        scale = contrast * brightness / 255.0
        to_gray = (1 - saturation) * scale
        matrix = torch.tensor(
            [
                [to_gray * w + (saturation * scale if i == j else 0.0) for j, w in enumerate(LUMA)]
                for i in range(3)
            ]
        )
        offset = torch.full((3, 1), (1 - contrast) * mean_gray)
        flat = torch.addmm(offset, matrix, image.reshape(3, -1))
        return flat.view(image.shape).clamp_(0.0, 1.0)

    def __repr__(self) -> str:
        mean, std = self.mean.flatten().tolist(), self.std.flatten().tolist()
        return f"{type(self).__name__}(mean={mean}, std={std}, jitter={self.jitter})"


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
