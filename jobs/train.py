"""Train the bird ViT with Ray Train: on this machine, or on any Ray cluster unchanged.

    python jobs/train.py                                # vit-cpu on the synthetic birds, local Ray
    python jobs/train.py --data-dir ../shared/data/cub100 --num-workers 2 --run-name cub
    python jobs/train.py --preset vit-s16 --use-gpu --num-workers 4 --storage-path gs://b/runs
    python jobs/train.py --device mps                   # Apple silicon, one worker

    # On a cluster started with `ray start --head` (token auth on, as Ray 2.60 does by default):
    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train.py --num-workers 2

Rerunning with the same --run-name and --storage-path resumes from the latest checkpoint. Flags
override the preset's values; every other value comes from `vitbirds.presets`. Exit status: 0 on
success, 2 for a usage error (bad flag value, missing device or data), 1 if training failed.
"""

import argparse
import logging
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vitbirds.config import DATA_MODES
from vitbirds.errors import ConfigError, VitbirdsError
from vitbirds.presets import PRESETS, Recipe, get_recipe
from vitbirds.training.tracking import TRACKERS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        default="vit-cpu-small-data",
        choices=list(PRESETS),
        help="model + training recipe",
    )
    data = parser.add_argument_group("data (default: the generated synthetic birds)")
    data.add_argument("--data-dir", help="Kaggle bird-species layout or any ImageFolder tree")
    data.add_argument("--num-classes", type=int, help="seeded subset of the classes")
    data.add_argument("--images-per-class", type=int, help="seeded subset per class and split")
    data.add_argument(
        "--cache-dir", help="where generated data is kept (default ~/.cache/vitbirds)"
    )
    data.add_argument(
        "--data-mode", choices=DATA_MODES,
        help="cache: decode once into memory; stream: decode each worker's shard every epoch "
        "(memory flat in the dataset size); default auto: cache when it fits the budget",
    )  # fmt: skip
    train = parser.add_argument_group("training (default: the preset's)")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int, help="global batch, split across the workers")
    train.add_argument("--lr", type=float, help="peak learning rate")
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--depth", type=int, help="transformer blocks")
    train.add_argument("--dim", type=int, help="embedding width")
    train.add_argument("--heads", type=int, help="attention heads (must divide --dim)")
    train.add_argument("--patch-size", type=int, help="must divide the preset's image size")
    train.add_argument("--seed", type=int)
    train.add_argument("--init-from", help="timm ViT weights (.safetensors) to start from")
    train.add_argument(
        "--teacher",
        help="model directory to distil from, trained on the same classes (presets with a "
        "distillation token need one; e.g. a ResNet-18 from jobs/bench_accuracy.py --only resnet)",
    )
    ray_group = parser.add_argument_group("Ray")
    ray_group.add_argument("--num-workers", type=int, default=1)
    ray_group.add_argument("--use-gpu", action="store_true", help="one CUDA GPU per worker")
    ray_group.add_argument(
        "--device", choices=["cpu", "cuda", "mps"], default="cpu",
        help="cuda equals --use-gpu; mps trains on the Apple GPU with one worker",
    )  # fmt: skip
    ray_group.add_argument(
        "--cpus-per-worker", type=int,
        help="CPUs (and torch threads) per worker; default: this machine's CPUs split between "
        "the workers, or 1 on a remote cluster",
    )  # fmt: skip
    ray_group.add_argument("--max-failures", type=int, default=0, help="worker-group restarts")
    ray_group.add_argument("--keep-checkpoints", type=int, default=2, help="best k by val top-1")
    out = parser.add_argument_group("outputs")
    out.add_argument("--storage-path", default="runs", help="local folder or gs:// URI")
    out.add_argument("--run-name", help="same name + storage path resumes; default: new run")
    out.add_argument("--tracker", choices=TRACKERS, default="mlflow")
    out.add_argument("--export-dir", help="also copy the exported model here (models/latest)")
    out.add_argument("--summary", help="write a JSON summary of the run to this path")
    out.add_argument(
        "--evaluate", action=argparse.BooleanOptionalAction, default=True,
        help="evaluate the best checkpoint on the test split (valid when there is none)",
    )  # fmt: skip
    return parser.parse_args(argv)


def build_recipe(args: argparse.Namespace) -> Recipe:
    """The preset with the flags the user gave written over it (and validated again)."""
    recipe = get_recipe(args.preset)

    def given(**values: object) -> dict[str, object]:
        return {name: value for name, value in values.items() if value is not None}

    data = given(
        data_dir=absolute(args.data_dir), num_classes=args.num_classes,
        images_per_class=args.images_per_class, seed=args.seed, data_mode=args.data_mode,
    )  # fmt: skip
    train = given(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, seed=args.seed,
    )  # fmt: skip
    model = given(depth=args.depth, dim=args.dim, heads=args.heads, patch_size=args.patch_size)
    return Recipe(
        model=replace(recipe.model, **model),
        data=replace(recipe.data, **data),
        train=replace(recipe.train, **train, device=device_of(args)),
        preset=args.preset,
    )


def absolute(path: str | None) -> str | None:
    """A local path made absolute here, on the driver, as jobs/tune.py does: Ray Train workers
    run in another working directory, where a relative path would name nothing. URIs pass."""
    if path is None or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def device_of(args: argparse.Namespace) -> str:
    return "cuda" if args.use_gpu else args.device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Our INFO lines, everyone else's (MLflow's database set-up, Ray's) from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vitbirds").setLevel(logging.INFO)
    try:
        from vitbirds.ray_adapter import train as ray_train

        recipe = build_recipe(args)
        if recipe.model.distill_token and not args.teacher:
            raise ConfigError(
                f"preset {args.preset} distils from a teacher: pass --teacher MODEL_DIR (see "
                "README, 'A distilled ViT')"
            )
        local = ray_train.cluster_is_local()
        # Before starting Ray: a missing GPU is a usage error, not a hung placement group.
        ray_train.check_device(recipe.train.device, local=local)
        ray_train.connect()
        job = ray_train.TrainJob(
            recipe=recipe,
            run_name=args.run_name or f"{args.preset}-{datetime.now():%Y%m%d-%H%M%S}",
            storage_path=args.storage_path,
            num_workers=args.num_workers,
            device=recipe.train.device,
            cpus_per_worker=args.cpus_per_worker
            or ray_train.default_cpus_per_worker(args.num_workers, local=local),
            max_failures=args.max_failures,
            keep_checkpoints=args.keep_checkpoints,
            init_from=args.init_from,
            teacher=absolute(args.teacher),
            tracker=args.tracker,
            evaluate=args.evaluate,
            export_dir=args.export_dir,
            cache_dir=absolute(args.cache_dir),
        )
        print(
            f"run {job.run_name}: {args.preset}, {job.num_workers} worker(s) on {job.device}, "
            f"{job.cpus_per_worker} CPU(s) each, storage {job.storage_path}",
            flush=True,
        )
        outcome = ray_train.run_training(job)
    except VitbirdsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ray_train.TrainingFailedError as error:
        print(f"error: training failed: {error}", file=sys.stderr)
        return 1
    print(ray_train.describe_outcome(outcome), flush=True)
    if args.summary:
        print(f"summary: {ray_train.write_summary(outcome, args.summary)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
