"""A CNN baseline to measure the ViT against, and the teacher for DeiT distillation.

ResNet-18 (He et al. 2015) from torchvision, from scratch: the usual reference for what a
convolutional inductive bias buys on small data. It is a baseline and a teacher only: attention
maps, embeddings for drift monitoring and the other ViT features stay ViT-only.
"""

from torch import nn

from vitbirds.config import ModelConfig
from vitbirds.errors import ConfigError
from vitbirds.model.vit import build_model

ARCHITECTURES = ("vit", "resnet18")


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
