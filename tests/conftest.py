"""Shared fixtures: the photos (real where ../shared/data is present, else a generated stand-in),
a photo and a model of their species, one local Ray for the whole session, and a record of every
skip.

Skips are written, with their reasons, to `$VITBIRDS_SKIP_REPORT` (JSON) when it is set:
`.ci/run` reads it, prints how many tests skipped and why, and fails when any skipped except the
tests marked `real_photos` (tests/skip_reasons.py)."""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_head import token_auth_head
from skip_reasons import MISSING_DATA, REAL_PHOTOS_MARK
from standin_data import CUB, KAGGLE, make_standin_shared_data

from vitbirds.inference.stand_in import make_model_dir
from vitbirds.paths import shared_data_dir

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray aborts a local start when its agents take over 15 s, which a loaded 2-core box can exceed.
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{REAL_PHOTOS_MARK}: measures what only the real photos of ../shared/data show; skips "
        "(counted by .ci/run) where they are absent",
    )


_SKIPS: list[dict] = []


def _record_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if report.skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        _SKIPS.append(
            {
                "test": report.nodeid,
                "reason": reason.removeprefix("Skipped: "),
                "real_photos": REAL_PHOTOS_MARK in getattr(report, "keywords", {}),
            }
        )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _record_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """A module that skips as a whole (a module-level importorskip) skips at collection."""
    _record_skip(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("VITBIRDS_SKIP_REPORT")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        report = {"exitstatus": int(exitstatus), "collected": session.testscollected}
        Path(path).write_text(json.dumps({**report, "skipped": _SKIPS}, indent=2) + "\n")


def real_shared_data() -> Path | None:
    """The real shared datasets, or None when either is absent (an empty $VITBIRDS_DATA too)."""
    root = shared_data_dir()
    if root is None or not ((root / CUB).is_dir() and (root / KAGGLE).is_dir()):
        return None
    return root


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`cub100/` and `kaggle-birds525-valid/`: the real photos where present, else a generated
    stand-in with the same layout and counts (tests/standin_data.py), made once per session."""
    return real_shared_data() or make_standin_shared_data(tmp_path_factory.mktemp("standin"))


@pytest.fixture(scope="session")
def cub_valid(shared_data: Path) -> Path:
    """cub100's valid split: one folder of photos per species."""
    return shared_data / "cub100" / "valid"


@pytest.fixture(scope="session")
def cub_classes(cub_valid: Path) -> list[str]:
    from serve.testing import photo_classes

    return photo_classes(cub_valid)


@pytest.fixture(scope="session")
def photo_file(cub_valid: Path, cub_classes: list[str]) -> Path:
    """A bird photo: the first of cub100's first valid species."""
    return sorted((cub_valid / cub_classes[0]).glob("*.jpg"))[0]


@pytest.fixture(scope="session")
def photo(photo_file: Path) -> bytes:
    return photo_file.read_bytes()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, cub_classes: list[str]) -> Path:
    """A random-weight vit-test model of cub100's species, one per test module (what a module
    serves may write beside it)."""

    return make_model_dir(tmp_path_factory.mktemp("model") / "model", cub_classes)


@pytest.fixture(scope="session")
def real_photos() -> Path:
    """The real photos only, for tests marked `real_photos`; skips where they are absent."""
    root = real_shared_data()
    if root is None:
        pytest.skip(
            f"{MISSING_DATA} real photos not found (set VITBIRDS_DATA or place ../shared/data "
            "beside the repo)"
        )
    return root


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray per test session: starting Ray costs 10-40 s on a 2-core machine."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(
            address="local",  # a new instance, never a `ray start` cluster running on the machine
            num_cpus=2,
            object_store_memory=300 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
        )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    """A private `ray start --head` with token auth for a module's job-submission tests:
    (dashboard address, environment with RAY_AUTH_MODE=token and the token's path).

    Per module, not per session: the head is stopped before later modules start the session's
    Ray, so two clusters never compete for the two cores during timing-sensitive Serve tests."""
    with token_auth_head(tmp_path_factory.mktemp("auth")) as cluster:
        yield cluster
