"""Batch prediction on Ray Data: photos in, one row per photo out, streaming end to end.

    inputs (sorted, sharded) -> DecodePhotos actors -> ScorePhotos actors -> the driver, which
    writes each shard as soon as its last row arrives (vitbirds/inference/batch_files.py)

Decoding runs in `DecodePhotos` actors, each with one sandboxed decode process (the decoder Serve
uses, under the same time and memory limits): a corrupt or hostile file becomes a row with an
`error`, never a crash or a stalled run. Scoring runs in `ScorePhotos` actors (one model each, on
CPU or one GPU) through `BatchPredictor`, the forward pass Serve runs. The two stages overlap:
while one actor forwards a batch, the others decode the next. Ray Data's backpressure bounds what
is in flight, so memory does not grow with the number of photos.
"""

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from vitbirds.data.images import DEFAULT_MAX_PIXELS
from vitbirds.data.sandbox import DecodePool, SandboxConfig
from vitbirds.errors import ImageDecodeError
from vitbirds.inference.batch_files import (
    SHARD_SIZE,
    OutputPlan,
    PhotoReader,
    ShardedOutput,
    inputs_digest,
    list_inputs,
)
from vitbirds.inference.scoring import BatchPredictor, ImagePreprocessor
from vitbirds.lifecycle.store import content_digest, fetch_model
from vitbirds.model.files import ModelMetadata, load_model, read_metadata
from vitbirds.precision import DEFAULT_PRECISION, resolve_precision

logger = logging.getLogger(__name__)

DECODE_BATCH = 32  # photos per decode call: small, so the scorers get work early


@dataclass
class PredictJob:
    model: str  # any model reference (vitbirds.lifecycle.store)
    input: str  # a folder, a .txt list, or a URI prefix (vitbirds.inference.batch_files)
    output: str  # OUT.parquet | OUT.csv | OUT.jsonl
    top_k: int = 5
    batch_size: int = 64  # photos per forward pass
    workers: int = 1  # ScorePhotos actors (one model each)
    cpus_per_worker: int = 1  # torch threads of each
    decoders: int = 1  # DecodePhotos actors (one decode process each)
    # CPUs each DecodePhotos actor reserves. Its decode process uses a fraction of what a model
    # actor uses per photo, so on one machine decoders reserve none and share the model actors'
    # cores (their number bounds what they take); on a cluster 1 keeps them spread over nodes.
    decode_cpus: float = 1.0
    use_gpu: bool = False  # one GPU per ScorePhotos actor
    precision: str = DEFAULT_PRECISION
    embeddings: bool = False  # add each photo's CLS embedding (what drift checks compare)
    shard_size: int = SHARD_SIZE
    # Ray Data's object store budget for this run's blocks in flight (by default it may use the
    # whole store, 30 % of RAM). Unbounded, a local node's peak memory grew 9-25 % from 42,000 to
    # 84,000 photos; bounded, 4-10 % (jobs/bench_predict.py, README).
    max_in_flight_mb: int = 512
    overwrite: bool = False
    tracking_uri: str | None = None  # of a models:/ reference's registry
    decode_timeout_s: float = 5.0


@dataclass
class PredictSummary:
    output: str
    rows: int  # in the output: one per input photo
    scored: int  # photos this run read (the rest were in shards an earlier run wrote)
    errors: int  # of those, rows with an error instead of a prediction
    shards_written: int
    shards_skipped: int  # finished by an earlier run of the same plan
    seconds: float
    model: dict[str, str] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0


class DecodePhotos:
    """Ray Data stage: paths -> uint8 model crops, or an error per photo that cannot be read."""

    def __init__(self, metadata: ModelMetadata, timeout_s: float, max_pixels: int) -> None:
        config = SandboxConfig(workers=1, timeout_s=timeout_s, wait_s=timeout_s + 30.0)
        self.pool = DecodePool(config)
        self.preprocess = ImagePreprocessor(
            metadata, max_pixels=max_pixels, decoder=self.pool.decode
        )
        self.size = metadata.image_size
        self.reader = PhotoReader()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["path"])
        images = np.zeros((count, 3, self.size, self.size), dtype=np.uint8)
        errors = np.full(count, "", dtype=object)
        for row, path in enumerate(batch["path"]):
            try:
                images[row] = self.preprocess.model_input(self.reader.read(path)).numpy()
            except ImageDecodeError as error:
                errors[row] = f"{error.reason}: {_one_line(error)}"
            except OSError as error:
                errors[row] = f"unreadable: {_one_line(error)}"
        return {**batch, "image": images, "error": errors}


class ScorePhotos:
    """Ray Data stage: model crops -> top-k rows, through the forward pass Serve runs."""

    def __init__(self, job: PredictJob, location: str, identity: dict[str, str]) -> None:
        torch.set_num_threads(job.cpus_per_worker)
        device = torch.device("cuda" if job.use_gpu else "cpu")
        fetched = fetch_model(location, tracking_uri=job.tracking_uri)
        if content_digest(fetched.path) != identity["model_sha256"]:
            raise RuntimeError(f"{location} changed after the run started: its digest differs")
        loaded = load_model(fetched.path, device=device)
        precision = resolve_precision(job.precision, device)
        logger.info("scoring on %s: %s", device, precision.describe())
        self.predictor = BatchPredictor(loaded, device, precision)
        self.class_names = loaded.metadata.class_names
        self.top_k = min(job.top_k, len(self.class_names))
        self.embeddings = job.embeddings
        self.identity = identity

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        count = len(batch["path"])
        decoded = np.flatnonzero(batch["error"] == "")
        labels: list[list[str] | None] = [None] * count
        probabilities: list[list[float] | None] = [None] * count
        embeddings: list[list[float] | None] = [None] * count
        if len(decoded):
            outputs = self.predictor([torch.from_numpy(batch["image"][i]) for i in decoded])
            scores = torch.tensor([output.probabilities for output in outputs])
            values, indices = scores.topk(self.top_k, dim=1)
            for row, top_values, top_indices, output in zip(
                decoded, values.tolist(), indices.tolist(), outputs, strict=True
            ):
                labels[row] = [self.class_names[i] for i in top_indices]
                probabilities[row] = top_values
                embeddings[row] = output.embedding
        columns = {
            "path": pa.array(batch["path"], pa.string()),
            "shard": pa.array(batch["shard"], pa.int32()),
            "label": pa.array([v[0] if v else None for v in labels], pa.string()),
            "probability": pa.array([v[0] if v else None for v in probabilities], pa.float32()),
            "top_labels": pa.array(labels, pa.list_(pa.string())),
            "top_probabilities": pa.array(probabilities, pa.list_(pa.float32())),
            "error": pa.array([e or None for e in batch["error"]], pa.string()),
            **{
                name: pa.array([value] * count, pa.string())
                for name, value in self.identity.items()
            },
        }
        if self.embeddings:
            columns["embedding"] = pa.array(embeddings, pa.list_(pa.float32()))
        return pa.table(columns)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def model_identity(metadata: ModelMetadata, sha256: str) -> dict[str, str]:
    """The columns that say which model answered each row."""
    return {"model_name": metadata.name, "model_version": metadata.version, "model_sha256": sha256}


def predict(job: PredictJob) -> PredictSummary:
    """Scores every photo of `job.input` into `job.output`, resuming an interrupted run of the
    same inputs and model. Bad inputs, models and outputs raise VitbirdsError before any work."""
    started = time.perf_counter()
    inputs = list_inputs(job.input)
    fetched = fetch_model(job.model, tracking_uri=job.tracking_uri)
    metadata = read_metadata(fetched.path)
    identity = model_identity(metadata, content_digest(fetched.path))
    plan = OutputPlan(
        inputs_sha256=inputs_digest(inputs),
        inputs=len(inputs),
        shard_size=job.shard_size,
        model_sha256=identity["model_sha256"],
        top_k=job.top_k,
        embeddings=job.embeddings,
    )
    output = ShardedOutput(job.output, plan)
    done = output.prepare(overwrite=job.overwrite)
    pending = [
        {"path": path, "shard": index // job.shard_size}
        for index, path in enumerate(inputs)
        if index // job.shard_size not in done
    ]
    print(
        f"{len(inputs)} photos in {plan.shards} shards of {job.shard_size}; "
        f"{len(done)} shards already written, {len(pending)} photos to score with "
        f"{fetched.label} ({identity['model_sha256'][:12]})",
        flush=True,
    )
    errors = _score(job, pending, output, fetched.location, metadata, identity)
    rows = output.finish()
    return PredictSummary(
        output=str(output.output),
        rows=rows,
        scored=len(pending),
        errors=errors,
        shards_written=plan.shards - len(done),
        shards_skipped=len(done),
        seconds=time.perf_counter() - started,
        model=identity,
    )


def _score(
    job: PredictJob,
    pending: list[dict],
    output: ShardedOutput,
    location: str,
    metadata: ModelMetadata,
    identity: dict[str, str],
) -> int:
    """Runs the pipeline over `pending` and writes each shard as it completes; returns the
    number of rows with an error."""
    if not pending:
        return 0
    expected: dict[int, int] = defaultdict(int)
    for item in pending:
        expected[item["shard"]] += 1
    context = ray.data.DataContext.get_current()
    context.execution_options.resource_limits = ray.data.ExecutionResources(
        object_store_memory=job.max_in_flight_mb * 1024 * 1024
    )
    dataset = ray.data.from_items(pending, override_num_blocks=max(1, len(pending) // 256))
    dataset = dataset.map_batches(
        DecodePhotos,
        fn_constructor_kwargs={
            "metadata": metadata,
            "timeout_s": job.decode_timeout_s,
            "max_pixels": DEFAULT_MAX_PIXELS,
        },
        batch_size=DECODE_BATCH,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=job.decoders),
        num_cpus=job.decode_cpus,
    )
    dataset = dataset.map_batches(
        ScorePhotos,
        fn_constructor_args=(job, location, identity),
        batch_size=job.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=job.workers),
        num_cpus=job.cpus_per_worker,
        num_gpus=1 if job.use_gpu else 0,
    )
    arrived: dict[int, list[pa.Table]] = defaultdict(list)
    counts: dict[int, int] = defaultdict(int)
    errors = 0
    for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        errors += table.num_rows - table["error"].null_count
        for shard in set(table["shard"].to_pylist()):
            rows = table.filter(pc.equal(table["shard"], shard))
            arrived[shard].append(rows)
            counts[shard] += rows.num_rows
            if counts[shard] == expected[shard]:
                complete = pa.concat_tables(arrived.pop(shard)).drop_columns(["shard"])
                output.write_shard(shard, complete.sort_by("path"))
                logger.info("shard %d written (%d rows)", shard, complete.num_rows)
    return errors
