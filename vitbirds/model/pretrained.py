"""Start from weights a user already has on disk: a timm `VisionTransformer` state dict.

Our parameter names equal timm's, so the conversion is a check plus two adaptations: the position
embedding is resized to our patch grid and the classifier is replaced when the label sets differ.
Only safetensors files are read (pickled `.pth`/`.bin` files would execute code when loaded).
"""

from pathlib import Path

import torch
from safetensors.torch import load_file

from vitbirds.config import ModelConfig
from vitbirds.errors import ModelFileError
from vitbirds.model.files import refuse_pickle
from vitbirds.model.vit import VisionTransformer, resize_pos_embed


def adapt_timm_state_dict(
    model: VisionTransformer, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The subset of `state` our model takes; raises ModelFileError when shapes cannot match."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        state["pos_embed"] = resize_pos_embed(
            state["pos_embed"], model.grid_size, model.num_prefix_tokens
        )
    if (
        state.get("head.weight") is not None
        and state["head.weight"].shape != own["head.weight"].shape
    ):
        # Another label set: keep the backbone, train a fresh head.
        state.pop("head.weight")
        state.pop("head.bias", None)
        state.update({"head.weight": own["head.weight"], "head.bias": own["head.bias"]})
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    missing = sorted(set(own) - set(state))
    if mismatched or missing:
        shapes = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in mismatched[:3]]
        raise ModelFileError(
            f"pretrained weights do not fit this model config: wrong shapes {shapes}, "
            f"missing {missing[:5]}"
        )
    return {k: state[k] for k in own}


def timm_twin(config: ModelConfig) -> torch.nn.Module:
    """timm's `VisionTransformer` of the same shape as `build_model(config)` (plain ViT options):
    the same parameter names and computation, so the weights of either load into the other.
    The parity tests and `jobs/bench_model.py`'s baseline are built with it. Needs timm."""
    import timm

    return timm.models.vision_transformer.VisionTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.dim,
        depth=config.depth,
        num_heads=config.heads,
        mlp_ratio=config.mlp_ratio,
        num_classes=config.num_classes,
        drop_path_rate=config.drop_path,
    )


def init_from_timm(model: VisionTransformer, path: str | Path) -> None:
    """Loads a timm ViT `.safetensors` file into `model` in place."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"--init-from file {path} does not exist")
    if path.suffix != ".safetensors":
        refuse_pickle(path)
    model.load_state_dict(adapt_timm_state_dict(model, load_file(path)))
