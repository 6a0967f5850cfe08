"""The one training loop: AdamW, warmup + cosine, grad clipping, label smoothing, mixup/cutmix,
bf16 autocast where the device runs it fast (`vitbirds.precision`), optional EMA, torch.compile
and distillation from a teacher.

It knows nothing of Ray: a Ray Train worker wraps the model and loaders (DDP, distributed sampler)
and passes an `on_epoch_end` callback that reports and checkpoints. Validation metrics are
all-reduced when torch.distributed is initialised, so every worker sees the global numbers.
"""

import json
import math
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from vitbirds.config import TrainConfig
from vitbirds.errors import ModelFileError
from vitbirds.model.files import ModelMetadata, save_model, unwrap_model
from vitbirds.precision import FP32, Precision
from vitbirds.progress import ProgressFactory, default_progress

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"

Batch = tuple[torch.Tensor, torch.Tensor]
BatchMixer = Callable[[torch.Tensor, torch.Tensor], Batch]  # (images, labels) -> (images, soft)
EpochCallback = Callable[[dict[str, float]], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, kind: str, temperature: float
) -> torch.Tensor:
    """DeiT's two flavours: CE against the teacher's argmax ("hard"), or KL(teacher || student) of
    the temperature-softened distributions, scaled by T² so gradients keep their size ("soft")."""
    if kind == "hard":
        return F.cross_entropy(student, teacher.argmax(dim=1))
    return F.kl_div(
        F.log_softmax(student / temperature, dim=1),
        F.log_softmax(teacher / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, position embeddings and tokens (1-D or named so)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "dist_token"))
        (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _global_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums across workers when running distributed (DDP under Ray Train), else unchanged."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


class TrainingRun:
    """Optimiser, schedule and loop state for one model; resumable through `state_dict`.

    `mixer` mixes each batch (mixup/cutmix, `vitbirds.data.batch_mixer`) into soft targets.
    `teacher` (a frozen classifier over the same inputs, e.g. a ResNet-18 model directory) turns on
    DeiT distillation: loss = (CE(cls, labels) + distillation_loss(dist, teacher)) / 2, where
    `dist` is the distillation head of a ViT with `distill_token`, else the same logits.
    `precision`: the forward passes' autocast (`vitbirds.precision`); the weights, the optimiser
    state, the loss and the metrics stay fp32 at any precision.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        *,
        steps_per_epoch: int,
        device: torch.device,
        mixer: BatchMixer | None = None,
        teacher: nn.Module | None = None,
        precision: Precision = FP32,
    ) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.mixer = mixer
        self.teacher = teacher
        self.precision = precision
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            if hasattr(unwrap_model(model), "distilled_training"):
                unwrap_model(model).distilled_training = True
        self.epoch = 0  # epochs completed
        self.optimizer = torch.optim.AdamW(
            _param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.999)
        )
        total = max(1, config.epochs * steps_per_epoch)
        warmup = min(total, max(1, round(config.warmup_epochs * steps_per_epoch)))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_multiplier(
                step, warmup_steps=warmup, total_steps=total, min_ratio=config.min_lr_ratio
            ),
        )
        self.ema = (
            AveragedModel(
                unwrap_model(model),
                multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay),
                use_buffers=True,
            )
            if config.ema_decay
            else None
        )
        self.forward = torch.compile(model) if config.compile else model

    def train_epoch(
        self, loader: Iterable[Batch], progress: ProgressFactory | None = None
    ) -> dict[str, float]:
        """One pass over `loader`; returns loss, accuracy against the hard labels, lr, images/s.
        `progress` draws the batches (default: `vitbirds.progress.default_progress()`)."""
        self.model.train()
        started = time.perf_counter()
        # Summed on the device and read once per epoch: an .item() per step would make the host
        # wait for every step to finish on a GPU, instead of queueing the next one.
        sums = torch.zeros(2, device=self.device)  # loss x batch, correct
        seen = 0
        bar = progress or default_progress()
        batches = bar(
            loader, desc=f"epoch {self.epoch + 1}/{self.config.epochs}", total=_length(loader)
        )
        for images, labels in batches:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            targets = labels
            if self.mixer is not None:
                images, targets = self.mixer(images, labels)
            with self.precision.autocast():
                logits, loss = self._loss(images, targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.config.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(unwrap_model(self.model))
            batch = labels.shape[0]
            correct = (logits.argmax(dim=1) == labels).sum()
            sums += torch.stack([loss.detach().float() * batch, correct.float()])
            seen += batch
        loss_sum, correct = sums.tolist()
        elapsed = time.perf_counter() - started
        self.epoch += 1
        loss_sum, correct, seen = _global_sum([loss_sum, correct, seen], self.device)
        return {
            "epoch": self.epoch,
            "train_loss": loss_sum / max(seen, 1),
            "train_top1": correct / max(seen, 1),
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": seen / elapsed if elapsed > 0 else 0.0,
            "epoch_time_s": elapsed,
        }

    def _loss(
        self, images: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits scored against the labels, loss); see the class docstring for distillation."""
        outputs = self.forward(images)
        logits, logits_dist = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.config.label_smoothing)
        if self.teacher is None:
            return logits, loss
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        distill = distillation_loss(
            logits_dist.float(),
            teacher_logits,
            kind=self.config.distillation,
            temperature=self.config.distill_temperature,
        )
        return (logits + logits_dist) / 2, (loss + distill) / 2

    def evaluation_model(self) -> nn.Module:
        """The EMA weights when enabled (they generalise better), else the trained model."""
        return self.ema.module if self.ema is not None else unwrap_model(self.model)

    @torch.no_grad()
    def evaluate(self, loader: Iterable[Batch], model: nn.Module | None = None) -> dict[str, float]:
        """Loss and top-1/top-5 accuracy on `loader`, summed over all workers, of `model`
        (default: `evaluation_model()`; pass `run.model` to score the raw weights beside EMA)."""
        model = model if model is not None else self.evaluation_model()
        model.eval()
        loss_sum = top1 = top5 = seen = 0.0
        for images, labels in loader:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with self.precision.autocast():
                logits = model(images).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            k = min(5, logits.shape[1])
            hits = (logits.topk(k, dim=1).indices == labels[:, None]).float()
            top1 += hits[:, 0].sum().item()
            top5 += hits.sum().item()
            seen += labels.shape[0]
        loss_sum, top1, top5, seen = _global_sum([loss_sum, top1, top5, seen], self.device)
        seen = max(seen, 1.0)
        return {"val_loss": loss_sum / seen, "val_top1": top1 / seen, "val_top5": top5 / seen}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Resumable state split into tensors (safetensors) and plain values (JSON)."""
        optimizer = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        for index, state in optimizer["state"].items():
            for key, value in state.items():
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        if self.ema is not None:
            for key, value in self.ema.state_dict().items():
                tensors[f"ema.{key}"] = value.detach().cpu().contiguous()
        numpy_state = np.random.get_state()
        values = {
            "epoch": self.epoch,
            "param_groups": optimizer["param_groups"],
            "scheduler": self.scheduler.state_dict(),
            "rng_python": random.getstate(),
            "rng_numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        }
        return tensors, values

    def load_state_dict(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = tensor.to(self.device)
        self.optimizer.load_state_dict({"state": state, "param_groups": values["param_groups"]})
        self.scheduler.load_state_dict(values["scheduler"])
        if self.ema is not None:
            ema = {k.removeprefix("ema."): v for k, v in tensors.items() if k.startswith("ema.")}
            self.ema.load_state_dict(ema)
        self.epoch = int(values["epoch"])
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        python_state = values["rng_python"]
        random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
        kind, keys, *rest = values["rng_numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def fit(
    run: TrainingRun,
    train_loader: Iterable[Batch],
    valid_loader: Iterable[Batch],
    *,
    on_epoch_end: EpochCallback | None = None,
    before_epoch: Callable[[int], None] | None = None,
    progress: ProgressFactory | None = None,
) -> list[dict[str, float]]:
    """Trains from `run.epoch` to `run.config.epochs`; returns the per-epoch metrics.

    `before_epoch(epoch)` lets a distributed caller reseed its sampler; `on_epoch_end(metrics)`
    reports and checkpoints; `progress` draws each epoch's batches (default: the process's,
    which the Ray adapter sets to tqdm_ray on rank 0 and to nothing on the other ranks).
    """
    history = []
    while run.epoch < run.config.epochs:
        if before_epoch is not None:
            before_epoch(run.epoch)
        metrics = run.train_epoch(train_loader, progress)
        metrics.update(run.evaluate(valid_loader))
        history.append(metrics)
        if on_epoch_end is not None:
            on_epoch_end(metrics)
    return history


def _length(loader: Iterable[Batch]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def save_checkpoint(checkpoint_dir: str | Path, run: TrainingRun, metadata: ModelMetadata) -> Path:
    """A servable model directory plus the state needed to resume training from it."""
    checkpoint_dir = save_model(checkpoint_dir, run.evaluation_model(), metadata)
    tensors, values = run.state_dict()
    model_state = {
        f"model.{k}": v.detach().cpu() for k, v in unwrap_model(run.model).state_dict().items()
    }
    save_file({**tensors, **model_state}, checkpoint_dir / STATE_TENSORS)
    (checkpoint_dir / STATE_JSON).write_text(json.dumps(values))
    return checkpoint_dir


def load_checkpoint(checkpoint_dir: str | Path, run: TrainingRun) -> None:
    """Restores the trained (non-EMA) weights and the loop state into `run`."""
    checkpoint_dir = Path(checkpoint_dir)
    if (
        not (checkpoint_dir / STATE_TENSORS).is_file()
        or not (checkpoint_dir / STATE_JSON).is_file()
    ):
        raise ModelFileError(f"{checkpoint_dir} holds no training state to resume from")
    tensors = load_file(checkpoint_dir / STATE_TENSORS)
    model_state = {
        k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")
    }
    unwrap_model(run.model).load_state_dict(model_state)
    run.load_state_dict(tensors, json.loads((checkpoint_dir / STATE_JSON).read_text()))
