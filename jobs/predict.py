"""Batch prediction: score a folder, a bucket or a list of photos into one table, on Ray Data.

examples:
    python jobs/predict.py --model models/latest --input ../shared/data/cub100/valid \\
        --output runs/predictions/cub100-valid.parquet
    python jobs/predict.py --model models:/vitbirds@champion --input gs://BUCKET/incoming/ \\
        --output /mnt/vitbirds/predictions/batch/incoming.csv --embeddings
    ray job submit --working-dir . -- python jobs/predict.py --model gs://BUCKET/models/v3 \\
        --input photos.txt --output runs/predictions/photos.jsonl --workers 4 --use-gpu

--input is a folder (searched recursively for photos), a .txt file listing one path or URI per
line, or a gs:// / s3:// prefix. --output ends in .parquet, .csv or .jsonl: one row per photo,
in input order, with `path`, `label` and `probability` (top-1), `top_labels` and
`top_probabilities` (top-k), `error` (why a photo could not be read or decoded; empty otherwise),
`model_name`, `model_version`, `model_sha256`, and with --embeddings the photo's CLS `embedding`.
Photos are decoded by the sandboxed decoder Serve uses: a corrupt file is a row with an error.
Rows are written in shards to OUTPUT.parts/ as they complete: rerunning the same command after an
interruption skips the finished shards; the parts are joined into OUTPUT at the end.
Relative paths are relative to the current directory, or to $VITBIRDS_HOME (default ~/vitbirds)
when the job runs through `ray job submit --working-dir`.

Exit status: 0 on success, 2 for a usage error (bad model, input, output or flag value).
"""

import argparse
import sys
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.cli import OneLineErrorParser, positive_int, start_job
from vitbirds.errors import VitbirdsError
from vitbirds.inference.batch_files import SHARD_SIZE
from vitbirds.lifecycle.registry import registry_uri
from vitbirds.paths import output_path
from vitbirds.ray_adapter.predict import PredictJob, predict
from vitbirds.ray_adapter.train import cluster_is_local, connect
from vitbirds.settings import RunSettings, add_arguments


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = PredictJob(model="", input="", output="")
    description, _, epilog = __doc__.partition("\n\n")
    parser = OneLineErrorParser(
        description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--model", required=True, metavar="REF",
        help="the model: a model or run directory, gs://..., models:/NAME@ALIAS or "
             "models:/NAME/VERSION")  # fmt: skip
    add("--input", required=True, metavar="SOURCE",
        help="a folder of photos, a .txt list of paths or URIs, or a gs:// or s3:// "
             "prefix")  # fmt: skip
    add("--output", required=True, metavar="FILE",
        help="the table to write: .parquet, .csv or .jsonl")  # fmt: skip
    add("--top-k", type=positive_int, default=defaults.top_k, metavar="K",
        help=f"labels and probabilities per photo (default: {defaults.top_k})")  # fmt: skip
    add("--batch-size", type=positive_int, default=defaults.batch_size, metavar="N",
        help=f"photos per forward pass (default: {defaults.batch_size})")  # fmt: skip
    add("--workers", type=positive_int, metavar="N",
        help="model actors, one model each (default: one per CPU of this machine locally, 1 "
             "on a cluster)")  # fmt: skip
    add("--cpus-per-worker", type=positive_int, metavar="N",
        help="CPUs and torch threads of each model actor (default: 1)")  # fmt: skip
    add("--decoders", type=positive_int, metavar="N",
        help="decode actors, one sandboxed decode process each (default: a quarter of the "
             "CPUs, at least 1)")  # fmt: skip
    add("--decode-cpus", type=_non_negative_float, metavar="X",
        help="CPUs each decode actor reserves (default: 0 locally, sharing the model actors' "
             "cores; 1 on a cluster)")  # fmt: skip
    add("--max-in-flight-mb", type=positive_int, default=defaults.max_in_flight_mb, metavar="MB",
        help="object store memory for blocks in flight; raise it for many GPU actors "
             f"(default: {defaults.max_in_flight_mb})")  # fmt: skip
    add("--use-gpu", action="store_true", help="one GPU per model actor")
    add("--embeddings", action="store_true", help="add each photo's CLS embedding (for drift)")
    add("--shard-size", type=positive_int, default=SHARD_SIZE, metavar="N",
        help="photos per output shard, the unit a resumed run skips "
             f"(default: {SHARD_SIZE})")  # fmt: skip
    add("--overwrite", action="store_true",
        help="replace an existing output, or the unfinished parts of another run")  # fmt: skip
    add_arguments(parser, RunSettings, ["precision"])
    add_arguments(
        parser, RunSettings, ["storage_path"],
        notes={"storage_path": "here: where the local MLflow registry is, for models:/ refs"},
    )  # fmt: skip
    return parser.parse_args(argv)


def build_job(args: argparse.Namespace, cpus: int, *, local: bool) -> PredictJob:
    """The job, with the actors this cluster's `cpus` allow where the user gave none.

    On one machine, model actors of one thread each take every core and the decode actors
    share those cores (they reserve none): per photo, decoding costs a fraction of the forward
    pass, so cores given over to decoders alone would idle. On a cluster every actor reserves
    its CPUs, so Ray spreads them over the nodes.
    """
    cpus_per_worker = args.cpus_per_worker or 1
    workers = args.workers or (max(1, cpus // cpus_per_worker) if local else 1)
    decoders = args.decoders or max(1, cpus // 4)
    decode_cpus = args.decode_cpus if args.decode_cpus is not None else (0.0 if local else 1.0)
    return PredictJob(
        model=args.model,
        input=args.input,
        output=output_path(args.output),
        top_k=args.top_k,
        batch_size=args.batch_size,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        decoders=decoders,
        decode_cpus=decode_cpus,
        use_gpu=args.use_gpu,
        precision=args.precision,
        embeddings=args.embeddings,
        shard_size=args.shard_size,
        max_in_flight_mb=args.max_in_flight_mb,
        overwrite=args.overwrite,
        tracking_uri=registry_uri(output_path(args.storage_path)),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_job()
    try:
        connect()
        job = build_job(args, int(ray.cluster_resources().get("CPU", 1)), local=cluster_is_local())
        print(
            f"{job.workers} model actor(s) x {job.cpus_per_worker} CPU"
            f"{' + 1 GPU' if job.use_gpu else ''}, {job.decoders} decode actor(s) x "
            f"{job.decode_cpus:g} CPU",
            flush=True,
        )
        summary = predict(job)
    except VitbirdsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"{summary.rows} rows in {summary.output}: {summary.scored} photos scored in "
        f"{summary.seconds:.1f} s ({summary.images_per_s:.1f} photos/s), {summary.errors} with an "
        f"error, {summary.shards_skipped} shards kept from an earlier run"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
