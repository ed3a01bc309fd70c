"""Pictures for the evaluation report: a confusion heatmap and training curves.

Each function writes one PNG and returns its path. The Agg backend is selected before pyplot is
imported because reports are made on headless machines (servers, CI) with no display.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

from imgclf.core.atomic import atomic_write
from imgclf.core.errors import ImageError
from imgclf.data.sources import open_sample

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)

_DPI = 110
_ANNOTATE_MAX = 15


def confused_subset(matrix: np.ndarray | list, k: int) -> list[int]:
    """Indices (ascending) of the ``k`` classes most involved in off-diagonal confusion.

    A class's score is the images it lost to others plus the images others lost to it, so both
    sides of a bad pair are kept. Ties go to the lower index, making the choice deterministic.
    """
    m = np.asarray(matrix, dtype=np.float64)
    n = m.shape[0]
    if k >= n:
        return list(range(n))
    off = m - np.diag(np.diag(m))
    score = off.sum(axis=1) + off.sum(axis=0)
    chosen = np.argsort(-score, kind="stable")[: max(k, 0)]
    return sorted(int(i) for i in chosen)


def _row_normalise(matrix: np.ndarray) -> np.ndarray:
    """Each row as a fraction of its true class, so small and large classes read alike."""
    sums = matrix.sum(axis=1, keepdims=True)
    # Rows with no images stay all zero instead of becoming NaN.
    return np.divide(matrix, sums, out=np.zeros_like(matrix, dtype=np.float64), where=sums > 0)


def _annotate(ax, counts: np.ndarray, fractions: np.ndarray) -> None:
    """Write raw counts in the cells; white text on dark cells so it stays readable."""
    for t in range(counts.shape[0]):
        for p in range(counts.shape[1]):
            colour = "white" if fractions[t, p] > 0.5 else "black"
            ax.text(p, t, str(int(counts[t, p])), ha="center", va="center", color=colour, fontsize=8)


def plot_confusion(confusion: dict, path: str | Path, max_classes: int = 30, title: str = "Confusion matrix") -> Path:
    """Heatmap of a ``{"labels", "matrix"}`` confusion dict, normalised per true class.

    With more than ``max_classes`` classes only the most-confused ones are drawn: a full
    hundreds-of-classes matrix is an unreadable blur. Their rows keep the normalisation over all
    classes, so a cell still reads as "fraction of this class's images".
    """
    labels = list(confusion["labels"])
    counts = np.asarray(confusion["matrix"], dtype=np.int64).reshape(len(labels), len(labels))
    fractions = _row_normalise(counts)
    if len(labels) > max_classes:
        keep = confused_subset(counts, max_classes)
        title = f"{title} ({len(keep)} most-confused of {len(labels)} classes)"
        counts, fractions = counts[np.ix_(keep, keep)], fractions[np.ix_(keep, keep)]
        labels = [labels[i] for i in keep]
    k = len(labels)
    side = min(4.0 + 0.35 * k, 40.0)  # grow with the classes, but stay a sane image size
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    try:
        image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
        fontsize = 9 if k <= 30 else 7
        ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=fontsize)
        ax.set_yticks(range(k), labels, fontsize=fontsize)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(title)
        if k <= _ANNOTATE_MAX:
            _annotate(ax, counts, fractions)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)  # pyplot keeps figures alive otherwise; reports make many of them


def _column(history: list[dict], key: str) -> np.ndarray:
    """One metric over epochs; missing or None values become NaN, which pyplot leaves as gaps."""
    values = []
    for row in history:
        value = row.get(key)
        values.append(float("nan") if value is None else float(value))
    return np.asarray(values, dtype=np.float64)


def _curves(ax, epochs: np.ndarray, series: list[tuple[str, np.ndarray]], ylabel: str, best_epoch: int | None) -> None:
    """Draw one panel; all-NaN series are skipped so the legend lists only real curves."""
    for label, values in series:
        if not np.all(np.isnan(values)):
            # Markers keep a one-epoch run (a single point, no line) visible.
            ax.plot(epochs, values, marker="o", markersize=3, label=label)
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch ({best_epoch})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def plot_history(history: list[dict], path: str | Path, best_epoch: int | None = None) -> Path:
    """Loss and accuracy curves side by side, with the chosen (best) epoch marked.

    Seeing train and val together is how over- and under-fitting are spotted.
    """
    if not history:
        raise ValueError("no epochs in history to plot")
    epochs = np.asarray([int(row["epoch"]) for row in history])
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    try:
        _curves(
            loss_ax,
            epochs,
            [("train loss", _column(history, "train_loss")), ("val loss", _column(history, "val_loss"))],
            "loss",
            best_epoch,
        )
        _curves(
            acc_ax,
            epochs,
            [("train acc", _column(history, "train_acc")), ("val top-1", _column(history, "val_top1"))],
            "accuracy",
            best_epoch,
        )
        loss_ax.set_title("Loss")
        acc_ax.set_title("Accuracy")
        # Whole-number ticks: fractional epochs do not exist.
        for ax in (loss_ax, acc_ax):
            ax.xaxis.get_major_locator().set_params(integer=True)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def _save(fig, path: str | Path) -> Path:
    """Write the figure atomically, creating the folder, so callers can pass a fresh report directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda temp: fig.savefig(temp, dpi=_DPI, format=path.suffix.lstrip(".") or "png"))
    return path


def plot_leaderboard(rows: list[dict], path: str | Path) -> Path:
    """Horizontal bars of validation and test top-1 per candidate, best (by validation) on top."""
    labels = [f"{r['candidate']}" + (f" (n={r['per_class']})" if r["per_class"] != "all" else "") for r in rows]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(rows)))
    try:
        ax.barh(y - 0.2, [100 * r["val_top1"] for r in rows], height=0.4, label="validation top-1")
        ax.barh(y + 0.2, [100 * r["test_top1"] for r in rows], height=0.4, label="test top-1")
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("top-1 accuracy (%)")
        ax.legend(loc="lower right")
        ax.set_title("Candidates, ranked by validation top-1")
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_accuracy_vs_n(rows: list[dict], path: str | Path) -> Path:
    """Test top-1 against training photos per class, one line per candidate."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for candidate in dict.fromkeys(r["candidate"] for r in rows):
            points = sorted(
                (r["per_class"], r["test_top1"])
                for r in rows
                if r["candidate"] == candidate and r["per_class"] != "all"
            )
            ax.plot([n for n, _ in points], [100 * a for _, a in points], marker="o", label=candidate)
        ax.set_xscale("log")
        ax.set_xlabel("training photos per class")
        ax.set_ylabel("test top-1 accuracy (%)")
        ax.set_title("How many photos do I need?")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_reliability(calibration: dict, path: str | Path) -> Path:
    """Reliability diagram: accuracy against confidence per bin, before and after temperature scaling."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    try:
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
        for key, label in (
            ("bins_before", f"before (ECE {calibration['ece_before']:.3f})"),
            ("bins_after", f"after T={calibration['temperature']:.2f} (ECE {calibration['ece_after']:.3f})"),
        ):
            bins = calibration[key]
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", label=label)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top probability)")
        ax.set_ylabel("accuracy")
        ax.set_title("Reliability on the evaluation images")
        ax.legend(loc="upper left")
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_embedding_map(
    points: np.ndarray, labels: list[str], path: str | Path, method: str, thumbs: list | None = None
) -> Path:
    """2-D map of embeddings coloured by class; small sets get their photos drawn on the map."""
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    fig, ax = plt.subplots(figsize=(9, 8))
    try:
        classes = sorted(set(labels))
        colours = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
        for i, label in enumerate(classes):
            mask = np.array([lab == label for lab in labels])
            ax.scatter(points[mask, 0], points[mask, 1], s=12, color=colours(i % colours.N), label=label)
        if thumbs:
            for (x, y), sample in zip(points, thumbs):
                try:
                    image = open_sample(sample).resize((32, 32))
                except ImageError:
                    continue
                ax.add_artist(AnnotationBbox(OffsetImage(np.asarray(image), zoom=0.6), (x, y), frameon=False))
        if len(classes) <= 25:
            ax.legend(markerscale=2, fontsize=8, loc="best")
        ax.set_title(f"Embeddings ({method}), coloured by class")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)
