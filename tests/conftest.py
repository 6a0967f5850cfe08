"""Shared fixtures: real data from ../shared/data and one local Ray for the whole session."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_head import token_auth_head

from vitbirds.paths import shared_data_dir

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray aborts a local start when its agents take over 15 s, which a loaded 2-core box can exceed.
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-photo datasets; tests that need them skip where they are absent."""
    root = shared_data_dir()
    if root is None:
        pytest.skip(
            "shared data not found: set VITBIRDS_DATA or place ../shared/data beside the repo"
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
