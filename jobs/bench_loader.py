"""Loader benchmark: full-size PIL decode + PIL transforms every epoch (the naive ImageFolder way)
vs vitbirds' decode-once uint8 cache + tensor transforms, on the cub100 training images.

    .venv/bin/python jobs/bench_loader.py [--data-dir DIR] [--images-per-class N] [--epochs 2]

Both run single-threaded torch with loader_workers=0 (the training default); decoding the cache
uses its thread pool. Epochs alternate between the two pipelines so machine load hits both alike.
The last line printed is one JSON object (jobs.benchlib.report.report).
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.benchlib.data import add_data_argument, require_data
from jobs.benchlib.report import report, target
from vitbirds.config import DataConfig
from vitbirds.data import ImageDataset, Sample, discover_dataset, load_rgb, train_transform
from vitbirds.data.transforms import CROP_SCALE, IMAGENET_MEAN, IMAGENET_STD


class NaiveDataset(Dataset[tuple[torch.Tensor, int]]):
    """Decodes the full-size file on every access, as torchvision's ImageFolder does."""

    def __init__(self, samples: list[Sample], transform: v2.Transform) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        return self.transform(load_rgb(sample.path)), sample.label


def naive_transform(config: DataConfig) -> v2.Transform:
    """The same augmentation as `train_transform`, with torchvision's stock ops on PIL images."""
    jitter = config.color_jitter
    return v2.Compose(
        [
            v2.RandomResizedCrop(config.image_size, scale=CROP_SCALE, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def timed_epoch(loader: DataLoader) -> float:
    started = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(parser)
    parser.add_argument("--images-per-class", type=int, default=None, help="default: all")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    require_data(parser, args.data_dir)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = DataConfig(image_size=args.image_size)
    samples = discover_dataset(args.data_dir, images_per_class=args.images_per_class).train
    decode_size = round(config.image_size * config.decode_scale)

    started = time.perf_counter()
    cached = ImageDataset(samples, train_transform(config), decode_size=decode_size)
    decode_s = time.perf_counter() - started
    naive = NaiveDataset(samples, naive_transform(config))

    def loader(dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=args.batch_size, shuffle=True)

    naive_times, cached_times = [], []
    for _ in range(args.epochs):
        naive_times.append(timed_epoch(loader(naive)))
        cached_times.append(timed_epoch(loader(cached)))

    count = len(samples)
    naive_rate = count * args.epochs / sum(naive_times)
    cached_rate = count * args.epochs / sum(cached_times)
    naive_epoch_s = sum(naive_times) / args.epochs
    first_epoch_s = decode_s + cached_times[0]
    results = {
        "dataset": str(args.data_dir),
        "images": count,
        "image_size": config.image_size,
        "decode_size": decode_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "naive_images_per_s": round(naive_rate, 1),
        "cached_images_per_s": round(cached_rate, 1),
        "speedup": round(cached_rate / naive_rate, 2),
        "decode_once_s": round(decode_s, 3),
        "decode_images_per_s": round(count / decode_s, 1),
        "cached_first_epoch_s": round(first_epoch_s, 3),
        "naive_epoch_s": round(naive_epoch_s, 3),
        "cache_mb": round(cached.nbytes / 2**20, 1),
        "skipped": len(cached.skipped),
    }
    for key, value in results.items():
        print(f"{key:>22}: {value}")
    report(
        "loader",
        results,
        [
            target("cached_vs_naive_images_per_s", cached_rate / naive_rate, 3.0),
            # decoding everything once must cost no more than a single naive epoch
            target("cached_first_epoch_over_naive_epoch", first_epoch_s / naive_epoch_s, 1.0, "<="),
        ],
    )


if __name__ == "__main__":
    main()
