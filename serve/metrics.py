"""The service's Prometheus metrics (Ray Serve's metrics API), kept apart from the deployments
that record them so their names, tags and buckets are read in one place.

Each is created on first use, inside the replica that records it, and cached there.
"""

from functools import cache

from ray.serve import metrics

CONFIDENCE_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]


@cache
def rejected_inputs() -> metrics.Counter:
    return metrics.Counter(
        "vitbirds_rejected_inputs",
        description="Requests refused with a 4xx/503, by reason.",
        tag_keys=("reason",),
    )


@cache
def predictions_by_class() -> metrics.Counter:
    return metrics.Counter(
        "vitbirds_predictions", description="Top-1 predictions, by class.", tag_keys=("label",)
    )


@cache
def confidence() -> metrics.Histogram:
    return metrics.Histogram(
        "vitbirds_prediction_confidence",
        description="Top-1 probability of each prediction.",
        boundaries=CONFIDENCE_BUCKETS,
    )


@cache
def drift_gauge(name: str) -> metrics.Gauge:
    return metrics.Gauge(
        name,
        description="jobs/monitor.py's headline number on the prediction log's latest window.",
        tag_keys=("model_version",),
    )


@cache
def dropped_log_records() -> metrics.Counter:
    return metrics.Counter(
        "vitbirds_prediction_log_dropped",
        description="Prediction log records dropped: its write queue was full or a write failed.",
    )


@cache
def batch_sizes() -> metrics.Histogram:
    return metrics.Histogram(
        "vitbirds_batch_size",
        description="Images per Classifier forward pass.",
        boundaries=BATCH_SIZE_BUCKETS,
    )
