"""The Ray Serve application: an HTTP ingress composed with a batching classifier and an attention
explainer.

    HTTP -> Ingress (FastAPI: reads and decodes the upload, answers every bad input with a 4xx)
              |-> Classifier          (batched forward: probabilities + CLS embeddings)
              `-> AttentionExplainer  (attention rollout overlay PNG, /explain only)

`serve run serve/config.yaml` (from the repository root) or `serve.run(app({"model_dir": ...}))`.
`$VITBIRDS_MODEL_DIR` overrides `model_dir`. Uploads are decoded by the ingress, in worker
processes with time and memory limits (vitbirds/data/sandbox.py), so hostile bytes never reach a
model replica, and the replicas exchange small tensors. Backpressure: past
`max_queued_requests` the proxy (for the ingress) or the ingress (for the classifier) answers 503
at once instead of letting a queue grow without bound. The ingress also re-assesses its own
prediction log every few minutes (serve/drift_gauges.py) and exports the monitoring job's headline
numbers as Prometheus gauges and at `GET /drift`.
"""

import asyncio
import base64
import hmac
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import ray
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from serve.batching import DynamicBatcher
from serve.body_deadline import BodyDeadline, BodyDeadlineMiddleware
from serve.drift_gauges import DriftWatcher
from serve.inference import (
    BatchPredictor,
    ClassifierOutput,
    ImagePreprocessor,
    model_normaliser,
    render_explanation,
    top_k,
)
from serve.schemas import (
    FEEDBACK_MAX_BYTES,
    WRITE_TOKEN_ENV,
    BatchStats,
    DriftStatus,
    ErrorResponse,
    ExplainResponse,
    FeedbackRequest,
    FeedbackResponse,
    HealthResponse,
    ModelInfo,
    PredictResponse,
    ServeSettings,
)
from serve.server_timing import ServerTiming
from serve.torch_thread import torch_thread
from vitbirds.data.images import load_rgb
from vitbirds.data.sandbox import DecodePool, SandboxConfig
from vitbirds.devices import resolve_device
from vitbirds.errors import (
    DecodeBudgetExceeded,
    DecodersBusy,
    ExtremeAspectRatio,
    ImageDecodeError,
    ImageTooLarge,
    UnsupportedImageFormat,
)
from vitbirds.model.files import load_model, read_metadata
from vitbirds.model.versions import ModelVersion, materialize, resolve
from vitbirds.monitoring.predictions import (
    LOGGED_TOP_K,
    BackgroundPredictionLog,
    FeedbackRecord,
    LogRotation,
    PredictionLog,
    PredictionRecord,
    log_path,
    parse_time,
)
from vitbirds.monitoring.request_index import RequestIndex
from vitbirds.precision import resolve_precision

logger = logging.getLogger("ray.serve")
T = TypeVar("T")

STATIC_DIR = Path(__file__).parent / "static"
RAW_IMAGE_TYPES = ("image/", "application/octet-stream")
MAX_TOP_K = 1000
CONFIDENCE_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]


class InputRejected(Exception):
    """A request we refuse on purpose: becomes `status` with {"error", "reason"}."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


# Metrics are created on first use, inside the replica that records them.
@cache
def _rejected_inputs() -> metrics.Counter:
    return metrics.Counter(
        "vitbirds_rejected_inputs",
        description="Requests refused with a 4xx/503, by reason.",
        tag_keys=("reason",),
    )


@cache
def _predictions_by_class() -> metrics.Counter:
    return metrics.Counter(
        "vitbirds_predictions", description="Top-1 predictions, by class.", tag_keys=("label",)
    )


@cache
def _confidence() -> metrics.Histogram:
    return metrics.Histogram(
        "vitbirds_prediction_confidence",
        description="Top-1 probability of each prediction.",
        boundaries=CONFIDENCE_BUCKETS,
    )


@cache
def _drift_gauge(name: str) -> metrics.Gauge:
    return metrics.Gauge(
        name,
        description="jobs/monitor.py's headline number on the prediction log's latest window.",
        tag_keys=("model_version",),
    )


@cache
def _dropped_log_records() -> metrics.Counter:
    return metrics.Counter(
        "vitbirds_prediction_log_dropped",
        description="Prediction log records dropped: its write queue was full or a write failed.",
    )


@cache
def _batch_sizes() -> metrics.Histogram:
    return metrics.Histogram(
        "vitbirds_batch_size",
        description="Images per Classifier forward pass.",
        boundaries=BATCH_SIZE_BUCKETS,
    )


def _error(status: int, reason: str, message: str, headers: dict | None = None) -> JSONResponse:
    _rejected_inputs().inc(tags={"reason": reason})
    content = ErrorResponse(error=message, reason=reason).model_dump()
    return JSONResponse(content, status_code=status, headers=headers)


api = FastAPI(
    title="vitbirds",
    description="Bird species from a photo, with the attention map of a from-scratch ViT.",
    version="1",
)
api.add_middleware(BodyDeadlineMiddleware)  # 408 for bodies that arrive too slowly


@api.exception_handler(InputRejected)
async def _input_rejected(_: Request, exc: InputRejected) -> JSONResponse:
    headers = {401: {"WWW-Authenticate": "Bearer"}, 503: {"Retry-After": "1"}}.get(exc.status)
    return _error(exc.status, exc.reason, exc.message, headers=headers)


@api.exception_handler(RequestValidationError)
async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in exc.errors()
    )
    return _error(422, "invalid_request", problems)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, f"http_{exc.status_code}", str(exc.detail))


def _unavailable(exc: BackPressureError | RayActorError) -> JSONResponse:
    """503 when a model deployment's queue is full or its replica is gone: retry shortly. The
    client gets a fixed sentence; Ray's own text (actor ids, node addresses, a replica's
    traceback) goes to the log only."""
    if isinstance(exc, BackPressureError):
        reason, message = "overloaded", "the model is at capacity; retry shortly"
    else:
        reason, message = "model_unavailable", "the model replica is unavailable; retry shortly"
    logger.warning("503 %s: %s", reason, exc)
    return _error(503, reason, message, headers={"Retry-After": "1"})


def _decode_rejection(error: ImageDecodeError | DecodersBusy) -> InputRejected:
    message = str(error).removeprefix("<bytes>: ")
    if isinstance(error, DecodersBusy):  # not the file's fault: retry (Retry-After: 1)
        return InputRejected(503, "decoders_busy", message)
    if isinstance(error, UnsupportedImageFormat):
        return InputRejected(415, "unsupported_format", message)
    if isinstance(error, ImageTooLarge):
        return InputRejected(413, "too_many_pixels", message)
    if isinstance(error, ExtremeAspectRatio):
        return InputRejected(422, "extreme_aspect_ratio", message)
    if isinstance(error, DecodeBudgetExceeded):
        return InputRejected(422, "decode_budget_exceeded", message)
    if "not an image" in message:
        return InputRejected(422, "not_an_image", message)
    return InputRejected(422, "undecodable_image", message)


def _check_write_token(request: Request) -> None:
    """401 unless the request carries $VITBIRDS_WRITE_TOKEN (when that is set) as a Bearer
    token; compared in constant time so the response time says nothing about the token."""
    expected = os.environ.get(WRITE_TOKEN_ENV)
    if not expected:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), expected.encode()
    ):
        raise InputRejected(
            401, "unauthorized", "this endpoint needs 'Authorization: Bearer <token>'"
        )


async def _limited_body(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body in chunks, refused with 413 as soon as it is known to exceed `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InputRejected(400, "bad_content_length", f"Content-Length {declared!r}")
        if int(declared) > limit:
            raise InputRejected(
                413, "too_large", f"body of {declared} bytes exceeds the {limit}-byte limit"
            )
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputRejected(413, "too_large", f"body exceeds the {limit}-byte limit")
        yield chunk


async def read_upload(request: Request, limit: int) -> bytes:
    """The image bytes of a multipart upload (field `file`) or of a raw image body."""
    content_type = request.headers.get("content-type", "").lower()
    body = _limited_body(request, limit)
    if content_type.startswith("multipart/form-data"):
        try:
            form = await MultiPartParser(request.headers, body, max_files=1, max_fields=8).parse()
        except MultiPartException as exc:
            raise InputRejected(400, "bad_multipart", exc.message) from exc
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                fields = sorted(form.keys())
                raise InputRejected(400, "missing_file", f"no file field 'file' (got {fields})")
            data = await upload.read()
        finally:
            await form.close()
    elif content_type.startswith(RAW_IMAGE_TYPES):
        data = b"".join([chunk async for chunk in body])
    else:
        raise InputRejected(
            415,
            "unsupported_content_type",
            f"Content-Type {content_type or '(none)'!r}: send multipart/form-data with a 'file' "
            "field, or the image itself as image/* or application/octet-stream",
        )
    if not data:
        raise InputRejected(400, "empty", "the image is empty (0 bytes)")
    return data


def replica_torch_threads(configured: int | None) -> int:
    """This replica's torch threads: `configured`, else its CPU allotment rounded up. Ray sets
    OMP_NUM_THREADS to the allotment rounded *down* (at least 1), which left a Classifier with
    num_cpus 1 running a compute-bound model on one of the machine's cores."""
    if configured is None:
        allotted = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        configured = max(1, math.ceil(allotted))
    return configured


def _log_anchor(version: ModelVersion, local_dir: Path) -> Path:
    """The directory the prediction log goes beside by default: the configured model directory
    when it is one on this machine (as before versions), else the version's local snapshot."""
    source = Path(version.source)
    return source if "://" not in version.source and source.is_dir() else local_dir


@serve.deployment(
    name="Classifier",
    max_ongoing_requests=64,  # >= max_batch_size, so a full batch can form
    max_queued_requests=128,
    user_config={"max_batch_size": 32},
)
class Classifier:
    """Loads the model once; answers batches of preprocessed images. A batch is whatever queued
    while the previous one ran (serve/batching.py), up to `max_batch_size`."""

    def __init__(self, settings: ServeSettings, version: ModelVersion) -> None:
        self.torch_thread = torch_thread(
            "classifier-model", replica_torch_threads(settings.torch_threads)
        )
        threads = self.torch_thread.submit(torch.get_num_threads).result()
        device = resolve_device(settings.device)
        precision = resolve_precision(settings.precision, device)
        loaded = self.torch_thread.submit(load_model, materialize(version), device).result()
        self.predictor = BatchPredictor(loaded, device, precision)
        self.batch_stats = BatchStats(
            model_sha256=version.sha256, torch_threads=threads, precision=precision.name
        )
        self.batcher = DynamicBatcher(
            self.predictor, max_batch_size=32, on_batch=self._observe, executor=self.torch_thread
        )
        logger.info(
            "Classifier: %s %s (sha256 %s) on %s, %d torch threads, %s",
            loaded.metadata.name,
            loaded.metadata.version,
            version.short,
            device,
            threads,
            precision.describe(),
        )

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Batching from user_config, changeable without restarting the replica."""
        unknown = sorted(set(config) - {"max_batch_size"})
        if unknown:
            raise ValueError(f"unknown Classifier user_config keys {unknown}: only max_batch_size")
        self.batcher.max_batch_size = config.get("max_batch_size", 32)

    async def predict(self, image: torch.Tensor) -> ClassifierOutput:
        started = time.perf_counter()
        output = await self.batcher(image)
        return replace(output, replica_ms=1000 * (time.perf_counter() - started))

    def _observe(self, size: int) -> None:
        self.batch_stats.record(size)
        _batch_sizes().observe(size)

    def stats(self) -> BatchStats:
        return self.batch_stats


@serve.deployment(name="AttentionExplainer", max_ongoing_requests=8, max_queued_requests=32)
class AttentionExplainer:
    """Runs the model with attention weights and draws the rollout over the photo."""

    def __init__(self, settings: ServeSettings, version: ModelVersion) -> None:
        self.torch_thread = torch_thread(
            "explainer-model", replica_torch_threads(settings.torch_threads)
        )
        self.device = resolve_device(settings.device)
        self.precision = resolve_precision(settings.precision, self.device)
        self.loaded = self.torch_thread.submit(
            load_model, materialize(version), self.device
        ).result()
        self.normalise = model_normaliser(self.loaded.metadata)

    async def explain(self, image: torch.Tensor, display: Any) -> bytes:
        """`image`: the Ingress's uint8 crop (`ImagePreprocessor.model_input`)."""
        return await asyncio.get_running_loop().run_in_executor(
            self.torch_thread, self._render, image, display
        )

    def _render(self, image: torch.Tensor, display: Any) -> bytes:
        model_input = self.normalise(image.to(self.device))
        return render_explanation(self.loaded, model_input, display, self.device, self.precision)


_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 503)
}
_FEEDBACK_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 404, 409, 413, 422)
}
_FEEDBACK_BODY = {
    "required": True,
    "content": {"application/json": {"schema": FeedbackRequest.model_json_schema()}},
}
_TOP_K = Query(None, ge=1, le=MAX_TOP_K, description="How many classes (default 5)")


@serve.deployment(
    name="Ingress",
    max_ongoing_requests=64,
    max_queued_requests=64,
    backpressure_config={"status_code": 503, "retry_after_s": 1},
)
@serve.ingress(api)
class Ingress:
    """HTTP: reads and checks the upload, asks the model deployments, logs the prediction."""

    def __init__(
        self,
        classifier: DeploymentHandle,
        explainer: DeploymentHandle,
        settings: ServeSettings,
        version: ModelVersion,
    ) -> None:
        self.classifier = classifier
        self.explainer = explainer
        self.settings = settings
        self.version = version
        api.state.body_deadline = BodyDeadline(
            total_s=settings.body_timeout_s, idle_s=settings.body_idle_timeout_s
        )
        local_dir = materialize(version)
        self.metadata = read_metadata(local_dir)
        self.decode_pool = (
            DecodePool(
                SandboxConfig(
                    workers=settings.decode_workers,
                    timeout_s=settings.decode_timeout_s,
                    memory_bytes=settings.decode_memory_mb * 1024 * 1024,
                    wait_s=settings.decode_wait_s,
                )
            )
            if settings.decode_workers
            else None
        )
        self.preprocessor = ImagePreprocessor(
            self.metadata,
            max_pixels=settings.max_pixels,
            display_size=settings.display_size,
            decoder=self.decode_pool.decode if self.decode_pool else load_rgb,
        )
        rotation = LogRotation(settings.log_max_bytes, settings.log_max_age_s, settings.log_keep)
        self.log = BackgroundPredictionLog(
            PredictionLog(
                log_path(_log_anchor(version, local_dir), settings.prediction_log), rotation
            ),
            on_drop=lambda count: _dropped_log_records().inc(count),
        )
        self.requests = RequestIndex(self.log.path, timedelta(seconds=settings.feedback_max_age_s))
        self.index_html = (STATIC_DIR / "index.html").read_text()
        self.drift = DriftWatcher(
            local_dir,
            self.log.path,
            model_version=self.metadata.version,
            class_names=self.metadata.class_names,
            window=settings.drift_window,
            interval_s=settings.drift_interval_s,
            publish=self._publish_drift,
            min_refresh_interval_s=settings.drift_refresh_min_interval_s,
        )
        self.drift.start()
        logger.info("Ingress: prediction log %s", self.log.path)

    def __del__(self) -> None:
        """Serve's graceful shutdown: the queued prediction records are written before the
        replica goes, and the decode workers stop with it."""
        if hasattr(self, "log") and not self.log.close():
            logger.warning("Ingress: prediction log not flushed in time (%s)", self.log.path)
        if getattr(self, "decode_pool", None) is not None:
            self.decode_pool.close()

    def _publish_drift(self, gauges: dict[str, float]) -> None:
        for name, value in gauges.items():
            _drift_gauge(name).set(value, tags={"model_version": self.metadata.version})

    async def _decode(self, decoder: Callable[[bytes], T], data: bytes) -> T:
        """Runs a decoder in a thread (which waits on a sandboxed decode worker, or decodes itself
        when `decode_workers` is 0); bad images become 4xx, busy decoders 503."""
        try:
            return await asyncio.to_thread(decoder, data)
        except (ImageDecodeError, DecodersBusy) as exc:
            raise _decode_rejection(exc) from exc

    def _record(self, output: ClassifierOutput, k: int | None, endpoint: str) -> PredictResponse:
        """The response for one prediction; appends it (with LOGGED_TOP_K classes, whatever k
        the client asked for) to the log and the metrics."""
        request_id = uuid.uuid4().hex
        k = k or self.settings.default_top_k
        ranked = top_k(output.probabilities, self.metadata.class_names, max(k, LOGGED_TOP_K))
        predictions = ranked[:k]
        best = predictions[0]
        record = PredictionRecord(
            request_id=request_id,
            model_name=self.metadata.name,
            model_version=self.metadata.version,
            label=best["label"],
            confidence=best["probability"],
            top_k=ranked[:LOGGED_TOP_K],
            embedding=output.embedding,
            endpoint=endpoint,
        )
        self.requests.add(request_id, parse_time(record.time) or datetime.now(UTC))
        self.log.submit(record)
        _predictions_by_class().inc(tags={"label": best["label"]})
        _confidence().observe(best["probability"])
        return PredictResponse(
            request_id=request_id,
            model_name=self.metadata.name,
            model_version=self.metadata.version,
            predictions=predictions,
        )

    @api.post(
        "/predict",
        response_model=PredictResponse,
        responses=_ERRORS,
        openapi_extra={"requestBody": _UPLOAD_BODY},
        summary="Top-k species for a photo (multipart field 'file', or the raw image body)",
    )
    async def predict(
        self, request: Request, response: Response, top_k: int | None = _TOP_K
    ) -> Any:
        timing = ServerTiming()
        data = await read_upload(request, self.settings.max_body_bytes)
        timing.mark("read")
        image = await self._decode(self.preprocessor.model_input, data)
        timing.mark("decode")
        try:
            output = await self.classifier.predict.remote(image)
        except (BackPressureError, RayActorError) as exc:
            return _unavailable(exc)
        timing.mark("classifier")
        timing.add("classifier-replica", output.replica_ms)
        timing.add("classifier-batch", output.batch_ms)
        answer = self._record(output, top_k, "predict")
        timing.mark("record")
        response.headers["Server-Timing"] = timing.header()
        return answer

    @api.post(
        "/explain",
        responses={
            200: {"content": {"image/png": {}}, "model": ExplainResponse},
            **_ERRORS,
            409: {"model": ErrorResponse},
        },
        openapi_extra={"requestBody": _UPLOAD_BODY},
        summary="Attention overlay PNG; JSON with it in base64 plus the top-k if "
        "Accept: application/json",
    )
    async def explain(self, request: Request, top_k: int | None = _TOP_K) -> Any:
        if not self.metadata.attention_maps:
            # A CNN baseline (e.g. the ResNet-18 teacher) is served for /predict, but has no
            # attention to draw: say so before reading the upload.
            raise InputRejected(
                409,
                "no_attention_maps",
                f"the served model ({self.metadata.architecture}) has no attention maps; "
                "use /predict",
            )
        data = await read_upload(request, self.settings.max_body_bytes)
        image = await self._decode(self.preprocessor.model_input, data)
        prediction = self.classifier.predict.remote(image)  # under way while the display decodes
        display = await self._decode(self.preprocessor.display_image, data)
        try:
            output, png = await asyncio.gather(
                prediction, self.explainer.explain.remote(image, display)
            )
        except (BackPressureError, RayActorError) as exc:
            return _unavailable(exc)
        response = self._record(output, top_k, "explain")
        if "application/json" in request.headers.get("accept", ""):
            overlay = base64.b64encode(png).decode("ascii")
            return ExplainResponse(**response.model_dump(), overlay_png_base64=overlay)
        return Response(png, media_type="image/png", headers={"X-Request-Id": response.request_id})

    @api.post(
        "/feedback",
        response_model=FeedbackResponse,
        status_code=202,
        responses=_FEEDBACK_ERRORS,
        openapi_extra={"requestBody": _FEEDBACK_BODY},
    )
    async def feedback(self, request: Request) -> Any:
        """Attach the true label to a recent prediction (by its request_id), once.

        Needs `Authorization: Bearer <token>` when $VITBIRDS_WRITE_TOKEN is set."""
        _check_write_token(request)
        data = b"".join([chunk async for chunk in _limited_body(request, FEEDBACK_MAX_BYTES)])
        try:
            body = FeedbackRequest.model_validate_json(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
            )
            raise InputRejected(422, "invalid_request", problems) from exc
        if body.label not in self.metadata.class_names:
            raise InputRejected(
                422, "unknown_label", f"{body.label!r} is not one of the model's classes"
            )
        entry = await asyncio.to_thread(self.requests.lookup, body.request_id)
        if entry is None:
            age = timedelta(seconds=self.settings.feedback_max_age_s)
            raise InputRejected(
                404,
                "unknown_request_id",
                f"no prediction with request_id {body.request_id!r} in the last {age}",
            )
        if not self.requests.mark_labelled(body.request_id):
            raise InputRejected(
                409, "already_labelled", f"request_id {body.request_id!r} already has a label"
            )
        self.log.submit(FeedbackRecord(request_id=body.request_id, label=body.label))
        return FeedbackResponse(request_id=body.request_id, label=body.label)

    @api.get("/healthz", response_model=HealthResponse, responses={503: {"model": ErrorResponse}})
    async def healthz(self) -> Any:
        """Ready when a Classifier replica answers; includes that replica's batching counters."""
        try:
            stats = await self.classifier.stats.remote()
        except (BackPressureError, RayActorError) as exc:
            return _unavailable(exc)
        return HealthResponse(
            status="ok",
            model_name=self.metadata.name,
            model_version=self.metadata.version,
            classifier=stats,
        )

    @api.get("/drift", response_model=DriftStatus, responses={429: {"model": ErrorResponse}})
    async def drift(self, refresh: bool = False) -> Any:
        """The latest live drift assessment of the prediction log (serve/drift_gauges.py);
        `refresh=true` assesses the latest window now instead of waiting for the next round,
        at most once per `drift_refresh_min_interval_s` (else 429 with Retry-After)."""
        if refresh:
            wait_s = self.drift.refresh_wait_s()
            if wait_s > 0:
                retry = str(max(1, round(wait_s + 0.5)))
                message = f"the drift was assessed moments ago; retry in {retry} s"
                return _error(429, "refresh_too_soon", message, headers={"Retry-After": retry})
            return DriftStatus(**await asyncio.to_thread(self.drift.assess_once))
        return DriftStatus(**self.drift.latest)

    @api.get("/model", response_model=ModelInfo)
    async def model(self) -> ModelInfo:
        m = self.metadata
        return ModelInfo(
            name=m.name,
            version=m.version,
            model_sha256=self.version.sha256,
            architecture=m.architecture,
            classes=m.class_names,
            image_size=m.image_size,
            metrics=m.metrics,
            synthetic=m.synthetic,
            attention_maps=m.attention_maps,
            created_at=m.created_at,
            code_version=m.code_version,
        )

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(self) -> HTMLResponse:
        return HTMLResponse(self.index_html)


def build_app(
    settings: ServeSettings, options: dict[str, dict[str, Any]] | None = None
) -> serve.Application:
    """The application with per-deployment option overrides (tests, benchmarks); serve/config.yaml
    sets the same options for `serve run`/`serve deploy`.

    The model reference is resolved here, once per deployment, to one immutable version that
    every replica loads, including replicas started later (restarts, autoscaling): re-exporting
    `models/latest` changes nothing until the app is deployed again (vitbirds/model/versions.py).
    """
    options = options or {}
    version = resolve(settings.model_dir, expected_sha256=settings.model_sha256)
    logger.info("vitbirds: %s resolved to sha256 %s", settings.model_dir, version.sha256)
    classifier = Classifier.options(**options.get("Classifier", {})).bind(settings, version)
    explainer = AttentionExplainer.options(**options.get("AttentionExplainer", {})).bind(
        settings, version
    )
    return Ingress.options(**options.get("Ingress", {})).bind(
        classifier, explainer, settings, version
    )


def app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `import_path: serve.app:app`, args as in ServeSettings."""
    return build_app(ServeSettings.from_args(args))
