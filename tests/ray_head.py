"""A private `ray start --head` with token authentication on, as Ray 2.60 starts it.

Private: its own temp dir, ports and token file, started with `--block` so stopping that one
process stops exactly this cluster (`ray stop` would stop every Ray on the machine, the shared
test session's included). conftest.py gives one to each module that asks for `token_cluster`.
"""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RAY = Path(sys.executable).parent / "ray"
PORT_FLAGS = (
    "--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port",
    "--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port", "--metrics-export-port",
)  # fmt: skip


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@contextmanager
def token_auth_head(token_dir: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """(dashboard address, environment with RAY_AUTH_MODE=token) of a private head node."""
    token = token_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0")
    # Ray 2.60's raylet aborts when its agents take over 15 s to publish their ports, which a
    # busy 2-core machine can cause (ray-project/ray#65983, "node timed out during startup"):
    # a head that dies that way is started again.
    for _ in range(3):
        head, address, temp_dir = _start_head(env)
        if _wait_until_ready(address, token.read_text(), head, temp_dir):
            break
        _stop_head(head, temp_dir)
    else:
        raise RuntimeError("a Ray head with token auth did not start in 3 attempts")
    try:
        yield address, env
    finally:
        _stop_head(head, temp_dir)


def _start_head(env: dict[str, str]) -> tuple[subprocess.Popen, str, str]:
    # Unix socket paths must stay under ~100 characters: a short temp dir, not tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="vbray-", dir="/tmp")
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))  # no clashes
    command = [str(RAY), "start", "--head", "--block", "--num-cpus", "2", "--temp-dir", temp_dir]
    command += ["--include-dashboard", "true", "--disable-usage-stats"]
    for flag, port in ports.items():
        command += [flag, str(port)]
    with open(Path(temp_dir) / "ray-start.log", "w") as log:
        head = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return head, f"http://127.0.0.1:{ports['--dashboard-port']}", temp_dir


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    head.terminate()  # with --block, `ray start` stops the processes it started, and only those
    try:
        head.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)  # its own session: nothing else is in the group
        head.wait()
    shutil.rmtree(temp_dir, ignore_errors=True)


def http_status(url: str, token: str | None) -> int:
    """HTTP status of a GET, with the token as a bearer header when given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5):
            return 200
    except urllib.error.HTTPError as error:
        return error.code


def _wait_until_ready(
    address: str, token: str, head: subprocess.Popen, temp_dir: str, timeout_s: float = 240
) -> bool:
    """True once the dashboard answers and the agents have published their ports (what the
    raylet waits for); False if the head died on the way."""
    session = Path(temp_dir) / "session_latest"
    start_log = Path(temp_dir) / "ray-start.log"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            return False
        # The dashboard answers before `ray start` has seen its raylet register, which can still
        # time out (30 s) on a loaded machine; "Ray runtime started." comes after that wait.
        started = "Ray runtime started" in start_log.read_text(errors="replace")
        agents_up = started and all(
            any(session.glob(f"{name}_*"))
            for name in ("dashboard_agent_listen_port", "metrics_agent_port")
        )
        try:
            if agents_up and http_status(f"{address}/api/version", token) == 200:
                time.sleep(3)  # the head notices a raylet that aborted a moment ago
                return head.poll() is None
        except OSError:
            pass
        time.sleep(2)
    return False


def wait_for_job(
    address: str, env: dict[str, str], job_id: str, timeout_s: float
) -> tuple[str, str]:
    """(final status, logs) of a job on a token-auth cluster started by `token_cluster` (whose
    token file `env` names); fails the test with the job's log past `timeout_s`."""
    from ray.job_submission import JobSubmissionClient

    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout_s
    while not (status := client.get_job_status(job_id)).is_terminal():
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(3)
    return str(status), client.get_job_logs(job_id)
