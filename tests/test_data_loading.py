"""The decode-once cache and the loaders: bad files skipped and reported once, batch shapes."""

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import RandomSampler, SequentialSampler

from vitbirds.config import DataConfig, TrainConfig
from vitbirds.data.loading import ImageDataset, make_loaders
from vitbirds.data.sources import Sample, discover_dataset
from vitbirds.data.synthetic import make_synthetic_dataset
from vitbirds.errors import DataError


def _write_jpeg(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG")
    return path.read_bytes()


@pytest.fixture
def tree_with_bad_files(tmp_path: Path) -> Path:
    """Two classes of 4 good JPEGs, plus a truncated JPEG, a zero-byte file and a text file."""
    for name, colour in (("finch", (200, 30, 30)), ("heron", (30, 30, 200))):
        for index in range(4):
            _write_jpeg(tmp_path / name / f"{index}.jpg", (60, 40), colour)
    noisy = Image.effect_noise((64, 64), 60).convert("RGB")
    noisy.save(tmp_path / "finch" / "truncated.jpg", "JPEG")
    data = (tmp_path / "finch" / "truncated.jpg").read_bytes()
    (tmp_path / "finch" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "heron" / "empty.jpg").write_bytes(b"")
    (tmp_path / "heron" / "notes.jpg").write_text("field notes, not a photo")
    return tmp_path


def test_undecodable_files_are_skipped_counted_and_logged_once(tree_with_bad_files, caplog):
    splits = discover_dataset(tree_with_bad_files)
    samples = splits.train + splits.valid
    assert len(samples) == 11
    with caplog.at_level(logging.WARNING, logger="vitbirds.data.loading"):
        dataset = ImageDataset(samples, decode_size=16)
    assert len(dataset) == 8
    assert sorted(s.path.name for s in dataset.skipped) == [
        "empty.jpg",
        "notes.jpg",
        "truncated.jpg",
    ]
    assert all(s.reason for s in dataset.skipped)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 3 of 11" in warnings[0].getMessage()
    assert "empty.jpg" in warnings[0].getMessage()
    # every remaining item loads: nothing can fail mid-epoch
    labels = [dataset[i][1] for i in range(len(dataset))]
    assert sorted(labels) == [0, 0, 0, 0, 1, 1, 1, 1]


def test_a_split_with_no_decodable_image_is_an_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="none of the 1 images"):
        ImageDataset([Sample(tmp_path / "a.jpg", 0)])


def test_cache_holds_uint8_images_decoded_at_the_short_side(tmp_path):
    _write_jpeg(tmp_path / "wide.jpg", (300, 200), (10, 200, 10))
    _write_jpeg(tmp_path / "tall.jpg", (100, 250), (10, 200, 10))
    dataset = ImageDataset(
        [Sample(tmp_path / "wide.jpg", 0), Sample(tmp_path / "tall.jpg", 1)], decode_size=50
    )
    image, label = dataset[0]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 50, 75) and label == 0
    assert tuple(dataset[1][0].shape) == (3, 125, 50)
    assert dataset.nbytes == 3 * (50 * 75 + 125 * 50)
    full = ImageDataset([Sample(tmp_path / "wide.jpg", 0)])
    assert tuple(full[0][0].shape) == (3, 200, 300)


def test_cub_images_decode_once_at_reduced_size(shared_data):
    splits = discover_dataset(shared_data / "cub100", num_classes=4, images_per_class=3, seed=0)
    dataset = ImageDataset(splits.train, decode_size=74)
    assert len(dataset) == 12 and not dataset.skipped
    assert all(min(image.shape[1:]) == 74 for image in dataset.images)


@pytest.fixture(scope="module")
def synthetic_splits(tmp_path_factory):
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("synthetic"), num_classes=3, images_per_class=12, image_size=32
    )
    return discover_dataset(root)


def test_make_loaders_yields_normalised_batches_of_the_configured_size(synthetic_splits):
    data_cfg = DataConfig(image_size=32)
    train, valid, test = make_loaders(synthetic_splits, data_cfg, TrainConfig(batch_size=8))
    images, labels = next(iter(train))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.shape == (8,)
    assert sum(len(batch[1]) for batch in train) == len(synthetic_splits.train)
    assert test is not None
    assert sum(len(batch[1]) for batch in test) == len(synthetic_splits.test)
    assert sum(len(batch[1]) for batch in valid) == len(synthetic_splits.valid)


def test_loaders_are_plain_so_ray_train_can_shard_them(synthetic_splits):
    train, valid, test = make_loaders(synthetic_splits, DataConfig(image_size=32), TrainConfig())
    assert isinstance(train.sampler, RandomSampler)
    assert isinstance(valid.sampler, SequentialSampler)
    assert isinstance(test.sampler, SequentialSampler)
    assert train.num_workers == 0


def test_valid_batches_are_identical_every_epoch(synthetic_splits):
    _, valid, _ = make_loaders(synthetic_splits, DataConfig(image_size=32), TrainConfig())
    first = torch.cat([images for images, _ in valid])
    second = torch.cat([images for images, _ in valid])
    assert torch.equal(first, second)


def test_train_order_follows_the_train_seed(synthetic_splits):
    def order(seed: int) -> list[int]:
        train, _, _ = make_loaders(
            synthetic_splits, DataConfig(image_size=32), TrainConfig(batch_size=64, seed=seed)
        )
        return next(iter(train))[1].tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)


def test_no_test_split_gives_no_test_loader(shared_data):
    splits = discover_dataset(shared_data / "cub100", num_classes=2, images_per_class=2)
    _, _, test = make_loaders(splits, DataConfig(image_size=32), TrainConfig(batch_size=4))
    assert test is None
