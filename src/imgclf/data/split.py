"""Deterministic, stratified train/val/test split that stays stable as images are added.

As TensorFlow's retrain.py does, a file's split comes from a hash of its relative path (with any
``_nohash_`` suffix ignored, so variants of one photo stay together): adding images never moves
the ones already there. Splits given by the source (split folders, a CSV column) are honoured;
only files without one are assigned. A class too small to get a val or test image by hash gets
its lowest-hash training images moved there, so every split sees every class with 3+ images.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import re
from collections import defaultdict
from pathlib import Path

from imgclf.data.scan import Sample

SPLITS = ("train", "val", "test")
_NOHASH = re.compile(r"_nohash_.*$")
_BUCKETS = 2**27 - 1


def hash_fraction(rel_path: str) -> float:
    """A stable number in [0, 1) for a file, from its relative path."""
    stem = _NOHASH.sub("", rel_path)
    digest = hashlib.sha1(stem.encode("utf-8")).hexdigest()
    return (int(digest, 16) % (_BUCKETS + 1)) / (_BUCKETS + 1)


def _split_for(fraction: float, val_fraction: float, test_fraction: float) -> str:
    if fraction < test_fraction:
        return "test"
    if fraction < test_fraction + val_fraction:
        return "val"
    return "train"


def assign_splits(samples: list[Sample], val_fraction: float = 0.1, test_fraction: float = 0.1) -> list[Sample]:
    """Give every sample a split. Existing splits are kept; missing val/test come out of train.

    When the source names only some splits (say train and test), the missing ones are carved out
    of the training images by hash with their usual fractions; when it names all three, nothing moves.
    """
    given = {s.split for s in samples if s.split}
    wants = {"val": val_fraction if "val" not in given else 0.0,
             "test": test_fraction if "test" not in given else 0.0}
    result = []
    for sample in samples:
        if sample.split in ("val", "test"):
            result.append(sample)
            continue
        key = sample.rel or sample.path
        if sample.index >= 0:
            key = f"{key}#{sample.index}"
        split = _split_for(hash_fraction(key), wants["val"], wants["test"])
        result.append(dataclasses.replace(sample, split=split))
    return _fill_empty_splits(result, [name for name in ("val", "test") if wants[name] > 0])


def _fill_empty_splits(samples: list[Sample], carved: list[str]) -> list[Sample]:
    """Classes with 3+ images but no val (or test) image get their lowest-hash train image moved."""
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        by_class[sample.label].append(i)
    samples = list(samples)
    for label, members in by_class.items():
        if len(members) < 3:
            continue
        for split in carved:
            if any(samples[i].split == split for i in members):
                continue
            train = sorted((i for i in members if samples[i].split == "train"),
                           key=lambda i: hash_fraction(samples[i].rel or samples[i].path))
            if len(train) > 1:
                samples[train[0]] = dataclasses.replace(samples[train[0]], split=split)
    return samples


def write_split_csv(samples: list[Sample], path: str | Path) -> None:
    """The split used, one row per image: ``path,label,split,index``."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split", "index"])
        for sample in samples:
            writer.writerow([sample.path, sample.label, sample.split, sample.index])


def read_split_csv(path: str | Path) -> list[Sample]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [Sample(r["path"], r["label"], r["split"], "", int(r.get("index") or -1)) for r in rows]
