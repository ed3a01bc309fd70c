"""Deterministic, stratified train/val/test split that stays stable as images are added.

As TensorFlow's retrain.py does, a file's split comes from a hash of its relative path (with any
``_nohash_`` suffix ignored, so variants of one photo stay together): adding images never moves
the ones already there. Splits given by the source (split folders, a CSV column) are honoured;
only files without one are assigned. A class with 3+ images that hashing leaves without a train,
val or test image gets one moved there, so every split sees every such class.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import re
from collections import Counter, defaultdict
from pathlib import Path

from imgclf.core.atomic import atomic_write
from imgclf.core.events import Events, ignore, info
from imgclf.data.sources import Sample

SPLITS = ("train", "val", "test")
_NOHASH = re.compile(r"_nohash_.*$")
_BUCKETS = 2**27 - 1


def name_bytes(name: str) -> bytes:
    """The bytes of a file name as the file system holds them, for hashing.

    Names that are not valid UTF-8 come from the OS as surrogate escapes, which plain
    ``.encode()`` refuses; ``surrogateescape`` gives their original bytes back (as ``os.fsencode``
    does on a UTF-8 file system) and the very same bytes as before for every valid name, whatever
    the locale, so existing splits do not move. ``surrogatepass`` covers the unpaired UTF-16
    surrogates a Windows name may hold.
    """
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogatepass")


def hash_fraction(rel_path: str) -> float:
    """A stable number in [0, 1) for a file, from its relative path."""
    stem = _NOHASH.sub("", rel_path)
    digest = hashlib.sha1(name_bytes(stem)).hexdigest()
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
    wants = {"val": val_fraction if "val" not in given else 0.0, "test": test_fraction if "test" not in given else 0.0}
    result, movable = [], set()
    for i, sample in enumerate(samples):
        if sample.split in ("val", "test"):
            result.append(sample)
            continue
        movable.add(i)
        split = _split_for(hash_fraction(_hash_key(sample)), wants["val"], wants["test"])
        result.append(dataclasses.replace(sample, split=split))
    return _fill_empty_splits(result, [name for name in ("val", "test") if wants[name] > 0], movable)


def _hash_key(sample: Sample) -> str:
    return sample.name


def _fill_empty_splits(samples: list[Sample], carved: list[str], movable: set[int]) -> list[Sample]:
    """Classes with 3+ images but an empty train (or carved val/test) split get one image moved
    there, from the largest other split, lowest hash first; splits the source gave never move."""
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        by_class[sample.label].append(i)
    samples = list(samples)
    for members in by_class.values():
        if len(members) < 3:
            continue
        for split in ("train", *carved):
            counts = Counter(samples[i].split for i in members)
            if counts[split]:
                continue
            donors = [i for i in members if i in movable and counts[samples[i].split] > 1]
            if donors:
                i = min(donors, key=lambda j: (-counts[samples[j].split], hash_fraction(_hash_key(samples[j]))))
                samples[i] = dataclasses.replace(samples[i], split=split)
    return samples


def limit_per_class(samples: list[Sample], per_class: int, seed: int) -> list[Sample]:
    """Keep at most ``per_class`` training images of each class (val and test untouched), chosen
    by a seeded hash so the same seed picks the same photos, and a larger N keeps the smaller N's."""
    if per_class <= 0:
        return samples
    by_class: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        if sample.split == "train":
            by_class[sample.label].append(sample)
    keep = set()
    for members in by_class.values():
        ranked = sorted(members, key=lambda s: hash_fraction(f"{seed}:{_hash_key(s)}"))
        keep.update(id(s) for s in ranked[:per_class])
    return [s for s in samples if s.split != "train" or id(s) in keep]


SPLIT_COLUMNS = ["path", "label", "split", "kind", "member"]


def write_split_csv(samples: list[Sample], path: str | Path) -> None:
    """The split used, one row per image: ``path,label,split,kind,member``, written atomically.

    A file name that is not valid UTF-8 is written as its own bytes (``surrogateescape``), so
    :func:`read_split_csv` gives back a path that opens the file; every other name is plain UTF-8."""

    def write(temp: str) -> None:
        with open(temp, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
            writer = csv.writer(handle)
            writer.writerow(SPLIT_COLUMNS)
            for sample in samples:
                writer.writerow([sample.path, sample.label, sample.split, sample.kind, sample.member])

    atomic_write(path, write)


def read_split_csv(path: str | Path) -> list[Sample]:
    """The samples of a run's split.csv (also the ``index`` column that earlier versions wrote)."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        rows = list(csv.DictReader(handle))
    samples = []
    for r in rows:
        kind, member = r.get("kind") or "file", r.get("member") or ""
        if "index" in r and int(r["index"] or -1) >= 0:
            kind, member = "idx", r["index"]
        samples.append(Sample(r["path"], r["label"], r["split"], "", member, kind))
    return samples


def keep_copies_together(
    samples: list[Sample], given: list[Sample], duplicates: list[dict], events: Events = ignore
) -> list[Sample]:
    """Copies of one photo under one label all go to one split (the split of the copy whose name
    sorts first), so that the automatic split never puts a photo in training and its copy in the
    test (leakage: a flattering test score). Splits the data named itself are never moved; copies
    those leave across splits were reported by the audit."""
    index = {sample.ref: i for i, sample in enumerate(samples)}
    movable = {sample.ref for sample in given if not sample.split}
    samples, moved, groups = list(samples), 0, 0
    for group in duplicates:
        if group["kind"] != "within_class":
            continue
        members = sorted((samples[index[ref]].name, index[ref]) for ref in group["paths"] if ref in index)
        if len({samples[i].split for _, i in members}) < 2:
            continue
        target = samples[members[0][1]].split
        groups += 1
        for _, i in members:
            if samples[i].split != target and samples[i].ref in movable:
                samples[i] = dataclasses.replace(samples[i], split=target)
                moved += 1
    if moved:
        info(events, f"{moved} copies of {groups} photo(s) kept in the split of their first copy (no leakage)")
    return samples
