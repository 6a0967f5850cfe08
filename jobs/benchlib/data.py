"""Where a benchmark finds its photos, one way for all of them: a flag (`--data-dir`), else a
dataset under the shared data folder (`../shared/data` or `$VITBIRDS_DATA`). A benchmark that
needs photos and has none stops with one message naming the flag and the variable."""

import argparse
from pathlib import Path

from vitbirds.paths import shared_data_dir

CUB = "cub100"
KAGGLE_VALID = "kaggle-birds525-valid"


def add_data_argument(
    parser: argparse.ArgumentParser,
    dataset: str = CUB,
    *,
    flag: str = "--data-dir",
    help: str = "an ImageFolder or Kaggle-layout dataset",
) -> None:
    """`flag`, defaulting to `dataset` in the shared data folder (None where there is none)."""
    shared = shared_data_dir()
    parser.add_argument(
        flag,
        type=Path,
        default=shared / dataset if shared else None,
        help=f"{help} (default: {dataset} in ../shared/data or $VITBIRDS_DATA)",
    )


def require_data(
    parser: argparse.ArgumentParser, path: Path | None, flag: str = "--data-dir"
) -> Path:
    """`path` when it is a folder; otherwise the usage error naming `flag` and VITBIRDS_DATA."""
    if path is None:
        parser.error(f"no photos: pass {flag} or set VITBIRDS_DATA (or place ../shared/data)")
    if not path.is_dir():
        parser.error(f"{flag} {path} is not a folder")
    return path
