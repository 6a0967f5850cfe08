"""The model deployments: `Classifier` (batched forward passes) and `AttentionExplainer`
(attention rollout overlays), each loading one resolved model version on its own torch thread.

They receive the ingress's preprocessed uint8 crops, never uploaded bytes, and share the Ray-free
inference code in vitbirds/inference/scoring.py. serve/app.py composes them behind the ingress.
"""

import asyncio
import logging
import math
import time
from dataclasses import replace
from typing import Any

import ray
import torch
from ray import serve

from serve.batching import DynamicBatcher
from serve.metrics import batch_sizes
from serve.schemas import BatchStats, ServeSettings
from serve.torch_thread import torch_thread
from vitbirds.devices import resolve_device
from vitbirds.inference.scoring import (
    BatchPredictor,
    ClassifierOutput,
    model_normaliser,
    render_explanation,
)
from vitbirds.lifecycle.store import ModelVersion, materialize
from vitbirds.model.files import load_model
from vitbirds.precision import resolve_precision

logger = logging.getLogger("ray.serve")


def replica_torch_threads(configured: int | None) -> int:
    """This replica's torch threads: `configured`, else its CPU allotment rounded up. Ray sets
    OMP_NUM_THREADS to the allotment rounded *down* (at least 1), which left a Classifier with
    num_cpus 1 running a compute-bound model on one of the machine's cores."""
    if configured is None:
        allotted = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        configured = max(1, math.ceil(allotted))
    return configured


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
        batch_sizes().observe(size)

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
