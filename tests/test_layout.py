"""The shape of the code base: which folder may import what, and how long a library function may be.

The stages, lowest first; a module imports from its own stage and the ones below, never above:

    core        vitbirds/*.py but settings.py: errors, config, presets, devices, precision, paths
    model       the networks and the model directory format
    lifecycle   tracking, the model registry, the model store
    data        datasets, decoding, transforms
    evaluation  metrics, reports, agreement
    monitoring  drift and decay
    inference   scoring photos with an exported model: one path for Serve and batch prediction
    settings    vitbirds/settings.py: every run setting, the CLIs built from it
    training    the loop, run set-up, export, sweeps
    ray_adapter Ray Train, Tune and Data
    serve       the HTTP service
    jobs        the command lines and benchmarks

Read from the source with `ast` (every import, lazy ones inside functions included), so a move
that breaks the layout fails here rather than in review.
"""

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RAY_ALLOWED = ("vitbirds/ray_adapter/", "serve/", "jobs/", "tests/")
MAX_FUNCTION_LINES = 100


def _sources() -> list[Path]:
    skipped = {".venv", "venv", ".git", "runs", "build", "node_modules"}
    return sorted(
        path
        for path in ROOT.rglob("*.py")
        if not skipped & set(path.relative_to(ROOT).parts) and "egg-info" not in str(path)
    )


def _imports(path: Path) -> Iterator[tuple[str, int]]:
    """(top-level module, line) of every import in `path`; relative imports are skipped."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module.split(".")[0], node.lineno


def _violations(rule) -> list[str]:
    found = []
    for path in _sources():
        name = path.relative_to(ROOT).as_posix()
        for module, line in _imports(path):
            if not rule(name, module):
                found.append(f"{name}:{line} imports {module}")
    return found


STAGES = (
    "core", "model", "lifecycle", "data", "evaluation", "monitoring", "inference", "settings",
    "training", "ray_adapter", "serve", "jobs",
)  # fmt: skip


def _stage(module: str) -> str | None:
    """The stage of a dotted module name or a source path's dotted form; None outside the tree."""
    parts = module.split(".")
    if parts[0] in ("serve", "jobs"):
        return parts[0]
    if parts[0] != "vitbirds":
        return None
    if len(parts) > 1 and parts[1] in STAGES:
        return parts[1]
    return "settings" if parts[1:2] == ["settings"] else "core"


def _dotted_imports(path: Path) -> Iterator[tuple[str, int]]:
    """(dotted module, line) of every absolute import in `path`, `from a import b` as `a.b`."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                yield f"{node.module}.{alias.name}", node.lineno


def test_no_module_imports_from_a_stage_above_its_own() -> None:
    found = []
    for path in _sources():
        name = path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
        own = _stage(name)
        if own is None:
            continue
        for module, line in _dotted_imports(path):
            theirs = _stage(module)
            if theirs is not None and STAGES.index(theirs) > STAGES.index(own):
                found.append(f"{name}:{line} ({own}) imports {module} ({theirs})")
    assert found == []


def test_the_stage_map_knows_every_library_package() -> None:
    packages = {p.name for p in (ROOT / "vitbirds").iterdir() if (p / "__init__.py").is_file()}
    assert packages <= set(STAGES)


def test_ray_is_imported_only_in_the_adapter_folder_serve_jobs_and_tests() -> None:
    assert _violations(lambda name, module: module != "ray" or name.startswith(RAY_ALLOWED)) == []


def test_the_library_never_imports_serve_or_jobs() -> None:
    def rule(name: str, module: str) -> bool:
        return not name.startswith("vitbirds/") or module not in ("serve", "jobs")

    assert _violations(rule) == []


def test_serve_never_imports_jobs() -> None:
    assert _violations(lambda name, module: not name.startswith("serve/") or module != "jobs") == []


# The benchmarks of Serve itself: its speed, hostile uploads through the running service, the
# thread its replicas run their model on, and what its drift gauges read.
SERVE_BENCHMARKS = {"bench_serve.py", "bench_fuzz.py", "bench_torch_thread.py", "bench_log_read.py"}


def test_jobs_import_serve_only_in_serve_benchmarks() -> None:
    def rule(name: str, module: str) -> bool:
        return (
            not name.startswith("jobs/") or module != "serve" or Path(name).name in SERVE_BENCHMARKS
        )

    assert _violations(rule) == []


@pytest.mark.parametrize(
    "path", sorted((ROOT / "vitbirds").rglob("*.py")), ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_no_library_function_is_longer_than_100_lines(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    functions = (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))
    long = {
        f"{node.name} (line {node.lineno}): {node.end_lineno - node.lineno + 1} lines"
        for node in functions
        if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    }
    assert long == set()
