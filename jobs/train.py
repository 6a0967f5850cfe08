"""Train the bird ViT with Ray Train: on this machine, or on any Ray cluster unchanged.

examples:
  python jobs/train.py                               # the default preset on synthetic birds
  python jobs/train.py --data-dir ../shared/data/cub100 --num-workers 2 --run-name cub
  python jobs/train.py --preset vit-s16 --use-gpu --num-workers 4 --storage-path gs://b/runs
  python jobs/train.py --device mps                  # Apple silicon, one worker

  # On a cluster started with `ray start --head` (token auth on, as Ray 2.60 does by default):
  RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- \\
      python jobs/train.py --num-workers 2 --export-dir models/latest

Rerunning with the same --run-name and --storage-path resumes from the latest checkpoint. Flags
override the preset's values; every other value comes from `vitbirds.presets`. Relative output
paths are relative to the current directory, or to $VITBIRDS_HOME (default ~/vitbirds) on the head
node when the job runs through `ray job submit --working-dir` (whose current directory is Ray's
temporary copy of the code). Exit status: 0 on success, 2 for a usage error (bad flag value,
missing device or data), 1 if training failed.
"""

import argparse
import logging
import sys
from dataclasses import fields
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.cli import start_job
from vitbirds.errors import ConfigError, VitbirdsError
from vitbirds.paths import output_path
from vitbirds.presets import Recipe
from vitbirds.settings import (
    RecipeSettings,
    TrainSettings,
    add_arguments,
    add_recipe_arguments,
    preset_with_overrides,
    presets_table,
)

# The recipe flags of a training run, in --help order (vitbirds.settings.RECIPE_FLAGS).
TRAINING_FLAGS = (
    "epochs", "batch_size", "lr", "weight_decay", "depth", "dim", "heads", "patch_size", "seed",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """jobs/train.py's flags: defaults and help from `vitbirds.settings` and the presets."""
    description, _, epilog = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        description=description,
        epilog=f"{epilog}\npresets:\n{presets_table()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser, RecipeSettings, ["preset"])
    data = parser.add_argument_group("data")
    add_arguments(data, RecipeSettings, ["data_dir", "num_classes", "images_per_class"])
    add_arguments(data, TrainSettings, ["cache_dir"])
    add_recipe_arguments(data, ["data_mode"])
    train = parser.add_argument_group("training (flags write over the preset's values)")
    add_recipe_arguments(train, TRAINING_FLAGS)
    add_arguments(train, TrainSettings, ["init_from", "teacher"])
    ray_group = parser.add_argument_group("Ray")
    add_arguments(ray_group, TrainSettings, ["num_workers", "device", "precision"])
    ray_group.add_argument("--use-gpu", action="store_true", help="same as --device cuda")
    add_arguments(
        ray_group, TrainSettings, ["cpus_per_worker"], defaults={"cpus_per_worker": None},
        notes={"cpus_per_worker": "default: this machine's CPUs split between the workers, or "
               f"{TrainSettings.cpus_per_worker} on a remote cluster"},
    )  # fmt: skip
    add_arguments(ray_group, TrainSettings, ["max_failures", "keep_checkpoints"])
    out = parser.add_argument_group("outputs")
    add_arguments(out, TrainSettings, ["storage_path", "tracker", "export_dir", "evaluate"])
    add_arguments(out, TrainSettings, ["register", "registered_model"])
    out.add_argument(
        "--run-name",
        help="the same name and --storage-path resume a run (default: PRESET-DATE-TIME, a new run)",
    )
    out.add_argument("--summary", help="also write a JSON summary of the run to this path")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_recipe(args: argparse.Namespace) -> Recipe:
    """The preset with the flags the user gave written over it (and validated again)."""
    given = {name: getattr(args, name) for name in (*TRAINING_FLAGS, "data_mode")}
    return preset_with_overrides(
        args.preset,
        {
            **given,
            "data_dir": absolute(args.data_dir),
            "num_classes": args.num_classes,
            "images_per_class": args.images_per_class,
            "device": device_of(args),
        },
    )


def absolute(path: str | None) -> str | None:
    """An input path made absolute here, on the driver, as jobs/tune.py does: Ray Train workers
    run in another working directory, where a relative path would name nothing. URIs pass.
    (Outputs, and the model directories earlier jobs wrote, go through `output_path`.)"""
    if path is None or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def device_of(args: argparse.Namespace) -> str:
    return "cuda" if args.use_gpu else args.device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Our INFO lines, everyone else's (MLflow's database set-up, Ray's) from WARNING up.
    start_job()
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
        # Every TrainSettings field is a flag of the same name; outputs go where jobs write.
        settings = {spec.name: getattr(args, spec.name) for spec in fields(TrainSettings)}
        settings.update(
            storage_path=output_path(args.storage_path),
            export_dir=output_path(args.export_dir),
            cache_dir=output_path(args.cache_dir),
            device=recipe.train.device,
            cpus_per_worker=args.cpus_per_worker
            or ray_train.default_cpus_per_worker(args.num_workers, local=local),
        )
        job = ray_train.TrainJob(
            **settings,
            recipe=recipe,
            run_name=args.run_name or f"{args.preset}-{datetime.now():%Y%m%d-%H%M%S}",
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
        summary = ray_train.write_summary(outcome, output_path(args.summary))
        print(f"summary: {summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
