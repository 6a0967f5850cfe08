"""Find a dataset's images on disk and split them into train/valid/test; no pixel is decoded here.

Layouts understood, as users download them:
- Kaggle "525 bird species": `birds.csv` (columns `filepaths`, `labels`, `data set`; paths
  relative to the root) beside `train/`, `valid/`, `test/` folders of `<CLASS NAME>/<file>.jpg`.
  The CSV, when present, is the index; rows whose file is missing are dropped with one warning.
- ImageFolder trees: `root/<class>/*` or `root/{train,valid|val,test}/<class>/*`, which also
  covers the Kaggle folders without their CSV.
- The synthetic dataset of `vitbirds.data.synthetic` (split folders plus a SYNTHETIC.json marker).

Class names are sorted and indexed once over all splits, so an index means the same species in
train, valid and test. A dataset without a valid split gets a stratified, seeded one; subsets
(`num_classes`, `images_per_class`) are seeded random choices, never "the first N files".
"""

import csv
import hashlib
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitbirds.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
KAGGLE_CSV = "birds.csv"
SYNTHETIC_MARKER = "SYNTHETIC.json"
SPLITS = ("train", "valid", "test")
_SPLIT_FOLDERS = {"train": ("train",), "valid": ("valid", "val", "validation"), "test": ("test",)}
_CSV_SPLITS = {"train": "train", "valid": "valid", "val": "valid", "test": "test"}

# split name -> class name -> image paths
_Listing = dict[str, dict[str, list[Path]]]


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class DatasetSplits:
    """Labelled image paths per split; `classes[label]` is the class name of a sample."""

    classes: list[str]
    train: list[Sample]
    valid: list[Sample]
    test: list[Sample]  # may be empty
    source: str  # "kaggle" | "imagefolder" | "synthetic"
    root: Path
    synthetic: bool = False

    def split(self, name: str) -> list[Sample]:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; known: {list(SPLITS)}")
        return getattr(self, name)

    def fingerprint(self) -> str:
        """Short stable hash of class names, relative paths, labels and file sizes.

        Sizes rather than contents: cheap on 80k files and still catches re-encoded or replaced
        images; the hash is independent of where the dataset is mounted.
        """
        digest = hashlib.sha256()
        digest.update("\n".join(self.classes).encode())
        for name in SPLITS:
            for sample in self.split(name):
                try:
                    size = sample.path.stat().st_size
                except OSError:
                    size = -1
                relative = _relative(sample.path, self.root)
                digest.update(f"\n{name}\t{relative}\t{sample.label}\t{size}".encode())
        return digest.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """What a model's metadata records about its data (JSON-able)."""
        return {
            "source": self.source,
            "root": str(self.root),
            "fingerprint": self.fingerprint(),
            "synthetic": self.synthetic,
            "num_classes": len(self.classes),
            "sizes": {name: len(self.split(name)) for name in SPLITS},
        }


def class_key(name: str) -> str:
    """'BLACK-THROATED SPARROW' and 'Black_throated_Sparrow' -> 'blackthroatedsparrow': how a
    dataset's class names meet a model's wherever a model is scored, so a Kaggle folder
    ('BARN SWALLOW') checks a CUB-trained model ('Barn_Swallow')."""
    return re.sub(r"[^a-z0-9]", "", name.casefold())


def model_labels(dataset_classes: Sequence[str], model_classes: Sequence[str]) -> dict[int, int]:
    """Dataset label -> model output index, for the dataset classes the model knows (by
    `class_key`)."""
    index = {class_key(name): i for i, name in enumerate(model_classes)}
    return {
        label: index[class_key(name)]
        for label, name in enumerate(dataset_classes)
        if class_key(name) in index
    }


def samples_for_model(
    samples: Sequence[Sample], dataset_classes: Sequence[str], model_classes: Sequence[str]
) -> list[Sample]:
    """The samples of classes the model knows, relabelled with the model's class indices;
    the model cannot be right about the others, so they are left out."""
    to_model = model_labels(dataset_classes, model_classes)
    return [Sample(s.path, to_model[s.label]) for s in samples if s.label in to_model]


def discover_dataset(
    root: str | Path,
    *,
    num_classes: int | None = None,
    images_per_class: int | None = None,
    seed: int = 0,
    valid_fraction: float = 0.2,
) -> DatasetSplits:
    """List and label the images under `root`.

    `num_classes` keeps a seeded random choice of classes; `images_per_class` then caps each
    class in each split (a seeded random choice per class, so every class keeps its share).
    Without a valid split, `valid_fraction` of each class of train (or of whichever split exists)
    becomes valid, chosen with `seed`.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"dataset directory {root} does not exist or is not a directory")
    if not 0.0 < valid_fraction < 1.0:
        raise DataError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    synthetic = (root / SYNTHETIC_MARKER).is_file()
    if (root / KAGGLE_CSV).is_file():  # jobs/make_dataset.py's stand-in too: same code path
        listing, source = _read_kaggle_csv(root), "kaggle"
    else:
        listing = _scan_split_folders(root) or {"train": _scan_class_folders(root)}
        source = "synthetic" if synthetic else "imagefolder"
    if not any(paths for split in listing.values() for paths in split.values()):
        raise DataError(
            f"no images found under {root}: expected <class>/<image> folders, "
            f"train/valid/test split folders, or {KAGGLE_CSV}"
        )

    listing = _fill_missing_splits(listing, valid_fraction, seed)
    classes = sorted({name for split in listing.values() for name in split})
    if num_classes is not None:
        classes = choose_classes(classes, num_classes, seed)
    label_of = {name: index for index, name in enumerate(classes)}
    per_split: dict[str, list[Sample]] = {}
    for split in SPLITS:
        samples = []
        for name in classes:
            paths = listing.get(split, {}).get(name, [])
            if images_per_class is not None:
                paths = choose_images(paths, images_per_class, seed, f"{split}/{name}")
            samples.extend(Sample(path, label_of[name]) for path in paths)
        per_split[split] = samples
    return DatasetSplits(
        classes=classes, **per_split, source=source, root=root, synthetic=synthetic
    )


def choose_classes(classes: list[str], count: int, seed: int) -> list[str]:
    """A seeded random choice of `count` class names, returned sorted."""
    if count <= 0:
        raise DataError(f"num_classes must be positive, got {count}")
    if count > len(classes):
        raise DataError(f"num_classes={count} but the dataset has only {len(classes)} classes")
    return sorted(random.Random(f"classes:{seed}").sample(sorted(classes), count))


def choose_images(paths: list[Path], count: int, seed: int, key: str) -> list[Path]:
    """A seeded random choice of at most `count` paths, in path order.

    `key` (split/class) seeds each class separately, so which images a class keeps does not
    depend on which other classes were chosen.
    """
    if count <= 0:
        raise DataError(f"images_per_class must be positive, got {count}")
    if len(paths) <= count:
        return sorted(paths)
    return sorted(random.Random(f"images:{seed}:{key}").sample(sorted(paths), count))


def stratified_split(
    by_class: dict[str, list[Path]], fraction: float, seed: int
) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Moves a seeded `fraction` of each class (at least one image, never the last) aside.

    Returns (kept, moved). A class with a single image stays entirely in `kept`.
    """
    kept: dict[str, list[Path]] = {}
    moved: dict[str, list[Path]] = {}
    for name, paths in sorted(by_class.items()):
        shuffled = sorted(paths)
        random.Random(f"split:{seed}:{name}").shuffle(shuffled)
        count = min(len(shuffled) - 1, max(1, round(len(shuffled) * fraction)))
        kept[name] = sorted(shuffled[count:])
        if count > 0:
            moved[name] = sorted(shuffled[:count])
    return kept, moved


def _fill_missing_splits(listing: _Listing, valid_fraction: float, seed: int) -> _Listing:
    """Ensures train and valid exist: valid is carved out of train, or train out of valid."""
    train, valid, test = (listing.get(name, {}) for name in SPLITS)
    if not train and not valid:
        train, test = test, {}
    if train and not valid:
        train, valid = stratified_split(train, valid_fraction, seed)
    elif valid and not train:
        train, valid = stratified_split(valid, valid_fraction, seed)
    return {"train": train, "valid": valid, "test": test}


def _read_kaggle_csv(root: Path) -> _Listing:
    listing: _Listing = {}
    missing: list[str] = []
    with open(root / KAGGLE_CSV, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        needed = {"filepaths", "labels", "data set"}
        if not needed <= set(reader.fieldnames or ()):
            raise DataError(
                f"{root / KAGGLE_CSV} lacks columns {sorted(needed - set(reader.fieldnames or ()))}"
                f"; found {reader.fieldnames}"
            )
        for row in reader:
            split = _CSV_SPLITS.get(row["data set"].strip().lower())
            if split is None:
                raise DataError(f"{root / KAGGLE_CSV}: unknown data set {row['data set']!r}")
            path = root / row["filepaths"]
            if not path.is_file():
                missing.append(row["filepaths"])
                continue
            listing.setdefault(split, {}).setdefault(row["labels"].strip(), []).append(path)
    if missing:
        logger.warning(
            "%s lists %d file(s) that do not exist, ignored (first: %s)",
            root / KAGGLE_CSV,
            len(missing),
            ", ".join(missing[:5]),
        )
    return listing


def _scan_split_folders(root: Path) -> _Listing:
    """{split: classes} for whichever split folders hold class folders; {} when none does."""
    listing: _Listing = {}
    for split, folder_names in _SPLIT_FOLDERS.items():
        for folder_name in folder_names:
            by_class = _scan_class_folders(root / folder_name)
            if by_class:
                listing[split] = by_class
                break
    return listing


def _scan_class_folders(folder: Path) -> dict[str, list[Path]]:
    """{class folder name: sorted image paths}; folders without images are not classes."""
    if not folder.is_dir():
        return {}
    by_class = {}
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if class_dir.name.startswith("."):
            continue
        images = sorted(p for p in class_dir.iterdir() if _is_image_file(p))
        if images:
            by_class[class_dir.name] = images
    return by_class


def _is_image_file(path: Path) -> bool:
    # Dot-files include macOS "._x.jpg" resource forks, which are not images despite the name.
    return (
        path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()
    )


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
