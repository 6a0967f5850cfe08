"""Device choice for the one training loop: cpu, cuda or Apple's mps."""

import torch

from vitbirds.errors import DeviceUnavailableError

# The devices a run can train on; evaluation also takes "auto" (cuda, then mps, then cpu).
DEVICES = ("cpu", "cuda", "mps")
DEVICE_CHOICES = ("auto", *DEVICES)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is missing is an error,
    not a silent fallback, so a run never trains 50x slower than its owner thinks."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                "device 'cuda' was requested but no CUDA GPU is visible to PyTorch "
                f"(torch {torch.__version__}, cuda build {torch.version.cuda}); use --device cpu"
            )
        return torch.device("cuda")
    if name == "mps":
        if not torch.backends.mps.is_available():
            reason = (
                "this PyTorch build has no MPS support"
                if not torch.backends.mps.is_built()
                else "this machine has no Apple-silicon GPU (or macOS < 12.3)"
            )
            raise DeviceUnavailableError(
                f"device 'mps' was requested but {reason}; use --device cpu"
            )
        return torch.device("mps")
    raise DeviceUnavailableError(
        f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}"
    )
