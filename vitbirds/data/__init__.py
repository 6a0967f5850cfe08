"""Datasets on disk -> labelled splits -> decoded images (cached or streamed) -> augmented batches.

`sources` finds and splits images, `images` decodes one safely, `loading` caches and batches,
`streaming` decodes each worker's shard every epoch instead (memory flat in the dataset size),
`transforms` augments, `synthetic` generates the default dataset and Kaggle-scale stand-ins.
"""

from vitbirds.data.images import DEFAULT_MAX_PIXELS, load_rgb
from vitbirds.data.loading import ImageDataset, SkippedImage, make_loaders
from vitbirds.data.sources import DatasetSplits, Sample, discover_dataset
from vitbirds.data.synthetic import load_mask, make_synthetic_dataset
from vitbirds.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    batch_mixer,
    eval_transform,
    mix_batch,
    train_transform,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatasetSplits",
    "ImageDataset",
    "Sample",
    "SkippedImage",
    "batch_mixer",
    "discover_dataset",
    "eval_transform",
    "load_mask",
    "load_rgb",
    "make_loaders",
    "make_synthetic_dataset",
    "mix_batch",
    "train_transform",
]
