"""`serve run serve/config.yaml` as the README runs it, in Serve's throughput mode (HAProxy in
front, gRPC between replicas), over real HTTP with real photos.

A subprocess with its own local Ray (`serve run -a local`): the mode's switches are read when Ray
starts, so it cannot share the session's Ray. The config is serve/config.yaml itself with the
port, the model and the log changed, and the Ingress queue made small (8 running + 8 waiting) so
that an overload is certain to happen on any machine: with HAProxy in front, the Ingress replica's
own server does the rejecting.
"""

import asyncio
import contextlib
import os
import shutil
import signal
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
from test_serve import assert_matches_offline, offline_probabilities

from serve.testing import SERVE_MODES, free_port, make_model_dir, photo_classes
from vitbirds.model.files import LoadedModel, load_model
from vitbirds.paths import repo_root

SERVE = Path(sys.executable).parent / "serve"
INGRESS_LIMITS = {"max_ongoing_requests": 8, "max_queued_requests": 8}
START_TIMEOUT_S = 300  # Ray, the controller, HAProxy and three replicas on two busy cores


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    classes = photo_classes(shared_data / "cub100" / "valid")
    return make_model_dir(tmp_path_factory.mktemp("serve_run") / "model", classes)


@pytest.fixture(scope="module")
def offline(model_dir: Path) -> LoadedModel:
    return load_model(model_dir)


@pytest.fixture(scope="module")
def photo(shared_data: Path) -> bytes:
    valid = shared_data / "cub100" / "valid"
    return sorted((valid / photo_classes(valid)[0]).glob("*.jpg"))[0].read_bytes()


@pytest.fixture(scope="module")
def url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("serve_run_config")
    config = yaml.safe_load((repo_root() / "serve" / "config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    (application,) = config["applications"]
    application["args"].update(
        model_dir=str(model_dir), prediction_log=str(work / "predictions.jsonl")
    )
    (ingress,) = [d for d in application["deployments"] if d["name"] == "Ingress"]
    ingress.update(INGRESS_LIMITS)
    config_file = work / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(SERVE_MODES["haproxy"])
    env["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] = "60"  # a busy machine starts actors slowly
    # Unix socket paths stay under HAProxy's 97 characters: a short directory, not tmp_path.
    haproxy_dir = Path(tempfile.mkdtemp(prefix="vbhap-", dir="/tmp"))
    env.update(_private_haproxy(haproxy_dir))
    log = (work / "serve-run.log").open("w")
    server = subprocess.Popen(
        [str(SERVE), "run", "-a", "local", str(config_file)],
        cwd=repo_root(),  # import_path serve.app:app resolves from the repository root
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(base, server, work / "serve-run.log")
        yield base
    finally:
        os.killpg(server.pid, signal.SIGINT)  # serve run shuts the app and its Ray down
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        _kill_orphaned_haproxy(haproxy_dir)
        shutil.rmtree(haproxy_dir, ignore_errors=True)
        log.close()


def _private_haproxy(directory: Path) -> dict[str, str]:
    """Ray's HAProxy keeps its files under /tmp/haproxy-serve and its stats and metrics on ports
    8404 and 9101, whoever else runs one on the machine: this one gets its own of each."""
    return {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(directory / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(directory / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(directory / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(directory),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(directory / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    }


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
    assert_matches_offline(response.json()["predictions"], offline_probabilities(offline, photo))


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
