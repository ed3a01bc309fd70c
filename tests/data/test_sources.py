"""Contract over every data source kind: the same images given as class folders, split folders, a
CSV manifest, IDX files and imgclf shards give the same samples (labels and pixels) through the one registry,
and the audit treats them alike."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from imgclf.core.settings import as_settings
from imgclf.data.audit import audit
from imgclf.data.shards import write_shards
from imgclf.data.sources import SOURCES, open_sample, read_sample, scan
from imgclf.data.sources.idx import write_idx

LABELS = ("zero", "one", "two")


def _images() -> list[tuple[str, np.ndarray, str]]:
    """(label, 32x32 uint8 pixels, split) for 8 real digit scans of each of three classes."""
    digits = load_digits()
    out = []
    for digit, label in enumerate(LABELS):
        scans = digits.images[digits.target == digit][:8]
        for i, pixels in enumerate(scans):
            big = np.kron(np.round(pixels * 255 / 16).astype(np.uint8), np.ones((4, 4), np.uint8))
            out.append((label, big, "test" if i >= 6 else "train"))
    return out


def _write(kind: str, root, images):
    if kind == "folders":
        for n, (label, pixels, _) in enumerate(images):
            (root / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, "L").save(root / label / f"{n:03d}.png")
        return root
    if kind == "split-folders":
        for n, (label, pixels, split) in enumerate(images):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, "L").save(root / split / label / f"{n:03d}.png")
        return root
    if kind == "csv":
        (root / "pictures").mkdir(parents=True)
        rows = ["path,label,split"]
        for n, (label, pixels, split) in enumerate(images):
            Image.fromarray(pixels, "L").save(root / "pictures" / f"{n:03d}.png")
            rows.append(f"pictures/{n:03d}.png,{label},{split}")
        (root / "labels.csv").write_text("\n".join(rows) + "\n")
        return root / "labels.csv"
    if kind == "idx":
        root.mkdir(parents=True)
        for split, prefix in (("train", "train"), ("test", "t10k")):
            part = [(LABELS.index(label), pixels) for label, pixels, s in images if s == split]
            write_idx(root / f"{prefix}-images-idx3-ubyte", np.stack([p for _, p in part]))
            write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.array([t for t, _ in part], dtype=np.uint8))
        (root / "classes.txt").write_text("\n".join(LABELS) + "\n")
        return root
    if kind == "shards":  # imgclf shard of the split folders (no validation carved: the splits stay as given)
        photos = _write("split-folders", root / "photos", images)
        write_shards(photos, root / "shards", as_settings({"val_fraction": 0, "shard_samples": 5}))
        return root / "shards"
    raise AssertionError(f"no writer for source kind {kind}: add one to this contract test")


@pytest.fixture(scope="module")
def images():
    return _images()


def _content(sample) -> str:
    return hashlib.sha1(np.asarray(open_sample(sample)).tobytes()).hexdigest()


@pytest.mark.parametrize("kind", [source.kind for source in SOURCES])
def test_every_source_gives_the_same_samples_and_labels(kind, images, tmp_path):
    result = scan(_write(kind, tmp_path / kind, images))
    assert result.kind == kind
    expected = Counter(
        (label, hashlib.sha1(np.stack([pixels] * 3, -1).tobytes()).hexdigest()) for label, pixels, _ in images
    )
    assert Counter((s.label, _content(s)) for s in result.samples) == expected
    assert result.classes == sorted(LABELS)
    if kind != "folders":  # the others carry the split
        assert Counter(s.split for s in result.samples) == Counter(split for _, _, split in images)
    assert len({s.name for s in result.samples}) == len(images)  # stable, distinct names for the split
    assert all(read_sample(s) for s in result.samples)
    report = audit(result)
    assert len(report.usable) == len(images) and not report.problems


def test_an_unknown_source_is_a_clear_error(tmp_path):
    from imgclf.core.errors import DataError

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="expected a folder of class folders, a .csv manifest or IDX files"):
        scan(tmp_path / "notes.txt")
