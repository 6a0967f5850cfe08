"""What the model looks at: attention rollout, last-layer CLS attention and overlay images.

Pure functions on tensors so that Serve (one image per request) and evaluation (a grid in the
report) draw the same maps. The input is what `model.forward_with_attention` returns: one
post-softmax attention tensor [B, heads, T, T] per layer, token 0 = CLS, T = prefix + patches.

Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"): fuse the
heads of each layer, add the identity for the residual connection, renormalise the rows, and
multiply the layers; row 0 of the product is how much of the final CLS token flows from each input
token. The raw last-layer CLS attention is offered too: it is sharper but ignores earlier layers.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from vitbirds.precision import FP32, Precision

HeadFusion = Literal["mean", "max", "min"]
Method = Literal["rollout", "last_layer"]
CAPTION_FONT_SIZE = 12


@dataclass
class Explanation:
    """One image's prediction and attention map."""

    probs: torch.Tensor  # [C] softmax probabilities
    patch_map: torch.Tensor  # [gh, gw] CLS attention mass per patch (raw, not normalised)
    heatmap: torch.Tensor  # [H, W] patch_map upsampled to the input and scaled to [0, 1]

    @property
    def predicted(self) -> int:
        return int(self.probs.argmax())


def fuse_heads(attention: torch.Tensor, head_fusion: HeadFusion = "mean") -> torch.Tensor:
    """[B, heads, T, T] -> [B, T, T] by the mean, max or min over heads."""
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    if head_fusion == "min":
        return attention.amin(dim=1)
    raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")


def discard_lowest(attention: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the `ratio` fraction of smallest weights in each row of [B, T, T].

    Per row rather than over the whole matrix (as some implementations do) so a token whose
    attention is diffuse keeps its strongest links instead of losing every one; the diagonal is
    restored by the residual identity afterwards anyway.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {ratio}")
    count = int(attention.shape[-1] * ratio)
    if count == 0:
        return attention
    lowest = attention.topk(count, dim=-1, largest=False).indices
    return attention.scatter(-1, lowest, 0.0)


def attention_rollout(
    attentions: Sequence[torch.Tensor],
    *,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
) -> torch.Tensor:
    """Joint attention [B, T, T] from the input tokens (columns) to the output tokens (rows).

    Every row of the result sums to 1.
    """
    if not attentions:
        raise ValueError("attention rollout needs at least one layer")
    first = attentions[0]
    batch, _, tokens, _ = first.shape
    identity = torch.eye(tokens, dtype=torch.float32, device=first.device)
    joint = identity.expand(batch, tokens, tokens)
    for attention in attentions:
        fused = discard_lowest(fuse_heads(attention.float(), head_fusion), discard_ratio)
        with_residual = fused + identity
        with_residual = with_residual / with_residual.sum(dim=-1, keepdim=True)
        joint = with_residual @ joint  # later layers act on what earlier layers mixed
    return joint


def cls_patch_map(
    attention: torch.Tensor, grid_size: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Row 0 (CLS) of a [B, T, T] matrix, patch columns only, as a [B, gh, gw] map."""
    gh, gw = grid_size
    patches = attention[:, 0, num_prefix_tokens:]
    if patches.shape[-1] != gh * gw:
        raise ValueError(f"{patches.shape[-1]} patch tokens do not fill a {gh}x{gw} grid")
    return patches.reshape(-1, gh, gw)


def rollout_map(
    attentions: Sequence[torch.Tensor],
    grid_size: tuple[int, int],
    *,
    num_prefix_tokens: int = 1,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
) -> torch.Tensor:
    """Attention rollout's CLS -> patch mass as [B, gh, gw]."""
    joint = attention_rollout(attentions, head_fusion=head_fusion, discard_ratio=discard_ratio)
    return cls_patch_map(joint, grid_size, num_prefix_tokens)


def last_layer_cls_attention(
    attentions: Sequence[torch.Tensor],
    grid_size: tuple[int, int],
    *,
    num_prefix_tokens: int = 1,
    head_fusion: HeadFusion = "mean",
) -> torch.Tensor:
    """The last layer's CLS -> patch attention (heads fused) as [B, gh, gw]."""
    fused = fuse_heads(attentions[-1].float(), head_fusion)
    return cls_patch_map(fused, grid_size, num_prefix_tokens)


def upsample_map(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, gh, gw] -> [B, H, W] by bilinear interpolation."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[
        :, 0
    ]


def normalize_map(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each [..., H, W] map to [0, 1]; a constant map becomes all zeros."""
    flat = maps.flatten(-2)
    low = flat.amin(dim=-1, keepdim=True)
    span = flat.amax(dim=-1, keepdim=True) - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp_min(1e-12), torch.zeros_like(flat))
    return scaled.reshape(maps.shape)


@torch.inference_mode()
def attention_maps(
    model: nn.Module,
    images: torch.Tensor,
    *,
    method: Method = "rollout",
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    precision: Precision = FP32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities [B, C] and raw CLS -> patch maps [B, gh, gw] for a batch of model inputs.

    The model is used as it is; a LoadedModel's model is already in eval mode, and a model in
    train mode would give maps perturbed by dropout. Under bf16 only the forward pass autocasts:
    the rollout multiplies fp32 copies of the attention weights.
    """
    with precision.autocast():
        logits, attentions = model.forward_with_attention(images)
    grid = model.grid_size
    prefix = model.num_prefix_tokens
    if method == "rollout":
        maps = rollout_map(
            attentions,
            grid,
            num_prefix_tokens=prefix,
            head_fusion=head_fusion,
            discard_ratio=discard_ratio,
        )
    elif method == "last_layer":
        maps = last_layer_cls_attention(
            attentions, grid, num_prefix_tokens=prefix, head_fusion=head_fusion
        )
    else:
        raise ValueError(f"method must be 'rollout' or 'last_layer', got {method!r}")
    return logits.float().softmax(dim=-1), maps


def explain_image(
    model: nn.Module,
    image_tensor: torch.Tensor,
    *,
    method: Method = "rollout",
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    precision: Precision = FP32,
) -> Explanation:
    """Prediction and attention map of one preprocessed image [3, H, W] (on the model's device)."""
    probs, maps = attention_maps(
        model,
        image_tensor[None],
        method=method,
        head_fusion=head_fusion,
        discard_ratio=discard_ratio,
        precision=precision,
    )
    heatmap = normalize_map(upsample_map(maps, tuple(image_tensor.shape[-2:])))[0]
    return Explanation(probs=probs[0].cpu(), patch_map=maps[0].cpu(), heatmap=heatmap.cpu())


def denormalize(
    image_tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """A normalised [3, H, W] model input back to a displayable uint8 [H, W, 3] array."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    pixels = image_tensor.detach().float().cpu() * std_t + mean_t
    return (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def render_overlay(
    image: Image.Image | np.ndarray,
    heatmap: torch.Tensor | np.ndarray,
    *,
    caption: str | None = None,
    colormap: str = "jet",
    alpha: float = 0.5,
    gap: int = 4,
) -> bytes:
    """PNG bytes of three panels side by side: original | heat map | overlay, plus a caption.

    `image` is a PIL image or uint8 [H, W, 3]; `heatmap` is [h, w] of any scale, resized to the
    image bilinearly and min-max normalised, so a map from a 64 px model can be drawn on a sharper
    display image of the same crop. The PNG is (3W + 2 gap) wide and H tall, plus one caption
    line per line of `caption`.
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    heat = torch.as_tensor(np.asarray(heatmap, dtype=np.float32))
    heat = normalize_map(upsample_map(heat[None], (height, width)))[0].numpy()
    colored = (colormaps[colormap](heat)[..., :3] * 255).astype(np.uint8)
    blended = ((1 - alpha) * rgb + alpha * colored).round().astype(np.uint8)

    font = ImageFont.load_default(size=CAPTION_FONT_SIZE)
    lines = caption.splitlines() if caption else []
    line_height = CAPTION_FONT_SIZE + 4
    canvas = Image.new("RGB", (3 * width + 2 * gap, height + line_height * len(lines)), "white")
    for column, panel in enumerate((rgb, colored, blended)):
        canvas.paste(Image.fromarray(panel), (column * (width + gap), 0))
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        draw.text((2, height + row * line_height + 1), line, fill="black", font=font)
    buffer = io.BytesIO()
    # Level 1: ~6x faster than Pillow's default 6 for ~8% more bytes; /explain renders per request.
    canvas.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
