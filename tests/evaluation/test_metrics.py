"""Tests for imgclf.evaluation.metrics: hand-computed answers plus a seeded sklearn cross-check."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from imgclf.evaluation.metrics import compute_metrics, rollup_confusion

CLASSES = ["cat", "dog", "fox"]
# Rows: predictions cat, dog(wrong, 0.6), dog, dog, fox, cat(wrong, 0.9).
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.6, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.5, 0.3],
        [0.1, 0.1, 0.8],
        [0.9, 0.05, 0.05],
    ]
)
TARGETS = np.array([0, 0, 1, 1, 2, 2])
PATHS = [f"img{i}.jpg" for i in range(6)]


def _assert_plain(value) -> None:
    """JSON-serialisable with builtin types only (no numpy scalars sneaking through)."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert type(key) is str
            _assert_plain(item)
    elif isinstance(value, list):
        for item in value:
            _assert_plain(item)
    else:
        assert type(value) in (str, int, float, bool), (type(value), value)


def test_hand_built_three_class_case():
    m = compute_metrics(PROBS, TARGETS, CLASSES, PATHS)
    _assert_plain(m)
    json.dumps(m)
    assert m["n"] == 6
    assert m["top1"] == pytest.approx(4 / 6)
    assert m["top5"] == pytest.approx(1.0)  # only 3 classes: the true class is always in top 3
    assert m["confusion"] == {"labels": CLASSES, "matrix": [[1, 1, 0], [0, 2, 0], [1, 0, 1]]}
    pc = m["per_class"]
    assert pc["cat"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert pc["dog"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert pc["fox"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    # Two cells with count 1: ties are broken by the true label's name.
    assert m["most_confused"] == [
        {"true": "cat", "predicted": "dog", "count": 1},
        {"true": "fox", "predicted": "cat", "count": 1},
    ]
    assert "levels" not in m


def test_mistakes_most_confident_first_with_top3():
    mistakes = compute_metrics(PROBS, TARGETS, CLASSES, PATHS)["mistakes"]
    assert [x["path"] for x in mistakes] == ["img5.jpg", "img1.jpg"]
    first = mistakes[0]
    assert (first["true"], first["predicted"]) == ("fox", "cat")
    assert first["confidence"] == pytest.approx(0.9)
    assert [label for label, _ in first["top3"]] == ["cat", "dog", "fox"]
    assert [p for _, p in first["top3"]] == pytest.approx([0.9, 0.05, 0.05])
    limited = compute_metrics(PROBS, TARGETS, CLASSES, PATHS, max_mistakes=1)["mistakes"]
    assert [x["path"] for x in limited] == ["img5.jpg"]


def test_seeded_random_case_matches_sklearn():
    rng = np.random.default_rng(1234)
    n, c = 300, 8
    classes = [f"c{i}" for i in range(c)]
    probs = rng.dirichlet(np.ones(c) * 0.5, size=n)
    targets = rng.integers(0, c, size=n)
    # Make the model somewhat right so there is structure to measure.
    probs[np.arange(0, n, 2), targets[::2]] += 1.0
    probs /= probs.sum(axis=1, keepdims=True)
    paths = [f"p{i}.png" for i in range(n)]
    m = compute_metrics(probs, targets, classes, paths, max_mistakes=1000)
    preds = probs.argmax(axis=1)
    labels = list(range(c))
    assert m["top1"] == pytest.approx(accuracy_score(targets, preds))
    assert m["top5"] == pytest.approx(top_k_accuracy_score(targets, probs, k=5, labels=labels))
    assert m["confusion"]["matrix"] == confusion_matrix(targets, preds, labels=labels).tolist()
    prec, rec, f1, sup = precision_recall_fscore_support(targets, preds, labels=labels, zero_division=0)
    for i, name in enumerate(classes):
        got = m["per_class"][name]
        assert got["precision"] == pytest.approx(prec[i])
        assert got["recall"] == pytest.approx(rec[i])
        assert got["f1"] == pytest.approx(f1[i])
        assert got["support"] == sup[i]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(targets, preds))
    n_wrong = int(np.sum(preds != targets))
    conf = [x["confidence"] for x in m["mistakes"]]
    assert len(conf) == n_wrong
    assert conf == sorted(conf, reverse=True)
    assert all(x["true"] != x["predicted"] for x in m["mistakes"])


def test_most_confused_ordering_and_limit():
    rng = np.random.default_rng(7)
    c = 6
    classes = [f"k{i}" for i in range(c)]
    targets = rng.integers(0, c, size=400)
    preds = rng.integers(0, c, size=400)
    probs = np.full((400, c), 0.1 / (c - 1))
    probs[np.arange(400), preds] = 0.9
    m = compute_metrics(probs, targets, classes, [str(i) for i in range(400)])
    cm = confusion_matrix(targets, preds, labels=list(range(c)))
    off = cm - np.diag(np.diag(cm))
    entries = m["most_confused"]
    assert len(entries) == 10
    counts = [e["count"] for e in entries]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == off.max()
    keys = [(-e["count"], e["true"], e["predicted"]) for e in entries]
    assert keys == sorted(keys)
    for e in entries:
        assert e["true"] != e["predicted"]
        assert cm[classes.index(e["true"]), classes.index(e["predicted"])] == e["count"]


def test_top5_needs_true_class_in_top_five():
    c = 7
    classes = [f"c{i}" for i in range(c)]
    # True class ranked 5th for row 0 (counts) and 6th for row 1 (does not).
    row = np.array([0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05])
    probs = np.stack([row, row])
    m = compute_metrics(probs, np.array([4, 5]), classes, ["a", "b"])
    assert m["top1"] == 0.0
    assert m["top5"] == pytest.approx(0.5)


def test_hierarchical_levels():
    classes = ["A > x", "A > y", "B > z"]
    probs = np.array(
        [
            [0.8, 0.1, 0.1],  # true A>y, predicted A>x: right at depth 1, wrong at depth 2
            [0.1, 0.8, 0.1],  # true A>y, right
            [0.7, 0.2, 0.1],  # true B>z, predicted A>x: wrong at both depths
            [0.6, 0.3, 0.1],  # true A>x, right
        ]
    )
    targets = np.array([1, 1, 2, 0])
    m = compute_metrics(probs, targets, classes, ["a", "b", "c", "d"])
    assert m["levels"] == [
        {"depth": 1, "accuracy": pytest.approx(0.75), "n": 4},
        {"depth": 2, "accuracy": pytest.approx(0.5), "n": 4},
    ]
    assert m["top1"] == pytest.approx(0.5)


def test_levels_with_labels_of_different_depths():
    classes = ["A", "A > x", "B > y > z"]
    probs = np.array([[0.1, 0.9, 0.0], [0.0, 0.1, 0.9]])
    # Row 0: true "A", predicted "A > x": same first level, but "A" != "A > x" below that.
    m = compute_metrics(probs, np.array([0, 2]), classes, ["a", "b"])
    assert [lv["depth"] for lv in m["levels"]] == [1, 2, 3]
    assert [lv["accuracy"] for lv in m["levels"]] == pytest.approx([1.0, 0.5, 0.5])


def test_custom_separator():
    m = compute_metrics(np.array([[0.9, 0.1]]), np.array([1]), ["a/x", "a/y"], ["p"], separator="/")
    assert [lv["accuracy"] for lv in m["levels"]] == [1.0, 0.0]


def test_no_images_raises():
    with pytest.raises(ValueError, match="no images to evaluate"):
        compute_metrics(np.zeros((0, 3)), np.zeros(0, dtype=int), CLASSES, [])


def test_mismatched_inputs_raise():
    with pytest.raises(ValueError):
        compute_metrics(PROBS, TARGETS, CLASSES, PATHS[:-1])
    with pytest.raises(ValueError):
        compute_metrics(PROBS, TARGETS, CLASSES[:2], PATHS)
    with pytest.raises(ValueError):
        compute_metrics(PROBS, np.array([0, 0, 1, 1, 2, 3]), CLASSES, PATHS)


def test_single_class():
    m = compute_metrics(np.ones((3, 1)), np.zeros(3, dtype=int), ["only"], ["a", "b", "c"])
    _assert_plain(m)
    assert m["top1"] == 1.0 and m["top5"] == 1.0
    assert m["confusion"]["matrix"] == [[3]]
    assert m["most_confused"] == [] and m["mistakes"] == []
    assert m["per_class"]["only"]["support"] == 3
    assert m["macro_f1"] == 1.0 and m["balanced_accuracy"] == 1.0


def test_balanced_accuracy_skips_classes_without_images():
    # "fox" has no images and is never predicted: it must not count as a 0 recall or 0 F1.
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    m = compute_metrics(probs, np.array([0, 1, 1]), CLASSES, ["a", "b", "c"])
    assert m["per_class"]["fox"]["support"] == 0
    assert m["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_rollup_preserves_sums_and_merges_prefixes():
    confusion = {
        "labels": ["B > z", "A > x", "A > y"],  # deliberately unsorted
        "matrix": [[5, 1, 2], [3, 7, 4], [0, 6, 8]],
    }
    rolled = rollup_confusion(confusion, depth=1)
    assert rolled["labels"] == ["A", "B"]
    # A->A = 7+4+6+8, A->B = 3+0, B->A = 1+2, B->B = 5
    assert rolled["matrix"] == [[25, 3], [3, 5]]
    assert sum(map(sum, rolled["matrix"])) == sum(map(sum, confusion["matrix"]))
    full = rollup_confusion(confusion, depth=2)
    assert full["labels"] == ["A > x", "A > y", "B > z"]
    assert full["matrix"] == [[7, 4, 3], [6, 8, 0], [1, 2, 5]]
    _assert_plain(rolled)


def test_rollup_from_compute_metrics_matches_levels():
    rng = np.random.default_rng(3)
    classes = ["M > shoes > a", "M > shoes > b", "M > shirts > c", "W > shoes > d"]
    probs = rng.dirichlet(np.ones(4), size=120)
    targets = rng.integers(0, 4, size=120)
    m = compute_metrics(probs, targets, classes, [str(i) for i in range(120)])
    for depth in (1, 2, 3):
        rolled = np.array(rollup_confusion(m["confusion"], depth)["matrix"])
        assert rolled.sum() == 120
        # The diagonal of the rolled-up matrix is exactly the depth-d accuracy.
        assert np.trace(rolled) / 120 == pytest.approx(m["levels"][depth - 1]["accuracy"])


def test_rollup_rejects_bad_depth():
    with pytest.raises(ValueError):
        rollup_confusion({"labels": ["a"], "matrix": [[1]]}, depth=0)
