"""The evaluation's figures, drawn with matplotlib's object API (no pyplot global state, so safe
inside Ray workers): learning curves, the confusion matrix in an order that puts mutual confusions
side by side, and the reliability diagram."""

from collections.abc import Sequence

import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform

from vitbirds.evaluation.html_page import figure_png
from vitbirds.evaluation.metrics import ClassificationReport

TICK_LABEL_LIMIT = 40  # beyond this many classes, names on the confusion axes are unreadable
ZOOM_CLASSES = 30  # classes in the named close-up of the confusion matrix, when there are more

_CURVES = (
    ("Loss", ("train_loss", "val_loss")),
    ("Accuracy", ("train_top1", "val_top1", "val_top5")),
)


def learning_curves_png(history: list[dict[str, float]]) -> bytes:
    """Loss and accuracy per epoch, one panel each, for whichever of those keys exist."""
    figure = Figure(figsize=(10, 3.5))
    axes = figure.subplots(1, 2)
    epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
    for ax, (name, keys) in zip(axes, _CURVES, strict=True):
        for key in keys:
            points = [(e, row[key]) for e, row in zip(epochs, history, strict=True) if key in row]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    return figure_png(figure)


def confusion_order(confusion: np.ndarray) -> np.ndarray:
    """A class order that puts mutually confused classes next to each other.

    Average-linkage clustering on 1 - (symmetrised, row-normalised confusion); classes never
    confused keep their label order at the end of the dendrogram's leaves.
    """
    support = confusion.sum(axis=1, keepdims=True)
    rates = np.divide(confusion, support, out=np.zeros(confusion.shape), where=support > 0)
    similarity = rates + rates.T
    np.fill_diagonal(similarity, 0.0)
    if similarity.max() <= 0 or len(confusion) < 3:
        return np.arange(len(confusion))
    distance = 1.0 - similarity / similarity.max()
    np.fill_diagonal(distance, 0.0)
    return leaves_list(linkage(squareform(distance, checks=False), method="average"))


def most_confused_classes(confusion: np.ndarray, limit: int) -> np.ndarray:
    """Up to `limit` classes with the largest share of confusions, as the true class or as the
    prediction (row-normalised rates), in an order that puts mutual confusions side by side."""
    support = confusion.sum(axis=1, keepdims=True)
    rates = np.divide(confusion, support, out=np.zeros(confusion.shape), where=support > 0)
    np.fill_diagonal(rates, 0.0)
    involvement = rates.sum(axis=0) + rates.sum(axis=1)
    involved = np.flatnonzero(involvement > 0)
    chosen = np.sort(involved[np.argsort(-involvement[involved], kind="stable")][:limit])
    return chosen[confusion_order(confusion[np.ix_(chosen, chosen)])]


def confusion_png(
    confusion: np.ndarray, class_names: Sequence[str], classes: np.ndarray | None = None
) -> bytes:
    """Row-normalised confusion matrix; named axes up to TICK_LABEL_LIMIT classes, else ordered
    by co-confusion without names. `classes` draws only those rows and columns, in that order
    and named (rates still over each class's whole support)."""
    c = len(confusion)
    support = confusion.sum(axis=1, keepdims=True)
    rates = np.divide(confusion, support, out=np.zeros(confusion.shape), where=support > 0)
    if classes is not None:
        order, c = np.asarray(classes), len(classes)
    else:
        order = np.arange(c) if c <= TICK_LABEL_LIMIT else confusion_order(confusion)
    rates = rates[np.ix_(order, order)]
    # Beyond the named range, at least ~2 screen pixels per class so no class row is dropped.
    side = 8 if c <= TICK_LABEL_LIMIT else min(14, max(8, 2 + 2.4 * c / 100))
    figure = Figure(figsize=(side, side))
    ax = figure.subplots()
    image = ax.imshow(rates, cmap="viridis", norm=PowerNorm(0.5, 0, 1), interpolation="nearest")
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if c <= TICK_LABEL_LIMIT:
        names = [class_names[i] for i in order]
        ax.set_xticks(range(c), names, rotation=90, fontsize=7)
        ax.set_yticks(range(c), names, fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    return figure_png(figure)


def reliability_png(report: ClassificationReport) -> bytes:
    """Accuracy per confidence bin against the diagonal, with the bin counts underneath."""
    figure = Figure(figsize=(5, 6))
    top, bottom = figure.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    bins = report.reliability
    centers = [(b.lower + b.upper) / 2 for b in bins]
    width = bins[0].upper - bins[0].lower
    accuracy = [b.accuracy or 0.0 for b in bins]
    top.bar(centers, accuracy, width=width * 0.95, color="#4c72b0", label="accuracy")
    confidence = [(x, b.confidence) for x, b in zip(centers, bins, strict=True) if b.count]
    if confidence:
        top.plot(*zip(*confidence, strict=True), "o", color="#dd8452", label="mean confidence")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"ECE = {report.ece:.4f}")
    top.legend(loc="upper left")
    bottom.bar(centers, [b.count for b in bins], width=width * 0.95, color="gray")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (top probability)")
    bottom.set_ylabel("images")
    return figure_png(figure)
