"""The streaming data path: trains like the cache, keeps memory flat, skips bad files, and `auto`
chooses between the two by size. Tiny generated data; no Ray (the resumed Ray run is in
tests/test_stream_job.py)."""

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitbirds.config import DataConfig, TrainConfig
from vitbirds.data import discover_dataset, make_loaders, make_synthetic_dataset, streaming
from vitbirds.data.sources import DatasetSplits, Sample
from vitbirds.data.streaming import choose_data_mode, make_stream_loaders
from vitbirds.devices import resolve_device
from vitbirds.errors import ConfigError
from vitbirds.model.vit import build_model
from vitbirds.presets import get_recipe
from vitbirds.training.loop import TrainingRun, fit, seed_everything

ROOT = Path(__file__).resolve().parent.parent


def _train(splits: DatasetSplits, mode: str, epochs: int) -> list[dict[str, float]]:
    recipe = get_recipe("vit-test")
    recipe.train = replace(recipe.train, epochs=epochs, batch_size=16)
    recipe.model.num_classes = len(splits.classes)
    # Decoding in the main process, and no colour jitter: both paths then draw the same crops
    # and flips from one RNG in the same order (the stream draws jitter per batch, the cache
    # per image; tests/test_data_transforms.py checks that the two halves equal the whole).
    data_cfg = replace(recipe.data, stream_workers=0, color_jitter=0.0)
    seed_everything(0)
    if mode == "cache":
        train, valid, _ = make_loaders(splits, data_cfg, recipe.train)
    else:
        train, valid, _ = make_stream_loaders(splits, data_cfg, recipe.train)
    run = TrainingRun(
        build_model(recipe.model), recipe.train, steps_per_epoch=len(train),
        device=resolve_device("cpu"),
    )  # fmt: skip

    def before_epoch(epoch: int) -> None:
        seed_everything(100 + epoch)
        if mode == "stream":
            train.set_epoch(epoch)
        else:
            train.generator.manual_seed(recipe.train.seed + epoch)

    return fit(run, train, valid, before_epoch=before_epoch)


def test_stream_and_cache_train_the_same_model_to_the_same_accuracy(tmp_path) -> None:
    root = make_synthetic_dataset(tmp_path / "birds", num_classes=3, images_per_class=30)
    splits = discover_dataset(root)
    cached, streamed = _train(splits, "cache", 4), _train(splits, "stream", 4)
    assert abs(cached[-1]["val_top1"] - streamed[-1]["val_top1"]) <= 0.05, (cached, streamed)
    assert streamed[-1]["train_loss"] < streamed[0]["train_loss"]  # it trained, as the cache did


def _splits(count: int) -> DatasetSplits:
    samples = [Sample(Path(f"/data/{i}.jpg"), 0) for i in range(count)]
    return DatasetSplits(["a"], samples, samples[:1], [], source="imagefolder", root=Path("/"))


def test_auto_streams_above_the_memory_budget_and_caches_below() -> None:
    config = DataConfig(image_size=224, cache_budget_gib=4.0)  # 258^2 x 3 = 0.2 MB per image
    small = choose_data_mode(config, _splits(5_000), workers_per_node=2)  # 2 GB
    large = choose_data_mode(config, _splits(20_000), workers_per_node=2)  # 8 GB
    assert small.mode == "cache" and "fits the 4 GiB cache budget" in small.reason
    assert large.mode == "stream" and "exceeds the 4 GiB cache budget" in large.reason
    assert "20001 images at 224 px x 2 worker(s)" in large.reason


def test_an_explicit_data_mode_is_kept_and_a_bad_one_is_named() -> None:
    config = DataConfig(image_size=224, data_mode="cache", cache_budget_gib=0.001)
    assert choose_data_mode(config, _splits(20_000), workers_per_node=2).mode == "cache"
    with pytest.raises(
        ConfigError, match="data_mode must be one of auto, cache, stream, got 'disk'"
    ):
        DataConfig(data_mode="disk")


def _noise_images(folder: Path, count: int, size: int) -> None:
    """Random colour gradients: distinct images that are quick to write and to decode."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0.0, 1.0, size)[None, :, None]
    for index in range(count):
        class_dir = folder / "train" / f"c{index % 2}"
        class_dir.mkdir(parents=True, exist_ok=True)
        start, end = rng.integers(0, 256, (2, 1, 1, 3))
        pixels = np.broadcast_to(start + (end - start) * ramp, (size, size, 3))
        Image.fromarray(pixels.astype(np.uint8)).save(class_dir / f"{index}.jpg", quality=80)


_MEASURE = textwrap.dedent(
    """
    import json, sys
    from vitbirds.config import DataConfig, TrainConfig
    from vitbirds.data import discover_dataset, make_loaders
    from vitbirds.data.streaming import make_stream_loaders

    def mib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(field)

    mode, warm_root, root = sys.argv[1:]
    make = {"stream": make_stream_loaders, "cache": make_loaders}[mode]
    data_cfg = DataConfig(image_size=224, stream_workers=0)

    def one_epoch(folder):
        train, valid, _ = make(discover_dataset(folder), data_cfg, TrainConfig(batch_size=32))
        for _ in train:
            pass
        return train, valid

    # Libraries, allocator arenas and thread pools settle on a tiny set first; then only what
    # the measured set itself costs can move the peak (VmHWM, reset through clear_refs).
    loaders = one_epoch(warm_root)
    del loaders
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = mib("VmRSS")
    loaders = one_epoch(root)
    print(json.dumps(mib("VmHWM") - before))
    """
)


def _data_path_growth(mode: str, warm: Path, root: Path) -> float:
    """Peak RSS over building `mode`'s loaders for `root` and one epoch, minus RSS before (MiB),
    in a fresh process warmed up on the tiny set `warm`."""
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, mode, str(warm), str(root)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_streaming_worker_s_memory_stays_flat_when_the_dataset_grows_4x(tmp_path) -> None:
    warm, small, large = tmp_path / "warm", tmp_path / "small", tmp_path / "large"
    _noise_images(warm, 64, 256)
    _noise_images(small, 250, 256)
    _noise_images(large, 1000, 256)
    growth = {
        mode: _data_path_growth(mode, warm, large) - _data_path_growth(mode, warm, small)
        for mode in ("stream", "cache")
    }
    # The cache holds 750 more images of 258^2 x 3 bytes (143 MiB): the measurement sees it.
    # The stream's peak moves by allocator noise only (up to ~25 MiB seen), not with the data.
    assert growth["cache"] > 100, growth
    assert growth["stream"] < 0.3 * growth["cache"], growth


@pytest.mark.parametrize("workers", [0, 2])
def test_an_undecodable_file_in_the_stream_is_skipped_and_counted(tmp_path, caplog, workers):
    _noise_images(tmp_path, 20, 40)
    bad = tmp_path / "train" / "c1" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    splits = discover_dataset(tmp_path)
    train, _, _ = make_stream_loaders(
        splits, DataConfig(image_size=32, stream_workers=workers), TrainConfig(batch_size=8)
    )
    labels = [label for _, batch_labels in train for label in batch_labels.tolist()]
    assert len(labels) == len(splits.train) - 1
    assert len(train.skipped) == 1 and str(bad) in train.skipped[0]
    assert "skipped 1 image(s) that could not be decoded" in caplog.text
    list(train)  # a second epoch meets the same file: still one
    assert len(train.skipped) == 1


def test_training_crops_come_from_the_decoded_photo_and_eval_resizes_as_the_cache(
    tmp_path, monkeypatch
):
    """The training split's random crop is the one resampling (no resize to the decode size
    first); valid/test are resized as the cache, Serve and evaluation resize them."""
    for split, count in (("train", 4), ("valid", 2)):
        folder = tmp_path / split / "c0"
        folder.mkdir(parents=True)
        for index in range(count):
            Image.new("RGB", (160, 120), (index * 40, 90, 200)).save(folder / f"{index}.png")
    decoded: list[tuple[str, tuple[int, int]]] = []
    real_load_rgb = streaming.load_rgb

    def spy(path, **kwargs):
        image = real_load_rgb(path, **kwargs)
        decoded.append((Path(path).parts[-3], image.size))
        return image

    monkeypatch.setattr(streaming, "load_rgb", spy)
    train, valid, _ = make_stream_loaders(
        discover_dataset(tmp_path), DataConfig(image_size=32, stream_workers=0), TrainConfig()
    )
    shapes = [images.shape[-2:] for loader in (train, valid) for images, _ in loader]
    assert all(shape == (32, 32) for shape in shapes)
    assert sorted(decoded) == [("train", (160, 120))] * 4 + [("valid", (49, 37))] * 2


def test_the_stream_yields_the_test_split_and_splits_valid_exactly_between_ranks(tmp_path):
    root = make_synthetic_dataset(tmp_path / "birds", num_classes=3, images_per_class=20)
    splits = discover_dataset(root)
    config, train_cfg = DataConfig(image_size=32, stream_workers=0), TrainConfig(batch_size=4)
    shards = [make_stream_loaders(splits, config, train_cfg, rank=r, world=2) for r in (0, 1)]
    valid_seen = sum(labels.numel() for shard in shards for _, labels in shard[1])
    test_seen = sum(labels.numel() for shard in shards for _, labels in shard[2])
    assert (valid_seen, test_seen) == (len(splits.valid), len(splits.test))


def test_reused_batches_are_the_fresh_ones_when_consumed_one_at_a_time(tmp_path):
    """What a Ray Train worker iterates (`reuse_batches=True`) is what a fresh loader gives, as
    long as each batch is used before the next is asked for, as the training loop does."""
    root = make_synthetic_dataset(tmp_path / "birds", num_classes=3, images_per_class=20)
    splits = discover_dataset(root)
    # No jitter: it draws from the global RNG, which the two loaders, interleaved, would share.
    config = DataConfig(image_size=32, stream_workers=1, color_jitter=0.0)
    train_cfg = TrainConfig(batch_size=4)
    fresh = make_stream_loaders(splits, config, train_cfg)
    reused = make_stream_loaders(splits, config, train_cfg, reuse_batches=True)
    for fresh_loader, reused_loader in zip(fresh[:2], reused[:2], strict=True):
        buffers = set()
        pairs = zip(fresh_loader, reused_loader, strict=True)
        for (images, labels), (reused_images, reused_labels) in pairs:
            assert torch.equal(images, reused_images) and torch.equal(labels, reused_labels)
            buffers.add(reused_images.data_ptr())
        assert len(buffers) <= 2 < len(fresh_loader)  # full batches, and a last smaller one


@pytest.mark.parametrize("workers", [0, 1])
def test_streamed_eval_batches_equal_the_cache_s_per_image_transform(tmp_path, workers):
    """Streamed batches are uint8 crops normalised as a batch where they are consumed; the
    images the model sees must be the ones the per-image transform (cache, Serve) gives."""
    root = make_synthetic_dataset(tmp_path / "birds", num_classes=3, images_per_class=20)
    splits = discover_dataset(root)
    train_cfg = TrainConfig(batch_size=4)
    _, cached, _ = make_loaders(splits, DataConfig(image_size=32), train_cfg)
    _, streamed, _ = make_stream_loaders(
        splits, DataConfig(image_size=32, stream_workers=workers), train_cfg
    )
    cached_batches, streamed_batches = list(cached), list(streamed)
    assert len(cached_batches) == len(streamed_batches) > 1
    for (a, labels_a), (b, labels_b) in zip(cached_batches, streamed_batches, strict=True):
        assert b.dtype == torch.float32 and torch.equal(labels_a, labels_b)
        assert torch.allclose(a, b, atol=1e-5)
