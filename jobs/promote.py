"""The promotion gate: move the registry's `champion` alias to the `challenger` only if it is not
worse on the same labelled photos.

    # after a training run registered its model as the challenger (jobs/train.py does)
    python jobs/promote.py --data-dir ../shared/data/cub100 --split valid --storage-path runs
    # a folder of new labelled photos (<class>/<image>), every image of it
    python jobs/promote.py --data-dir new-photos --split all --margin 0.02
    # decide and print, move nothing
    python jobs/promote.py --data-dir ../shared/data/cub100 --split valid --dry-run

Both versions are downloaded from the registry and scored on the same images (the classes both
models know). Not worse: the lower end of the 95 % paired-bootstrap interval of top-1(challenger)
- top-1(champion) is at least -margin (see vitbirds/evaluation/compare.py for why this test).
Without a champion yet, the challenger becomes the first one. The decision and its figures are
written as tags on the challenger's version (and `promotion.replaced_by` on the old champion).
Serve picks up the new champion when it is redeployed with `models:/vitbirds@champion`.

Exit status: 0 promoted (or the challenger already is the champion), 3 refused, 2 usage error
(bad flag, no challenger, missing data).
"""

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.cli import OneLineErrorParser, start_job
from vitbirds.data.sources import SPLITS, DatasetSplits, Sample, discover_dataset, model_labels
from vitbirds.devices import resolve_device
from vitbirds.errors import DataError, VitbirdsError
from vitbirds.evaluation.compare import Comparison, GateConfig, paired_bootstrap
from vitbirds.evaluation.evaluate import EvaluationConfig, evaluate_model
from vitbirds.lifecycle.registry import (
    CHALLENGER,
    CHAMPION,
    DEFAULT_MODEL_NAME,
    RegisteredVersion,
    Registry,
    registry_uri,
)
from vitbirds.model.files import load_model, read_metadata

PROMOTED, REFUSED, USAGE = 0, 3, 2


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written (examples included); defaults shown where there is one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = GateConfig()
    parser = OneLineErrorParser(description=__doc__, formatter_class=_Help)
    add = parser.add_argument
    add("--data-dir", required=True, type=Path, help="labelled photos both models are scored on")
    add(
        "--split", choices=[*SPLITS, "all"], default="test",
        help="which split of --data-dir; 'all' for a folder that is only an evaluation set",
    )  # fmt: skip
    add("--max-images", type=int, help="score a seeded sample of this many images, not all")
    add("--model-name", default=DEFAULT_MODEL_NAME, help="the registered model")
    add("--storage-path", default="runs", help="whose MLflow store holds the registry")
    add("--tracking-uri", help="the registry's MLflow URI (default: MLFLOW_TRACKING_URI, else "
        "the SQLite store under --storage-path)")  # fmt: skip
    add("--margin", type=float, default=defaults.margin, help="top-1 the challenger may lose")
    add("--confidence", type=float, default=defaults.confidence, help="of the interval")
    add("--resamples", type=int, default=defaults.resamples, help="bootstrap resamples")
    add("--seed", type=int, default=defaults.seed, help="bootstrap, image sample, valid split")
    add("--device", default="auto", help="auto, cpu, cuda or mps")
    add("--dry-run", action="store_true", help="decide and print; move no alias, write no tag")
    add("--out", type=Path, help="also write the decision as JSON to this file")
    return parser.parse_args(argv)


@dataclass
class Decision:
    """What the gate decided, on which versions, and the figures it rests on."""

    promoted: bool
    reason: str
    challenger: RegisteredVersion
    champion: RegisteredVersion | None
    comparison: Comparison | None
    challenger_top1: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "promoted": self.promoted,
            "reason": self.reason,
            "challenger": self.challenger.to_dict(),
            "champion": self.champion.to_dict() if self.champion else None,
            "comparison": self.comparison.to_dict() if self.comparison else None,
            "challenger_top1": self.challenger_top1,
        }


def select_samples(
    args: argparse.Namespace, models_classes: list[list[str]]
) -> tuple[DatasetSplits, list[Sample]]:
    """The requested split's images of classes every compared model knows (matched by
    `class_key`, as evaluation matches them), seeded sample."""
    splits = discover_dataset(args.data_dir, seed=args.seed)
    samples = splits.split(args.split) if args.split != "all" else [
        *splits.train, *splits.valid, *splits.test
    ]  # fmt: skip
    if not samples:
        sizes = ", ".join(f"{name} ({len(splits.split(name))})" for name in SPLITS)
        raise DataError(
            f"split {args.split!r} of {splits.root} is empty (splits: {sizes}); "
            "--split all scores every image"
        )
    for model_classes in models_classes:
        known = model_labels(splits.classes, model_classes)
        samples = [s for s in samples if s.label in known]
    if not samples:
        raise DataError(f"none of the classes of {splits.root} is known to the compared models")
    if args.max_images is not None and len(samples) > args.max_images:
        chosen = np.random.default_rng(args.seed).choice(len(samples), args.max_images, False)
        samples = [samples[i] for i in sorted(chosen)]
    return splits, samples


def correct_by_path(
    model_dir: Path, splits: DatasetSplits, samples: list[Sample], device: Any
) -> dict[Path, bool]:
    """Was the model right on each decodable image? (undecodable ones are left out, counted in
    the evaluation's warning)."""
    loaded = load_model(model_dir, device)
    result = evaluate_model(
        loaded, samples, splits.classes, config=EvaluationConfig(overlays=0), device=device
    )
    right = result.probs.argmax(axis=1) == result.labels
    return {sample.path: bool(hit) for sample, hit in zip(result.samples, right, strict=True)}


def decide(args: argparse.Namespace, registry: Registry) -> Decision:
    challenger = registry.by_alias(CHALLENGER)
    if challenger is None:
        raise DataError(
            f"registered model {registry.name!r} has no {CHALLENGER!r} version in "
            f"{registry.tracking_uri}: train one (jobs/train.py registers every export)"
        )
    champion = registry.by_alias(CHAMPION)
    if champion is not None and champion.version == challenger.version:
        return Decision(True, "the challenger already is the champion", challenger, champion,
                        None, None)  # fmt: skip
    device = resolve_device(args.device)
    dirs = {"challenger": registry.download(challenger)}
    if champion is not None:
        dirs["champion"] = registry.download(champion)
    splits, samples = select_samples(args, [read_metadata(d).class_names for d in dirs.values()])
    scored = {role: correct_by_path(d, splits, samples, device) for role, d in dirs.items()}
    if champion is None:
        top1 = float(np.mean(list(scored["challenger"].values())))
        return Decision(True, "no champion yet: the first challenger becomes the champion",
                        challenger, None, None, top1)  # fmt: skip
    both = scored["challenger"].keys() & scored["champion"].keys()
    paths = [s.path for s in samples if s.path in both]
    comparison = paired_bootstrap(
        np.array([scored["challenger"][p] for p in paths]),
        np.array([scored["champion"][p] for p in paths]),
        GateConfig(args.margin, args.confidence, args.resamples, args.seed),
    )
    bound = f"lower bound {comparison.ci_low:+.2%} vs -margin {-comparison.margin:+.2%}"
    if comparison.not_worse:
        return Decision(True, f"not worse ({bound})", challenger, champion, comparison,
                        comparison.challenger_top1)  # fmt: skip
    return Decision(False, f"worse ({bound})", challenger, champion, comparison,
                    comparison.challenger_top1)  # fmt: skip


def record(registry: Registry, decision: Decision, args: argparse.Namespace) -> None:
    """Moves `champion` when promoted; the figures as tags on the versions either way."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    tags = {
        "promotion.decision": "promoted" if decision.promoted else "refused",
        "promotion.reason": decision.reason,
        "promotion.at": now,
        "promotion.data": f"{Path(args.data_dir).resolve()} ({args.split})",
    }
    if decision.champion is not None:
        tags["promotion.champion_version"] = str(decision.champion.version)
    if decision.challenger_top1 is not None:
        tags["promotion.challenger_top1"] = f"{decision.challenger_top1:.6g}"
    if decision.comparison is not None:
        comparison = decision.comparison
        tags.update({
            "promotion.champion_top1": f"{comparison.champion_top1:.6g}",
            "promotion.difference": f"{comparison.difference:.6g}",
            "promotion.ci_low": f"{comparison.ci_low:.6g}",
            "promotion.ci_high": f"{comparison.ci_high:.6g}",
            "promotion.confidence": str(comparison.confidence),
            "promotion.margin": str(comparison.margin),
            "promotion.images": str(comparison.images),
        })  # fmt: skip
    registry.tag(decision.challenger.version, tags)
    if not decision.promoted:
        return
    registry.set_alias(CHAMPION, decision.challenger.version)
    if decision.champion is not None:
        registry.tag(decision.champion.version, {
            "promotion.replaced_by": str(decision.challenger.version),
            "promotion.replaced_at": now,
        })  # fmt: skip


def describe(decision: Decision) -> list[str]:
    challenger, champion = decision.challenger, decision.champion
    lines = [f"challenger: {challenger.uri}", f"champion:   {champion.uri if champion else '-'}"]
    comparison = decision.comparison
    if comparison is not None:
        lines.append(
            f"top-1 on {comparison.images} images: challenger {comparison.challenger_top1:.2%}, "
            f"champion {comparison.champion_top1:.2%}, difference {comparison.difference:+.2%} "
            f"({comparison.confidence:.0%} CI [{comparison.ci_low:+.2%}, "
            f"{comparison.ci_high:+.2%}]; only challenger right {comparison.only_challenger_right},"
            f" only champion right {comparison.only_champion_right})"
        )
    elif decision.challenger_top1 is not None:
        lines.append(f"challenger top-1: {decision.challenger_top1:.2%}")
    verdict = "PROMOTED" if decision.promoted else "REFUSED"
    lines.append(f"decision: {verdict}: {decision.reason}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_job()
    try:
        GateConfig(args.margin, args.confidence, args.resamples, args.seed)  # flags checked first
        if args.max_images is not None and args.max_images < 1:
            raise DataError(f"--max-images must be positive, got {args.max_images}")
        registry = Registry(registry_uri(args.storage_path, args.tracking_uri), args.model_name)
        decision = decide(args, registry)
        if not args.dry_run:
            record(registry, decision, args)
    except VitbirdsError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE
    for line in describe(decision):
        print(line, flush=True)
    if decision.promoted and not args.dry_run:
        print(f"{CHAMPION} -> {decision.challenger.uri}; redeploy Serve with "
              f"models:/{registry.name}@{CHAMPION} to serve it", flush=True)  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(decision.to_dict(), indent=2) + "\n")
    return PROMOTED if decision.promoted else REFUSED


if __name__ == "__main__":
    sys.exit(main())
