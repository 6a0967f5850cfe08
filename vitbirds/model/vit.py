"""A Vision Transformer (Dosovitskiy et al. 2020) written from scratch.

Parameter names match timm's `VisionTransformer`, so a timm state dict of the same shape loads
as-is (see `vitbirds.model.pretrained`). Attention runs through the fused
`F.scaled_dot_product_attention` unless a caller asks for the weights, which only the explicit
softmax path can return, or the model trains in bf16 on a CPU, where the explicit path is the
faster (`_explicit_is_faster`); both paths compute the same function.

Options for small data: a convolutional stem (Xiao et al. 2021, `ConvStemPatchEmbed`); shifted
patch tokenization (`ShiftedPatchEmbed`) and locality self-attention (`Attention` with
`locality=True`) from Lee et al. 2021 ("Vision Transformer for Small-Size Datasets"); and, from
Touvron et al. 2021 (DeiT), a distillation token: a second prefix token after CLS with its own
head (`head_dist`, named as in timm), which `vitbirds.training.loop` trains against a teacher's
predictions.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitbirds.config import ModelConfig
from vitbirds.errors import ConfigError

LAYER_NORM_EPS = 1e-6  # as in the reference implementations (big_vision, timm)


class PatchEmbed(nn.Module):
    """Cuts the image into non-overlapping patches and projects each to `dim` with one conv."""

    def __init__(self, *, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, dim]


class ConvStemPatchEmbed(nn.Module):
    """A convolutional stem (Xiao et al. 2021): log2(patch_size) 3x3 stride-2 convs with BatchNorm
    and ReLU, channels doubling up to `dim`, then a 1x1 projection. It gives the transformer the
    locality prior of a CNN's first layers, which a ViT trained from scratch on small data lacks,
    for a few percent more compute than the patchify conv."""

    def __init__(self, *, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        stages = int(math.log2(patch_size))
        layers: list[nn.Module] = []
        channels = in_chans
        for stage in range(stages):
            width = max(dim // 2 ** (stages - 1 - stage), 16)
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(channels, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)  # [B, N, dim]


class ShiftedPatchEmbed(nn.Module):
    """Shifted patch tokenization (Lee et al. 2021): each patch also sees its four diagonal
    neighbours' halves, which widens the receptive field of a token on small images."""

    def __init__(self, *, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        patch_dim = 5 * in_chans * patch_size * patch_size
        self.norm = nn.LayerNorm(patch_dim, eps=LAYER_NORM_EPS)
        self.proj = nn.Linear(patch_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.patch_size // 2
        shifts = [(s, -s, s, -s), (-s, s, s, -s), (s, -s, -s, s), (-s, s, -s, s)]
        shifted = [x] + [self._shift(x, *shift) for shift in shifts]
        x = torch.cat(shifted, dim=1)
        b, c, h, w = x.shape
        p = self.patch_size
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        patches = patches.reshape(b, (h // p) * (w // p), p * p * c)
        return self.proj(self.norm(patches))

    @staticmethod
    def _shift(x: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
        """Pads on one side and crops the other, moving the image diagonally by half a patch."""
        padded = F.pad(x, (max(left, 0), max(right, 0), max(top, 0), max(bottom, 0)))
        _, _, h, w = padded.shape
        return padded[:, :, max(-top, 0) : h - max(-bottom, 0), max(-left, 0) : w - max(-right, 0)]


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    `locality=True` gives locality self-attention: a learnable softmax temperature and a mask on
    each token's attention to itself, which sharpens attention on small datasets.
    """

    def __init__(self, *, dim: int, heads: int, attn_dropout: float, dropout: float,
                 locality: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        self.locality = locality
        if locality:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(self.scale)))

    def forward(
        self, x: torch.Tensor, *, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, N, head_dim]
        scale = self.log_temperature.exp() if self.locality else self.scale
        # SDPA wants True where attention is allowed; LSA forbids each token attending to itself.
        allowed = ~torch.eye(n, dtype=torch.bool, device=x.device) if self.locality else None
        dropout_p = self.attn_dropout if self.training else 0.0
        weights = None
        if need_weights or _explicit_is_faster(q):
            logits = (q * scale) @ k.transpose(-2, -1)
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            # The softmax in fp32 whatever the matrix products ran in (a no-op at fp32).
            probabilities = logits.float().softmax(dim=-1).to(v.dtype)
            out = F.dropout(probabilities, dropout_p, self.training) @ v
            weights = probabilities if need_weights else None
        else:
            # SDPA takes a float scale only, so a learned temperature is folded into q.
            if self.locality:
                q, scale = q * scale, 1.0
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale
            )
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out)), weights


def _explicit_is_faster(q: torch.Tensor) -> bool:
    """bf16 training on a CPU. There PyTorch's fused attention backward (flash, bf16) runs 2-6x
    slower than the explicit product (bf16 matrix products on AMX, an fp32 softmax): on a 2-core
    AMX Xeon (`jobs/bench_attention.py`), forward+backward of [64, 3, 65, 64] (vit-cpu) took
    34-36 ms fused and 6.1-6.3 explicit, [8, 6, 197, 64] (vit-s16) 16-18 and 7.9-8.8, and the
    fused backward was half of vit-cpu's bf16 train step. Without gradients, at fp32, or on a GPU
    the fused kernel is as fast or faster."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad


class Mlp(nn.Module):
    """The transformer's position-wise feed-forward network."""

    def __init__(self, *, dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample while training."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        # The 1/keep rescale goes on the [B, 1, 1] mask, not on the [B, N, dim] activations: one
        # full-size multiply forward and one backward, as timm, instead of a multiply and a divide.
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)
        return x * mask


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(
            dim=config.dim,
            heads=config.heads,
            attn_dropout=config.attn_dropout,
            dropout=config.dropout,
            locality=config.locality_attention,
        )
        self.norm2 = nn.LayerNorm(config.dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(
            dim=config.dim, hidden_dim=int(config.dim * config.mlp_ratio), dropout=config.dropout
        )
        self.drop_path = DropPath(drop_path)

    def forward(
        self, x: torch.Tensor, *, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attn(self.norm1(x), need_weights=need_weights)
        x = x + self.drop_path(attended)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, weights


class VisionTransformer(nn.Module):
    """ViT classifier on the CLS token. See the module docstring for the two attention paths.

    With `config.distill_token` the tokens are [CLS, DIST, patches...]: token 0 stays CLS for
    embeddings and attention maps, and the logits are the mean of both heads, except while
    `distilled_training` is set (by a training run with a teacher) and the model is in train mode:
    then `forward` returns the pair (CLS logits, DIST logits) so each head gets its own loss.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.num_prefix_tokens = 2 if config.distill_token else 1
        self.distilled_training = False
        embed_cls = PatchEmbed
        if config.shifted_patches:
            embed_cls = ShiftedPatchEmbed
        elif config.conv_stem:
            embed_cls = ConvStemPatchEmbed
        self.patch_embed = embed_cls(
            patch_size=config.patch_size, in_chans=config.in_chans, dim=config.dim
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.dist_token = (
            nn.Parameter(torch.zeros(1, 1, config.dim)) if config.distill_token else None
        )
        self.pos_embed = nn.Parameter(
            torch.zeros(1, config.num_patches + self.num_prefix_tokens, config.dim)
        )
        self.pos_drop = nn.Dropout(config.dropout)
        rates = torch.linspace(0, config.drop_path, config.depth).tolist()
        self.blocks = nn.ModuleList(Block(config, rate) for rate in rates)
        self.norm = nn.LayerNorm(config.dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(config.dim, config.num_classes)
        self.head_dist = nn.Linear(config.dim, config.num_classes) if config.distill_token else None
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's default ('original') ViT initialisation, so from-scratch runs behave alike."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)  # as DeiT
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid of the configured image size (rows, columns)."""
        side = self.config.image_size // self.config.patch_size
        return side, side

    def _check_input(self, x: torch.Tensor) -> None:
        p = self.config.patch_size
        if x.ndim != 4 or x.shape[1] != self.config.in_chans:
            raise ConfigError(
                f"expected images [B, {self.config.in_chans}, H, W], got {list(x.shape)}"
            )
        if x.shape[2] % p or x.shape[3] % p:
            raise ConfigError(f"image size {tuple(x.shape[2:])} is not divisible by patch size {p}")

    def _position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid == self.grid_size:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, grid, self.num_prefix_tokens)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        grid = (x.shape[2] // self.config.patch_size, x.shape[3] // self.config.patch_size)
        patches = self.patch_embed(x)
        prefix = [self.cls_token] if self.dist_token is None else [self.cls_token, self.dist_token]
        prefix = [token.expand(x.shape[0], -1, -1) for token in prefix]
        tokens = torch.cat([*prefix, patches], dim=1) + self._position_embedding(grid)
        return self.pos_drop(tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm: [B, prefix + N, dim] (prefix: CLS, then DIST if on)."""
        x = self._tokens(x)
        for block in self.blocks:
            x, _ = block(x)
        return self.norm(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.head(features[:, 0])
        if self.head_dist is None:
            return logits
        logits_dist = self.head_dist(features[:, 1])
        if self.distilled_training and self.training:
            return logits, logits_dist  # type: ignore[return-value]
        return (logits + logits_dist) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised CLS embedding [B, dim] that the (CLS) head reads; drift monitoring
        uses it."""
        return self.forward_features(x)[:, 0]

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits plus every layer's attention weights [B, heads, P + N, P + N] (rows sum to 1),
        P = `num_prefix_tokens`; row and column 0 are the CLS token."""
        x = self._tokens(x)
        attentions = []
        for block in self.blocks:
            x, weights = block(x, need_weights=True)
            attentions.append(weights)
        return self.forward_head(self.norm(x)), attentions


def resize_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Bicubic interpolation of the patch part of a [1, prefix + N, dim] position embedding to
    another grid, so a model runs (or fine-tunes) at another image size."""
    prefix, patch_pos = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_side = math.isqrt(patch_pos.shape[1])
    if old_side * old_side != patch_pos.shape[1]:
        raise ConfigError(f"position embedding has {patch_pos.shape[1]} patches, not a square grid")
    dim = patch_pos.shape[-1]
    patch_pos = patch_pos.reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)
    return torch.cat([prefix, patch_pos], dim=1)


def build_model(config: ModelConfig) -> VisionTransformer:
    """The one constructor jobs use, so a future architecture switch has one place to go."""
    return VisionTransformer(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
