"""What the drift monitor catches: shift x strength -> decision, p-values, estimated vs true
accuracy.

Trains a small ViT (32 px) on the 100 CUB species minus a held-out quarter of each species'
training images, and saves it with its reference profile (the CUB valid split, 599 photos). Then
runs the label-free monitor (`vitbirds.monitoring.assess.assess`) on:

- random subsets of the held-out images (same distribution: every non-OK is a false alarm);
- the held-out images blurred, darkened and colour-cast at several strengths;
- a label shift (half the species thinned out); Kaggle photos of the 36 species both datasets
  have (true accuracy known) and of any of its 525 species; pure noise.

Prints the table, then one JSON line (jobs.benchlib.report.report). Runs without Ray:

    python jobs/bench_drift.py                     # ~5 min on 2 cores, the model cached in --out
    python jobs/bench_drift.py --subsets 50        # a tighter false-alarm estimate
    python jobs/bench_drift.py --preset vit-cpu-small-data --epochs 30 --out runs/drift-convstem
"""

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.benchlib.data import CUB, KAGGLE_VALID, add_data_argument, require_data
from jobs.benchlib.report import report, target
from jobs.benchlib.shifts import (
    SHIFTS,
    ScenarioResult,
    Subject,
    get_shift,
    label_shift,
    noise_images,
    run_scenario,
    shared_species,
    subject_recipe,
    train_subject,
)
from vitbirds.data.sources import Sample, discover_dataset, samples_for_model
from vitbirds.model.files import load_model
from vitbirds.monitoring.assess import MonitorConfig
from vitbirds.monitoring.reference import (
    UNKNOWN_LABEL,
    image_dataset,
    load_reference_profile,
)
from vitbirds.paths import repo_root
from vitbirds.presets import get_recipe

STRENGTHS = (0.25, 0.5, 1.0)
FALSE_ALARM_GOAL = 0.10  # non-OK verdicts on same-distribution subsets
STRONG_DETECTION_GOAL = 1.0  # non-OK verdicts on the strongest version of each shift


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(parser, CUB, flag="--cub-dir", help="the subject's photos")
    add_data_argument(
        parser, KAGGLE_VALID, flag="--other-dir",
        help="photos of the same species from another source",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=repo_root() / "runs" / "drift-bench")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument(
        "--preset", help="train the subject with this preset (default: a 14 %%-accurate 32 px ViT "
        "that trains in ~2 min); a stronger model gives label shift more power",
    )  # fmt: skip
    parser.add_argument(
        "--classes", choices=["all", "shared"], default="all",
        help="all CUB species (more reference images: more power), or only those Kaggle has",
    )  # fmt: skip
    parser.add_argument("--subsets", type=int, default=20, help="same-distribution subsets")
    parser.add_argument("--subset-size", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--retrain", action="store_true", help="ignore a cached model in --out")
    args = parser.parse_args(argv)
    require_data(parser, args.cub_dir, "--cub-dir")
    require_data(parser, args.other_dir, "--other-dir")
    return args


def subject(args: argparse.Namespace) -> Subject:
    """The trained model (cached in --out/model) and its held-out images."""
    model_dir = args.out / "model"
    cached = model_dir / "reference.json"
    if cached.is_file() and not args.retrain:
        held = json.loads((args.out / "held_out.json").read_text())
        classes = load_reference_profile(model_dir).class_names
        return Subject(model_dir, [Sample(Path(p), label) for p, label in held], classes)
    classes = None
    if args.classes == "shared":
        cub, other = discover_dataset(args.cub_dir), discover_dataset(args.other_dir)
        classes = shared_species(cub.classes, other.classes)
    started = time.perf_counter()
    recipe = subject_recipe(args.epochs)
    if args.preset:
        recipe = get_recipe(args.preset)
        recipe.train = replace(recipe.train, epochs=args.epochs, device="cpu")
    result = train_subject(args.cub_dir, recipe, model_dir, classes=classes)
    print(f"trained in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    held_out = [[str(s.path), s.label] for s in result.held_out]
    (args.out / "held_out.json").write_text(json.dumps(held_out))
    return result


def format_row(row: ScenarioResult) -> str:
    p = row.p_values
    strength = "" if row.strength is None else f"{row.strength:g}"
    true = "  -  " if row.true_accuracy is None else f"{row.true_accuracy:5.1%}"
    psi = "-" if row.class_psi is None else f"{row.class_psi:.2f}"
    auroc = "-" if row.domain_auroc is None else f"{row.domain_auroc:.2f}"
    return (
        f"| {row.scenario:<12} | {strength:>4} | {row.num_images:>4} | {row.decision:<7} "
        f"| {row.labelled_decision or '-':<7} "
        f"| {p.get('confidence', 1):.1e} | {p.get('entropy', 1):.1e} "
        f"| {p.get('predicted_class', 1):.1e} | {p.get('embedding_mmd', 1):.1e} "
        f"| {psi:>5} | {auroc:>4} | {row.estimated_accuracy:5.1%} "
        f"| {row.atc_accuracy:5.1%} | {true} |"
    )


HEADER = (
    "| scenario     | str  |    n | decision | labelled | p conf  | p entr  | p class "
    "| p MMD   |  PSI  | dAUC | est.acc | ATC     | true  |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    subj = subject(args)
    loaded = load_model(subj.model_dir)
    profile = load_reference_profile(subj.model_dir)
    config = MonitorConfig()
    rows: list[ScenarioResult] = []

    def scenario(name: str, images, strength: float | None = None) -> ScenarioResult:
        row, _ = run_scenario(
            loaded, profile, images, scenario=name, strength=strength, config=config,
            labelled=True,
        )  # fmt: skip
        rows.append(row)
        print(format_row(row), file=sys.stderr, flush=True)
        return row

    print(HEADER, file=sys.stderr)
    held = image_dataset(subj.held_out, loaded.metadata)
    rng = np.random.default_rng(0)
    same = []
    for i in range(args.subsets):
        indices = rng.choice(len(held), size=min(args.subset_size, len(held)), replace=False)
        same.append(scenario(f"same #{i + 1}", torch.utils.data.Subset(held, indices.tolist())))
    for name in SHIFTS:
        for strength in STRENGTHS:
            perturbed = image_dataset(
                subj.held_out, loaded.metadata, perturb=get_shift(name, strength)
            )
            scenario(name, perturbed, strength)
    for strength in (0.5, 1.0):
        skewed = label_shift(subj.held_out, strength)
        scenario("label shift", image_dataset(skewed, loaded.metadata), strength)
    other = discover_dataset(args.other_dir)
    other_samples = samples_for_model(
        other.train + other.valid + other.test, other.classes, profile.class_names
    )
    scenario("other source", image_dataset(other_samples, loaded.metadata))
    everything = other.train + other.valid + other.test
    picked = np.random.default_rng(0).choice(len(everything), len(subj.held_out), replace=False)
    other_species = [Sample(everything[i].path, UNKNOWN_LABEL) for i in sorted(picked)]
    scenario("other species", image_dataset(other_species, loaded.metadata))
    scenario("noise", noise_images(len(subj.held_out), loaded))

    false_alarms = sum(r.decision != "OK" for r in same) / len(same)
    strongest = [
        r
        for r in rows
        if r.strength == 1.0 or r.scenario in ("other source", "other species", "noise")
    ]
    detected = sum(r.decision != "OK" for r in strongest) / len(strongest)
    shifted = [r for r in rows if r.true_accuracy is not None and not r.scenario.startswith("same")]
    ts_error = float(np.mean([abs(r.estimated_accuracy - r.true_accuracy) for r in shifted]))
    atc_error = float(np.mean([abs(r.atc_accuracy - r.true_accuracy) for r in shifted]))
    results = {
        "reference_accuracy": profile.accuracy,
        "reference_samples": len(profile.outputs.labels),
        "classes": len(profile.class_names),
        "false_alarm_rate": false_alarms,
        "same_distribution_subsets": len(same),
        "strong_shift_detection_rate": detected,
        "atc_mean_abs_error": atc_error,
        "calibrated_confidence_mean_abs_error": ts_error,
        "wall_s": round(time.perf_counter() - started, 1),
        "rows": [r.to_dict() for r in rows],
    }
    (args.out / "bench_drift.json").write_text(json.dumps(results, indent=2))
    print(
        f"false alarms {false_alarms:.0%} of {len(same)} same-distribution subsets; strongest "
        f"shifts caught {detected:.0%}; |ATC - true| {atc_error:.3f}, |TS conf - true| "
        f"{ts_error:.3f}",
        file=sys.stderr,
    )
    report(
        "drift",
        results,
        [
            target("false_alarm_rate", false_alarms, FALSE_ALARM_GOAL, "<="),
            target("strong_shift_detection_rate", detected, STRONG_DETECTION_GOAL, ">="),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
