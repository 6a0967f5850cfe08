"""The generated bird dataset: deterministic, discoverable, with masks that sit on the birds."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitbirds.data.sources import discover_dataset
from vitbirds.data.synthetic import SPECIES, load_mask, make_synthetic_dataset
from vitbirds.errors import DataError

SMALL = {"num_classes": 3, "images_per_class": 6, "image_size": 32}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.png")}


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path):
    first = _files(make_synthetic_dataset(tmp_path / "a", seed=7, **SMALL))
    second = _files(make_synthetic_dataset(tmp_path / "b", seed=7, **SMALL))
    other = _files(make_synthetic_dataset(tmp_path / "c", seed=8, **SMALL))
    assert len(first) == 2 * 3 * 6  # images and masks
    assert first == second
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first if not name.startswith("masks"))


def test_discovered_as_synthetic_with_train_valid_test(tmp_path):
    root = make_synthetic_dataset(tmp_path, num_classes=4, images_per_class=20, image_size=32)
    splits = discover_dataset(root)
    assert splits.source == "synthetic" and splits.synthetic
    assert splits.classes == sorted(s.name for s in SPECIES[:4])
    for split, count in (("train", 14), ("valid", 3), ("test", 3)):
        assert Counter(s.label for s in splits.split(split)) == {label: count for label in range(4)}
    marker = json.loads((root / "SYNTHETIC.json").read_text())
    assert marker["seed"] == 0 and marker["image_size"] == 32 and marker["num_classes"] == 4
    with Image.open(splits.train[0].path) as image:
        assert image.size == (32, 32) and image.mode == "RGB"


def test_masks_align_with_the_birds(tmp_path):
    """The median colour under each mask is its species' body colour, nearer than any other."""
    root = make_synthetic_dataset(tmp_path, num_classes=12, images_per_class=3, image_size=48)
    palette = np.array(sorted({s.body for s in SPECIES}))
    body = {s.name: np.array(s.body) for s in SPECIES}
    splits = discover_dataset(root)
    samples = splits.train + splits.valid + splits.test
    hits = 0
    for sample in samples:
        mask = load_mask(sample.path)
        pixels = np.asarray(Image.open(sample.path)).astype(float)
        assert mask.shape == pixels.shape[:2] and mask.dtype == bool
        assert 0.02 < mask.mean() < 0.7
        median = np.median(pixels[mask], axis=0)
        nearest = palette[np.abs(palette - median).sum(axis=1).argmin()]
        hits += np.array_equal(nearest, body[splits.classes[sample.label]])
    assert hits >= 0.9 * len(samples)


def test_paired_species_share_body_colour_and_differ_in_shape():
    for first, second in zip(SPECIES[0::2], SPECIES[1::2], strict=True):
        assert first.body == second.body
        assert (first.beak, first.wing, first.size) != (second.beak, second.wing, second.size)
    assert Counter(s.body for s in SPECIES[:6]) == {SPECIES[i].body: 2 for i in (0, 2, 4)}


def test_existing_dataset_is_reused_and_other_parameters_regenerate(tmp_path):
    root = make_synthetic_dataset(tmp_path, **SMALL)
    image = next((root / "train").rglob("*.png"))
    stamp = image.stat().st_mtime_ns
    make_synthetic_dataset(tmp_path, **SMALL)
    assert image.stat().st_mtime_ns == stamp
    make_synthetic_dataset(tmp_path, **{**SMALL, "num_classes": 2})
    assert len(discover_dataset(root).classes) == 2


def test_refuses_to_write_into_a_foreign_folder(tmp_path):
    (tmp_path / "photos.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        make_synthetic_dataset(tmp_path, **SMALL)


def test_load_mask_outside_a_synthetic_dataset_is_an_error(tmp_path):
    image = tmp_path / "train" / "a" / "x.png"
    image.parent.mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(image)
    with pytest.raises(DataError, match="not in a synthetic dataset"):
        load_mask(image)
