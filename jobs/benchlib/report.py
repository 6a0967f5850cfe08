"""The one JSON line every `jobs/bench_*.py` prints last, so results are machine-readable."""

import json
import os
from typing import Any

import torch

from vitbirds.devices import cpu_name
from vitbirds.precision import fast_bf16


def machine_info(device: str = "cpu") -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
        "torch": torch.__version__,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    if not device.startswith("cuda") or torch.cuda.is_available():
        info["native_bf16"], info["bf16_evidence"] = fast_bf16(device)
    return info


def target(name: str, value: float, goal: float, op: str = ">=") -> dict[str, Any]:
    met = value >= goal if op == ">=" else value <= goal
    return {"name": name, "value": round(value, 4), "goal": goal, "op": op, "met": bool(met)}


def report(bench: str, results: dict[str, Any], targets: list[dict[str, Any]],
           device: str = "cpu") -> str:  # fmt: skip
    """Prints and returns the closing JSON line."""
    line = json.dumps(
        {"bench": bench, "machine": machine_info(device), "results": results, "targets": targets}
    )
    print(line, flush=True)
    return line
