"""Compute precision: fp32, or bf16 autocast where the device runs bf16 fast.

One setting (`auto`, `fp32`, `bf16`) is resolved here for training, evaluation and Serve alike.
`auto` picks bf16 on a CUDA GPU that supports it and on an x86 CPU with AMX-BF16 or AVX512-BF16
(detected at run time through `torch.cpu.get_capabilities()`); everywhere else, fp32: a CPU
without those instructions emulates bf16 and runs slower than fp32, and MPS's bf16 is unmeasured
here. An explicit `bf16` is honoured on any device (correct, only slower where emulated).

Under bf16 only the model's forward runs in autocast: weights, gradients and the optimiser state
stay fp32, and callers take `.float()` of the logits before the loss, softmax and metrics, so an
exported model is the same fp32 safetensors either way.
"""

import contextlib
from dataclasses import dataclass

import torch

from vitbirds.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_PRECISION = "auto"
# x86 instructions that run bf16 matrix products natively (oneDNN uses them under autocast).
FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Precision:
    """A resolved precision: what runs (`name`), why, and on which device type."""

    name: str  # "fp32" | "bf16"
    reason: str
    device_type: str = "cpu"
    requested: str = DEFAULT_PRECISION

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Autocast to bf16 for this device type, or nothing at fp32."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16)

    def describe(self) -> str:
        """One line for a log: `precision bf16 (auto: this CPU has amx_bf16, avx512_bf16)`."""
        return f"precision {self.name} ({self.requested}: {self.reason})"

    def to_dict(self) -> dict[str, str]:
        """What a model's metadata records: the compute precision, why, and the weights' dtype."""
        return {
            "compute": self.name,
            "requested": self.requested,
            "reason": self.reason,
            "weights": "fp32",
        }


FP32 = Precision("fp32", "requested", requested="fp32")


def check_precision(requested: str) -> str:
    """`requested` if it names a precision, else a ConfigError naming the choices."""
    if requested not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    return requested


def fast_bf16(device: torch.device | str) -> tuple[bool, str]:
    """Whether `device` runs bf16 matrix products natively, and the evidence either way."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{torch.cuda.get_device_name(device)} has bf16 tensor cores"
        return False, f"{torch.cuda.get_device_name(device)} has no native bf16"
    if device.type == "cpu":
        capabilities = torch.cpu.get_capabilities()
        architecture = capabilities.get("architecture", "unknown")
        found = [flag for flag in FAST_BF16_CPU_FLAGS if capabilities.get(flag, False)]
        if architecture == "x86_64" and found:
            return True, f"this CPU has {', '.join(found)}"
        if architecture == "x86_64":
            return False, f"this CPU has none of {', '.join(FAST_BF16_CPU_FLAGS)}"
        return False, f"bf16 on {architecture} CPUs is unmeasured here"
    return False, f"bf16 on {device.type} is unmeasured here"


def resolve_precision(requested: str, device: torch.device | str) -> Precision:
    """The precision a run on `device` computes in (see the module docstring)."""
    check_precision(requested)
    device_type = torch.device(device).type
    if requested == "fp32":
        return Precision("fp32", "requested", device_type, requested)
    fast, evidence = fast_bf16(device)
    if requested == "bf16":
        reason = "requested" if fast else f"requested, though {evidence}: emulated and slower"
        return Precision("bf16", reason, device_type, requested)
    return Precision("bf16" if fast else "fp32", evidence, device_type, requested)
