"""Our ViT computes exactly timm's VisionTransformer, and loads its weights (`--init-from`)."""

from collections import Counter

import pytest
import torch
from safetensors.torch import save_file
from torch.profiler import ProfilerActivity, profile

from vitbirds.config import ModelConfig
from vitbirds.errors import ModelFileError, UnsafeModelFileError
from vitbirds.model.pretrained import init_from_timm, timm_twin
from vitbirds.model.vit import VisionTransformer

timm = pytest.importorskip("timm")


def _timm_model(config: ModelConfig) -> torch.nn.Module:
    return timm_twin(config).eval()


def _training_step_ops(model: torch.nn.Module, x: torch.Tensor) -> Counter:
    """How often each aten op runs in one training-mode forward + backward."""
    model.train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x).logsumexp(dim=1).mean().backward()
    return Counter({e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")})


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(image_size=32, patch_size=8, dim=64, depth=2, heads=4, num_classes=7),
        ModelConfig(image_size=64, patch_size=16, dim=96, depth=3, heads=3, num_classes=10),
        ModelConfig(image_size=48, patch_size=8, dim=72, depth=2, heads=6, mlp_ratio=2.0),
    ],
    ids=["32px-p8", "64px-p16", "48px-mlp2"],
)
def test_timm_state_dict_loads_and_gives_the_same_logits(config: ModelConfig) -> None:
    reference = _timm_model(config)
    ours = VisionTransformer(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(4, 3, config.image_size, config.image_size)
    with torch.no_grad():
        assert torch.allclose(ours(x), reference(x), atol=1e-4)
        assert torch.allclose(ours.forward_with_attention(x)[0], reference(x), atol=1e-4)


def test_init_from_timm_file_resizes_position_embedding_and_replaces_head(tmp_path) -> None:
    source = ModelConfig(image_size=32, patch_size=8, dim=64, depth=2, heads=4, num_classes=1000)
    reference = _timm_model(source)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    target = VisionTransformer(
        ModelConfig(image_size=48, patch_size=8, dim=64, depth=2, heads=4, num_classes=6)
    )
    init_from_timm(target, path)
    assert torch.equal(target.blocks[1].attn.qkv.weight, reference.blocks[1].attn.qkv.weight)
    assert target.pos_embed.shape == (1, 37, 64)
    assert target.head.weight.shape == (6, 64)


def test_init_from_refuses_pickles_and_wrong_shapes(tmp_path) -> None:
    pickled = tmp_path / "vit.pth"
    torch.save({"a": torch.zeros(1)}, pickled)
    model = VisionTransformer(ModelConfig(image_size=32, patch_size=8, dim=64, depth=2, heads=4))
    with pytest.raises(UnsafeModelFileError, match="arbitrary code"):
        init_from_timm(model, pickled)
    other = _timm_model(ModelConfig(image_size=32, patch_size=8, dim=32, depth=2, heads=4))
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, path)
    with pytest.raises(ModelFileError, match="do not fit this model config"):
        init_from_timm(model, path)


def test_a_training_step_runs_no_op_that_timm_does_not() -> None:
    """The step-speed comparison of jobs/bench_model.py rests on this: with stochastic depth on, our
    forward + backward is timm's op for op (timm runs one extra no-op dropout before its head)."""
    config = ModelConfig(image_size=32, patch_size=8, dim=48, depth=3, heads=3, drop_path=0.2)
    reference = _timm_model(config)
    ours = VisionTransformer(config)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    extra = _training_step_ops(ours, x) - _training_step_ops(reference, x)
    assert extra == Counter()


def test_training_mode_with_stochastic_depth_matches_timm_under_the_same_seed() -> None:
    config = ModelConfig(image_size=32, patch_size=8, dim=48, depth=3, heads=3, drop_path=0.5)
    reference = _timm_model(config).train()
    ours = VisionTransformer(config).train()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    expected = reference(x)
    torch.manual_seed(1)
    assert torch.allclose(ours(x), expected, atol=1e-5)
