"""Progress bars: the library's long loops draw through a factory it is given, and never import
Ray to do it (the Ray adapter passes tqdm_ray)."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from vitbirds.data.loading import ImageDataset
from vitbirds.data.sources import Sample
from vitbirds.model.vit import build_model
from vitbirds.presets import get_recipe
from vitbirds.progress import no_progress, tqdm_progress
from vitbirds.training.loop import TrainingRun, fit

ROOT = Path(__file__).resolve().parent.parent


class Recorder:
    """A progress factory that remembers each bar and how many items went through it."""

    def __init__(self) -> None:
        self.bars: list[dict] = []

    def __call__(self, iterable, *, desc, total=None):
        bar = {"desc": desc, "total": total, "seen": 0}
        self.bars.append(bar)
        for item in iterable:
            bar["seen"] += 1
            yield item


def test_each_epoch_draws_one_bar_over_its_batches() -> None:
    recipe = get_recipe("vit-test")
    config = replace(recipe.model, num_classes=2)
    train = replace(recipe.train, epochs=2, batch_size=4)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(10, 3, 32, 32), torch.tensor([0, 1] * 5))
    loader = DataLoader(data, batch_size=4)
    run = TrainingRun(build_model(config), train, steps_per_epoch=3, device=torch.device("cpu"))
    recorder = Recorder()
    fit(run, loader, loader, progress=recorder)
    assert recorder.bars == [
        {"desc": "epoch 1/2", "total": 3, "seen": 3},
        {"desc": "epoch 2/2", "total": 3, "seen": 3},
    ]


def test_decoding_a_dataset_draws_a_bar_over_every_image(tmp_path) -> None:
    from PIL import Image

    samples = []
    for index in range(5):
        path = tmp_path / f"{index}.png"
        Image.new("RGB", (20, 20), (index * 40, 0, 0)).save(path)
        samples.append(Sample(path, 0))
    recorder = Recorder()
    dataset = ImageDataset(samples, progress=recorder)
    assert len(dataset) == 5
    assert recorder.bars == [{"desc": "decode", "total": 5, "seen": 5}]


def test_bars_are_off_where_nobody_watches_and_on_when_asked(monkeypatch) -> None:
    items = [1, 2, 3]
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("VITBIRDS_PROGRESS", "0")
    assert tqdm_progress(items, desc="x") is items
    monkeypatch.setenv("VITBIRDS_PROGRESS", "1")
    bar = tqdm_progress(items, desc="x")
    assert bar is not items and list(bar) == items


def test_a_ray_job_driver_draws_bars_into_its_log(monkeypatch) -> None:
    monkeypatch.delenv("VITBIRDS_PROGRESS", raising=False)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    items = [1, 2]
    assert tqdm_progress(items, desc="x") is not items
    assert no_progress(items, desc="x") is items


def test_the_library_loops_with_bars_do_not_import_ray() -> None:
    modules = [
        "vitbirds.progress", "vitbirds.training.loop", "vitbirds.data.loading",
        "vitbirds.evaluation.evaluate", "vitbirds.monitoring.reference",
        "vitbirds.lifecycle.registry", "vitbirds.evaluation.compare",
    ]  # fmt: skip
    code = f"import sys; import {', '.join(modules)}; print('ray' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
