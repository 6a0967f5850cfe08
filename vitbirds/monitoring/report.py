"""The monitor's HTML report: the decision and its reasons first, then the evidence.

One self-contained page (figures are embedded PNGs): verdict, drift tests, accuracy estimates,
labelled metrics with confidence intervals, drift over time windows, the confidence histograms
and the retraining command. Built from monitor.json's dict plus the raw scores for the figures.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from vitbirds.evaluation.html_page import escape, figure_png, image, page, section, table
from vitbirds.monitoring.assess import LABEL_FREE_TESTS, Observations

_STYLE = """
.verdict { font-size: 1.6em; font-weight: bold; padding: 0.4em 0.8em; display: inline-block; }
.OK { background: #d4edda; } .WATCH { background: #fff3cd; } .RETRAIN { background: #f8d7da; }
code { background: #f4f4f4; padding: 0.2em 0.4em; word-break: break-all; }
"""


def render_report(result: dict[str, Any], reference: Observations, observed: Observations) -> str:
    """`result` is monitor.json; `reference`/`observed` give the histograms their data."""
    assessment = result["assessment"]
    decision = assessment["decision"]
    model = result["model"]
    title = f"Monitor: {model['name']} {model['version']}"
    return page(
        title,
        [
            f'<p id="decision" class="verdict {escape(decision)}">{escape(decision)}</p>',
            '<ul id="reasons">'
            + "".join(f"<li>{escape(r)}</li>" for r in assessment["reasons"])
            + "</ul>",
            _source_section(result),
            _tests_section(assessment),
            _estimates_section(assessment),
            _labelled_section(assessment.get("labelled")),
            _windows_section(result.get("windows") or [], assessment),
            _scores_section(reference, observed),
            _retrain_section(result.get("retrain")),
        ],
        _STYLE,
    )


def _source_section(result: dict[str, Any]) -> str:
    source = result["source"]
    assessment = result["assessment"]
    rows = [
        ("source", source["kind"]),
        ("path", source["path"]),
        ("predictions assessed", assessment["num_observed"]),
        ("reference predictions", assessment["num_reference"]),
    ]
    rows += [(k, v) for k, v in source.items() if k not in ("kind", "path")]
    period = assessment.get("period") or {}
    if period:
        rows.append(("period", f"{period['first']} .. {period['last']}"))
    return section("source", "What was assessed", table("source", ("", ""), rows))


def _tests_section(assessment: dict[str, Any]) -> str:
    tests = assessment["tests"]
    if not tests:
        return ""
    alpha = assessment["alpha_per_test"]
    rows = [
        (
            name,
            round(t["statistic"], 4),
            f"{t['p_value']:.2g}",
            "yes" if t["p_value"] < alpha else "no",
            f"{t['effect_name']} {t['effect']:+.3f}",
        )
        for name, t in tests.items()
    ]
    body = (
        f"<p>Each test at alpha {alpha:.2g} (Bonferroni over {len(tests)} tests). "
        "Domain classifier AUROC on the embeddings: "
        f"{_fmt(assessment.get('domain_auroc'))} (0.5: indistinguishable, 1: separable).</p>"
        + table("tests", ("test", "statistic", "p-value", "significant", "effect"), rows)
    )
    moved = tests.get("predicted_class", {}).get("detail", {}).get("moved", [])
    if moved:
        body += "<p>Predicted classes whose share moved most:</p>" + table(
            "moved",
            ("class", "reference share", "observed share"),
            [
                (m["class"], f"{m['reference_share']:.1%}", f"{m['observed_share']:.1%}")
                for m in moved
            ],
        )
    return section("tests", "Drift tests (no labels needed)", body)


def _estimates_section(assessment: dict[str, Any]) -> str:
    rows = [
        ("reference accuracy (validation split)", f"{assessment['reference_accuracy']:.1%}"),
        (
            "estimated: mean temperature-scaled confidence",
            f"{assessment['estimated_accuracy']:.1%}",
        ),
        ("estimated: ATC (Garg et al. 2022)", f"{assessment['atc_accuracy']:.1%}"),
    ]
    note = (
        "<p>Both estimates assume the model is about as calibrated on new data as on its "
        "validation split; out of domain (high domain AUROC) they overestimate.</p>"
    )
    return section(
        "estimates", "Accuracy without labels", table("estimates", ("", ""), rows) + note
    )


def _labelled_section(labelled: dict[str, Any] | None) -> str:
    if not labelled:
        return ""
    rows = []
    for name, observed in labelled["observed"].items():
        reference, drop = labelled["reference"][name], labelled["drop"][name]
        rows.append(
            (
                name,
                _interval(reference),
                _interval(observed),
                f"{drop['estimate']:+.3f} [{drop['low']:+.3f}, {drop['high']:+.3f}]",
            )
        )
    confidence = next(iter(labelled["observed"].values()))["confidence"]
    body = (
        f"<p>{labelled['num_labelled']} labelled predictions; {confidence:.0%} percentile "
        "bootstrap intervals.</p>"
        + table("labelled", ("metric", "reference", "observed", "drop (ref - obs)"), rows)
    )
    drops = labelled["dropped_classes"][:15]
    if drops:
        body += "<p>Classes whose recall fell (one-sided Fisher exact, BH q-values):</p>" + table(
            "dropped",
            ("class", "reference recall", "observed recall", "n ref / obs", "p", "q"),
            [
                (
                    d["name"],
                    f"{d['reference_recall']:.0%}",
                    f"{d['observed_recall']:.0%}",
                    f"{d['reference_support']} / {d['observed_support']}",
                    f"{d['p_value']:.2g}",
                    f"{d['q_value']:.2g}",
                )
                for d in drops
            ],
        )
    return section("labelled", "Measured quality (labelled data)", body)


def _windows_section(windows: list[dict[str, Any]], assessment: dict[str, Any]) -> str:
    if not windows:
        return ""
    rows = [
        (
            w["start"],
            w["num_observed"],
            f"{w['estimated_accuracy']:.1%}",
            f"{w['atc_accuracy']:.1%}",
            f"{w['mean_confidence']:.3f}",
            *(f"{w['p_values'][t]:.2g}" if t in w["p_values"] else "-" for t in LABEL_FREE_TESTS),
            ", ".join(w["significant"]) or "-",
        )
        for w in windows
    ]
    header = (
        "window start",
        "n",
        "est. accuracy",
        "ATC",
        "mean conf",
        *(f"p {t}" for t in LABEL_FREE_TESTS),
    )
    body = image(_windows_png(windows, assessment), "drift over time") + table(
        "windows", (*header, "significant"), rows
    )
    return section("windows", "Drift over time", body)


def _scores_section(reference: Observations, observed: Observations) -> str:
    figure = Figure(figsize=(10, 3.2))
    for axis, (label, ref, obs) in zip(
        figure.subplots(1, 2),
        (
            ("top-1 confidence", reference.confidence, observed.confidence),
            ("entropy (nats)", reference.truncated(observed.top_k).entropy, observed.entropy),
        ),
        strict=True,
    ):
        bins = np.linspace(min(ref.min(), obs.min()), max(ref.max(), obs.max()), 30)
        axis.hist(ref, bins=bins, density=True, alpha=0.5, label="reference")
        axis.hist(obs, bins=bins, density=True, alpha=0.5, label="observed")
        axis.set_xlabel(label)
        axis.legend()
    return section(
        "scores", "Score distributions", image(figure_png(figure, dpi=90), "score histograms")
    )


def _retrain_section(retrain: dict[str, Any] | None) -> str:
    if not retrain:
        return ""
    body = f"<p>Retraining command:</p><p><code>{escape(retrain['command'])}</code></p>"
    if retrain.get("job_id"):
        body += (
            f"<p>Submitted to {escape(retrain['address'])} as job "
            f"<code>{escape(retrain['job_id'])}</code>.</p>"
        )
    return section("retrain", "Retraining", body)


def _windows_png(windows: list[dict[str, Any]], assessment: dict[str, Any]) -> bytes:
    figure = Figure(figsize=(10, 5.5))
    top, bottom = figure.subplots(2, 1, sharex=True)
    x = np.arange(len(windows))
    for test in LABEL_FREE_TESTS:
        values = [-np.log10(max(w["p_values"].get(test, np.nan), 1e-300)) for w in windows]
        top.plot(x, values, marker="o", label=test)
    top.axhline(-np.log10(assessment["alpha_per_test"]), color="red", linestyle="--",
                label="alpha per test")  # fmt: skip
    top.set_ylabel("-log10 p")
    top.legend(fontsize=8, ncol=3)
    bottom.plot(x, [w["estimated_accuracy"] for w in windows], marker="o", label="calibrated conf.")
    bottom.plot(x, [w["atc_accuracy"] for w in windows], marker="s", label="ATC")
    bottom.axhline(assessment["reference_accuracy"], color="gray", linestyle="--",
                   label="reference accuracy")  # fmt: skip
    bottom.set_ylabel("accuracy")
    bottom.legend(fontsize=8)
    counts = bottom.twinx()
    counts.bar(x, [w["num_observed"] for w in windows], alpha=0.15, color="black")
    counts.set_ylabel("predictions")
    bottom.set_xticks(x, [w["start"][5:16] for w in windows], rotation=45, fontsize=8)
    return figure_png(figure, dpi=90)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _interval(values: dict[str, float]) -> str:
    return f"{values['estimate']:.3f} [{values['low']:.3f}, {values['high']:.3f}]"
