"""Decode every image once into memory, then augment tensors per epoch.

Full-size JPEG decoding each epoch is what starves a small model on a 2-core machine. Here each
image is decoded once, at the reduced size training needs (JPEG DCT scaling via `Image.draft`),
in a thread pool (Pillow releases the GIL while decoding), and kept as a uint8 tensor; epochs
only run cheap tensor transforms on small images. Memory: about N * (1.15 * image_size)^2 * 3
bytes, e.g. 10k images at 64 px take 0.2 GB and at 224 px 2 GB.

Files that cannot be decoded are skipped, counted in `.skipped` and reported in one warning,
so a bad file found in a 80k-image dataset never stops an epoch. When the decoded set does not
fit in memory, `streaming.py` decodes each worker's shard every epoch instead (`--data-mode`).
"""

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vitbirds.config import DataConfig, TrainConfig
from vitbirds.data.images import DEFAULT_MAX_PIXELS, load_rgb
from vitbirds.data.sources import DatasetSplits, Sample
from vitbirds.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform
from vitbirds.errors import DataError, ImageDecodeError
from vitbirds.progress import ProgressFactory, default_progress

logger = logging.getLogger(__name__)

_SKIPPED_SHOWN = 5  # paths named in the warning; the rest are counted


@dataclass(frozen=True)
class SkippedImage:
    path: Path
    reason: str


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """(transformed image, label) pairs over images decoded once into a uint8 tensor cache.

    `decode_size` is the short side images are decoded to (None: full size). Without a
    `transform`, items are the cached uint8 tensors [3, H, W]. `progress` draws the decoding
    (default: `vitbirds.progress.default_progress()`).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        decode_size: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        threads: int | None = None,
        progress: ProgressFactory | None = None,
    ) -> None:
        self.transform = transform
        threads = threads or min(8, os.cpu_count() or 1)

        def decode(sample: Sample) -> torch.Tensor | ImageDecodeError:
            try:
                image = load_rgb(sample.path, short_side=decode_size, max_pixels=max_pixels)
            except ImageDecodeError as exc:
                return exc
            # HWC storage viewed as CHW: no copy, and torchvision's uint8 resize is fastest on
            # channels-last memory.
            return torch.from_numpy(np.array(image)).permute(2, 0, 1)

        with ThreadPoolExecutor(max_workers=threads) as pool:
            bar = progress or default_progress()
            decoded = list(bar(pool.map(decode, samples), desc="decode", total=len(samples)))

        self.samples: list[Sample] = []
        self.images: list[torch.Tensor] = []
        self.skipped: list[SkippedImage] = []
        for sample, result in zip(samples, decoded, strict=True):
            if isinstance(result, ImageDecodeError):
                self.skipped.append(SkippedImage(sample.path, str(result)))
            else:
                self.samples.append(sample)
                self.images.append(result)
        if self.skipped:
            shown = "; ".join(str(s.path) for s in self.skipped[:_SKIPPED_SHOWN])
            more = len(self.skipped) - _SKIPPED_SHOWN
            logger.warning(
                "skipped %d of %d images that could not be decoded: %s%s",
                len(self.skipped),
                len(samples),
                shown,
                f" and {more} more" if more > 0 else "",
            )
        if samples and not self.samples:
            raise DataError(
                f"none of the {len(samples)} images could be decoded; "
                f"first: {self.skipped[0].reason}"
            )

    @property
    def labels(self) -> list[int]:
        return [sample.label for sample in self.samples]

    @property
    def nbytes(self) -> int:
        """Memory held by the decoded-image cache."""
        return sum(image.numel() for image in self.images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.samples[index].label


def make_loaders(
    splits: DatasetSplits,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tuple[DataLoader, DataLoader, DataLoader | None]:
    """(train, valid, test) loaders; test is None when the dataset has no test split.

    Plain DataLoaders (train shuffled by a seeded generator, no custom sampler), so Ray Train's
    `prepare_data_loader` can add its DistributedSampler (the Ray adapter does). Batches are
    (float images [B, 3, H, W], int64 labels [B]); mixup/cutmix are applied on the device by
    `transforms.batch_mixer`.
    """
    decode_size = round(data_cfg.image_size * data_cfg.decode_scale)
    eval_tf = eval_transform(data_cfg.image_size, mean, std, resize_scale=data_cfg.decode_scale)

    def loader(samples: list[Sample], transform: Callable, shuffle: bool) -> DataLoader:
        dataset = ImageDataset(samples, transform, decode_size=decode_size)
        workers = train_cfg.loader_workers
        return DataLoader(
            dataset,
            batch_size=train_cfg.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(train_cfg.seed) if shuffle else None,
        )

    return (
        loader(splits.train, train_transform(data_cfg, mean, std), shuffle=True),
        loader(splits.valid, eval_tf, shuffle=False),
        loader(splits.test, eval_tf, shuffle=False) if splits.test else None,
    )
