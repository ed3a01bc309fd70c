"""The command line on real data: check's counts, the demo's accuracy, IDX data end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from imgclf.cli import main


def _readme_counts(clothing) -> dict[str, int]:
    """Per-class totals from the data set's own README table (train + validation + test rows)."""
    lines = (clothing.parent / "README.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| split"))
    names = [c.strip() for c in header.strip("|").split("|")][1:-1]
    totals = dict.fromkeys(names, 0)
    for line in lines:
        if re.match(r"\| (train|validation|test) ", line):
            cells = [c.strip().replace(",", "") for c in line.strip("|").split("|")][1:-1]
            for name, cell in zip(names, cells):
                totals[name] += int(cell)
    return totals


@pytest.mark.slow
def test_check_clothing_finds_the_readme_counts(clothing, tmp_path, capsys):
    out = tmp_path / "audit.json"
    assert main(["check", str(clothing), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["classes"] == _readme_counts(clothing)
    assert report["splits"]["val"]["skirt"] == 12 and report["splits"]["train"]["t-shirt"] == 795
    assert report["n_files"] == 3781 and report["imbalance_ratio"] > 5
    table = capsys.readouterr().out
    assert "t-shirt" in table and "3781 files" in table


@pytest.mark.slow
def test_demo_reaches_95_percent_on_the_digits(tmp_path, capsys):
    assert main(["demo", "--data", str(tmp_path / "digits"), "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["top1"] >= 0.95 and metrics["n"] > 150
    out = capsys.readouterr().out
    assert f"test top-1 {metrics['top1']:.3f}" in out and "report:" in out and "predicted 3 (true 3)" in out


@pytest.mark.slow
def test_train_on_idx_files_end_to_end(digits_dir, tmp_path):
    """MNIST-format files (as Fashion-MNIST ships them) train like folders: 'train' and 't10k' splits."""
    from PIL import Image

    from imgclf.data.sources.idx import write_idx

    images, labels = [], []
    for label in range(10):
        for png in sorted((digits_dir / str(label)).glob("*.png"))[:60]:
            images.append(np.asarray(Image.open(png).convert("L").resize((28, 28))))
            labels.append(label)
    images, labels = np.stack(images), np.array(labels, dtype=np.uint8)
    order = np.random.default_rng(0).permutation(len(labels))
    train_idx, test_idx = order[:480], order[480:]
    folder = tmp_path / "idx"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte.gz", images[train_idx])
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels[train_idx])
    write_idx(folder / "t10k-images-idx3-ubyte", images[test_idx])
    write_idx(folder / "t10k-labels-idx1-ubyte", labels[test_idx])
    (folder / "classes.txt").write_text("\n".join(f"digit-{d}" for d in range(10)))
    assert (
        main(
            [
                "train",
                str(folder),
                "--out",
                str(tmp_path / "run"),
                "--model",
                "cnn3",
                "--image-size",
                "28",
                "--epochs",
                "6",
                "--batch-size",
                "32",
                "--augment",
                "none",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n"] == 120 and metrics["split"] == "test"
    assert metrics["top1"] > 0.6  # chance is 0.1
    assert "digit-3" in metrics["per_class"]
