"""Does torch.compile (inductor) pay for itself on this machine? Our ViT compiled against eager.

For each preset, at `--precision` (default auto: bf16 where the CPU has AMX-BF16), the eager
model and its `torch.compile` twin are timed in interleaved rounds (as `jobs/bench_model.py`
times ours against timm): the training step at the preset's batch, and the Serve forward at
batch 1 (a lone client) and at `--serve-batch` (a loaded replica), each shape compiled once
(`dynamic=False`, so each batch size Serve forms would compile anew). The compile time is the
first call's wall time less an eager step's.

"End to end" counts the compile time against the work it serves: `--train-steps` training steps
(default: 50 epochs of cub100's 2,400 photos at the preset's batch), and `--serve-requests`
lone requests per replica start. The goal (compile kept only if it is met): >= 1.10x eager.

    python jobs/bench_compile.py [--presets vit-cpu vit-s16] [--rounds 10]
"""

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.bench_model import (
    DEFAULT_BATCH,
    interleaved_rounds,
    make_steps,
    run_under_steady_malloc,
)
from jobs.benchlib.report import report, target
from vitbirds.model.vit import VisionTransformer
from vitbirds.precision import PRECISIONS, resolve_precision
from vitbirds.presets import PRESETS, get_recipe
from vitbirds.settings import RunSettings

GOAL = 1.10
CUB100_TRAIN_PHOTOS, CUB100_EPOCHS = 2400, 50


def first_call_seconds(step, eager_step) -> float:
    """Wall time of the compiled step's first call less one eager step: the compile time."""
    started = time.perf_counter()
    step()
    compiled_first = time.perf_counter() - started
    started = time.perf_counter()
    eager_step()
    return max(0.0, compiled_first - (time.perf_counter() - started))


def end_to_end(eager_per_s: float, compiled_per_s: float, compile_s: float, items: int) -> float:
    """Speed-up of compiling over `items` images of work, the compile time included."""
    eager_s = items / eager_per_s
    return eager_s / (compile_s + items / compiled_per_s)


def bench_shape(
    model: torch.nn.Module, batch: int, mode: str, args: argparse.Namespace, precision
) -> dict:
    config = model.config
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, config.image_size, config.image_size, generator=generator)
    y = torch.randint(0, config.num_classes, (batch,), generator=generator)
    eager = make_steps(model, x, y, precision)[mode]
    compiled = make_steps(torch.compile(model, dynamic=False), x, y, precision)[mode]
    compile_s = first_call_seconds(compiled, eager)
    speeds, _, steps = interleaved_rounds(
        {"compiled": compiled, "eager": eager},
        batch=batch,
        steps=None,
        round_seconds=args.round_seconds,
        rounds=args.rounds,
        warmup=1,
        device="cpu",
        clock="wall",
    )
    ratios = [c / e for c, e in zip(speeds["compiled"], speeds["eager"], strict=True)]
    return {
        "batch": batch,
        "compile_s": round(compile_s, 1),
        "eager_images_per_s": round(statistics.median(speeds["eager"]), 2),
        "compiled_images_per_s": round(statistics.median(speeds["compiled"]), 2),
        "compiled_over_eager": round(statistics.median(ratios), 4),
        "ratio_min": round(min(ratios), 4),
        "ratio_max": round(max(ratios), 4),
        "steps_per_round": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--presets", nargs="+", default=["vit-cpu", "vit-s16"], choices=PRESETS)
    parser.add_argument("--precision", choices=PRECISIONS, default=RunSettings.precision)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--round-seconds", type=float, default=1.0)
    parser.add_argument("--serve-batch", type=int, default=8)
    parser.add_argument("--serve-requests", type=int, default=1000)
    parser.add_argument("--train-steps", type=int, help="default: 50 epochs of cub100")
    args = parser.parse_args()
    run_under_steady_malloc()
    torch.set_num_threads(os.cpu_count() or 1)
    precision = resolve_precision(args.precision, "cpu")
    results: dict = {"precision": precision.describe(), "load_average_before": os.getloadavg()[0]}
    targets = []
    for name in args.presets:
        config = get_recipe(name).model
        config.num_classes = 100
        torch.manual_seed(0)
        model = VisionTransformer(config)
        train_batch = DEFAULT_BATCH.get(name, 8)
        shapes = {
            "train_step": bench_shape(model, train_batch, "forward_backward", args, precision),
            "serve_batch_1": bench_shape(model, 1, "forward", args, precision),
            f"serve_batch_{args.serve_batch}": bench_shape(
                model, args.serve_batch, "forward", args, precision
            ),
        }
        train_steps = args.train_steps or CUB100_EPOCHS * math.ceil(
            CUB100_TRAIN_PHOTOS / train_batch
        )
        train = shapes["train_step"]
        lone = shapes["serve_batch_1"]
        shapes["train_end_to_end"] = round(
            end_to_end(
                train["eager_images_per_s"],
                train["compiled_images_per_s"],
                train["compile_s"],
                train_steps * train_batch,
            ),
            3,
        )
        # A replica compiles each batch shape it meets; counted here for the lone request only.
        shapes["serve_end_to_end"] = round(
            end_to_end(
                lone["eager_images_per_s"],
                lone["compiled_images_per_s"],
                lone["compile_s"] + shapes[f"serve_batch_{args.serve_batch}"]["compile_s"],
                args.serve_requests,
            ),
            3,
        )
        results[name] = shapes
        targets.append(target(f"{name} train compiled/eager e2e", shapes["train_end_to_end"], GOAL))
        targets.append(target(f"{name} serve compiled/eager e2e", shapes["serve_end_to_end"], GOAL))
    results["load_average_after"] = os.getloadavg()[0]
    report("compile", results, targets)


if __name__ == "__main__":
    main()
