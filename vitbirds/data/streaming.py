"""Stream images from disk: each training worker decodes only its own shard, lazily, every epoch.

Why this and not the decode-once cache (`loading.py`): the cache holds every image of train and
valid in every worker, N * (1.15 * image_size)^2 * 3 bytes each (85k Kaggle photos at 224 px:
17 GB per worker), so memory grows with the dataset. Here a worker holds only the file list and
the batches in flight: DataLoader processes (`DataConfig.stream_workers`) read, decode (JPEG DCT
scaling, `images.load_rgb`) and crop a sample at a time, so memory is bounded by
workers x prefetch x batch, whatever the dataset size. They hand over uint8 crops, stacked
straight into shared memory; colour jitter and normalisation run batch by batch where the
batch is consumed, on the training device (`transforms.SplitTransform`). Float crops were 4x
the bytes to stack, share and copy to a GPU: at 224 px that cost more than a quarter of what
decoding and cropping cost.
Training crops are cut from the decoded photo (JPEG DCT scaling only, `resize=False`), not from
a copy first resampled to the decode size: one resampling per image instead of two (an epoch
of a small model through `jobs/train.py` over 21,000 of the 224-px stand-in's photos, two Train
workers on 2 cores, before and after alternated four times: 288-372 -> 340-453 images/s, +6 to
+36 % per pair; the trainers' own work bounds the epoch too).
`jobs/bench_data.py` (streamed, normalised images/s over a process pool's per-image decode +
augment + normalise rate, same 2 cores): 0.64 with float crops; with uint8 ones 0.70-0.80, and
0.85 and 0.76 with the single resampling (the pool pays no hand-off: shared-memory batches, a
third process on two cores). The consumer normalising into one reused float buffer
(`reuse_batches`, what Ray Train workers use) took it to 0.93 and 0.95 in two runs on a faster
2-core VM, where the same bench without it gave 0.85.

Why this and not Ray Data (file list -> `map_batches` decode + augment -> `get_dataset_shard` +
`iter_torch_batches`): `jobs/bench_data.py` measures both on the same files and cores. On the
2-core machine this was built on (quiet at last; 300 files at 224 px): this path 279 images/s
and 0.82 GiB peak PSS, a bare process pool 436 images/s, Ray Data 10 images/s (its timing
includes starting Ray, so that rate is a floor, not a fair comparison) and 2.9 GiB for the Ray
node it needs. Earlier, under a load of ~18, a local Ray failed its 30 s start-up deadline in
most tries. The choice rests on the design as much: Ray Data hands every decoded float batch (38
MB per 64 images at 224 px) through the object store, an extra copy and shared memory on the
node, where a DataLoader worker's shared-memory queue feeds the trainer in the same pod; Ray
Data splits blocks between ranks dynamically, so which rank trains on which image is not a
function of (seed, epoch) and a restarted run cannot replay an epoch, while a
DistributedSampler's order is; and a file that fails in `map_batches` fails the task unless
filtered by hand. Its real advantage, a CPU pool feeding GPU pods, matters only once a GPU pod's
own cores cannot decode as fast as its GPU trains, which needs GPU figures to decide.
`jobs/bench_data.py` keeps the Ray Data candidate so that comparison can be rerun.

Semantics shared with the cache: the same transforms, the same seeded order (a generator reseeded
per epoch, or a DistributedSampler with the seed and `set_epoch`), valid/test split exactly
rank::world so all-reduced metrics count each image once. DataLoader workers are not persistent:
each epoch's worker RNGs then derive from that epoch's seed, so a resumed run replays the epoch
exactly as an uninterrupted one would. Undecodable files are skipped, counted and named in one
warning per pass; they cost a smaller batch, never a failed epoch.
"""

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, get_worker_info

from vitbirds.config import DataConfig, TrainConfig
from vitbirds.data.images import DEFAULT_MAX_PIXELS, load_rgb
from vitbirds.data.sources import DatasetSplits, Sample
from vitbirds.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SplitTransform,
    Transform,
    eval_transform,
    train_transform,
)
from vitbirds.errors import DataError, ImageDecodeError

logger = logging.getLogger(__name__)

_SKIPPED_SHOWN = 5
_BYTES_PER_GIB = 1024**3

Item = tuple[torch.Tensor | None, int, str | None]  # (image or None, label, why it was skipped)


class LazyImageDataset(Dataset[Item]):
    """(transformed image, label, None) per sample, decoded on every access; (None, label,
    reason) for a file that cannot be decoded, which `collate_skipping` drops and counts.
    `transform` is the per-image, uint8 half of a `SplitTransform`. `resize=False` decodes at
    a reduced JPEG scale only, leaving the one resampling to a random crop (`images.load_rgb`)."""

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[torch.Tensor], torch.Tensor],
        *,
        decode_size: int | None = None,
        resize: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.decode_size = decode_size
        self.resize = resize
        self.max_pixels = max_pixels

    @property
    def labels(self) -> list[int]:
        return [sample.label for sample in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Item:
        sample = self.samples[index]
        try:
            image = load_rgb(
                sample.path,
                short_side=self.decode_size,
                resize=self.resize,
                max_pixels=self.max_pixels,
            )
        except ImageDecodeError as exc:
            return None, sample.label, str(exc)
        # HWC viewed as CHW without a copy, as the cache stores it (loading.py).
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        return self.transform(tensor).as_subclass(torch.Tensor), sample.label, None


@dataclass
class StreamBatch:
    images: torch.Tensor  # uint8 [B, 3, H, W]; B may be 0 when every file of the batch was bad
    labels: torch.Tensor
    skipped: list[str]  # reasons, each naming its file

    def pin_memory(self) -> "StreamBatch":
        """Called by the DataLoader's pinning thread on CUDA machines (faster host-to-GPU)."""
        return StreamBatch(self.images.pin_memory(), self.labels.pin_memory(), self.skipped)


def collate_skipping(items: list[Item]) -> StreamBatch:
    """The batch of the decodable items. In a DataLoader process the images are stacked
    straight into shared memory, as torch's default_collate does: sending the batch to the
    trainer then copies nothing."""
    good = [(image, label) for image, label, _ in items if image is not None]
    skipped = [reason for image, _, reason in items if image is None and reason is not None]
    if not good:
        return StreamBatch(
            torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), skipped
        )
    first = good[0][0]
    images = torch.empty((len(good), *first.shape), dtype=first.dtype)
    if get_worker_info() is not None:
        images.share_memory_()
    torch.stack([image for image, _ in good], out=images)
    labels = torch.tensor([label for _, label in good], dtype=torch.int64)
    return StreamBatch(images, labels, skipped)


class StreamLoader:
    """Iterates a DataLoader of uint8 `StreamBatch`es as (normalised float images, labels) pairs
    on `device`, as the training loop expects, keeping count of the files it had to skip (each
    named once in the log). `finish` is the batch half of the transform (`SplitTransform`)."""

    def __init__(
        self, loader: DataLoader, *, finish: Transform, seed: int, device: torch.device
    ) -> None:
        self.loader = loader
        self.finish = finish
        self.seed = seed
        self.device = device
        self.skipped: list[str] = []  # each bad file's reason (naming it), in order found
        self._known: set[str] = set()

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """The epoch's order: a function of (seed, epoch) on every rank, resumed or not."""
        sampler = self.loader.sampler
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        elif self.loader.generator is not None:
            self.loader.generator.manual_seed(self.seed + epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        new: list[str] = []
        seen = 0
        for batch in self.loader:
            for reason in batch.skipped:
                if reason not in self._known:
                    self._known.add(reason)
                    self.skipped.append(reason)
                    new.append(reason)
            if batch.labels.numel():
                seen += batch.labels.numel()
                images = batch.images.to(self.device, non_blocking=True)
                yield self.finish(images), batch.labels.to(self.device, non_blocking=True)
        if new:
            more = len(new) - _SKIPPED_SHOWN
            logger.warning(
                "skipped %d image(s) that could not be decoded: %s%s",
                len(new),
                "; ".join(new[:_SKIPPED_SHOWN]),
                f" and {more} more" if more > 0 else "",
            )
        if seen == 0 and len(self.loader.dataset) > 0 and self.skipped:
            raise DataError(
                f"none of the {len(self.loader.dataset)} images of this shard could be decoded; "
                f"first: {self.skipped[0]}"
            )


def make_stream_loaders(
    splits: DatasetSplits,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    *,
    rank: int = 0,
    world: int = 1,
    cpus: int | None = None,
    device: torch.device | str = "cpu",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    reuse_batches: bool = False,
) -> tuple[StreamLoader, StreamLoader, StreamLoader | None]:
    """(train, valid, test) streaming loaders of this rank's shard; test None without a test split.

    Train: shuffled (a DistributedSampler when `world` > 1, as Ray's `prepare_data_loader` would
    add); valid and test: every world-th image from `rank`, no padding. `cpus`: this worker's
    cores (default: the machine's), which size the decoding pool when the config leaves it open.
    Batches arrive on `device`, normalised there. `reuse_batches`: each loader normalises every
    batch into the tensor it returned last (`ToNormalizedFloat`), for a consumer that is done
    with one batch before it asks for the next, as a training loop is; not for `list(loader)`.
    """
    decode_size = round(data_cfg.image_size * data_cfg.decode_scale)
    reuse = {"reuse_batch_output": reuse_batches}
    eval_tf = eval_transform(
        data_cfg.image_size, mean, std, resize_scale=data_cfg.decode_scale, **reuse
    )
    workers = data_cfg.stream_workers
    if workers is None:  # the Ray adapter passes the Train worker's own CPU count
        workers = max(1, (cpus or os.cpu_count() or 1) - 1)

    def loader(samples: list[Sample], transform: SplitTransform, train: bool) -> StreamLoader:
        # Training's random crop resamples each image once; evaluation resizes as the cache did.
        dataset: Dataset = LazyImageDataset(
            samples, transform.per_image, decode_size=decode_size, resize=not train
        )
        sampler, generator = None, None
        if train and world > 1:
            sampler = DistributedSampler(
                dataset, num_replicas=world, rank=rank, shuffle=True, seed=train_cfg.seed
            )
        elif train:
            generator = torch.Generator().manual_seed(train_cfg.seed)
        elif world > 1:
            dataset = Subset(dataset, range(rank, len(samples), world))
        return StreamLoader(
            DataLoader(
                dataset,
                batch_size=train_cfg.batch_size,
                shuffle=train and sampler is None,
                sampler=sampler,
                generator=generator,
                num_workers=workers,
                collate_fn=collate_skipping,
                prefetch_factor=2 if workers > 0 else None,
                pin_memory=torch.device(device).type == "cuda",
            ),
            finish=transform.per_batch,
            seed=train_cfg.seed,
            device=torch.device(device),
        )

    return (
        loader(splits.train, train_transform(data_cfg, mean, std, **reuse), train=True),
        loader(splits.valid, eval_tf, train=False),
        loader(splits.test, eval_tf, train=False) if splits.test else None,
    )


@dataclass(frozen=True)
class DataModeChoice:
    mode: str  # "cache" | "stream"
    reason: str


def cache_bytes(num_images: int, data_cfg: DataConfig) -> int:
    """What the decode-once cache of `num_images` holds in one worker (uint8, square images
    decoded at image_size * decode_scale)."""
    side = round(data_cfg.image_size * data_cfg.decode_scale)
    return num_images * side * side * 3


def choose_data_mode(
    data_cfg: DataConfig, splits: DatasetSplits, *, workers_per_node: int
) -> DataModeChoice:
    """`data_cfg.data_mode`, with `auto` resolved: the cache when every worker of a node can
    hold its decoded train + valid images within `cache_budget_gib`, else streaming."""
    images = len(splits.train) + len(splits.valid)
    node_bytes = cache_bytes(images, data_cfg) * workers_per_node
    estimate = (
        f"{images} images at {data_cfg.image_size} px x {workers_per_node} worker(s) "
        f"= {node_bytes / _BYTES_PER_GIB:.1f} GiB decoded"
    )
    budget = f"the {data_cfg.cache_budget_gib:g} GiB cache budget"
    if data_cfg.data_mode != "auto":
        return DataModeChoice(data_cfg.data_mode, f"asked for ({estimate} if cached)")
    if node_bytes <= data_cfg.cache_budget_gib * _BYTES_PER_GIB:
        return DataModeChoice("cache", f"{estimate} fits {budget}: decode once, fastest epochs")
    return DataModeChoice(
        "stream", f"{estimate} exceeds {budget}: each worker decodes its own shard per epoch"
    )
