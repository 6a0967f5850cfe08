"""Finding, labelling, splitting and subsetting datasets (no decoding)."""

import logging
from collections import Counter
from pathlib import Path

import pytest

from vitbirds.data.sources import DatasetSplits, discover_dataset
from vitbirds.errors import DataError

KAGGLE = "kaggle-birds525-valid"
CUB = "cub100"


def _relative(splits: DatasetSplits, split: str) -> list[tuple[str, int]]:
    return sorted(
        (s.path.relative_to(splits.root).as_posix(), s.label) for s in splits.split(split)
    )


def _write_tree(root: Path, counts: dict[str, int], *, split: str | None = None) -> None:
    """Tiny files named like images; discovery never decodes, so content is irrelevant here."""
    base = root / split if split else root
    for name, count in counts.items():
        (base / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            (base / name / f"{index:03d}.jpg").write_bytes(b"x" * (index + 1))


def test_kaggle_csv_only_valid_split_becomes_stratified_train_and_valid(shared_data):
    splits = discover_dataset(shared_data / KAGGLE)
    assert splits.source == "kaggle" and not splits.synthetic
    assert len(splits.classes) == 525
    assert splits.classes == sorted(splits.classes)
    assert splits.test == []
    assert len(splits.train) + len(splits.valid) == 2625
    # 5 images per class, valid_fraction 0.2: exactly one per class held out
    assert Counter(s.label for s in splits.valid) == Counter(range(525))
    assert set(Counter(s.label for s in splits.train).values()) == {4}
    assert not {s.path for s in splits.train} & {s.path for s in splits.valid}
    for sample in splits.train + splits.valid:
        assert splits.classes[sample.label] == sample.path.parent.name


def test_kaggle_folders_without_csv_give_the_same_dataset(shared_data, tmp_path):
    (tmp_path / "valid").symlink_to(shared_data / KAGGLE / "valid")
    from_folders = discover_dataset(tmp_path)
    from_csv = discover_dataset(shared_data / KAGGLE)
    assert from_folders.source == "imagefolder"
    assert from_folders.classes == from_csv.classes
    assert _relative(from_folders, "train") == _relative(from_csv, "train")
    assert _relative(from_folders, "valid") == _relative(from_csv, "valid")
    # the fingerprint ignores where the dataset is mounted
    assert from_folders.fingerprint() == from_csv.fingerprint()


def test_kaggle_csv_splits_labels_and_missing_files(tmp_path, caplog):
    rows = ["class id,filepaths,labels,data set,scientific name"]
    for split, count in (("train", 3), ("valid", 1), ("test", 1)):
        for name in ("ZEBRA DOVE", "AFRICAN CROWNED CRANE"):
            _write_tree(tmp_path, {name: count}, split=split)
            rows += [f"0,{split}/{name}/{i:03d}.jpg,{name},{split},X Y" for i in range(count)]
    rows.append("0,train/ZEBRA DOVE/gone.jpg,ZEBRA DOVE,train,X Y")
    (tmp_path / "birds.csv").write_text("\n".join(rows) + "\n")

    with caplog.at_level(logging.WARNING, logger="vitbirds.data.sources"):
        splits = discover_dataset(tmp_path)
    assert splits.source == "kaggle"
    assert splits.classes == ["AFRICAN CROWNED CRANE", "ZEBRA DOVE"]
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (6, 2, 2)
    assert [r.message for r in caplog.records if "gone.jpg" in r.message]
    for name in ("train", "valid", "test"):
        for sample in splits.split(name):
            assert sample.path.parts[-3] == name
            assert splits.classes[sample.label] == sample.path.parent.name


def test_kaggle_csv_without_needed_columns_is_refused(tmp_path):
    (tmp_path / "birds.csv").write_text("path,label\na.jpg,A\n")
    with pytest.raises(DataError, match="lacks columns"):
        discover_dataset(tmp_path)


def test_cub_imagefolder_with_split_folders(shared_data):
    splits = discover_dataset(shared_data / CUB)
    assert splits.source == "imagefolder"
    assert len(splits.classes) == 100
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (2400, 599, 0)
    assert {s.label for s in splits.valid} <= set(range(100))
    for sample in splits.train + splits.valid:
        assert splits.classes[sample.label] == sample.path.parent.name


def test_flat_imagefolder_gets_a_stratified_seeded_valid_split(tmp_path):
    _write_tree(tmp_path, {"b": 10, "a": 10, "c": 5})
    splits = discover_dataset(tmp_path, seed=1, valid_fraction=0.2)
    assert splits.classes == ["a", "b", "c"]
    assert Counter(s.label for s in splits.valid) == {0: 2, 1: 2, 2: 1}
    assert Counter(s.label for s in splits.train) == {0: 8, 1: 8, 2: 4}
    assert not {s.path for s in splits.train} & {s.path for s in splits.valid}

    again = discover_dataset(tmp_path, seed=1, valid_fraction=0.2)
    assert again.valid == splits.valid and again.train == splits.train
    other = discover_dataset(tmp_path, seed=2, valid_fraction=0.2)
    assert {s.path for s in other.valid} != {s.path for s in splits.valid}


def test_train_folder_without_valid_is_split_and_test_is_kept(tmp_path):
    _write_tree(tmp_path, {"a": 5, "b": 5}, split="train")
    _write_tree(tmp_path, {"a": 2, "b": 2}, split="test")
    splits = discover_dataset(tmp_path)
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (8, 2, 4)
    assert all(s.path.parts[-3] == "train" for s in splits.train + splits.valid)


def test_class_index_is_shared_by_splits_even_when_a_class_misses_one(tmp_path):
    _write_tree(tmp_path, {"a": 3, "c": 3}, split="train")
    _write_tree(tmp_path, {"b": 2, "c": 1}, split="valid")
    splits = discover_dataset(tmp_path)
    assert splits.classes == ["a", "b", "c"]
    assert {s.label for s in splits.valid} == {1, 2}
    assert {s.label for s in splits.train} == {0, 2}


def test_subsets_are_seeded_and_stratified(shared_data):
    subset = discover_dataset(shared_data / CUB, num_classes=10, images_per_class=5, seed=3)
    assert len(subset.classes) == 10 and subset.classes == sorted(subset.classes)
    assert Counter(s.label for s in subset.train) == Counter({label: 5 for label in range(10)})
    assert set(Counter(s.label for s in subset.valid)) == set(range(10))
    assert max(Counter(s.label for s in subset.valid).values()) <= 5

    full = discover_dataset(shared_data / CUB)
    assert subset.classes != full.classes[:10]
    first_files = {
        name: sorted(s.path for s in full.train if full.classes[s.label] == name)[:5]
        for name in subset.classes
    }
    chosen = {
        name: sorted(s.path for s in subset.train if subset.classes[s.label] == name)
        for name in subset.classes
    }
    assert chosen != first_files  # a random choice, not the first files

    same = discover_dataset(shared_data / CUB, num_classes=10, images_per_class=5, seed=3)
    assert same.train == subset.train and same.valid == subset.valid
    other = discover_dataset(shared_data / CUB, num_classes=10, images_per_class=5, seed=4)
    assert other.classes != subset.classes


def test_asking_for_more_classes_than_exist_is_an_error(tmp_path):
    _write_tree(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(DataError, match="only 2 classes"):
        discover_dataset(tmp_path, num_classes=3)


def test_missing_or_empty_roots_are_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        discover_dataset(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images found"):
        discover_dataset(tmp_path)


def test_dotfiles_and_other_extensions_are_not_samples(tmp_path):
    _write_tree(tmp_path, {"a": 4, "b": 4})
    (tmp_path / "a" / "._000.jpg").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    (tmp_path / "a" / "README.txt").write_text("hi")
    splits = discover_dataset(tmp_path)
    names = {s.path.name for s in splits.train + splits.valid}
    assert len(splits.train) + len(splits.valid) == 8
    assert "._000.jpg" not in names and "README.txt" not in names


def test_fingerprint_is_stable_and_tracks_file_sizes(tmp_path):
    _write_tree(tmp_path, {"a": 4, "b": 4})
    first = discover_dataset(tmp_path).fingerprint()
    assert len(first) == 16
    assert discover_dataset(tmp_path).fingerprint() == first
    (tmp_path / "a" / "000.jpg").write_bytes(b"longer content")
    assert discover_dataset(tmp_path).fingerprint() != first
