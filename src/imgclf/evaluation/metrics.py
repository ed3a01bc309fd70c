"""Evaluation numbers for a classifier, computed from its predicted probabilities.

Everything here is a pure function of arrays (no files, no model, no torch) so it can be tested
exactly and reused for val during training and for the final test report alike. The result is a
plain dict of Python scalars and lists so it can be written straight to JSON.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

_MOST_CONFUSED = 10
_TOP_K = 5
_TOP_SHOWN = 3


def compute_metrics(
    probs: np.ndarray,
    targets: np.ndarray,
    classes: list[str],
    paths: list[str],
    separator: str = " > ",
    max_mistakes: int = 200,
) -> dict:
    """All evaluation numbers for one split, as a JSON-serialisable dict.

    ``probs`` is (n, C) with columns in ``classes`` order, ``targets`` holds class indices and
    ``paths`` names each row's image, so that the worst mistakes can be looked at by a person.
    """
    probs, targets = _validate(probs, targets, classes, paths)
    n, n_classes = probs.shape
    ranked = _rank(probs)
    preds = ranked[:, 0]
    k = min(_TOP_K, n_classes)
    matrix = _confusion(targets, preds, n_classes)
    per_class, macro_f1, balanced = _per_class(targets, preds, classes)
    result: dict = {
        "n": int(n),
        "top1": float(np.mean(preds == targets)),
        "top5": float(np.mean(np.any(ranked[:, :k] == targets[:, None], axis=1))),
        "per_class": per_class,
        "macro_f1": macro_f1,
        "balanced_accuracy": balanced,
        "confusion": {"labels": list(classes), "matrix": matrix.astype(int).tolist()},
        "most_confused": _most_confused(matrix, classes),
        "mistakes": _mistakes(probs, ranked, targets, classes, paths, max_mistakes),
    }
    if any(separator in name for name in classes):
        result["levels"] = _levels(preds, targets, classes, separator)
    return result


def _validate(
    probs: np.ndarray, targets: np.ndarray, classes: list[str], paths: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Fail early with a readable message instead of a confusing sklearn/numpy error later."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets).astype(np.int64).reshape(-1)
    if probs.ndim != 2:
        raise ValueError(f"probs must be 2-D (n, C), got shape {probs.shape}")
    if probs.shape[0] == 0 or targets.size == 0:
        raise ValueError("no images to evaluate")
    n, n_classes = probs.shape
    if n_classes != len(classes) or n_classes == 0:
        raise ValueError(f"probs has {n_classes} columns but there are {len(classes)} classes")
    if targets.shape[0] != n or len(paths) != n:
        raise ValueError(f"{n} probability rows, {targets.shape[0]} targets, {len(paths)} paths")
    if targets.min() < 0 or targets.max() >= n_classes:
        raise ValueError(f"targets must be class indices in [0, {n_classes})")
    return probs, targets


def _confusion(targets: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts with rows = true class, columns = predicted class, over every class."""
    with warnings.catch_warnings():
        # sklearn warns on any 1x1 result, even though we pass all labels so one class is right.
        warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
        return confusion_matrix(targets, preds, labels=list(range(n_classes)))


def _rank(probs: np.ndarray) -> np.ndarray:
    """Class indices per row, most probable first.

    A stable sort means exact ties go to the lower class index, matching ``argmax``.
    """
    return np.argsort(-probs, axis=1, kind="stable")


def _per_class(targets: np.ndarray, preds: np.ndarray, classes: list[str]) -> tuple[dict, float, float]:
    """Per-class precision/recall/F1/support, macro F1 and balanced accuracy.

    Macro F1 averages over classes that occur in the targets or the predictions (sklearn's
    default): a class never seen and never predicted says nothing about the model and would
    otherwise drag the average down with a meaningless 0. Balanced accuracy likewise skips
    classes with no images, because their recall is undefined.
    """
    labels = list(range(len(classes)))
    prec, rec, f1, support = precision_recall_fscore_support(targets, preds, labels=labels, zero_division=0)
    per_class = {
        name: {
            "precision": float(prec[i]),
            "recall": float(rec[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    }
    seen = np.zeros(len(classes), dtype=bool)
    seen[np.unique(np.concatenate([targets, preds]))] = True
    macro_f1 = float(np.mean(f1[seen]))
    balanced = float(np.mean(rec[support > 0]))
    return per_class, macro_f1, balanced


def _most_confused(matrix: np.ndarray, classes: list[str]) -> list[dict]:
    """The off-diagonal cells with the most images: the pairs worth looking at first."""
    cells = [(int(matrix[t, p]), classes[t], classes[p]) for t, p in zip(*np.nonzero(matrix)) if t != p]
    # Label names break ties so the report is identical from run to run.
    cells.sort(key=lambda cell: (-cell[0], cell[1], cell[2]))
    return [{"true": true, "predicted": pred, "count": count} for count, true, pred in cells[:_MOST_CONFUSED]]


def _mistakes(
    probs: np.ndarray,
    ranked: np.ndarray,
    targets: np.ndarray,
    classes: list[str],
    paths: list[str],
    limit: int,
) -> list[dict]:
    """Misclassified images, most confidently wrong first.

    Confident mistakes are the most informative ones: they are often mislabelled images or
    near-duplicate classes rather than merely hard photos.
    """
    preds = ranked[:, 0]
    wrong = np.nonzero(preds != targets)[0]
    confidence = probs[wrong, preds[wrong]]
    # Path breaks ties so equal confidences come out in a reproducible order.
    order = sorted(range(len(wrong)), key=lambda j: (-confidence[j], str(paths[wrong[j]])))
    shown = min(_TOP_SHOWN, probs.shape[1])
    out = []
    for j in order[: max(limit, 0)]:
        i = wrong[j]
        out.append(
            {
                "path": str(paths[i]),
                "true": classes[targets[i]],
                "predicted": classes[preds[i]],
                "confidence": float(confidence[j]),
                "top3": [[classes[c], float(probs[i, c])] for c in ranked[i, :shown]],
            }
        )
    return out


def _prefix(label: str, depth: int, separator: str) -> str:
    """The first ``depth`` levels of a hierarchical label (the whole label if it is shorter)."""
    return separator.join(label.split(separator)[:depth])


def _levels(preds: np.ndarray, targets: np.ndarray, classes: list[str], separator: str) -> list[dict]:
    """Accuracy at each depth of a label hierarchy.

    A model that confuses two kinds of sneaker is far more useful than one that confuses shoes
    with shirts; per-depth accuracy shows which of the two is happening.
    """
    max_depth = max(len(name.split(separator)) for name in classes)
    levels = []
    for depth in range(1, max_depth + 1):
        names = np.array([_prefix(name, depth, separator) for name in classes], dtype=object)
        right = names[preds] == names[targets]
        levels.append({"depth": depth, "accuracy": float(np.mean(right)), "n": int(len(targets))})
    return levels


def rollup_confusion(confusion: dict, depth: int, separator: str = " > ") -> dict:
    """Collapse a confusion dict to the first ``depth`` levels of its hierarchical labels.

    Large hierarchies give confusion matrices too big to read; summing cells by label prefix
    gives a small matrix of the coarse mistakes. Totals are preserved.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    labels = list(confusion["labels"])
    matrix = np.asarray(confusion["matrix"], dtype=np.int64).reshape(len(labels), len(labels))
    prefixes = [_prefix(name, depth, separator) for name in labels]
    rolled = sorted(set(prefixes))
    index = np.array([rolled.index(p) for p in prefixes], dtype=np.int64)
    out = np.zeros((len(rolled), len(rolled)), dtype=np.int64)
    # np.add.at accumulates repeated (row, col) pairs, which plain fancy-index assignment drops.
    np.add.at(out, (index[:, None], index[None, :]), matrix)
    return {"labels": rolled, "matrix": out.tolist()}
