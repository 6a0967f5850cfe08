"""vitbirds: a Vision Transformer for bird species, written from scratch in PyTorch."""

__version__ = "0.1.0"
