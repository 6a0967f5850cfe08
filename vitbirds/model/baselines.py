"""A CNN baseline to measure the ViT against, and the teacher for DeiT distillation.

ResNet-18 (He et al. 2015) from torchvision, from scratch: the usual reference for what a
convolutional inductive bias buys on small data. Attention maps stay ViT-only (a CNN has no
attention); the embedding that drift monitoring compares exists for both: the ViT's normalised
CLS token and the ResNet's globally pooled features, each being what the classifier head reads.
"""

import torch
from torch import nn

from vitbirds.config import ModelConfig
from vitbirds.errors import ConfigError
from vitbirds.model.vit import VisionTransformer, build_model

ARCHITECTURES = ("vit", "resnet18")
RESNET18_FEATURES = 512  # width of ResNet-18's pooled features, the input of its `fc` head


def build_classifier(architecture: str, config: ModelConfig) -> nn.Module:
    """`architecture`'s classifier for `config.num_classes` classes, randomly initialised.

    For the ResNet only `num_classes` matters; it takes any image size (global pooling).
    """
    if architecture == "vit":
        return build_model(config)
    if architecture == "resnet18":
        from torchvision.models import resnet18

        return resnet18(weights=None, num_classes=config.num_classes)
    raise ConfigError(
        f"unknown architecture {architecture!r}; known architectures: {', '.join(ARCHITECTURES)}"
    )


def embedding_dim(architecture: str, config: ModelConfig) -> int:
    """Width of the embedding `logits_and_embedding` returns for this architecture."""
    if architecture == "vit":
        return config.dim
    if architecture == "resnet18":
        return RESNET18_FEATURES
    raise ConfigError(
        f"unknown architecture {architecture!r}; known architectures: {', '.join(ARCHITECTURES)}"
    )


def logits_and_embedding(
    model: nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, C] and the embedding [B, D] the head reads, in one forward pass: the ViT's
    normalised CLS token, or a torchvision ResNet's globally pooled last feature map."""
    if isinstance(model, VisionTransformer):
        features = model.forward_features(images)
        return model.forward_head(features), features[:, 0]
    if all(hasattr(model, name) for name in ("layer4", "avgpool", "fc")):
        # torchvision's ResNet._forward_impl, stopping to keep the pooled features.
        x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
        x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
        pooled = torch.flatten(model.avgpool(x), 1)
        return model.fc(pooled), pooled
    raise ConfigError(f"no embedding is defined for a {type(model).__name__}")
