"""`serve run serve/config.yaml` as a user runs it, over real HTTP with real photos, in both of
Serve's set-ups: the Python proxy (the README's local command) and the throughput mode that the
cluster runs (HAProxy in front, gRPC between replicas).

A subprocess with its own local Ray (`serve run -a local`): the mode's switches are read when Ray
starts, so it cannot share the session's Ray. The config is serve/config.yaml itself with the
port, the model and the log changed. In HAProxy mode the Ingress queue is made small (8 running +
8 waiting) so that an overload is certain to happen on any machine: with HAProxy in front, the
Ingress replica's own server does the rejecting. In proxy mode the config's own limits stand, and
140 slow senders and a Ctrl-C are tried against it. HAProxy mode is not Ctrl-C-tested: Ray starts
HAProxy as a plain child of an actor and stops it only from a graceful Serve shutdown, so a
force-killed actor leaves it listening (README.md, "Serve"); its fixture stops such orphans.
"""

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
import yaml
from served_answers import (
    SERVED_PRECISION,
    TOLERANCE,
    assert_matches_offline,
    offline_probabilities,
)

from serve import testing as serve_testing
from vitbirds.model.files import LoadedModel, load_model
from vitbirds.paths import CACHE_ENV, repo_root

SERVE = Path(sys.executable).parent / "serve"
INGRESS_LIMITS = {"max_ongoing_requests": 8, "max_queued_requests": 8}
START_TIMEOUT_S = 300  # Ray, the controller, HAProxy and three replicas on two busy cores


@pytest.fixture(scope="module")
def offline(model_dir: Path) -> LoadedModel:
    return load_model(model_dir)


class ServeRun:
    """A `serve run` subprocess on private ports; `interrupt()` is the user's Ctrl-C."""

    def __init__(self, mode: str, config_file: Path, work: Path, port: int) -> None:
        self.mode = mode
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = work / "serve-run.log"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(serve_testing.SERVE_MODES[mode])
        env["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] = "60"  # a busy machine starts actors slowly
        env[CACHE_ENV] = str(work / "cache")
        env["PYTHONUNBUFFERED"] = "1"  # the log shows how far a shutdown got, even if killed
        # Unix socket paths stay under HAProxy's 97 characters: a short directory, not tmp_path.
        self.haproxy_dir = Path(tempfile.mkdtemp(prefix="vbhap-", dir="/tmp"))
        self.ports = [port]
        if mode == "haproxy":
            haproxy_env = serve_testing.private_haproxy_env(self.haproxy_dir)
            env.update(haproxy_env)
            self.ports += [
                int(haproxy_env["RAY_SERVE_HAPROXY_STATS_PORT"]),
                int(haproxy_env["RAY_SERVE_HAPROXY_METRICS_PORT"]),
            ]
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [str(SERVE), "run", "-a", "local", str(config_file)],
            cwd=repo_root(),  # import_path serve.app:app resolves from the repository root
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # As from a terminal: SIGINT raises KeyboardInterrupt. A test run started in the
            # background of a script inherits SIGINT ignored, and so would `serve run`.
            preexec_fn=_default_sigint,
        )

    def interrupt(self) -> None:
        """SIGINT to `serve run` alone, as a terminal's Ctrl-C; then waits for it to exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def close(self) -> None:
        self.interrupt()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever of its group is left
        _kill_orphaned_haproxy(self.haproxy_dir)
        shutil.rmtree(self.haproxy_dir, ignore_errors=True)
        self._log.close()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _config_file(
    work: Path, model_dir: Path, port: int, ingress: dict[str, int] | None = None
) -> Path:
    """serve/config.yaml with the port, the model and the log changed (and the Ingress's)."""
    config = yaml.safe_load((repo_root() / "serve" / "config.yaml").read_text())
    config["http_options"]["port"] = port
    (application,) = config["applications"]
    application["args"].update(
        model_dir=str(model_dir), prediction_log=str(work / "predictions.jsonl")
    )
    (deployment,) = [d for d in application["deployments"] if d["name"] == "Ingress"]
    deployment.update(ingress or {})
    config_file = work / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return config_file


@contextlib.contextmanager
def _serve_run(
    mode: str, model_dir: Path, work: Path, ingress: dict[str, int] | None = None
) -> Iterator[ServeRun]:
    port = serve_testing.free_port()
    run = ServeRun(mode, _config_file(work, model_dir, port, ingress), work, port)
    try:
        _wait_until_healthy(run.base, run.process, run.log_path)
        yield run
    finally:
        run.close()


@pytest.fixture(scope="module")
def haproxy_run(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeRun]:
    """Throughput mode, the Ingress queue made small so that an overload is certain."""
    work = tmp_path_factory.mktemp("serve_run_haproxy")
    with _serve_run("haproxy", model_dir, work, INGRESS_LIMITS) as run:
        yield run


@pytest.fixture(scope="module")
def url(haproxy_run: ServeRun) -> str:
    return haproxy_run.base


@pytest.fixture(scope="module")
def proxy_run(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeRun]:
    """The README's local command: Serve's Python proxy, serve/config.yaml's own limits."""
    work = tmp_path_factory.mktemp("serve_run_proxy")
    with _serve_run("proxy", model_dir, work) as run:
        yield run


def _kill_orphaned_haproxy(directory: Path) -> None:
    """When Serve's shutdown times out on a busy machine, Ray force-kills the actor that owns
    HAProxy and the HAProxy process lives on, holding its ports: stop ours."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"haproxy") and any(str(directory).encode() in a for a in argv):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def _wait_until_healthy(base: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"serve run exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(base + "/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or HAProxy has no backend yet
            pass
        time.sleep(1)
    pytest.fail(f"serve run was not healthy in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def test_predictions_through_haproxy_equal_the_models_output(url, photo, offline):
    response = requests.post(url + "/predict", files={"file": ("bird.jpg", photo, "image/jpeg")})
    assert response.status_code == 200, response.text
    expected = offline_probabilities(offline, photo, SERVED_PRECISION)
    assert_matches_offline(
        response.json()["predictions"], expected, atol=TOLERANCE[SERVED_PRECISION.name]
    )


def test_explain_and_bad_input_through_haproxy(url, photo):
    overlay = requests.post(url + "/explain", data=photo, headers={"content-type": "image/jpeg"})
    assert overlay.status_code == 200
    assert overlay.content.startswith(b"\x89PNG")
    empty = requests.post(url + "/predict", data=b"", headers={"content-type": "image/jpeg"})
    assert empty.status_code == 400 and empty.json()["reason"]


def test_overload_through_haproxy_gets_503s_and_recovers(url, photo):
    async def flood(n: int) -> list[int]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n)) as client:
            responses = await asyncio.gather(
                *[
                    client.post(
                        url + "/predict", content=photo, headers={"content-type": "image/jpeg"}
                    )
                    for _ in range(n)
                ]
            )
        return [r.status_code for r in responses]

    statuses = asyncio.run(flood(200))  # against 8 + 8 at the ingress
    assert set(statuses) <= {200, 503}
    assert statuses.count(503) > 0 and statuses.count(200) >= sum(INGRESS_LIMITS.values())
    assert requests.get(url + "/healthz").status_code == 200


SLOW_SENDERS = 140


def _photo_while_slow_senders_hold_connections(base: str, port: int, photo: bytes):
    """(status of a normal /predict sent once the slow senders are connected, their answers)."""

    async def scenario() -> tuple[int, list[bytes]]:
        stop = asyncio.Event()
        senders = asyncio.gather(
            *[serve_testing.slow_sender(port, stop) for _ in range(SLOW_SENDERS)]
        )
        await asyncio.sleep(3)  # all connected and sending
        async with httpx.AsyncClient(timeout=60) as client:
            response = await client.post(
                base + "/predict", content=photo, headers={"content-type": "image/jpeg"}
            )
        answers = await asyncio.wait_for(senders, timeout=120)  # cut by the body deadline
        stop.set()
        return response.status_code, answers

    return asyncio.run(scenario())


def test_a_photo_is_answered_while_140_slow_senders_are_connected(proxy_run, photo):
    status, answers = _photo_while_slow_senders_hold_connections(
        proxy_run.base, proxy_run.port, photo
    )
    assert status == 200
    # Each slow sender was cut off instead of holding its slot: 408 from the body deadline, or a
    # 503 from the proxy's back-pressure (1 of 140 in one of four full-suite runs).
    statuses = [serve_testing.answer_status(a) for a in answers]
    assert set(statuses) <= {"408", "503"} and statuses.count("408") > SLOW_SENDERS // 2


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _ports_freed_after_ctrl_c(run: ServeRun, within_s: float = 60) -> list[int]:
    """Sends Ctrl-C; returns the ports still listening `within_s` seconds later."""
    interrupted = time.monotonic()
    run.interrupt()
    while time.monotonic() - interrupted < within_s:
        still = [port for port in run.ports if _listening(port)]
        if not still:
            return []
        time.sleep(1)
    return [port for port in run.ports if _listening(port)]


def test_ctrl_c_leaves_nothing_listening_in_the_local_default_mode(proxy_run):
    still_listening = _ports_freed_after_ctrl_c(proxy_run)
    assert still_listening == [], proxy_run.log_path.read_text()[-4000:]
