"""Why `vitbirds.model.vit.Attention` trains in bf16 on a CPU through the explicit product.

One attention call at each preset's shape ([batch, heads, tokens, head_dim]), timed fused
(`F.scaled_dot_product_attention`) and explicit (q @ kᵀ, an fp32 softmax, @ v), at fp32 and bf16,
forward alone (inference) and forward+backward (training), the variants interleaved in rounds.
The targets are the two facts the model's choice rests on: in bf16 training the explicit path is
faster; in bf16 inference the fused kernel is at least as fast.

    python jobs/bench_attention.py [--rounds 10]
"""

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.benchlib.report import report, target

SHAPES = {"vit-cpu": (64, 3, 65, 64), "vit-s16": (8, 6, 197, 64)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def attention_step(shape, dtype: torch.dtype, fused: bool, train: bool) -> Callable[[], None]:
    head_dim = shape[-1]
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(shape, generator=generator).to(dtype).requires_grad_(train) for _ in range(3)
    )

    def step() -> None:
        with torch.set_grad_enabled(train):
            if fused:
                out = F.scaled_dot_product_attention(q, k, v)
            else:
                logits = (q * head_dim**-0.5) @ k.transpose(-2, -1)
                out = logits.float().softmax(dim=-1).to(dtype) @ v
            if train:
                out.sum().backward()

    return step


def milliseconds(step: Callable[[], None], seconds: float) -> float:
    step()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        count += 1
    return 1000 * (time.perf_counter() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--round-seconds", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    results: dict = {"load_average_before": os.getloadavg()[0]}
    targets = []
    for preset, shape in SHAPES.items():
        steps = {
            f"{mode}_{precision}_{'fused' if fused else 'explicit'}": attention_step(
                shape, dtype, fused, mode == "train"
            )
            for mode in ("train", "eval")
            for precision, dtype in DTYPES.items()
            for fused in (True, False)
        }
        timings: dict[str, list[float]] = {label: [] for label in steps}
        for round_index in range(args.rounds):
            order = list(steps) if round_index % 2 == 0 else list(steps)[::-1]
            for label in order:
                timings[label].append(milliseconds(steps[label], args.round_seconds))
        medians = {label: round(statistics.median(ms), 3) for label, ms in timings.items()}
        results[preset] = {"shape": list(shape), "ms": medians}
        targets.append(
            target(
                f"{preset} bf16 train fused / explicit",
                medians["train_bf16_fused"] / medians["train_bf16_explicit"],
                1.0,
            )
        )
        targets.append(
            target(
                f"{preset} bf16 eval explicit / fused",
                medians["eval_bf16_explicit"] / medians["eval_bf16_fused"],
                1.0,
            )
        )
    results["load_average_after"] = os.getloadavg()[0]
    report("attention", results, targets)


if __name__ == "__main__":
    main()
