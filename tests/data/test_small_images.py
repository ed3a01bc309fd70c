"""The minimum-size rule judges a photo against its class: a data set whose photos are all small
(28x28, as MNIST-style sets are handed out) trains with the defaults, and a photo much smaller
than its class is still named (issue 14, acceptance 2)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

import imgclf
from imgclf.core.errors import DataError
from imgclf.core.settings import DataSettings
from imgclf.data.audit import audit
from imgclf.data.sources import scan


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """10 classes of about 100 grey 28x28 JPEGs: scikit-learn's digit scans, scaled up."""
    root = tmp_path_factory.mktemp("mnist-style") / "digits"
    digits = load_digits()
    for digit in range(10):
        (root / str(digit)).mkdir(parents=True)
        scans = digits.images[digits.target == digit][:100]
        for n, scan_8x8 in enumerate(scans):
            grey = Image.fromarray(np.uint8(scan_8x8 * (255 / 16)), "L").resize((28, 28), Image.Resampling.BILINEAR)
            grey.save(root / str(digit) / f"{n:03d}.jpg", quality=90)
    return root


def test_all_small_is_the_data_sets_resolution_and_an_outlier_is_named(small_set, tmp_path):
    events = []
    report = audit(scan(small_set), DataSettings(), events=events.append)
    assert report.problems == [] and len(report.usable) == sum(report.classes.values()) >= 990
    assert any("typical of their classes" in e.text for e in events if hasattr(e, "text"))
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(small_set, copy)
    Image.new("L", (8, 8), 128).save(copy / "3" / "outlier.jpg")
    report = audit(scan(copy), DataSettings())
    assert [p["path"].rsplit("/", 2)[-2:] for p in report.problems] == [["3", "outlier.jpg"]]
    assert "under half its class's typical 28 px" in report.problems[0]["reason"]


def test_a_1x10000_strip_and_a_1x1_dot_among_28px_photos_are_named_too_small(small_set, tmp_path):
    """BAD_INPUTS case 9 on the training side: both are refused by the size rule, by name."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(small_set, copy)
    Image.new("L", (10000, 1), 128).save(copy / "5" / "strip.png")
    Image.new("L", (1, 1), 128).save(copy / "7" / "dot.png")
    report = audit(scan(copy), DataSettings())
    named = sorted(p["path"].rsplit("/", 2)[-2:] for p in report.problems)
    assert named == [["5", "strip.png"], ["7", "dot.png"]], report.problems
    assert all("under half its class's typical 28 px" in p["reason"] for p in report.problems)


@pytest.mark.slow
def test_a_folder_of_28px_jpegs_trains_with_the_defaults(small_set, tmp_path):
    # the defaults but the time budget (10 minutes by default; the plan fits itself to 45 s)
    result = imgclf.train(small_set, tmp_path / "run", {"time_budget": "45s"})
    # a machine slowed by other work after the plan was measured stops at the budget, keeping its
    # best epoch: that is the budget doing its job; the accuracy below must hold either way
    assert result.status in ("finished", "stopped")
    top1 = imgclf.evaluate(tmp_path / "run", tmp_path / "eval")["top1"]
    print(f"28x28 digits, defaults, 45 s budget: test top-1 {top1:.3f}")
    assert top1 > 0.1 + 0.5, f"top-1 {top1:.3f}: chance is 0.1"


def test_an_error_after_skipped_files_says_how_many_why_and_what_to_change(tmp_path):
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for n in range(3):
            Image.new("RGB", (20, 20), (n * 40, 0, 0)).save(tmp_path / "data" / label / f"{n}.png")
    with pytest.raises(DataError) as caught:
        imgclf.train(tmp_path / "data", tmp_path / "run", {"max_pixels": 100, "time_budget": "0"})
    message = str(caught.value)
    assert "found none (6 files were skipped: 6 too many pixels" in message and "raise --max-pixels" in message
