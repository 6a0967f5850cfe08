"""Batch prediction: the inputs it finds, the table it writes, resuming, and the Ray Data run
agreeing photo by photo with the scoring path Serve runs."""

import re
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from jobs import predict as predict_cli
from vitbirds.errors import DataError
from vitbirds.inference.batch_files import (
    OutputPlan,
    ShardedOutput,
    inputs_digest,
    list_inputs,
    read_output,
)
from vitbirds.inference.scoring import BatchPredictor, ImagePreprocessor
from vitbirds.lifecycle.store import content_digest
from vitbirds.model.files import load_model

PHOTOS = 12


@pytest.fixture(scope="module")
def photos(tmp_path_factory, cub_valid: Path, cub_classes: list[str]) -> Path:
    """PHOTOS real (or stand-in) photos in nested folders, a corrupt .jpg and a dot-file."""
    root = tmp_path_factory.mktemp("photos")
    for index, source in enumerate(sorted(cub_valid.rglob("*.jpg"))[:PHOTOS]):
        target = root / f"group{index % 3}" / f"{index:03d}.jpg"
        target.parent.mkdir(exist_ok=True)
        shutil.copy(source, target)
    (root / "group0" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "group0" / "._resource-fork.jpg").write_bytes(b"macOS metadata")
    (root / "notes.txt").write_text("not a photo")
    return root


def _plan(inputs: list[str], shard_size: int = 4, model_sha256: str = "m") -> OutputPlan:
    return OutputPlan(
        inputs_sha256=inputs_digest(inputs),
        inputs=len(inputs),
        shard_size=shard_size,
        model_sha256=model_sha256,
        top_k=5,
        embeddings=False,
    )


def _table(paths: list[str], label: str = "x") -> pa.Table:
    return pa.table(
        {
            "path": paths,
            "label": [label] * len(paths),
            "top_labels": [[label, "y"]] * len(paths),
            "error": pa.array([None] * len(paths), pa.string()),
        }
    )


# --- inputs -----------------------------------------------------------------------------------


def test_a_folder_yields_its_photos_recursively_sorted_without_dot_files(photos: Path) -> None:
    found = list_inputs(str(photos))
    assert len(found) == PHOTOS + 1  # the corrupt .jpg is a photo by name: it gets an error row
    assert found == sorted(found)
    assert not any(Path(p).name.startswith(".") or p.endswith(".txt") for p in found)


def test_a_list_file_is_taken_as_given_relative_to_its_folder(tmp_path: Path, photos: Path):
    listing = tmp_path / "list.txt"
    first = sorted(photos.rglob("*.jpg"))[0]
    listing.write_text(f"# photos\n{first}\n\nmissing.jpg\nfile:///abs/elsewhere.jpg\n")
    assert list_inputs(str(listing)) == sorted(
        [str(first), str(tmp_path / "missing.jpg"), "file:///abs/elsewhere.jpg"]
    )


def test_a_file_uri_prefix_is_listed_through_pyarrow(photos: Path) -> None:
    found = list_inputs(photos.as_uri())
    assert len(found) == PHOTOS + 1
    assert all(p.startswith("file:///") for p in found)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "absent", "no such file or folder"),
        (lambda root: root, "no photos found"),
        (lambda root: (root / "x.csv").write_text("a") and root / "x.csv", "not a folder"),
    ],
    ids=["missing", "empty", "not-a-list"],
)
def test_bad_inputs_are_refused_naming_the_value(tmp_path: Path, make, message: str) -> None:
    source = str(make(tmp_path))
    with pytest.raises(DataError, match=message) as caught:
        list_inputs(source)
    assert source in str(caught.value)


# --- outputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_shards_join_into_one_file_in_input_order_with_lists_kept(tmp_path: Path, suffix: str):
    inputs = [f"/p/{i:02d}.jpg" for i in range(10)]
    output = ShardedOutput(tmp_path / f"out{suffix}", _plan(inputs))
    assert output.prepare() == set()
    for shard in (2, 0, 1):  # completion order is not input order
        output.write_shard(shard, _table(inputs[4 * shard : 4 * shard + 4]))
    assert output.finish() == 10
    table = read_output(tmp_path / f"out{suffix}")
    assert table["path"].to_pylist() == inputs
    assert table["top_labels"].to_pylist() == [["x", "y"]] * 10
    assert not output.parts.exists()


def test_a_rerun_of_the_same_plan_keeps_the_written_shards(tmp_path: Path) -> None:
    inputs = [f"/p/{i}.jpg" for i in range(8)]
    first = ShardedOutput(tmp_path / "out.parquet", _plan(inputs))
    first.prepare()
    first.write_shard(1, _table(inputs[4:]))
    again = ShardedOutput(tmp_path / "out.parquet", _plan(inputs))
    assert again.prepare() == {1}
    with pytest.raises(DataError, match=r"1 shards .* missing"):
        again.finish()


def test_parts_of_another_plan_or_a_finished_output_are_not_overwritten_silently(tmp_path: Path):
    inputs = [f"/p/{i}.jpg" for i in range(8)]
    ShardedOutput(tmp_path / "out.csv", _plan(inputs)).prepare()
    other_model = ShardedOutput(tmp_path / "out.csv", _plan(inputs, model_sha256="other"))
    with pytest.raises(DataError, match=r"unfinished run .* --overwrite"):
        other_model.prepare()
    assert other_model.prepare(overwrite=True) == set()
    (tmp_path / "done.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match="exists; pass --overwrite"):
        ShardedOutput(tmp_path / "done.jsonl", _plan(inputs)).prepare()


def test_an_output_without_a_known_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"out\.xlsx.*\.parquet, \.csv, \.jsonl"):
        ShardedOutput(tmp_path / "out.xlsx", _plan(["/a.jpg"]))


# --- the Ray Data run -------------------------------------------------------------------------


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    status = predict_cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


SHARD, TOP_K = 4, 3


def _argv(model_dir: Path, photos: Path, out: Path) -> list[str]:
    return [
        "--model", str(model_dir), "--input", str(photos), "--output", str(out),
        "--top-k", str(TOP_K), "--embeddings", "--shard-size", str(SHARD), "--precision", "fp32",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished(ray_session, photos: Path, model_dir: Path, tmp_path_factory) -> Path:
    """The output file of one whole run over `photos`."""
    out = tmp_path_factory.mktemp("predict") / "predictions.parquet"
    assert predict_cli.main(_argv(model_dir, photos, out)) == 0
    return out


def test_every_photo_gets_a_row_scored_as_serve_scores_it(
    finished: Path, photos: Path, model_dir: Path
) -> None:
    rows = {row["path"]: row for row in read_output(finished).to_pylist()}
    assert list(rows) == list_inputs(str(photos))

    corrupt = rows.pop(str(photos / "group0" / "corrupt.jpg"))
    assert corrupt["error"].startswith("undecodable_image") and corrupt["label"] is None
    loaded = load_model(model_dir)
    preprocessor, predictor = ImagePreprocessor(loaded.metadata), BatchPredictor(loaded)
    expected = predictor([preprocessor.model_input(Path(p).read_bytes()) for p in rows])
    digest = content_digest(model_dir)
    for row, output in zip(rows.values(), expected, strict=True):
        values, indices = torch.tensor(output.probabilities).topk(TOP_K)
        assert row["top_labels"] == [loaded.metadata.class_names[i] for i in indices]
        assert row["top_probabilities"] == pytest.approx(values.tolist(), abs=2e-3)
        assert row["label"] == row["top_labels"][0] and row["error"] is None
        assert row["embedding"] == pytest.approx(output.embedding, abs=1e-4)
        assert (row["model_name"], row["model_sha256"]) == (loaded.metadata.name, digest)


def test_an_interrupted_run_resumes_without_redoing_finished_shards(
    finished: Path, photos: Path, model_dir: Path, tmp_path: Path, capsys
) -> None:
    whole = read_output(finished)
    out = tmp_path / "predictions.parquet"
    # What an interrupted run leaves: its plan and its first shard (marked, to see it is kept).
    inputs = list_inputs(str(photos))
    plan = OutputPlan(
        inputs_digest(inputs), len(inputs), SHARD, content_digest(model_dir), TOP_K, True
    )
    interrupted = ShardedOutput(out, plan)
    interrupted.prepare()
    kept = whole.slice(0, SHARD)
    kept = kept.set_column(kept.column_names.index("label"), "label", pa.array(["KEPT"] * SHARD))
    interrupted.write_shard(0, kept)

    status, stdout, _ = _run(_argv(model_dir, photos, out), capsys)
    assert status == 0, stdout
    assert f"{len(inputs) - SHARD} photos scored" in stdout and "1 shards kept" in stdout
    assert f"{len(inputs)} rows in {out}" in stdout and "1 with an error" in stdout
    resumed = read_output(out)
    assert resumed["label"].to_pylist()[:SHARD] == ["KEPT"] * SHARD
    assert resumed.slice(SHARD) == whole.slice(SHARD)
    assert not interrupted.parts.exists()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--output", "out.xlsx", "--output .*out.xlsx: the name must end in"),
        ("--input", "no/such/folder", "--input no/such/folder: no such file or folder"),
        ("--model", "no/such/model", "no/such/model"),
    ],
)
def test_bad_values_exit_2_naming_them(
    ray_session, photos: Path, model_dir: Path, tmp_path: Path, capsys, flag, value, message
) -> None:
    args = {"--model": str(model_dir), "--input": str(photos), "--output": "out.csv"}
    args[flag] = value if flag != "--output" else str(tmp_path / value)
    status, _, stderr = _run([item for pair in args.items() for item in pair], capsys)
    assert status == 2
    assert stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1
    assert re.search(message, stderr)
