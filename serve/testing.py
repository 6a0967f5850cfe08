"""Helpers the tests and jobs/bench_serve.py share: the app started on a local port, in either of
its modes. Kept here, beside the app, so both start it the same way."""

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import uvicorn
from fastapi import FastAPI
from ray import serve

from serve.app import build_app
from serve.schemas import ServeSettings

DEPLOYMENTS = ("Ingress", "Classifier", "AttentionExplainer")

# Serve's two set-ups, as the environment switches Ray reads when it starts (every Ray process
# inherits them, so they belong to the cluster, not to serve/config.yaml). "haproxy" is what
# cluster/ deploys: HAProxy forwards HTTP straight to the Ingress replica's own server (no Python
# proxy hop) and replicas call each other over gRPC. "proxy" is the README's local command, the
# mode that Ctrl-C stops cleanly; jobs/bench_serve.py measures both.
# HAProxy's client timeout (default 3600 s) cuts a client that goes silent mid-request after 30 s,
# and its server timeout a replica that says nothing for 60 s (Serve's request_timeout_s).
SERVE_MODES: dict[str, dict[str, str]] = {
    "haproxy": {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "30",
        "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": "60",
    },
    "proxy": {},
}


def private_haproxy_env(directory: Path) -> dict[str, str]:
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


def photo_classes(split_dir: Path) -> list[str]:
    """Class names of an ImageFolder split (its sub-directories), sorted."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deployment_options(num_cpus: float, **per_deployment: dict[str, Any]) -> dict[str, dict]:
    """`num_cpus` for every replica (fractions let three fit on a small machine) plus overrides."""
    options: dict[str, dict] = {}
    for name in DEPLOYMENTS:
        options[name] = {
            "ray_actor_options": {"num_cpus": num_cpus},
            **per_deployment.get(name, {}),
        }
    return options


def start_app(
    settings: ServeSettings,
    options: dict[str, dict] | None = None,
    *,
    port: int | None = None,
    name: str = "vitbirds",
    timeout_s: float = 120.0,
) -> str:
    """Runs the app on the connected Ray, serving HTTP on 127.0.0.1; returns the base URL once
    /healthz answers."""
    port = port or free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(settings, options), name=name, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return url
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the app did not become healthy at {url} in {timeout_s} s")
        time.sleep(0.5)


async def slow_sender(port: int, stop: asyncio.Event, path: str = "/predict") -> bytes:
    """A client that announces a 1 MB upload and sends it one byte a second until answered or
    `stop`; returns the answer's first bytes (b"" if none). 140 of them at once are the
    slow-client attack the service's body deadlines are for."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: image/jpeg\r\nContent-Length: 1000000\r\n\r\n"
    )
    writer.write(head.encode())
    answer = b""
    try:
        while not stop.is_set() and not answer:
            writer.write(b"\xff")
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                answer = await asyncio.wait_for(reader.read(4096), timeout=1)
                if not answer:  # closed without an answer
                    break
    except ConnectionError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return answer


def answer_status(answer: bytes) -> str:
    """The status code of a raw HTTP answer, or "none"."""
    parts = answer.split(b" ", 2)
    return parts[1].decode() if answer.startswith(b"HTTP/") and len(parts) > 1 else "none"


@contextlib.contextmanager
def uvicorn_in_thread(api: FastAPI) -> Iterator[str]:
    """`api` on a real HTTP server on 127.0.0.1, in a thread of this process: for tests of the
    HTTP edge without Ray. Yields the base URL; stops the server on exit."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
