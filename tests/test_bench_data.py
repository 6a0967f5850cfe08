"""The benchmarks that need photos find them one way (`jobs/benchlib/data.py`) and, without any,
stop with a usage error naming the flag and VITBIRDS_DATA instead of a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# bench -> the arguments it needs besides its photos, and the flag that names them
NEEDS_PHOTOS = {
    "bench_accuracy.py": ([], "--data-dir"),
    "bench_loader.py": ([], "--data-dir"),
    "bench_precision.py": (["--model", "models/latest"], "--data-dir"),
    "bench_fuzz.py": ([], "--data-dir"),
    "bench_serve.py": ([], "--data-dir"),
    "bench_drift.py": ([], "--cub-dir"),
}


def _run(bench: str, args: list[str], data: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "VITBIRDS_DATA": str(data)}
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / bench), *args],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT,
    )  # fmt: skip


@pytest.mark.parametrize("bench", sorted(NEEDS_PHOTOS))
def test_without_photos_a_bench_names_the_flag_and_the_variable(bench, tmp_path) -> None:
    args, flag = NEEDS_PHOTOS[bench]
    done = _run(bench, args, tmp_path / "nowhere")
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"no photos: pass {flag} or set VITBIRDS_DATA" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_data_folder_that_is_not_there_is_named(tmp_path) -> None:
    tmp_path.joinpath("shared").mkdir()
    done = _run("bench_loader.py", [], tmp_path / "shared")
    assert done.returncode == 2
    assert f"--data-dir {tmp_path / 'shared' / 'cub100'} is not a folder" in done.stderr
