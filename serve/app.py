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

This module holds the routes and the application builder; the model deployments are in
serve/model_deployments.py, body reading and error answers in serve/http_edge.py, and the
Prometheus metrics in serve/metrics.py.
"""

import asyncio
import base64
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve.access import Access, ApiKeys, RateLimiter
from serve.body_deadline import BodyDeadline, BodyDeadlineMiddleware
from serve.drift_gauges import DriftWatcher
from serve.http_edge import (
    FEEDBACK_BODY,
    FEEDBACK_ERRORS,
    TOP_K,
    UPLOAD_BODY,
    UPLOAD_ERRORS,
    InputRejected,
    add_error_handlers,
    check_write_token,
    decode_rejection,
    error_response,
    limited_body,
    read_upload,
    refused_before_reading,
    unavailable,
)
from serve.metrics import confidence, drift_gauge, dropped_log_records, predictions_by_class
from serve.model_deployments import AttentionExplainer, Classifier
from serve.schemas import (
    FEEDBACK_MAX_BYTES,
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
from vitbirds.data.images import load_rgb
from vitbirds.data.sandbox import DecodePool, SandboxConfig
from vitbirds.errors import DecodersBusy, ImageDecodeError
from vitbirds.inference.scoring import ClassifierOutput, ImagePreprocessor, top_k
from vitbirds.lifecycle.store import ModelVersion, materialize, resolve
from vitbirds.model.files import MODEL_CARD_FILE, read_metadata
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

logger = logging.getLogger("ray.serve")
T = TypeVar("T")

STATIC_DIR = Path(__file__).parent / "static"


api = FastAPI(
    title="vitbirds",
    description="Bird species from a photo, with the attention map of a from-scratch ViT.",
    version="1",
)
api.add_middleware(BodyDeadlineMiddleware)  # 408 for bodies that arrive too slowly
add_error_handlers(api)  # every refusal answers as ErrorResponse, counted by reason


MAX_MODEL_CARD_BYTES = 1 << 20


def read_model_card(model_dir: Path) -> str | None:
    """The model's MODEL_CARD.md (its first MiB: a card is a few KiB), None when it has none."""
    try:
        with (model_dir / MODEL_CARD_FILE).open("rb") as handle:
            return handle.read(MAX_MODEL_CARD_BYTES).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None


def _log_anchor(version: ModelVersion, local_dir: Path) -> Path:
    """The directory the prediction log goes beside by default: the configured model directory
    when it is one on this machine (as before versions), else the version's local snapshot."""
    source = Path(version.source)
    return source if "://" not in version.source and source.is_dir() else local_dir


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
        self.access = Access(
            ApiKeys.from_environment(), RateLimiter(settings.api_rate_per_s, settings.api_burst)
        )
        api.state.body_deadline = BodyDeadline(
            total_s=settings.body_timeout_s, idle_s=settings.body_idle_timeout_s
        )
        local_dir = materialize(version)
        self.metadata = read_metadata(local_dir)
        self.model_card = read_model_card(local_dir)
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
            on_drop=lambda count: dropped_log_records().inc(count),
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

    def _admit(self, request: Request) -> None:
        """401 without a valid API key, 429 over the key's rate (serve/access.py), before the
        upload is read."""
        try:
            self.access.admit(request.headers)
        except InputRejected as rejection:
            raise refused_before_reading(request, rejection) from None

    def _publish_drift(self, gauges: dict[str, float]) -> None:
        for name, value in gauges.items():
            drift_gauge(name).set(value, tags={"model_version": self.metadata.version})

    async def _decode(self, decoder: Callable[[bytes], T], data: bytes) -> T:
        """Runs a decoder in a thread (which waits on a sandboxed decode worker, or decodes itself
        when `decode_workers` is 0); bad images become 4xx, busy decoders 503."""
        try:
            return await asyncio.to_thread(decoder, data)
        except (ImageDecodeError, DecodersBusy) as exc:
            raise decode_rejection(exc) from exc

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
        predictions_by_class().inc(tags={"label": best["label"]})
        confidence().observe(best["probability"])
        return PredictResponse(
            request_id=request_id,
            model_name=self.metadata.name,
            model_version=self.metadata.version,
            predictions=predictions,
        )

    @api.post(
        "/predict",
        response_model=PredictResponse,
        responses=UPLOAD_ERRORS,
        openapi_extra={"requestBody": UPLOAD_BODY},
        summary="Top-k species for a photo (multipart field 'file', or the raw image body)",
    )
    async def predict(self, request: Request, response: Response, top_k: int | None = TOP_K) -> Any:
        self._admit(request)
        timing = ServerTiming()
        data = await read_upload(request, self.settings.max_body_bytes)
        timing.mark("read")
        image = await self._decode(self.preprocessor.model_input, data)
        timing.mark("decode")
        try:
            output = await self.classifier.predict.remote(image)
        except (BackPressureError, RayActorError) as exc:
            return unavailable(exc)
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
            **UPLOAD_ERRORS,
            409: {"model": ErrorResponse},
        },
        openapi_extra={"requestBody": UPLOAD_BODY},
        summary="Attention overlay PNG; JSON with it in base64 plus the top-k if "
        "Accept: application/json",
    )
    async def explain(self, request: Request, top_k: int | None = TOP_K) -> Any:
        self._admit(request)
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
            return unavailable(exc)
        response = self._record(output, top_k, "explain")
        if "application/json" in request.headers.get("accept", ""):
            overlay = base64.b64encode(png).decode("ascii")
            return ExplainResponse(**response.model_dump(), overlay_png_base64=overlay)
        return Response(png, media_type="image/png", headers={"X-Request-Id": response.request_id})

    @api.post(
        "/feedback",
        response_model=FeedbackResponse,
        status_code=202,
        responses=FEEDBACK_ERRORS,
        openapi_extra={"requestBody": FEEDBACK_BODY},
    )
    async def feedback(self, request: Request) -> Any:
        """Attach the true label to a recent prediction (by its request_id), once.

        Needs `Authorization: Bearer <token>` when $VITBIRDS_WRITE_TOKEN is set."""
        check_write_token(request)
        data = b"".join([chunk async for chunk in limited_body(request, FEEDBACK_MAX_BYTES)])
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
            return unavailable(exc)
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
                return error_response(
                    429, "refresh_too_soon", message, headers={"Retry-After": retry}
                )
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
            model_card=self.model_card is not None,
            api_key_required=self.access.keys.required,
        )

    @api.get(
        "/model/card",
        response_class=Response,
        responses={200: {"content": {"text/markdown": {}}}, 404: {"model": ErrorResponse}},
    )
    async def model_card_text(self) -> Response:
        """The model card (Markdown) exported beside the weights: intended use, training data,
        metrics with intervals, known failure modes."""
        if self.model_card is None:
            return error_response(
                404, "no_model_card", f"this model was exported without a {MODEL_CARD_FILE}"
            )
        return Response(self.model_card, media_type="text/markdown; charset=utf-8")

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
    `models/latest` changes nothing until the app is deployed again (vitbirds/lifecycle/store.py).
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
