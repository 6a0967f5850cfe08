"""What the service is configured with and what its HTTP API says, in one place.

`ServeSettings` is the application's arguments (`args:` in serve/config.yaml); the pydantic models
are the JSON bodies, and FastAPI turns them into the OpenAPI document at /docs.
"""

import os
from dataclasses import dataclass, fields
from typing import Any

from pydantic import BaseModel, Field

from vitbirds.data.images import DEFAULT_MAX_PIXELS
from vitbirds.errors import ConfigError
from vitbirds.monitoring.assess import parse_window
from vitbirds.precision import DEFAULT_PRECISION, check_precision

MODEL_DIR_ENV = "VITBIRDS_MODEL_DIR"
# When set (e.g. from a Kubernetes Secret), POST /feedback needs "Authorization: Bearer <token>".
WRITE_TOKEN_ENV = "VITBIRDS_WRITE_TOKEN"
FEEDBACK_MAX_BYTES = 4096  # a request id and a class name: larger /feedback bodies get 413


@dataclass
class ServeSettings:
    """Application arguments shared by the three deployments."""

    model_dir: str = ""  # local path, gs:// or models:/name@alias; $VITBIRDS_MODEL_DIR overrides
    # Pins the version: deploying fails unless model_dir holds exactly this content digest
    # (vitbirds.lifecycle.store.content_digest); render_rayservice.py --model-sha256 sets it.
    model_sha256: str | None = None
    prediction_log: str | None = None  # None: beside the model dir; $VITBIRDS_PREDICTION_LOG wins
    max_body_bytes: int = 10 * 1024 * 1024  # larger uploads get 413 before being read
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images get 413 before being decoded
    # Uploads decode in worker processes (vitbirds/data/sandbox.py): this many at once per
    # Ingress replica, each stopped past the time or above the memory (0 workers: in-process).
    decode_workers: int = 2
    decode_timeout_s: float = 5.0
    decode_memory_mb: int = 1024
    decode_wait_s: float = 1.0  # for a free decoder; past it 503 decoders_busy
    default_top_k: int = 5
    device: str = "auto"  # the deployments' torch device: auto | cpu | cuda | mps
    # The model replicas' compute precision (vitbirds/precision.py): auto is bf16 where the
    # device runs it natively, else fp32. Probabilities are fp32 softmaxes either way.
    precision: str = DEFAULT_PRECISION
    # Torch threads per model replica. None: the replica's CPU allotment (ray_actor_options
    # num_cpus) rounded up; Ray itself would round it down (to 1 thread for num_cpus 1.5).
    torch_threads: int | None = None
    # Slow senders (serve/body_deadline.py): the body must arrive within body_timeout_s of the
    # request's start, with no pause longer than body_idle_timeout_s; otherwise 408.
    body_timeout_s: float = 30.0
    body_idle_timeout_s: float = 5.0
    display_size: int = 224  # side of the crop /explain draws the attention on
    # Live drift gauges (serve/drift_gauges.py): the prediction log's latest `drift_window`
    # assessed every `drift_interval_s` seconds (0: only on `GET /drift?refresh=true`), as
    # `jobs/monitor.py --window` does.
    drift_interval_s: float = 300.0
    drift_window: str = "1h"
    drift_refresh_min_interval_s: float = 30.0  # GET /drift?refresh=true more often: 429
    # The prediction log rotates past either bound, keeping `log_keep` old files.
    log_max_bytes: int = 64 * 1024 * 1024
    log_max_age_s: float = 24 * 3600.0
    log_keep: int = 14
    feedback_max_age_s: float = 24 * 3600.0  # labels for older predictions are refused
    # Where $VITBIRDS_API_KEYS holds keys (serve/access.py), each key may make this many
    # /predict and /explain requests a second, in bursts of api_burst, per Ingress replica.
    api_rate_per_s: float = 10.0
    api_burst: int = 20

    def __post_init__(self) -> None:
        if not self.model_dir:
            raise ConfigError(f"no model: set args.model_dir or ${MODEL_DIR_ENV}")
        positive = ("max_body_bytes", "max_pixels", "default_top_k", "display_size")
        positive += ("decode_timeout_s", "decode_memory_mb", "decode_wait_s", "log_max_bytes")
        positive += ("log_max_age_s", "api_rate_per_s", "api_burst")
        positive += ("log_keep", "feedback_max_age_s", "body_timeout_s", "body_idle_timeout_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.torch_threads is not None and self.torch_threads <= 0:
            raise ConfigError(f"torch_threads must be positive, got {self.torch_threads}")
        for name in ("decode_workers", "drift_refresh_min_interval_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.drift_interval_s < 0:
            raise ConfigError(f"drift_interval_s must be >= 0, got {self.drift_interval_s}")
        parse_window(self.drift_window)  # ConfigError naming the bad value
        check_precision(self.precision)

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "ServeSettings":
        """From `serve run`/`serve deploy` arguments, with `$VITBIRDS_MODEL_DIR` taking priority."""
        values = dict(args or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown application args {unknown}; known: {sorted(known)}")
        if os.environ.get(MODEL_DIR_ENV):
            values["model_dir"] = os.environ[MODEL_DIR_ENV]
        return cls(**values)


class ErrorResponse(BaseModel):
    error: str = Field(description="What was wrong, for a person")
    reason: str = Field(description="Machine-readable cause, e.g. not_an_image, too_large")


class Prediction(BaseModel):
    label: str
    index: int = Field(description="Output index of the class")
    probability: float


class PredictResponse(BaseModel):
    request_id: str = Field(description="Quote it in POST /feedback to attach the true label")
    model_name: str
    model_version: str
    predictions: list[Prediction] = Field(description="Top-k, most probable first")


class ExplainResponse(PredictResponse):
    overlay_png_base64: str = Field(description="Photo | attention rollout | overlay, PNG")


class FeedbackRequest(BaseModel):
    request_id: str = Field(min_length=1, max_length=128)
    label: str = Field(
        min_length=1, max_length=256, description="The true class name, one of GET /model's classes"
    )


class FeedbackResponse(BaseModel):
    request_id: str
    label: str
    status: str = "recorded"


class BatchStats(BaseModel):
    """Counters of one Classifier replica since it started."""

    requests: int = 0
    batches: int = 0
    max_batch_size_seen: int = 0
    batch_sizes: dict[int, int] = Field(default_factory=dict, description="size -> count")
    model_sha256: str = Field("", description="Content digest of the model this replica serves")
    torch_threads: int = Field(0, description="torch.get_num_threads() in this replica")
    precision: str = Field("fp32", description="What this replica's forward passes compute in")

    def record(self, size: int) -> None:
        self.requests += size
        self.batches += 1
        self.max_batch_size_seen = max(self.max_batch_size_seen, size)
        self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1


class HealthResponse(BaseModel):
    status: str
    model_name: str
    model_version: str
    classifier: BatchStats


class DriftStatus(BaseModel):
    status: str = Field(description="ok, pending (nothing logged yet), disabled or error")
    decision: str | None = Field(None, description="OK, WATCH or RETRAIN")
    reasons: list[str]
    num_observed: int | None = Field(None, description="Predictions in the assessed window")
    window_s: float | None = None
    assessed_at: str | None = None
    gauges: dict[str, float] = Field(
        default_factory=dict, description="The values exported as Prometheus gauges"
    )


class ModelInfo(BaseModel):
    name: str
    version: str
    model_sha256: str = Field(description="Content digest of weights + metadata being served")
    architecture: str
    classes: list[str]
    image_size: int
    metrics: dict[str, float]
    synthetic: bool = Field(description="Trained on generated shapes, not photos of birds")
    attention_maps: bool = Field(
        description="POST /explain draws attention overlays; false for a CNN baseline (409 there)"
    )
    created_at: str
    code_version: str
    model_card: bool = Field(
        default=False, description="GET /model/card answers the model card (Markdown)"
    )
    api_key_required: bool = Field(
        default=False,
        description="POST /predict and /explain need 'Authorization: Bearer KEY' or "
        "'X-API-Key: KEY' (401 without; 429 over the key's rate)",
    )
