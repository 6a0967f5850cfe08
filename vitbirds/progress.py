"""Progress bars, without the library knowing who draws them.

The library's long loops (the batches of an epoch, decoding a dataset once, evaluation, the
monitor's pass over new photos) wrap their iterable in a `ProgressFactory`. The default draws a
plain tqdm bar where someone watches: on a terminal, or in a Ray job's driver, whose output is the
log `ray job submit` follows. Elsewhere (CI, tests, piped output) it draws nothing, so logs stay
readable. VITBIRDS_PROGRESS=1 or 0 forces bars on or off. Inside Ray workers the Ray adapter
sets `ray.experimental.tqdm_ray` instead (rank 0 only), which draws the workers' bars on the
driver and in the job log; this module never imports Ray.
"""

import os
import sys
from collections.abc import Iterable
from typing import Protocol, TypeVar

T = TypeVar("T")
# Set in the driver process of a Ray job (`ray job submit`): its output is the job's log.
_RAY_JOB_DRIVER = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class ProgressFactory(Protocol):
    def __call__(
        self, iterable: Iterable[T], *, desc: str, total: int | None = None
    ) -> Iterable[T]: ...


def no_progress(iterable: Iterable[T], *, desc: str, total: int | None = None) -> Iterable[T]:
    """Draws nothing: non-zero Ray ranks, and tests that want quiet output."""
    return iterable


def watched() -> bool:
    """Whether a bar would be seen: VITBIRDS_PROGRESS, else a terminal or a Ray job's log."""
    forced = os.environ.get("VITBIRDS_PROGRESS", "").strip().lower()
    if forced in ("0", "1", "false", "true", "off", "on"):
        return forced in ("1", "true", "on")
    return sys.stderr.isatty() or _RAY_JOB_DRIVER in os.environ


def tqdm_progress(iterable: Iterable[T], *, desc: str, total: int | None = None) -> Iterable[T]:
    """A plain tqdm bar when `watched()` and tqdm is installed (Ray depends on it), else none."""
    if not watched():
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    # mininterval: a job log gets a line every few seconds, not a stream of carriage returns.
    return tqdm(iterable, desc=desc, total=total, leave=False, mininterval=2.0)


_default: ProgressFactory = tqdm_progress


def default_progress() -> ProgressFactory:
    """What loops draw when their caller passes no factory."""
    return _default


def set_default_progress(factory: ProgressFactory) -> None:
    """For a whole process, like logging's configuration: a Ray worker sets tqdm_ray once, and
    every loop it runs (decoding included) reports through it."""
    global _default
    _default = factory
