"""Device choice for the one training loop: cpu, cuda or Apple's mps; and the name of the
machine's CPU, which every reported figure carries."""

import platform

import torch

from vitbirds.errors import DeviceUnavailableError

# The devices a run can train on; evaluation also takes "auto" (cuda, then mps, then cpu).
DEVICES = ("cpu", "cuda", "mps")
DEVICE_CHOICES = ("auto", *DEVICES)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (e.g. "Intel(R) Xeon(R) Processor"), else what
    the platform module knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
