"""What a Ray Train worker iterates: this rank's train and valid batches, in either data mode.

- cache (`vitbirds.data.loading`): every worker decodes train + valid once; Ray's
  `prepare_data_loader` shards the train loader (DistributedSampler), valid is split exactly.
- stream (`vitbirds.data.streaming`): each worker decodes only its own shard, every epoch, so
  memory stays flat as the dataset grows (why not Ray Data: see that module's docstring).

Both give the same seeded order per (seed, epoch), the same transforms and the same exact valid
split, so a run trains the same way and resumes the same way in either mode.
"""

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import ray.train.torch
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from vitbirds.config import DataConfig, TrainConfig
from vitbirds.data.loading import make_loaders
from vitbirds.data.sources import DatasetSplits
from vitbirds.data.streaming import choose_data_mode, make_stream_loaders

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class WorkerData:
    mode: str  # "cache" | "stream"
    train: Iterable[Batch]
    valid: Iterable[Batch]
    steps_per_epoch: int
    set_epoch: Callable[[int], None]  # reseeds the train order for an epoch
    skipped_here: Callable[[], int]  # undecodable files this worker has met so far

    def skipped_images(self) -> int:
        """Undecodable files met so far by all workers together; every rank must call it at
        the same point (an all-reduce in stream mode, where each rank sees only its shard)."""
        count = self.skipped_here()
        if self.mode == "stream" and dist.is_available() and dist.is_initialized():
            total = torch.tensor([count], dtype=torch.int64)
            dist.all_reduce(total)
            count = int(total.item())
        return count


def worker_data(
    splits: DatasetSplits,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    *,
    rank: int,
    world: int,
    cpus: int,
    device: torch.device,
) -> WorkerData:
    """This rank's loaders; `train_cfg.batch_size` is already the per-worker batch, `cpus` the
    worker's cores (its decoding processes in stream mode); stream mode normalises batches on
    `device`."""
    mode = data_cfg.data_mode
    if mode == "auto":  # resolved by the driver for jobs/train.py; Tune trials come here
        mode = choose_data_mode(data_cfg, splits, workers_per_node=world).mode
    if mode == "stream":
        train, valid, _ = make_stream_loaders(
            replace(splits, test=[]), data_cfg, train_cfg, rank=rank, world=world, cpus=cpus,
            device=device, reuse_batches=True,  # the training loop takes one batch at a time
        )  # fmt: skip
        return WorkerData(
            mode, _FirstBatchAnnouncer(train, rank), valid, len(train), train.set_epoch,
            lambda: len(train.skipped) + len(valid.skipped),
        )  # fmt: skip
    train_loader, valid_loader, _ = make_loaders(replace(splits, test=[]), data_cfg, train_cfg)
    train_set, valid_set = train_loader.dataset, valid_loader.dataset
    if world > 1:
        train_loader = ray.train.torch.prepare_data_loader(train_loader, move_to_device=False)
        valid_loader = _exact_shard(valid_loader, rank, world)

    def set_epoch(epoch: int) -> None:
        if world > 1:
            train_loader.sampler.set_epoch(epoch)
        elif train_loader.generator is not None:
            train_loader.generator.manual_seed(train_cfg.seed + epoch)

    return WorkerData(
        mode, _FirstBatchAnnouncer(train_loader, rank), valid_loader, len(train_loader),
        set_epoch, lambda: len(train_set.skipped) + len(valid_set.skipped),
    )  # fmt: skip


class _FirstBatchAnnouncer:
    """Rank 0 prints when the first training batch is ready (unix time): how long a user waited
    for the first step, and what jobs/bench_data.py measures."""

    def __init__(self, loader: Iterable[Batch], rank: int) -> None:
        self.loader = loader
        self.pending = rank == 0

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            if self.pending:
                self.pending = False
                print(f"first training batch ready at unix time {time.time():.3f}", flush=True)
            yield batch


def _exact_shard(loader: DataLoader, rank: int, world: int) -> DataLoader:
    """Every rank-th image, no padding: all-reduced sums then count each image exactly once
    (a DistributedSampler would repeat images to even out the shards)."""
    dataset = loader.dataset
    return DataLoader(
        Subset(dataset, range(rank, len(dataset), world)),
        batch_size=loader.batch_size,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )
