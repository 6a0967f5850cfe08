"""Every script README.md and cluster/README.md tell a user to run starts: `--help` exits 0 with
its usage, in the environment the tests run in (a missing dependency or a broken import fails
here, not in a user's terminal)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "README.md", ROOT / "cluster" / "README.md")
COMMAND = re.compile(r"python3?(?:\.\d+)? ((?:jobs|cluster)/[a-z_]+\.py)")


def _scripts() -> list[str]:
    return sorted({m for doc in DOCS for m in COMMAND.findall(doc.read_text())})


def test_the_readmes_name_scripts() -> None:
    assert {"jobs/train.py", "jobs/evaluate.py", "jobs/monitor.py"} <= set(_scripts())


@pytest.mark.parametrize("script", _scripts())
def test_every_script_a_readme_shows_answers_help(script) -> None:
    assert (ROOT / script).is_file(), f"the README names {script}, which does not exist"
    done = subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
