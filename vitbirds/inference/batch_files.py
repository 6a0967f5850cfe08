"""Batch prediction's inputs and outputs, without Ray.

Inputs: the photos a source names (a folder, a list file, a bucket prefix), read in one sorted
order and cut into shards of `shard_size`, so that shard `i` is the same photos on every run.

Outputs: one table per shard, written to `OUTPUT.parts/part-NNNNN.EXT` (atomically: a temporary
name, then a rename) as each shard completes, beside a `plan.json` naming what the rows depend on
(the inputs' digest, the shard size, the model's digest, the columns). A rerun whose plan matches
skips the shards already written; when the last shard is in, they are joined into OUTPUT (one
Parquet, CSV or JSON-lines file, rows in input order) and the parts folder is removed.
"""

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.fs as pa_fs
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from vitbirds.data.sources import IMAGE_EXTENSIONS
from vitbirds.errors import DataError
from vitbirds.paths import is_uri

OUTPUT_FORMATS = (".parquet", ".csv", ".jsonl")
SHARD_SIZE = 4096  # photos per output shard: what an interrupted run may have to redo
PLAN_FILE = "plan.json"
LIST_SUFFIX = ".txt"
# Columns that hold lists: Parquet and JSON lines keep them as lists, CSV as JSON text.
LIST_COLUMNS = ("top_labels", "top_probabilities", "embedding")


# --- inputs -----------------------------------------------------------------------------------


def list_inputs(source: str) -> list[str]:
    """Every photo `source` names, sorted, as paths or URIs that `PhotoReader` opens.

    `source` is a folder (searched recursively), a `.txt` file listing one path or URI per line
    (blank lines and `#` comments skipped; relative paths are relative to the list's folder), or
    a URI prefix that pyarrow's filesystems read (gs://, s3://, file://). A folder or prefix
    yields the files with an image extension, as training finds them; a list is taken as given,
    so a file that is not a photo becomes a row with an error.
    """
    if is_uri(source):
        found = _list_uri(source)
    else:
        path = Path(source).expanduser()
        if path.is_file() and path.suffix.lower() == LIST_SUFFIX:
            found = _read_list(path)
        elif path.is_dir():
            found = [str(p) for p in path.rglob("*") if _is_photo_name(p.name) and p.is_file()]
        elif path.exists():
            raise DataError(f"--input {source}: not a folder, a {LIST_SUFFIX} list or a URI")
        else:
            raise DataError(f"--input {source}: no such file or folder")
    if not found:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"--input {source}: no photos found ({extensions})")
    return sorted(found)


def _is_photo_name(name: str) -> bool:
    # Dot-files include macOS "._x.jpg" resource forks, which are not images despite the name.
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def _list_uri(uri: str) -> list[str]:
    try:
        filesystem, root = pa_fs.FileSystem.from_uri(uri)
        infos = filesystem.get_file_info(pa_fs.FileSelector(root, recursive=True))
    except (OSError, ValueError, pa.ArrowException) as error:
        raise DataError(f"--input {uri}: cannot list it ({error})") from None
    scheme = uri.split("://", 1)[0]
    return [
        f"{scheme}://{info.path}"
        for info in infos
        if info.type == pa_fs.FileType.File and _is_photo_name(info.base_name)
    ]


def _read_list(path: Path) -> list[str]:
    entries = []
    for line in path.read_text().splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        entries.append(entry if is_uri(entry) else str((path.parent / entry).resolve()))
    return entries


class PhotoReader:
    """Reads a photo's bytes from a path or a URI, keeping one filesystem per scheme."""

    def __init__(self) -> None:
        self._filesystems: dict[str, pa_fs.FileSystem] = {}

    def read(self, path: str) -> bytes:
        if not is_uri(path):
            return Path(path).read_bytes()
        scheme, rest = path.split("://", 1)
        if scheme not in self._filesystems:
            self._filesystems[scheme] = pa_fs.FileSystem.from_uri(path)[0]
        with self._filesystems[scheme].open_input_stream(rest) as stream:
            return stream.read()


def inputs_digest(paths: Iterable[str]) -> str:
    """sha256 of the input list: a rerun resumes only over the very same photos."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode() + b"\n")
    return digest.hexdigest()


# --- outputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputPlan:
    """What the rows of a run depend on; a rerun with another plan cannot reuse its shards."""

    inputs_sha256: str
    inputs: int
    shard_size: int
    model_sha256: str
    top_k: int
    embeddings: bool

    @property
    def shards(self) -> int:
        return -(-self.inputs // self.shard_size)


class ShardedOutput:
    """The output table of one run, written a shard at a time (see the module docstring)."""

    def __init__(self, output: str | Path, plan: OutputPlan) -> None:
        self.output = Path(output).expanduser()
        self.format = self.output.suffix.lower()
        if self.format not in OUTPUT_FORMATS:
            raise DataError(
                f"--output {output}: the name must end in one of {', '.join(OUTPUT_FORMATS)}"
            )
        self.plan = plan
        self.parts = self.output.with_name(self.output.name + ".parts")

    def prepare(self, *, overwrite: bool = False) -> set[int]:
        """Makes the parts folder ready and returns the shards already written by an earlier run
        of the same plan. Refuses (DataError) to replace a finished output or another plan's
        parts unless `overwrite`."""
        if self.output.exists() and not overwrite:
            raise DataError(f"--output {self.output} exists; pass --overwrite to replace it")
        plan_file = self.parts / PLAN_FILE
        if self.parts.exists():
            earlier = _read_plan(plan_file)
            if earlier == asdict(self.plan):
                return self.written_shards()
            if not overwrite:
                raise DataError(
                    f"{self.parts} holds an unfinished run of other inputs, model or columns; "
                    "pass --overwrite to discard it, or choose another --output"
                )
            shutil.rmtree(self.parts)
        self.parts.mkdir(parents=True)
        _write_atomically(plan_file, lambda tmp: tmp.write_text(json.dumps(asdict(self.plan))))
        return set()

    def written_shards(self) -> set[int]:
        found = set()
        for path in self.parts.glob(f"part-*{self.format}"):
            index = path.name.removeprefix("part-").removesuffix(self.format)
            if index.isdigit() and int(index) < self.plan.shards:
                found.add(int(index))
        return found

    def shard_path(self, index: int) -> Path:
        return self.parts / f"part-{index:05d}{self.format}"

    def write_shard(self, index: int, table: pa.Table) -> None:
        _write_atomically(self.shard_path(index), lambda tmp: _write_table(table, tmp, self.format))

    def finish(self) -> int:
        """Joins every shard into the output file (one row per input), removes the parts;
        returns the row count."""
        missing = set(range(self.plan.shards)) - self.written_shards()
        if missing:
            raise DataError(f"{len(missing)} shards of {self.parts} are missing; rerun to finish")
        shards = [self.shard_path(i) for i in range(self.plan.shards)]
        self.output.parent.mkdir(parents=True, exist_ok=True)
        if self.output.is_dir():
            shutil.rmtree(self.output)
        _write_atomically(self.output, lambda tmp: _join(shards, tmp, self.format))
        shutil.rmtree(self.parts)
        return self.plan.inputs


def _read_plan(plan_file: Path) -> dict | None:
    try:
        return json.loads(plan_file.read_text())
    except (OSError, ValueError):
        return None


def _write_atomically(target: Path, write):
    tmp = target.with_name(f".{target.name}.tmp")
    result = write(tmp)
    os.replace(tmp, target)
    return result


def _csv_ready(table: pa.Table) -> pa.Table:
    """List columns as JSON text: CSV has no lists."""
    for name in LIST_COLUMNS:
        if name in table.column_names:
            text = pa.array(
                [None if v is None else json.dumps(v) for v in table[name].to_pylist()], pa.string()
            )
            table = table.set_column(table.column_names.index(name), name, text)
    return table


def _write_table(table: pa.Table, path: Path, fmt: str) -> None:
    if fmt == ".parquet":
        pq.write_table(table, path)
    elif fmt == ".csv":
        pa_csv.write_csv(_csv_ready(table), path)
    else:
        with path.open("w") as out:
            for row in table.to_pylist():
                out.write(json.dumps(row) + "\n")


def _join(shards: list[Path], path: Path, fmt: str) -> None:
    """Concatenates the shard files into `path`, one shard in memory at a time."""
    if fmt == ".parquet":
        writer = None
        for shard in shards:
            table = pq.read_table(shard)
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
        writer.close()
        return
    with path.open("wb") as out:
        for number, shard in enumerate(shards):
            with shard.open("rb") as part:
                if fmt == ".csv" and number > 0:
                    part.readline()  # each shard repeats the header
                shutil.copyfileobj(part, out)


def read_output(path: str | Path) -> pa.Table:
    """A finished output as a table (lists as lists whatever the format), for tests and users."""
    path = Path(path)
    fmt = path.suffix.lower()
    if fmt == ".parquet":
        return pq.read_table(path)
    if fmt == ".jsonl":
        return pa_json.read_json(path)
    table = pa_csv.read_csv(path)
    for name in LIST_COLUMNS:
        if name in table.column_names:
            values = [None if v is None else json.loads(v) for v in table[name].to_pylist()]
            table = table.set_column(table.column_names.index(name), name, pa.array(values))
    return table
