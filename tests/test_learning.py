"""A short run of the one training loop on the synthetic birds learns well above chance."""

import torch
from reproducible import TEST_SEED, reproducible

from vitbirds.data import discover_dataset, make_loaders, make_synthetic_dataset
from vitbirds.devices import resolve_device
from vitbirds.model.vit import build_model
from vitbirds.presets import get_recipe
from vitbirds.training.loop import TrainingRun, fit


def test_vit_learns_the_synthetic_birds_well_above_chance(tmp_path) -> None:
    root = make_synthetic_dataset(
        tmp_path / "birds", num_classes=6, images_per_class=50, seed=TEST_SEED
    )
    recipe = get_recipe("vit-test")
    recipe.train.epochs = 15
    recipe.train.batch_size = 16
    recipe.data.data_dir = str(root)
    splits = discover_dataset(root)
    assert splits.synthetic and len(splits.classes) == 6
    recipe.model.num_classes = len(splits.classes)
    recipe.data.seed = recipe.train.seed = TEST_SEED
    with reproducible():
        train, valid, _ = make_loaders(splits, recipe.data, recipe.train)
        run = TrainingRun(
            build_model(recipe.model),
            recipe.train,
            steps_per_epoch=len(train),
            device=resolve_device("cpu"),
        )
        history = fit(run, train, valid)
    # 48 validation images: chance gives 8 +- 2.6 right, so 2x chance (16) is > 3 sigma away.
    chance = 1 / 6
    assert history[-1]["val_top1"] >= 2 * chance, history[-1]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert torch.isfinite(torch.tensor(history[-1]["val_loss"]))
