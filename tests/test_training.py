"""The one training loop: schedule, resumable state, EMA and mixing."""

import itertools
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vitbirds.config import ModelConfig, TrainConfig
from vitbirds.model.files import ModelMetadata, load_model
from vitbirds.model.vit import VisionTransformer
from vitbirds.training.loop import (
    TrainingRun,
    fit,
    load_checkpoint,
    lr_multiplier,
    save_checkpoint,
    seed_everything,
)

CONFIG = ModelConfig(image_size=16, patch_size=4, dim=32, depth=2, heads=2, num_classes=3)


def _loader(seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(48) % 3
    images = torch.randn(48, 3, 16, 16, generator=generator) + labels[:, None, None, None]
    return DataLoader(TensorDataset(images, labels), batch_size=16, shuffle=True)


def _run(epochs: int, **train) -> TrainingRun:
    seed_everything(0)
    config = TrainConfig(epochs=epochs, lr=3e-3, warmup_epochs=1, **train)
    return TrainingRun(
        VisionTransformer(CONFIG), config, steps_per_epoch=3, device=torch.device("cpu")
    )


def _metadata() -> ModelMetadata:
    return ModelMetadata(
        model=CONFIG.to_dict(), class_names=["a", "b", "c"], mean=[0.5] * 3, std=[0.5] * 3,
        image_size=16,
    )  # fmt: skip


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_the_floor() -> None:
    values = [
        lr_multiplier(s, warmup_steps=10, total_steps=110, min_ratio=0.01) for s in range(111)
    ]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert values[110] == pytest.approx(0.01)
    assert all(a >= b for a, b in itertools.pairwise(values[9:]))


def test_fit_reports_every_epoch_and_the_loss_falls() -> None:
    run = _run(epochs=6)
    seen = []
    history = fit(run, _loader(), _loader(1), on_epoch_end=seen.append)
    assert [m["epoch"] for m in history] == [1, 2, 3, 4, 5, 6] and seen == history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert {"val_loss", "val_top1", "val_top5", "lr", "images_per_s"} <= set(history[-1])
    assert history[-1]["val_top5"] == 1.0  # 3 classes: top-5 always hits


def test_resuming_from_a_checkpoint_continues_exactly_where_it_stopped(tmp_path) -> None:
    straight = _run(epochs=4, ema_decay=0.9)
    fit(straight, _loader(), _loader(1))

    first = _run(epochs=4, ema_decay=0.9)
    first.config.epochs = 2
    fit(first, _loader(), _loader(1))
    save_checkpoint(tmp_path / "ckpt", first, _metadata())

    resumed = _run(epochs=4, ema_decay=0.9)
    torch.manual_seed(123)  # a fresh process would have another RNG state: the checkpoint wins
    load_checkpoint(tmp_path / "ckpt", resumed)
    assert resumed.epoch == 2
    history = fit(resumed, _loader(), _loader(1))
    assert [m["epoch"] for m in history] == [3, 4]
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert resumed.scheduler.last_epoch == straight.scheduler.last_epoch


def test_checkpoint_is_a_servable_model_directory_holding_the_ema_weights(tmp_path) -> None:
    run = _run(epochs=2, ema_decay=0.5)
    fit(run, _loader(), _loader(1))
    save_checkpoint(tmp_path, run, _metadata())
    loaded = load_model(tmp_path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), run.ema.module.eval()(x), atol=1e-6)
        assert not torch.allclose(loaded.model(x), run.model.eval()(x), atol=1e-4)


def test_a_mixer_trains_on_soft_targets() -> None:
    calls = []

    def mixer(images: torch.Tensor, labels: torch.Tensor):
        calls.append(labels.shape[0])
        soft = torch.nn.functional.one_hot(labels, 3).float() * 0.8 + 0.2 / 3
        return images, soft

    run = _run(epochs=1)
    run.mixer = mixer
    metrics = run.train_epoch(_loader())
    assert sum(calls) == 48 and math.isfinite(metrics["train_loss"])
