"""Attention rollout, CLS attention maps and the overlay renderer."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vitbirds.model.explain import (
    attention_rollout,
    discard_lowest,
    explain_image,
    fuse_heads,
    last_layer_cls_attention,
    render_overlay,
    rollout_map,
)
from vitbirds.model.vit import build_model
from vitbirds.presets import get_recipe

GRID = (3, 3)
TOKENS = 1 + GRID[0] * GRID[1]


def _random_attentions(layers: int = 4, batch: int = 2, heads: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (batch, heads, TOKENS, TOKENS)
    return [torch.randn(shape, generator=generator).mul(3).softmax(-1) for _ in range(layers)]


def _identity_attentions(layers: int = 4) -> list[torch.Tensor]:
    return [torch.eye(TOKENS).expand(1, 2, TOKENS, TOKENS).clone() for _ in range(layers)]


def _with_row(attention: torch.Tensor, row: int, targets: dict[int, float]) -> torch.Tensor:
    """Replace one token's attention row (all heads) with the given weights."""
    attention = attention.clone()
    attention[:, :, row] = 0.0
    for column, weight in targets.items():
        attention[:, :, row, column] = weight
    return attention


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.5, 0.9])
def test_rollout_rows_sum_to_one(head_fusion, discard_ratio):
    joint = attention_rollout(
        _random_attentions(), head_fusion=head_fusion, discard_ratio=discard_ratio
    )
    torch.testing.assert_close(joint.sum(-1), torch.ones(2, TOKENS))


def test_identity_attention_gives_a_uniform_map():
    maps = rollout_map(_identity_attentions(), GRID)
    assert maps.shape == (1, *GRID)
    assert torch.all(maps == maps.flatten()[0])


def test_uniform_attention_gives_a_uniform_nonzero_map():
    uniform = [torch.full((1, 2, TOKENS, TOKENS), 1 / TOKENS) for _ in range(3)]
    maps = rollout_map(uniform, GRID)
    torch.testing.assert_close(maps, torch.full_like(maps, maps.flatten()[0].item()))
    assert maps.flatten()[0] > 0


def test_planted_cls_attention_is_recovered():
    planted = [1, 5, 8]  # patch tokens, i.e. grid cells 0, 4 and 7
    attentions = _identity_attentions()
    attentions[0] = _with_row(attentions[0], 0, {t: 0.3 for t in planted} | {0: 0.1})
    maps = rollout_map(attentions, GRID)[0].flatten()
    assert set(maps.topk(3).indices.tolist()) == {t - 1 for t in planted}
    assert maps.sum() == pytest.approx(0.45)  # half of 0.9, the other half is the residual


def test_rollout_follows_attention_through_layers_which_last_layer_attention_misses():
    """Layer 1: CLS reads patch token 2; layer 0: token 2 read patch token 7."""
    attentions = _identity_attentions(layers=2)
    attentions[0] = _with_row(attentions[0], 2, {7: 1.0})
    attentions[1] = _with_row(attentions[1], 0, {2: 1.0})
    rollout = rollout_map(attentions, GRID)[0].flatten()
    last = last_layer_cls_attention(attentions, GRID)[0].flatten()
    assert rollout[7 - 1] == pytest.approx(0.25)
    assert rollout[2 - 1] == pytest.approx(0.25)
    assert last[7 - 1] == 0.0


def test_head_fusion_takes_mean_max_and_min_over_heads():
    attention = torch.stack([torch.eye(2), torch.full((2, 2), 0.5)])[None]  # [1, 2 heads, 2, 2]
    expected = {
        "mean": [[0.75, 0.25], [0.25, 0.75]],
        "max": [[1.0, 0.5], [0.5, 1.0]],
        "min": [[0.5, 0.0], [0.0, 0.5]],
    }
    for fusion, values in expected.items():
        torch.testing.assert_close(fuse_heads(attention, fusion)[0], torch.tensor(values))


def test_discard_lowest_zeroes_that_fraction_of_each_row():
    attention = torch.arange(20.0).reshape(1, 2, 10)
    kept = discard_lowest(attention, 0.5)
    assert (kept == 0).sum(-1).tolist() == [[5, 5]]
    assert kept[0, 1].tolist() == [0.0] * 5 + list(range(15, 20))


def test_discard_ratio_of_one_is_rejected():
    with pytest.raises(ValueError, match="discard_ratio"):
        attention_rollout(_random_attentions(), discard_ratio=1.0)


def _png_size(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        assert image.format == "PNG"
        return image.size


def test_overlay_png_has_three_panels_of_the_image_size():
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    png = render_overlay(image, torch.rand(4, 4), gap=4)
    assert _png_size(png) == (3 * 50 + 2 * 4, 40)


def test_overlay_caption_adds_a_strip_below_the_panels():
    image = Image.new("RGB", (64, 48), "gray")
    plain = _png_size(render_overlay(image, np.ones((8, 8))))
    captioned = _png_size(render_overlay(image, np.ones((8, 8)), caption="true: a\npred: b"))
    assert captioned[0] == plain[0]
    assert captioned[1] > plain[1] == 48


def test_overlay_puts_the_hot_colour_where_the_map_is_high():
    image = np.full((32, 32, 3), 128, dtype=np.uint8)
    heat = torch.zeros(4, 4)
    heat[0, 0] = 1.0
    with Image.open(io.BytesIO(render_overlay(image, heat, gap=0))) as canvas:
        panel = np.asarray(canvas.convert("RGB"))[:, 32:64].astype(int)
    # jet: high = red, low = blue
    assert panel[1, 1, 0] > panel[1, 1, 2]
    assert panel[30, 30, 2] > panel[30, 30, 0]


def test_explain_image_on_a_real_model_gives_a_map_of_the_input_size():
    torch.manual_seed(0)
    config = get_recipe("vit-test").model
    config.num_classes = 5
    model = build_model(config).eval()
    image = torch.randn(3, config.image_size, config.image_size)
    explanation = explain_image(model, image)
    assert explanation.heatmap.shape == (config.image_size, config.image_size)
    assert explanation.heatmap.min() >= 0.0 and explanation.heatmap.max() <= 1.0
    assert explanation.patch_map.shape == model.grid_size
    assert explanation.probs.sum() == pytest.approx(1.0)
    assert 0 <= explanation.predicted < 5
