"""compare: same split and seed for every candidate; the best is chosen by validation, not test."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from imgclf.cli import main
from tests.conftest import write_manifest


@pytest.mark.slow
def test_compare_writes_leaderboard_and_keeps_best_by_validation(digits_dir, tmp_path):
    manifest = write_manifest(digits_dir, tmp_path / "m.csv", per_class=60)
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                str(manifest),
                "--models",
                "cnn1,cnn3",
                "--per-class",
                "10,30",
                "--out",
                str(out),
                "--image-size",
                "24",
                "--epochs",
                "4",
                "--augment",
                "none",
            ]
        )
        == 0
    )
    board = json.loads((out / "leaderboard.json").read_text())
    rows = board["rows"]
    assert {(r["candidate"], r["per_class"]) for r in rows} == {(c, n) for c in ("cnn1", "cnn3") for n in (10, 30)}
    at_30 = [r for r in rows if r["per_class"] == 30]
    assert board["best"]["candidate"] == max(at_30, key=lambda r: r["val_top1"])["candidate"]
    best_meta = json.loads((out / "best" / "model.json").read_text())
    for name in (
        "model.safetensors",
        "metrics.json",
        "report.md",
        "report.html",
        "confusion.png",
        "curves.png",
        "reliability.png",
    ):
        assert (out / "best" / name).exists(), name  # the whole report travels with the best model
    assert best_meta["architecture"] == board["best"]["candidate"]
    splits = {(out / f"{r['candidate']}-n{r['per_class']}" / "split.csv").read_text().count(",val,") for r in rows}
    assert len(splits) == 1  # every candidate saw the same validation images
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.png", "accuracy_vs_photos.png"):
        assert (out / name).exists(), name
    assert Image.open(out / "leaderboard.png").size[0] > 300
    assert all(r["parameters"] > 1000 and r["size_mb"] > 0 for r in rows)
