"""`load_rgb` in worker processes with a time and a memory limit, for untrusted uploads.

The checks in `vitbirds/data/images.py` refuse what a header announces; they cannot bound what
decoding a file that lies (a progressive JPEG of thousands of scans, a codec bug) costs. A thread
cannot be stopped, so Serve decodes in a small pool of worker processes instead:

- each worker limits its own address space (`RLIMIT_AS`: its size after start-up plus
  `memory_bytes`), so a file that needs more fails with MemoryError in that worker alone;
- each worker starts with an allow-listed environment: a decoder subverted by a hostile file
  finds none of its parent's tokens or credentials;
- the parent waits `timeout_s` for an answer, then kills the worker and starts another in the
  background: a pathological file costs its own request and one worker start, nothing else;
- at most `workers` files decode at once, whatever the number of requests; a file that finds
  every worker busy for `wait_s` (say, both on hostile files running to their time limit) is
  refused with DecodersBusy instead of queueing, so requests do not pile up behind them.

Workers speak a plain length-prefixed protocol (a JSON header, then raw bytes) and return raw RGB
pixels, which the parent checks against the size budget before use: nothing a worker sends is
unpickled, so a decoder subverted by a hostile file gains nothing in the parent. Workers import
Pillow and numpy only (not torch), so each costs tens of MB and starts in well under a second.
"""

import json
import logging
import os
import queue
import resource
import select
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from vitbirds.data.images import DEFAULT_MAX_PIXELS, MAX_ASPECT_RATIO, load_rgb
from vitbirds.errors import DecodeBudgetExceeded, DecodersBusy, ImageDecodeError

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")
# The exception types a worker may report, by name: anything else reads as ImageDecodeError.
_ERRORS: dict[str, type[ImageDecodeError]] = {
    cls.__name__: cls for cls in (ImageDecodeError, *ImageDecodeError.__subclasses__())
}
_REPO_ROOT = Path(__file__).resolve().parents[2]
# The worker needs the decoder, not the loaders: a stub `vitbirds.data` package skips the real
# package's __init__ (which imports torch and would cost ~1 s and ~300 MB per worker).
_BOOTSTRAP = f"""
import sys, types
sys.path.insert(0, {str(_REPO_ROOT)!r})
package = types.ModuleType("vitbirds.data")
package.__path__ = [{str(Path(__file__).parent)!r}]
sys.modules["vitbirds.data"] = package
from vitbirds.data.sandbox import worker_main
worker_main(int(sys.argv[1]))
"""


@dataclass
class SandboxConfig:
    workers: int = 2  # files decoded at once per process using the pool
    timeout_s: float = 5.0  # per file; the worker is killed past it
    memory_bytes: int = 1024 * 1024 * 1024  # per worker, above its start-up size
    wait_s: float = 1.0  # for a free worker; past it DecodersBusy


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise EOFError(f"expected {size} bytes, got {len(data or b'')}")
    return data


def _write_message(stream: BinaryIO, header: dict, payload: bytes) -> None:
    encoded = json.dumps(header).encode()
    stream.write(_LENGTH.pack(len(encoded)) + encoded + _LENGTH.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _read_message(stream: BinaryIO, limit: int = 2**32) -> tuple[dict, bytes]:
    """One message; a length above `limit` (a subverted worker) raises ValueError."""

    def length() -> int:
        size = _LENGTH.unpack(_read_exact(stream, 4))[0]
        if size > limit:
            raise ValueError(f"message of {size} bytes over the {limit}-byte limit")
        return size

    header = json.loads(_read_exact(stream, length()))
    if not isinstance(header, dict):
        raise ValueError("message header is not a JSON object")
    return header, _read_exact(stream, length())


def _address_space() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def worker_main(memory_bytes: int) -> None:
    """A worker's loop: one request at a time from stdin, one answer each on stdout."""
    if Path("/proc/self/statm").exists():
        limit = _address_space() + memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            header, data = _read_message(requests)
        except EOFError:  # the parent closed the pipe or died
            return
        try:
            image = load_rgb(data, max_pixels=header["max_pixels"], short_side=header["short_side"])
            _write_message(answers, {"size": image.size}, image.tobytes())
        except ImageDecodeError as error:
            message = str(error).removeprefix("<bytes>: ")
            _write_message(answers, {"error": type(error).__name__, "message": message}, b"")
        except MemoryError:
            limit = f"{memory_bytes // 2**20} MiB"
            _write_message(
                answers,
                {
                    "error": "DecodeBudgetExceeded",
                    "message": f"decoding needs over {limit}",
                    "exiting": True,
                },
                b"",
            )
            return  # a failed allocation may leave the allocator fragmented: start afresh


# What a worker inherits of its parent's environment: enough to start Python and load Pillow's
# libraries, nothing that could be a credential (a Serve replica's environment may hold the
# feedback write token, the Ray auth token, cloud credentials).
_INHERITED_ENV = (
    "PATH",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "LD_LIBRARY_PATH",
)
_WORKER_THREADS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def worker_environment(parent: dict[str, str]) -> dict[str, str]:
    """A decode worker's whole environment: an allow-list of `parent`, one thread per library."""
    return {k: v for k, v in parent.items() if k in _INHERITED_ENV} | _WORKER_THREADS


class _Worker:
    def __init__(self, memory_bytes: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, str(memory_bytes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=worker_environment(dict(os.environ)),
        )

    def call(self, header: dict, data: bytes, timeout_s: float, limit: int) -> tuple[dict, bytes]:
        """Sends one request; raises TimeoutError past `timeout_s`, EOFError if the worker died."""
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            _write_message(self.process.stdin, header, data)
        except BrokenPipeError as exc:
            raise EOFError("worker gone") from exc
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        if not ready:
            raise TimeoutError
        # The answer's first bytes are here; a live worker writes the rest at once.
        return _read_message(self.process.stdout, limit)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


class DecodePool:
    """`decode` is `load_rgb` for bytes, run in a worker process under the limits of `config`."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._closed = False
        for _ in range(self.config.workers):
            self._idle.put(_Worker(self.config.memory_bytes))

    def decode(
        self, data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, short_side: int | None = None
    ) -> Image.Image:
        """An upright RGB image, or an ImageDecodeError subclass saying why not; waits up to
        `wait_s` for a free worker first (the pool bounds how many files decode at once), then
        raises DecodersBusy."""
        if self._closed:
            raise RuntimeError("decode pool is closed")
        try:
            worker = self._idle.get(timeout=self.config.wait_s)
        except queue.Empty:
            raise DecodersBusy(
                f"all {self.config.workers} image decoders stayed busy for "
                f"{self.config.wait_s:g} s; retry shortly"
            ) from None
        started = time.monotonic()
        try:
            header, pixels = worker.call(
                {"max_pixels": max_pixels, "short_side": short_side},
                data,
                self.config.timeout_s,
                limit=3 * _pixel_budget(max_pixels, short_side),
            )
        except TimeoutError:
            self._replace(worker)
            raise DecodeBudgetExceeded(
                f"decoding took over {self.config.timeout_s:g} s and was stopped"
            ) from None
        except (EOFError, ValueError, OSError):  # died: out of memory, a crash, a bad answer
            self._replace(worker)
            raise DecodeBudgetExceeded(
                f"the decoder stopped after {time.monotonic() - started:.1f} s "
                "(memory limit or crash)"
            ) from None
        if header.get("exiting") or worker.process.poll() is not None:
            self._replace(worker)  # it answered, then exits (after a MemoryError)
        else:
            self._idle.put(worker)
        if "error" in header:
            raise _ERRORS.get(str(header["error"]), ImageDecodeError)(str(header.get("message")))
        return _checked_image(header, pixels, max_pixels, short_side)

    def _replace(self, worker: _Worker) -> None:
        """Kills `worker` and starts its successor in the background, so the request that
        caused it is answered without waiting for a process start."""

        def restart() -> None:
            worker.kill()
            while not self._closed:
                try:
                    self._idle.put(_Worker(self.config.memory_bytes))
                    return
                except OSError:  # e.g. out of processes or file descriptors: try again
                    logger.exception("cannot start a decode worker; retrying in 1 s")
                    time.sleep(1.0)

        threading.Thread(target=restart, name="decode-worker-restart", daemon=True).start()

    def close(self) -> None:
        """Stops the idle workers; later `decode` calls fail."""
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                return


def _pixel_budget(max_pixels: int, short_side: int | None) -> int:
    """The most pixels a decoded (and resized) image may have."""
    if short_side is None:
        return max_pixels
    return round(short_side * short_side * MAX_ASPECT_RATIO) + 2 * short_side


def _checked_image(
    header: dict, pixels: bytes, max_pixels: int, short_side: int | None
) -> Image.Image:
    """The worker's pixels as an image, after checking they are what the budget allows."""
    try:
        width, height = (int(v) for v in header["size"])
    except (KeyError, TypeError, ValueError):
        raise DecodeBudgetExceeded("the decoder answered without a size") from None
    budget = _pixel_budget(max_pixels, short_side)
    if width <= 0 or height <= 0 or width * height > budget or len(pixels) != width * height * 3:
        raise DecodeBudgetExceeded(f"the decoder answered an inconsistent {width}x{height} image")
    return Image.frombytes("RGB", (width, height), pixels)
