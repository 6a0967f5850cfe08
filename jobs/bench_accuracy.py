"""Valid top-1/top-5 of our best ViT recipe against a from-scratch ResNet-18, at equal budget.

Both train through the same pipeline (`discover_dataset` -> `make_loaders` -> `TrainingRun`/`fit`)
on the same data for the same number of epochs; the ResNet with the plain `vit-cpu` data and
training settings (what a CNN needs no help with), the ViT with `--recipe` (default
`vit-cpu-distilled`, the best). A recipe with a distillation token learns from the ResNet trained
here (DeiT distillation, hard or soft as the recipe says), or from `--teacher`, an existing model
directory. The epochs are equal; the distilled ViT's wall time also pays for the teacher's forward
passes (both wall times are reported). Runs without Ray:

    python jobs/bench_accuracy.py --epochs 50                      # cub100, 2 threads, ~45 min
    python jobs/bench_accuracy.py --only resnet --name teacher     # the ResNet-18 alone, then
    python jobs/bench_accuracy.py --only vit --teacher runs/quality/teacher/resnet18 \\
        --recipe vit-cpu --set model.shifted_patches=true --name spt    # one ablation row

`--num-classes 20 --epochs 15 --threads 1` is the cheap budget the ablation used on a busy 2-core
machine. With `--teacher` and `--only vit`, the ResNet numbers come from that model directory's
metadata (same job, same data), so the ResNet is not retrained for every ViT variant.

Writes the model directories and `<name>.json` under `--out`, and prints one JSON line last.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.benchlib.data import add_data_argument, require_data
from jobs.benchlib.report import report, target
from vitbirds.data import IMAGENET_MEAN, IMAGENET_STD, discover_dataset
from vitbirds.data.sources import DatasetSplits
from vitbirds.errors import ConfigError
from vitbirds.lifecycle.store import fetch_model
from vitbirds.model.files import ModelMetadata, read_metadata, save_model
from vitbirds.paths import repo_root
from vitbirds.precision import PRECISIONS, Precision, resolve_precision
from vitbirds.presets import Recipe, get_recipe
from vitbirds.settings import RunSettings
from vitbirds.training.runner import load_teacher, train_in_process

DEFAULT_RECIPE = "vit-cpu-distilled"
RESNET_RECIPE = "vit-cpu"  # its data and training settings; the model is the ResNet-18
RATIO_GOAL = 0.85


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(parser)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="the ViT preset")
    parser.add_argument(
        "--num-classes", type=int, help="a seeded subset of the classes (a cheaper benchmark)"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (1 is faster on a busy machine)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a recipe field, e.g. model.drop_path=0.2 or data.mixup=0.8 (JSON values)",
    )
    parser.add_argument(
        "--teacher", help="a model to distil from: a model or run directory, gs://..., models:/..."
    )
    parser.add_argument("--only", choices=("both", "vit", "resnet"), default="both")
    parser.add_argument("--out", type=Path, default=repo_root() / "runs" / "quality")
    parser.add_argument("--name", default="bench", help="results file and model folder name")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precision",
        default=RunSettings.precision,
        choices=PRECISIONS,
        help=f"compute precision of both models (default: {RunSettings.precision}: bf16 where "
        "the device runs it natively, else fp32)",
    )
    args = parser.parse_args(argv)
    require_data(parser, args.data_dir)
    return args


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """`section.field=value` onto a copy of `recipe`; values parse as JSON, else stay strings."""
    recipe = recipe.copy()
    for override in overrides:
        key, _, text = override.partition("=")
        section, _, name = key.partition(".")
        config = getattr(recipe, section, None)
        if config is None or not hasattr(config, name):
            raise ConfigError(f"--set {override!r}: no field {key!r} in the recipe")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        setattr(recipe, section, type(config).from_dict({**config.to_dict(), name: value}))
    return recipe


def train_one(
    label: str,
    architecture: str,
    recipe: Recipe,
    splits: DatasetSplits,
    out_dir: Path,
    *,
    device: torch.device,
    precision: Precision,
    teacher: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Trains one classifier in this process, saves its model dir, returns metrics."""

    def progress(metrics: dict[str, float]) -> None:
        print(
            f"[{label}] epoch {metrics['epoch']:.0f} loss {metrics['train_loss']:.3f} "
            f"top1 {metrics['val_top1']:.3f} ({metrics['epoch_time_s']:.1f}s)",
            file=sys.stderr,
            flush=True,
        )

    started = time.perf_counter()
    trained = train_in_process(
        recipe, splits, architecture=architecture, device=device, precision=precision,
        teacher=teacher, on_epoch_end=progress,
    )  # fmt: skip
    wall = time.perf_counter() - started
    run, history, recipe = trained.run, trained.history, trained.recipe
    model = run.model
    final = history[-1]
    result = {
        "architecture": architecture,
        "val_top1": final["val_top1"],
        "val_top5": final["val_top5"],
        "best_val_top1": max(m["val_top1"] for m in history),
        "wall_s": round(wall, 1),
        "epochs": recipe.train.epochs,
        "parameters": sum(p.numel() for p in model.parameters()),
        "distilled": teacher is not None,
        "precision": precision.name,
        "recipe": {
            "model": recipe.model.to_dict(),
            "data": recipe.data.to_dict(),
            "train": recipe.train.to_dict(),
        },
    }
    if run.ema is not None:  # the raw weights too, so one run measures what EMA adds
        result["val_top1_raw"] = run.evaluate(trained.valid_loader, model=run.model)["val_top1"]
    metadata = ModelMetadata(
        model=recipe.model.to_dict(),
        architecture=architecture,
        class_names=splits.classes,
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
        image_size=recipe.data.image_size,
        name=f"bench-{label}",
        metrics={key: result[key] for key in ("val_top1", "val_top5", "wall_s", "epochs")},
        history=history,
        data={
            "source": splits.source,
            "root": str(splits.root),
            "fingerprint": splits.fingerprint(),
            "synthetic": splits.synthetic,
        },
        extra={"precision": precision.to_dict()},
    )
    save_model(out_dir / label, run.evaluation_model(), metadata)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device)
    print(f"{device.type}: {precision.describe()}", file=sys.stderr, flush=True)
    recipe = apply_overrides(get_recipe(args.recipe), args.overrides)
    image_size = args.image_size or recipe.model.image_size
    recipe.model.image_size = recipe.data.image_size = image_size
    recipe.model.validate()
    recipe.train.epochs = args.epochs
    recipe.train.device = args.device

    recipe.data.num_classes = args.num_classes
    splits = discover_dataset(args.data_dir, num_classes=args.num_classes, seed=recipe.data.seed)
    out_dir = args.out / args.name
    results: dict[str, Any] = {
        "data": str(args.data_dir),
        "train_images": len(splits.train),
        "valid_images": len(splits.valid),
        "classes": len(splits.classes),
        "threads": args.threads,
        "epochs": args.epochs,
        "image_size": image_size,
        "recipe": args.recipe,
        "overrides": args.overrides,
        "precision": precision.to_dict(),
    }

    def save() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")

    teacher_dir = fetch_model(args.teacher).path if args.teacher else None
    if args.only in ("both", "resnet"):
        baseline = get_recipe(RESNET_RECIPE)
        baseline.train.epochs = args.epochs
        baseline.train.device = args.device
        baseline.model.image_size = baseline.data.image_size = image_size
        baseline.data.num_classes = args.num_classes
        results["resnet18"] = train_one(
            "resnet18", "resnet18", baseline, splits, out_dir, device=device, precision=precision
        )
        teacher_dir = teacher_dir or out_dir / "resnet18"
        save()
    if args.only in ("both", "vit"):
        teacher = None
        if recipe.model.distill_token:
            if teacher_dir is None:
                raise SystemExit("the recipe distils: pass --teacher or train the ResNet too")
            teacher = load_teacher(str(teacher_dir), splits.classes, device)
            results["teacher"] = str(teacher_dir)
        results["vit"] = train_one("vit", "vit", recipe, splits, out_dir, device=device,
                                   precision=precision, teacher=teacher)  # fmt: skip
        save()

    if "resnet18" not in results and teacher_dir is not None:
        # A ResNet trained earlier by this job on the same data stands in for a retrain.
        results["resnet18"] = {**read_metadata(teacher_dir).metrics, "model_dir": str(teacher_dir)}
    targets = []
    reference = results.get("resnet18", {}).get("val_top1")
    if "vit" in results and reference:
        ratio = results["vit"]["val_top1"] / reference
        results["vit_resnet_top1_ratio"] = round(ratio, 4)
        targets.append(target("vit/resnet top-1 ratio", ratio, RATIO_GOAL))
        save()
    report("accuracy", results, targets, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
