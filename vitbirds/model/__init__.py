"""The model stage: the Vision Transformer, the ResNet baseline, timm weight import, attention
explanations and the on-disk model format (`files`: safetensors weights + JSON metadata)."""
