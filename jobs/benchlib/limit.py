"""The batched-forward limit: what the same cores score with no serving or pipeline around the
model, the yardstick of jobs/bench_serve.py and jobs/bench_predict.py."""

import time
from pathlib import Path

import torch

from vitbirds.inference.scoring import BatchPredictor, ImagePreprocessor
from vitbirds.model.files import load_model
from vitbirds.precision import Precision


def limit_images_per_second(
    model_dir: Path,
    photos: list[bytes],
    batch: int,
    seconds: float,
    threads: int,
    precision: Precision,
) -> float:
    """Decode + transform + batched forward, back to back, for `seconds`, on `threads` threads."""
    torch.set_num_threads(threads)
    loaded = load_model(model_dir)
    preprocessor = ImagePreprocessor(loaded.metadata)
    predictor = BatchPredictor(loaded, "cpu", precision)
    predictor([preprocessor.model_input(p) for p in photos[:batch]])  # warm-up
    done, started, index = 0, time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        chunk = [photos[(index + i) % len(photos)] for i in range(batch)]
        predictor([preprocessor.model_input(p) for p in chunk])
        index, done = index + batch, done + batch
    return done / (time.perf_counter() - started)
