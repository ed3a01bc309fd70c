"""Tests for imgclf.evaluation.plots: the PNGs are real, readable and sized sensibly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imgclf.evaluation.plots import confused_subset, plot_confusion, plot_history


def _open(path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img


def _confusion(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    matrix = np.diag(rng.integers(5, 20, size=n))
    return {"labels": [f"class {i}" for i in range(n)], "matrix": matrix.tolist()}


def test_plot_confusion_writes_png(tmp_path):
    confusion = {"labels": ["cat", "dog", "fox"], "matrix": [[1, 1, 0], [0, 2, 0], [0, 0, 0]]}
    out = plot_confusion(confusion, tmp_path / "sub" / "cm.png")  # folder is created
    assert out == tmp_path / "sub" / "cm.png"
    img = _open(out)
    assert img.format == "PNG"
    assert 300 <= img.width <= 3000 and 300 <= img.height <= 3000


def test_confused_subset_picks_the_confused_classes():
    matrix = np.diag(np.full(50, 10))
    # Confusions among classes 3, 17, 40 and 41; everything else is perfect.
    matrix[3, 17] = 5
    matrix[17, 3] = 2
    matrix[40, 41] = 4
    matrix[41, 3] = 1
    assert confused_subset(matrix, 4) == [3, 17, 40, 41]
    assert confused_subset(matrix, 2) == [3, 17]
    assert confused_subset(matrix.tolist(), 60) == list(range(50))


def test_large_confusion_is_reduced_to_sub_block(tmp_path):
    big = _confusion(50)
    matrix = np.array(big["matrix"])
    matrix[7, 8] = 3
    big["matrix"] = matrix.tolist()
    reduced = _open(plot_confusion(big, tmp_path / "big.png", max_classes=30))
    same_size = _open(plot_confusion(_confusion(30), tmp_path / "thirty.png", max_classes=30))
    # The figure grows with the number of classes drawn, so 30 drawn of 50 == 30 of 30.
    assert reduced.size == same_size.size
    small = _open(plot_confusion(_confusion(5), tmp_path / "five.png"))
    assert small.width < reduced.width and small.height < reduced.height


def test_plot_history_with_missing_and_nan_values(tmp_path):
    history = [
        {"epoch": 1, "train_loss": 2.0, "val_loss": float("nan"), "train_acc": 0.3, "val_top1": float("nan")},
        {"epoch": 2, "train_loss": 1.5, "val_loss": 1.6, "train_acc": 0.5, "val_top1": 0.45},
        {"epoch": 3, "train_loss": 1.1, "train_acc": 0.6},  # val missing entirely
        {"epoch": 4, "train_loss": 0.9, "val_loss": 1.2, "train_acc": 0.7, "val_top1": None},
    ]
    out = plot_history(history, tmp_path / "history.png", best_epoch=2)
    img = _open(out)
    assert img.format == "PNG"
    assert img.width > img.height  # two panels side by side
    assert img.width >= 600


def test_plot_history_single_epoch_no_val(tmp_path):
    out = plot_history([{"epoch": 1, "train_loss": 1.0, "train_acc": 0.4}], tmp_path / "h.png")
    assert _open(out).format == "PNG"


def test_plot_history_empty_raises(tmp_path):
    with pytest.raises(ValueError):
        plot_history([], tmp_path / "h.png")
