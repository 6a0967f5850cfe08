"""Augmentations for training, the deterministic view for evaluation, and batch-level mixing.

The train and eval transforms accept a PIL image or a uint8 tensor [3, H, W] (the in-memory
cache of `loading.py`) and return a float tensor [3, H, W], normalised with the mean/std that the
model's metadata records, so Serve normalises exactly as training did. Each is a `SplitTransform`:
its uint8 half can run where images are decoded and its float half on whole batches elsewhere.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

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


@dataclass(frozen=True)
class SplitTransform:
    """A transform in two halves: `per_image` (uint8 in, uint8 out: decode-size crops, flips and
    other augmentations) and `per_batch` (a uint8 batch [B, 3, H, W] in, a normalised float batch
    out: colour jitter, normalisation, erasing).

    Called on one image it runs both, which is what Serve, evaluation and the decode-once cache
    do. The streaming loader runs `per_image` in its decoding processes and `per_batch` where the
    batch is consumed, on the training device: uint8 crops are a quarter of the float ones to
    stack, pass through shared memory and copy to a GPU (`vitbirds.data.streaming`).
    """

    per_image: Transform
    per_batch: Transform

    def __call__(self, image: Any) -> torch.Tensor:
        return self.per_batch(self.per_image(image).as_subclass(torch.Tensor))


def eval_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    resize_scale: float = EVAL_RESIZE_SCALE,
    reuse_batch_output: bool = False,
) -> SplitTransform:
    """Resize the short side, centre-crop `image_size`, normalise: the same output every call.
    `reuse_batch_output`: see `ToNormalizedFloat`."""
    resize_and_crop = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(round(image_size * resize_scale), antialias=True),
            v2.CenterCrop(image_size),
        ]
    )
    normalise = ToNormalizedFloat(mean, std, reuse_batch_output=reuse_batch_output)
    return SplitTransform(resize_and_crop, normalise)


def train_transform(
    config: DataConfig,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    reuse_batch_output: bool = False,
) -> SplitTransform:
    """Random resized crop and flip, then the options `config` enables, then normalisation.
    `reuse_batch_output`: see `ToNormalizedFloat`."""
    augment: list[v2.Transform] = [
        v2.ToImage(),
        v2.RandomResizedCrop(config.image_size, scale=CROP_SCALE, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if config.randaugment:
        augment.append(v2.RandAugment())
    if config.trivialaugment:
        augment.append(v2.TrivialAugmentWide())
    finish: list[Transform] = [
        ToNormalizedFloat(
            mean, std, jitter=config.color_jitter, reuse_batch_output=reuse_batch_output
        )
    ]
    if config.random_erasing > 0:
        finish.append(EraseEach(config.random_erasing))
    return SplitTransform(v2.Compose(augment), v2.Compose(finish))


class ToNormalizedFloat:
    """uint8 image [3, H, W] or images [B, 3, H, W] -> float, each colour-jittered if asked, then
    normalised by mean/std.

    `jitter` draws brightness, contrast and saturation factors from [1 - jitter, 1 + jitter], per
    image. No hue: plumage colour is what tells many species apart. Scaling to [0, 1], the three
    adjustments and normalisation are all affine in RGB, so per image they compose into one 3x3
    matmul plus an offset, and clamping to [0, 1] becomes a clamp of each channel to its
    normalised image of [0, 1]; torchvision's ToDtype + ColorJitter + Normalize run ~20
    dispatched ops per image instead, which on 64 px images cost more than the crop and resize
    together. One image at a time: its float temporaries stay in cache, where a whole batch's
    (38 MB at 224 px) would be mapped and page-faulted afresh by every op (about 1.5x slower on
    CPU). On a GPU that is a handful of small kernels per image, without a host sync (not yet
    measured there: no GPU was available).

    `reuse_batch_output`: every batch of a shape is written into the same tensor, which the
    previous call returned. For a consumer that is done with a batch before it asks for the next
    (a training or evaluation loop): a fresh 38-MB batch lies above glibc's 32-MB mmap threshold,
    so each one is mapped anew and every page faulted in as it is written. Reusing it raised the
    stream's images/s in `jobs/bench_data.py` by 7-12 % on a 2-core VM (stream / raw decode rate
    0.85 before, 0.93 and 0.95 after).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        jitter: float = 0.0,
        reuse_batch_output: bool = False,
    ) -> None:
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.jitter = jitter
        self.reuse_batch_output = reuse_batch_output
        # Each channel's normalised image of [0, 1]: the clamp after jittering.
        self.bounds = [(-m / s, (1 - m) / s) for m, s in zip(self.mean, self.std, strict=True)]
        # One per (shape, device): an epoch's last, smaller batch does not evict the full one.
        self._outputs: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        if images.dim() == 3:
            return self._one(images.as_subclass(torch.Tensor))
        if images.dim() != 4:
            raise ValueError(f"expected [3, H, W] or [B, 3, H, W], got {tuple(images.shape)}")
        images = images.as_subclass(torch.Tensor)
        size, device = images.shape[0], images.device
        factors = self._factors(size)
        matrices = torch.tensor([self._matrix(*drawn) for drawn in factors], device=device)
        normalise = torch.tensor([[-m / s] for m, s in zip(self.mean, self.std, strict=True)])
        normalise, luma = normalise.to(device), _LUMA.to(device)
        # contrast pulls towards the image's mean gray: (1 - contrast) * brightness of it
        gray_pull = torch.tensor(
            [[(1 - c) * b / 255.0 / s] for b, c, _ in factors for s in self.std], device=device
        ).view(size, 3, 1)
        out = self._batch_output(images.shape, device)
        flat_out = out.view(size, 3, -1)
        for index in range(size):
            pixels = images[index].reshape(3, -1).float()
            offset = normalise
            if self.jitter > 0:
                offset = offset + gray_pull[index] * (pixels.mean(dim=1) @ luma)
            torch.addmm(offset, matrices[index], pixels, out=flat_out[index])
            if self.jitter > 0:
                for channel, (lowest, highest) in enumerate(self.bounds):
                    flat_out[index, channel].clamp_(lowest, highest)
        return out

    def _batch_output(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        if not self.reuse_batch_output:
            return torch.empty(shape, device=device)
        key = (tuple(shape), device)
        if key not in self._outputs:
            self._outputs[key] = torch.empty(shape, device=device)
        return self._outputs[key]

    def _one(self, image: torch.Tensor) -> torch.Tensor:
        """One image [3, H, W], the way every model so far was trained and served (the batch path
        above computes the same maps, composed, and agrees to float rounding)."""
        image = image.float()  # a new tensor: in-place ops below are safe
        mean = torch.tensor(self.mean).view(3, 1, 1).to(image.device)
        std = torch.tensor(self.std).view(3, 1, 1).to(image.device)
        if self.jitter == 0:
            return image.div_(255.0).sub_(mean).div_(std)
        low, high = 1 - self.jitter, 1 + self.jitter
        brightness, contrast, saturation = torch.empty(3).uniform_(low, high).tolist()
        mean_gray = float(image.mean(dim=(-2, -1)) @ _LUMA.to(image.device)) / 255.0 * brightness
        scale = contrast * brightness / 255.0
        to_gray = (1 - saturation) * scale
        matrix = torch.tensor(
            [
                [to_gray * w + (saturation * scale if i == j else 0.0) for j, w in enumerate(LUMA)]
                for i in range(3)
            ],
            device=image.device,
        )
        offset = torch.full((3, 1), (1 - contrast) * mean_gray, device=image.device)
        flat = torch.addmm(offset, matrix, image.reshape(3, -1))
        return flat.view(image.shape).clamp_(0.0, 1.0).sub_(mean).div_(std)

    def _factors(self, size: int) -> list[tuple[float, float, float]]:
        """Brightness, contrast and saturation of each image: its own draw, or 1s without jitter."""
        if self.jitter == 0:
            return [(1.0, 1.0, 1.0)] * size
        drawn = torch.empty(size, 3).uniform_(1 - self.jitter, 1 + self.jitter)
        return [tuple(row) for row in drawn.tolist()]

    def _matrix(self, brightness: float, contrast: float, saturation: float) -> list[list[float]]:
        """[0, 255] RGB -> jittered and normalised RGB, but for the mean-gray offset: saturation
        blends towards each pixel's gray, contrast scales, normalisation divides by std."""
        scale = contrast * brightness / 255.0
        to_gray = (1 - saturation) * scale
        return [
            [(to_gray * w + (saturation * scale if i == j else 0.0)) / self.std[i] for j, w in
             enumerate(LUMA)]
            for i in range(3)
        ]  # fmt: skip

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std}, jitter={self.jitter})"


class EraseEach:
    """RandomErasing (to 0, the mean colour once normalised) drawn for each image of a batch:
    torchvision's v2 transforms draw one set of parameters per call, so on a batch every image
    would lose the same box."""

    def __init__(self, probability: float) -> None:
        self.erase = v2.RandomErasing(p=probability, value=0)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dim() == 3:
            return self.erase(batch)
        for index in range(batch.shape[0]):
            batch[index] = self.erase(batch[index])
        return batch

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.erase.p})"


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
