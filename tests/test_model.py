"""The ViT is the ViT: shapes, both attention paths, timm parity, presets and config errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitbirds.config import ModelConfig
from vitbirds.errors import ConfigError
from vitbirds.model.baselines import build_classifier, embedding_dim, logits_and_embedding
from vitbirds.model.vit import DropPath, VisionTransformer, build_model, resize_pos_embed
from vitbirds.presets import PRESETS, get_recipe

SMALL = dict(image_size=32, patch_size=8, dim=48, depth=2, heads=3, num_classes=5)


def _inputs(config: ModelConfig, batch: int = 2) -> torch.Tensor:
    return torch.randn(
        batch, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0)
    )


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_and_outputs_one_logit_per_class(name: str) -> None:
    config = get_recipe(name).model
    if config.image_size > 64:  # keep the big presets cheap: shapes only, batch of one
        config.depth = 1
    model = build_model(config).eval()
    with torch.no_grad():
        logits = model(_inputs(config, batch=1))
    assert logits.shape == (1, config.num_classes)


def test_vit_b16_preset_has_the_published_shape() -> None:
    config = get_recipe("vit-b16").model
    assert (config.image_size, config.patch_size, config.dim, config.depth, config.heads) == (
        224, 16, 768, 12, 12,
    )  # fmt: skip
    model = build_model(config)
    assert 85_000_000 < sum(p.numel() for p in model.parameters()) < 87_000_000


@pytest.mark.parametrize("options", [{}, {"shifted_patches": True}, {"locality_attention": True}])
def test_attention_weights_path_gives_the_same_logits_and_rows_sum_to_one(options: dict) -> None:
    config = ModelConfig(**SMALL, **options)
    model = VisionTransformer(config).eval()
    x = _inputs(config)
    with torch.no_grad():
        fast = model(x)
        explicit, attentions = model.forward_with_attention(x)
    assert torch.allclose(fast, explicit, atol=1e-5)
    tokens = config.num_patches + 1
    assert len(attentions) == config.depth
    for weights in attentions:
        assert weights.shape == (2, config.heads, tokens, tokens)
        assert torch.allclose(weights.sum(-1), torch.ones(2, config.heads, tokens), atol=1e-5)


def test_drop_path_drops_whole_samples_and_rescales_the_kept_ones() -> None:
    torch.manual_seed(0)
    x = torch.ones(1000, 4, 3)
    out = DropPath(0.25).train()(x)
    per_sample = out.flatten(1)
    assert torch.allclose(per_sample.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert (per_sample == per_sample[:, :1]).all()
    assert 0.65 < (per_sample[:, 0] > 0).float().mean() < 0.85
    assert torch.equal(DropPath(0.25).eval()(x), x)


def test_locality_attention_never_attends_to_itself() -> None:
    model = VisionTransformer(ModelConfig(**SMALL, locality_attention=True)).eval()
    with torch.no_grad():
        _, attentions = model.forward_with_attention(_inputs(model.config))
    assert attentions[0].diagonal(dim1=-2, dim2=-1).abs().max() == 0


def test_shifted_patch_tokenization_sees_neighbouring_pixels() -> None:
    """A pixel change just outside a patch moves that patch's SPT token, not its plain token."""
    for shifted, should_change in ((True, True), (False, False)):
        model = VisionTransformer(ModelConfig(**SMALL, shifted_patches=shifted)).eval()
        x = torch.zeros(1, 3, 32, 32)
        y = x.clone()
        y[0, :, 2, 9] = 5.0  # column 9 belongs to patch (0, 1); patch (0, 0) spans columns 0-7
        with torch.no_grad():
            delta = (model.patch_embed(x)[0, 0] - model.patch_embed(y)[0, 0]).abs().max()
        assert (delta > 1e-6) == should_change


def test_cls_embedding_is_what_the_head_reads() -> None:
    model = VisionTransformer(ModelConfig(**SMALL)).eval()
    x = _inputs(model.config)
    with torch.no_grad():
        embedding = model.embed(x)
        assert embedding.shape == (2, 48)
        assert torch.allclose(model.head(embedding), model(x), atol=1e-6)


@pytest.mark.parametrize("architecture", ["vit", "resnet18"])
def test_the_embedding_of_either_architecture_is_what_its_head_reads(architecture: str) -> None:
    torch.manual_seed(0)
    config = ModelConfig(**SMALL)
    model = build_classifier(architecture, config).eval()
    x = _inputs(config)
    with torch.no_grad():
        logits, embedding = logits_and_embedding(model, x)
        assert torch.allclose(logits, model(x), atol=1e-5)
    assert embedding.shape == (2, embedding_dim(architecture, config))
    head = model.head if architecture == "vit" else model.fc
    assert torch.allclose(head(embedding), logits, atol=1e-5)


def test_position_embedding_is_interpolated_for_another_image_size() -> None:
    model = VisionTransformer(ModelConfig(**SMALL)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 48)).shape == (1, 5)
    resized = resize_pos_embed(model.pos_embed, (6, 6))
    assert resized.shape == (1, 37, 48)
    assert torch.equal(resized[:, 0], model.pos_embed[:, 0])  # CLS position untouched
    same = resize_pos_embed(model.pos_embed, (4, 4))
    assert torch.allclose(same, model.pos_embed, atol=1e-5)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"image_size": 30, "patch_size": 8}, "image_size 30 is not divisible by patch_size 8"),
        ({"dim": 50, "heads": 3}, "dim 50 is not divisible by heads 3"),
        ({"depth": 0}, "depth must be positive, got 0"),
        ({"drop_path": 1.5}, "drop_path must be in [0, 1), got 1.5"),
    ],
)
def test_config_errors_name_the_bad_values(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        ModelConfig(**{**SMALL, **values})
    assert message in str(error.value)


def test_input_not_divisible_by_patch_is_a_clear_error() -> None:
    model = VisionTransformer(ModelConfig(**SMALL))
    with pytest.raises(ConfigError, match=r"\(30, 30\) is not divisible by patch size 8"):
        model(torch.randn(1, 3, 30, 30))


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'vit-xl'.*vit-cpu"):
        get_recipe("vit-xl")


def test_the_library_and_the_model_bench_import_where_ray_is_not_installed() -> None:
    """A GPU box with torch and timm but no Ray runs `jobs/bench_model.py`: everything outside
    `vitbirds.ray_adapter` must import with `import ray` failing."""
    code = """
import importlib, pkgutil, sys
sys.modules["ray"] = None  # `import ray` now raises ImportError
import vitbirds
for module in pkgutil.walk_packages(vitbirds.__path__, "vitbirds."):
    if not module.name.startswith("vitbirds.ray_adapter"):
        importlib.import_module(module.name)
import jobs.bench_model
"""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("default_malloc", [False, True])
def test_the_model_bench_runs_under_the_steady_allocator_unless_told_not_to(default_malloc):
    """glibc reads its settings when a process starts, so the bench re-executes itself with them;
    the report shows what the measuring process had."""
    root = Path(__file__).resolve().parent.parent
    command = [
        sys.executable, "jobs/bench_model.py", "--presets", "vit-test", "--rounds", "2",
        "--steps", "1", "--warmup", "0", *(["--default-malloc"] if default_malloc else []),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    malloc = json.loads(done.stdout.strip().splitlines()[-1])["results"]["malloc"]
    if default_malloc:
        assert set(malloc.values()) == {"glibc default"}
    else:
        assert malloc == {
            "MALLOC_MMAP_THRESHOLD_": "33554432",
            "MALLOC_TRIM_THRESHOLD_": "4294967296",
        }
