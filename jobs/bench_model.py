"""Forward and forward+backward images/s of our ViT against timm's VisionTransformer.

Same configuration, batch and thread count, measured interleaved (ours, timm, ours, ...) so a
noisy neighbour slows both alike; the best of the repeats is kept. Runs without Ray, on CPU or
CUDA: `python jobs/bench_model.py [--device cuda] [--presets vit-cpu vit-s16]`.
"""

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.benchlib.report import report, target
from vitbirds.config import ModelConfig
from vitbirds.model.vit import VisionTransformer
from vitbirds.presets import get_recipe

DEFAULT_BATCH = {"vit-cpu": 64, "vit-s16": 8, "vit-b16": 4}


def timm_twin(config: ModelConfig) -> torch.nn.Module:
    import timm

    return timm.models.vision_transformer.VisionTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.dim,
        depth=config.depth,
        num_heads=config.heads,
        mlp_ratio=config.mlp_ratio,
        num_classes=config.num_classes,
        drop_path_rate=config.drop_path,
    )


def images_per_second(step: Callable[[], None], batch: int, steps: int, device: str) -> float:
    step()  # warm-up: allocator, kernels selection
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


def make_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: str):
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")

    @torch.no_grad()
    def forward() -> None:
        model.eval()
        with autocast:
            model(x)

    def forward_backward() -> None:
        model.train()
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return forward, forward_backward


def bench_preset(name: str, batch: int, steps: int, repeats: int, device: str) -> dict:
    config = get_recipe(name).model
    config.num_classes = 100
    ours = VisionTransformer(config).to(device)
    theirs = timm_twin(config).to(device)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(batch, 3, config.image_size, config.image_size, device=device)
    y = torch.randint(0, config.num_classes, (batch,), device=device)
    results: dict[str, float] = {}
    for mode in ("forward", "forward_backward"):
        best = {"ours": 0.0, "timm": 0.0}
        for _ in range(repeats):
            for label, model in (("ours", ours), ("timm", theirs)):
                forward, forward_backward = make_steps(model, x, y, device)
                step = forward if mode == "forward" else forward_backward
                best[label] = max(best[label], images_per_second(step, batch, steps, device))
        results[f"{mode}_ours"] = round(best["ours"], 1)
        results[f"{mode}_timm"] = round(best["timm"], 1)
        results[f"{mode}_ratio"] = round(best["ours"] / best["timm"], 3)
    results["batch"] = batch
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["vit-cpu", "vit-s16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, help="batch size for every preset")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results, targets = {}, []
    for name in args.presets:
        batch = args.batch or (DEFAULT_BATCH.get(name, 8) * (8 if args.device == "cuda" else 1))
        results[name] = bench_preset(name, batch, args.steps, args.repeats, args.device)
        for mode in ("forward", "forward_backward"):
            ratio = results[name][f"{mode}_ratio"]
            targets.append(target(f"{name} {mode} ours/timm", ratio, 0.95))
    report("model", results, targets, device=args.device)


if __name__ == "__main__":
    main()
