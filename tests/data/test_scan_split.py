"""Finding labelled images (class folders, nested folders, split folders, CSV, IDX) and the
deterministic, stable train/val/test split. Scanning only looks at names: the files are stubs."""

from __future__ import annotations

import gzip
import os
import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from imgclf.core.errors import DataError
from imgclf.data.sources import LEVEL_SEP, Sample, open_sample, scan
from imgclf.data.sources.idx import (
    FASHION_MNIST_CLASSES,
    find_idx_pairs,
    read_idx,
    scan_idx,
    write_idx,
)
from imgclf.data.split import (
    SPLITS,
    assign_splits,
    hash_fraction,
    read_split_csv,
    write_split_csv,
)


def touch(path: Path, data: bytes = b"stub") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def labels_of(result) -> dict[str, str]:
    return {Path(s.path).name: s.label for s in result.samples}


# ---------------------------------------------------------------- class folders


def test_nested_folders_give_hierarchical_labels(tmp_path):
    touch(tmp_path / "Men" / "Shoes" / "Sneakers" / "x.jpg")
    touch(tmp_path / "Men" / "Shoes" / "Boots" / "y.png")
    touch(tmp_path / "Women" / "Dresses" / "z.webp")
    touch(tmp_path / "Kids" / "k.JPG")
    result = scan(tmp_path)
    assert result.kind == "folders"
    assert labels_of(result) == {
        "x.jpg": "Men > Shoes > Sneakers",
        "y.png": "Men > Shoes > Boots",
        "z.webp": "Women > Dresses",
        "k.JPG": "Kids",
    }
    assert result.classes == ["Kids", "Men > Shoes > Boots", "Men > Shoes > Sneakers", "Women > Dresses"]
    sneaker = next(s for s in result.samples if s.path.endswith("x.jpg"))
    assert sneaker.rel == "Men/Shoes/Sneakers/x.jpg" and sneaker.split is None and sneaker.member == ""
    assert sneaker.kind == "file"
    assert LEVEL_SEP == " > "


def test_images_outside_leaf_folders_are_skipped_with_a_reason(tmp_path):
    touch(tmp_path / "Men" / "Shoes" / "Sneakers" / "x.jpg")
    touch(tmp_path / "Men" / "Shoes" / "stray.jpg")
    touch(tmp_path / "top.jpg")
    touch(tmp_path / "Men" / "Hats" / "h.jpg")
    result = scan(tmp_path)
    assert sorted(labels_of(result)) == ["h.jpg", "x.jpg"]
    reasons = {Path(s["path"]).name: s["reason"] for s in result.skipped}
    assert reasons["stray.jpg"] == "image in a folder that has class sub-folders"
    assert reasons["top.jpg"] == "image outside any class folder"


def test_non_images_and_hidden_files_are_ignored(tmp_path):
    touch(tmp_path / "a" / "1.jpg")
    touch(tmp_path / "a" / "README.txt")
    touch(tmp_path / "a" / "scan.pdf")
    touch(tmp_path / "a" / ".hidden.jpg")
    touch(tmp_path / ".thumbnails" / "t.jpg")
    touch(tmp_path / "b" / "2.jpeg")
    result = scan(tmp_path)
    assert labels_of(result) == {"1.jpg": "a", "2.jpeg": "b"}
    assert result.ignored_files == 2


def test_samples_are_sorted_and_scan_is_repeatable(tmp_path):
    for name in ["b.jpg", "a.jpg", "c.jpg"]:
        touch(tmp_path / "z" / name)
        touch(tmp_path / "y" / name)
    first, second = scan(tmp_path), scan(tmp_path)
    assert first.samples == second.samples
    assert [s.rel for s in first.samples] == sorted(s.rel for s in first.samples)


# ---------------------------------------------------------------- split folders


def test_split_folders_are_honoured(tmp_path):
    for split in ("train", "valid", "test"):
        for label in ("cat", "dog"):
            touch(tmp_path / split / label / f"{split}_{label}.jpg")
    result = scan(tmp_path)
    assert result.kind == "split-folders"
    assert result.classes == ["cat", "dog"]
    splits = {Path(s.path).name: s.split for s in result.samples}
    assert splits == {
        f"{split}_{label}.jpg": {"train": "train", "valid": "val", "test": "test"}[split]
        for split in ("train", "valid", "test")
        for label in ("cat", "dog")
    }
    rels = sorted(s.rel for s in result.samples if s.split == "val")
    assert rels == ["valid/cat/valid_cat.jpg", "valid/dog/valid_dog.jpg"]


@pytest.mark.parametrize(
    "names, expected",
    [
        (("Train", "Validation", "Test"), {"train", "val", "test"}),
        (("training", "val"), {"train", "val"}),
        (("train", "testing"), {"train", "test"}),
    ],
)
def test_split_folder_names(tmp_path, names, expected):
    for name in names:
        touch(tmp_path / name / "shirt" / "a.jpg")
    result = scan(tmp_path)
    assert {s.split for s in result.samples} == expected
    assert result.classes == ["shirt"]


def test_nested_classes_inside_split_folders(tmp_path):
    touch(tmp_path / "train" / "Men" / "Shoes" / "a.jpg")
    touch(tmp_path / "test" / "Men" / "Shoes" / "b.jpg")
    result = scan(tmp_path)
    assert {s.label for s in result.samples} == {"Men > Shoes"}


def test_two_folders_for_one_split_is_an_error(tmp_path):
    for name in ("train", "val", "valid"):
        touch(tmp_path / name / "a" / "x.jpg")
    with pytest.raises(DataError, match="two folders for the val split"):
        scan(tmp_path)


def test_a_class_named_test_without_train_is_a_class(tmp_path):
    touch(tmp_path / "test" / "x.jpg")
    touch(tmp_path / "other" / "y.jpg")
    result = scan(tmp_path)
    assert result.kind == "folders" and result.classes == ["other", "test"]


# ---------------------------------------------------------------- CSV manifest


def test_csv_manifest(tmp_path, monkeypatch):
    base = tmp_path / "shop"
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"):
        touch(base / "imgs" / name)
    manifest = base / "labels.csv"
    manifest.write_text(
        "path,label,split\n"
        "imgs/a.jpg,Men > Shoes,train\n"
        "imgs/b.jpg,Men>Shoes,valid\n"
        "imgs/c.jpg, Women > Dresses ,test\n"
        "imgs/d.jpg,Women > Dresses,\n"
        "imgs/e.jpg,Women > Dresses,holdout\n"
        "imgs/f.jpg,,train\n"
        "\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)  # paths are relative to the CSV, not to the working folder
    result = scan(manifest)
    assert result.kind == "csv"
    got = {s.rel: (s.label, s.split) for s in result.samples}
    assert got == {
        "imgs/a.jpg": ("Men > Shoes", "train"),
        "imgs/b.jpg": ("Men > Shoes", "val"),
        "imgs/c.jpg": ("Women > Dresses", "test"),
        "imgs/d.jpg": ("Women > Dresses", None),
    }
    for sample in result.samples:
        assert Path(sample.path) == base / sample.rel and Path(sample.path).exists()
    reasons = {s["path"]: s["reason"] for s in result.skipped}
    assert reasons["imgs/e.jpg"] == "unknown split 'holdout'"
    assert any(r == "row needs path and label" for r in reasons.values())


def test_csv_without_header_and_with_bom(tmp_path):
    touch(tmp_path / "x.png")
    touch(tmp_path / "sub" / "y.png")
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("x.png,A > B\nsub/y.png,C\n".encode("utf-8-sig"))
    result = scan(manifest)
    assert {s.rel: s.label for s in result.samples} == {"x.png": "A > B", "sub/y.png": "C"}
    assert all(s.split is None for s in result.samples)


def test_csv_with_only_a_header_is_an_error(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n", encoding="utf-8")
    with pytest.raises(DataError, match="no labelled images"):
        scan(manifest)


def test_scan_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        scan(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no labelled images"):
        scan(tmp_path / "empty")
    touch(tmp_path / "photo.jpg")
    with pytest.raises(DataError, match="expected a folder"):
        scan(tmp_path / "photo.jpg")


# ---------------------------------------------------------------- IDX


def _idx_folder(root: Path, classes: list[str] | None = ("Top", "Trouser", "Pullover")) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = {
        "train": (rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), np.array([0, 1, 2, 2, 1, 0, 0], np.uint8)),
        "t10k": (rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), np.array([2, 1, 0, 1], np.uint8)),
    }
    write_idx(root / "train-images-idx3-ubyte.gz", arrays["train"][0])  # gzip
    write_idx(root / "train-labels-idx1-ubyte.gz", arrays["train"][1])
    write_idx(root / "t10k-images-idx3-ubyte", arrays["t10k"][0])  # raw
    write_idx(root / "t10k-labels-idx1-ubyte", arrays["t10k"][1])
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
    return arrays


def test_idx_files_written_as_gzip_and_raw(tmp_path):
    _idx_folder(tmp_path / "idx")
    with gzip.open(tmp_path / "idx" / "train-images-idx3-ubyte.gz", "rb") as handle:
        assert handle.read(4) == bytes([0, 0, 0x08, 3])
    assert (tmp_path / "idx" / "t10k-labels-idx1-ubyte").read_bytes()[:8] == bytes([0, 0, 8, 1, 0, 0, 0, 4])


def test_idx_scan_labels_and_splits(tmp_path):
    root = tmp_path / "idx"
    arrays = _idx_folder(root)
    assert set(find_idx_pairs(root)) == {"train", "t10k"}
    result = scan(root)
    assert result.kind == "idx"
    names = ["Top", "Trouser", "Pullover"]
    train = [s for s in result.samples if s.split == "train"]
    test = [s for s in result.samples if s.split == "test"]
    assert [s.label for s in train] == [names[i] for i in arrays["train"][1]]
    assert [s.label for s in test] == [names[i] for i in arrays["t10k"][1]]
    assert [s.member for s in test] == ["0", "1", "2", "3"] and {s.kind for s in test} == {"idx"}
    assert {s.rel for s in test} == {"t10k-images-idx3-ubyte"}
    assert test[2].name == "t10k-images-idx3-ubyte#2"
    for sample in result.samples:
        prefix = "train" if sample.split == "train" else "t10k"
        pixels = np.asarray(open_sample(sample))[..., 0]
        assert np.array_equal(pixels, arrays[prefix][0][int(sample.member)])


def test_idx_class_names_without_classes_txt(tmp_path):
    plain = tmp_path / "digits"
    _idx_folder(plain, classes=None)
    assert scan(plain).classes == ["0", "1", "2"]
    fashion = tmp_path / "fashion-mnist"
    _idx_folder(fashion, classes=None)
    assert set(scan(fashion).classes) == set(FASHION_MNIST_CLASSES[:3])


def test_idx_too_few_class_names(tmp_path):
    _idx_folder(tmp_path / "idx", classes=["only", "two"])
    with pytest.raises(DataError, match="2 names for 3 classes"):
        scan(tmp_path / "idx")


def test_idx_images_and_labels_must_match(tmp_path):
    root = tmp_path / "idx"
    root.mkdir()
    write_idx(root / "train-images-idx3-ubyte", np.zeros((5, 28, 28), np.uint8))
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(DataError, match="do not match"):
        scan_idx(root)


def _header(dtype: int, dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, dtype, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("magic", b"\x01\x02\x08\x03" + bytes(100), "bad magic number"),
        ("dtype", b"\x00\x00\x42\x01" + bytes(12), "bad magic number"),
        ("short", b"\x00\x00", "bad magic number"),
        ("header", _header(0x08, (10, 28, 28))[:9], "header is truncated"),
        ("data", _header(0x08, (10, 28, 28)) + bytes(28 * 28 * 9), "header says 7840"),
        ("extra", _header(0x08, (2,)) + bytes(3), "header says 2"),
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path, name, data, message):
    path = tmp_path / f"{name}-images-idx3-ubyte"
    path.write_bytes(data)
    with pytest.raises(DataError, match=message):
        read_idx(str(path))


def test_read_idx_rejects_corrupt_gzip(tmp_path):
    path = tmp_path / "bad-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_header(0x08, (3, 28, 28)) + bytes(2000))[:-12])
    with pytest.raises(DataError):
        read_idx(str(path))
    text_file = tmp_path / "text-images-idx3-ubyte.gz"
    text_file.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read IDX"):
        read_idx(str(text_file))


def test_scan_of_corrupt_idx_folder_is_a_data_error(tmp_path):
    root = tmp_path / "idx"
    root.mkdir()
    (root / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03\x00\x00")
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(DataError):
        scan(root)


# ---------------------------------------------------------------- split


def fake_samples(classes: dict[str, int], start: int = 0) -> list[Sample]:
    """Made-up samples (no files): ``n`` per class, named ``<class>/img_<i>.jpg``."""
    return [
        Sample(f"/data/{label}/img_{i:05d}.jpg", label, None, f"{label}/img_{i:05d}.jpg")
        for label, n in classes.items()
        for i in range(start, start + n)
    ]


def split_map(samples: list[Sample]) -> dict[str, str]:
    return {s.rel: s.split for s in samples}


BIG = {"shirt": 120, "shoes": 100, "hat": 80}


def test_assign_splits_is_deterministic_and_order_free():
    samples = fake_samples(BIG)
    first = assign_splits(samples)
    assert first == assign_splits(samples)
    shuffled = list(samples)
    random.Random(3).shuffle(shuffled)
    assert split_map(assign_splits(shuffled)) == split_map(first)
    assert [s.rel for s in first] == [s.rel for s in samples]  # same order, same samples
    assert all(s.split in SPLITS for s in first)


def test_assign_splits_proportions():
    samples = fake_samples(BIG)
    counts = Counter(s.split for s in assign_splits(samples))
    total = len(samples)
    assert abs(counts["train"] / total - 0.8) < 0.06
    assert abs(counts["val"] / total - 0.1) < 0.04
    assert abs(counts["test"] / total - 0.1) < 0.04
    counts = Counter(s.split for s in assign_splits(samples, val_fraction=0.2, test_fraction=0.0))
    assert counts["test"] == 0 and abs(counts["val"] / total - 0.2) < 0.06


def test_every_class_gets_every_split():
    sizes = {f"c{n:02d}": n for n in range(6, 31)}
    sizes.update(BIG)
    by_class = defaultdict(set)
    for sample in assign_splits(fake_samples(sizes)):
        by_class[sample.label].add(sample.split)
    assert {label: splits for label, splits in by_class.items() if splits != set(SPLITS)} == {}


@pytest.mark.parametrize("label", ["c1", "c6", "c12"])
def test_every_class_of_three_gets_every_split(label):
    samples = [Sample(f"/d/{label}/img{j}.jpg", label, None, f"{label}/img{j}.jpg") for j in range(3)]
    assert sorted(s.split for s in assign_splits(samples)) == ["test", "train", "val"]


def test_classes_under_three_images_are_left_to_the_hash():
    for label in ("p", "q", "r", "s"):
        samples = fake_samples({label: 2})
        result = assign_splits(samples)
        assert [s.split for s in result] == [s.split for s in assign_splits(samples[:1])] + [
            s.split for s in assign_splits(samples[1:])
        ]


def test_adding_samples_never_moves_existing_ones():
    old = assign_splits(fake_samples(BIG))
    added = (
        fake_samples(BIG)
        + fake_samples({"shirt": 60, "shoes": 40, "hat": 30}, start=1000)
        + fake_samples({"new class": 50})
    )
    new = split_map(assign_splits(added))
    assert {rel: split for rel, split in split_map(old).items() if new[rel] != split} == {}


def test_removing_samples_never_moves_the_others():
    full = split_map(assign_splits(fake_samples(BIG)))
    kept = [s for s in fake_samples(BIG) if not s.rel.endswith(("3.jpg", "7.jpg"))]
    assert all(full[s.rel] == s.split for s in assign_splits(kept))


def test_split_depends_on_relative_path_not_on_root():
    a = [Sample(f"/mnt/a/{s.rel}", s.label, None, s.rel) for s in fake_samples(BIG)]
    b = [Sample(f"/home/b/{s.rel}", s.label, None, s.rel) for s in fake_samples(BIG)]
    assert split_map(assign_splits(a)) == split_map(assign_splits(b))


def test_nohash_variants_stay_together():
    assert hash_fraction("cls/photo_nohash_1.jpg") == hash_fraction("cls/photo_nohash_2.jpg")
    assert hash_fraction("cls/photo_1.jpg") != hash_fraction("cls/photo_2.jpg")
    samples = fake_samples(BIG)
    samples += [
        Sample(f"/d/shirt/p{k}_nohash_{v}.jpg", "shirt", None, f"shirt/p{k}_nohash_{v}.jpg")
        for k in range(40)
        for v in range(3)
    ]
    groups = defaultdict(set)
    for sample in assign_splits(samples):
        if "_nohash_" in sample.rel:
            groups[sample.rel.split("_nohash_")[0]].add(sample.split)
    assert all(len(splits) == 1 for splits in groups.values())
    assert len({next(iter(s)) for s in groups.values()}) > 1  # the groups themselves are spread


def test_hash_fraction_range_and_spread():
    values = [hash_fraction(f"x/{i}.jpg") for i in range(2000)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert abs(np.mean(values) - 0.5) < 0.03


def test_split_of_unicode_names_is_what_it_always_was():
    """Pinned values from before names that are not UTF-8 were supported: no existing split moves."""
    assert hash_fraction("0/0000.png") == 0.6936306282877922
    assert hash_fraction("robe d'été/naïve café.jpg") == 0.09791374951601028
    assert hash_fraction("帽子/2.jpg") == 0.16258611530065536
    assert hash_fraction("emoji 👗.jpg") == 0.7168319448828697


def test_names_that_are_not_utf8_are_split_and_written_to_split_csv(tmp_path):
    """Latin-1 bytes in a name (the OS hands them over as surrogate escapes) hash, split, and come
    back from split.csv as the very name, which opens the file."""
    try:
        touch(tmp_path / "data" / "a" / os.fsdecode(b"probe\xe9.png")).unlink()
    except (OSError, UnicodeError):
        pytest.skip("this file system accepts only Unicode file names")
    for label in ("a", "b"):
        for i in range(20):
            touch(tmp_path / "data" / label / os.fsdecode(b"caf\xe9-%d.png" % i))
            touch(tmp_path / "data" / label / f"café-{i}.png")
    samples = assign_splits(scan(tmp_path / "data").samples)
    assert len(samples) == 80 and {s.split for s in samples} == set(SPLITS)
    odd = os.fsdecode(b"a/caf\xe9-1.png")
    assert hash_fraction(odd) != hash_fraction("a/café-1.png")  # its own bytes, not a lookalike
    assert 0.0 <= hash_fraction(odd) < 1.0 and hash_fraction(odd) == hash_fraction(os.fsdecode(b"a/caf\xe9-1.png"))
    write_split_csv(samples, tmp_path / "split.csv")
    back = read_split_csv(tmp_path / "split.csv")
    assert [(s.path, s.label, s.split) for s in back] == [(s.path, s.label, s.split) for s in samples]
    assert all(Path(s.path).is_file() for s in back)
    assert sum(b"caf\xe9-" in os.fsencode(s.path) for s in back) == 40


def test_given_splits_are_kept():
    samples = [Sample(s.path, s.label, ("train", "val", "test")[i % 3], s.rel) for i, s in enumerate(fake_samples(BIG))]
    assert assign_splits(samples) == samples


def test_missing_splits_are_carved_out_of_train_only():
    """Like IDX: train and test given, val carved from train; given test images never move."""
    samples = [
        Sample(s.path, s.label, "test" if i % 5 == 0 else "train", s.rel) for i, s in enumerate(fake_samples(BIG))
    ]
    result = assign_splits(samples)
    given = split_map(samples)
    for sample in result:
        if given[sample.rel] == "test":
            assert sample.split == "test"
        else:
            assert sample.split in ("train", "val")
    n_train = sum(1 for s in samples if s.split == "train")
    n_val = sum(1 for s in result if s.split == "val")
    assert abs(n_val / n_train - 0.1) < 0.05


def test_idx_samples_split_by_index():
    samples = [Sample("/d/train-images", str(i % 3), None, "train-images", str(i), "idx") for i in range(600)]
    counts = Counter(s.split for s in assign_splits(samples))
    assert counts["val"] > 30 and counts["test"] > 30  # not all in one split: the index is hashed


def test_split_csv_round_trip(tmp_path):
    samples = assign_splits(fake_samples({"a b": 5, "é > f": 6}))
    samples.append(Sample("/d/images-idx3-ubyte", "x", "test", "", "7", "idx"))
    write_split_csv(samples, tmp_path / "split.csv")
    back = read_split_csv(tmp_path / "split.csv")
    assert [(s.path, s.label, s.split, s.member, s.kind) for s in back] == [
        (s.path, s.label, s.split, s.member, s.kind) for s in samples
    ]


def test_split_csv_of_earlier_versions_is_read(tmp_path):
    """Run folders written before the sources registry have an ``index`` column."""
    (tmp_path / "split.csv").write_text("path,label,split,index\n/d/a.png,a,train,-1\n/d/t-images,b,test,3\n")
    back = read_split_csv(tmp_path / "split.csv")
    assert [(s.kind, s.member) for s in back] == [("file", ""), ("idx", "3")]


def test_limit_per_class_is_stratified_seeded_and_nested():
    from imgclf.data.sources import Sample
    from imgclf.data.split import limit_per_class

    samples = [Sample(f"/d/{c}/{i}.jpg", c, "train", f"{c}/{i}.jpg") for c in "abc" for i in range(40)]
    samples += [Sample(f"/d/a/v{i}.jpg", "a", "val", f"a/v{i}.jpg") for i in range(5)]
    ten = limit_per_class(samples, 10, seed=1)
    from collections import Counter

    assert Counter(s.label for s in ten if s.split == "train") == {"a": 10, "b": 10, "c": 10}
    assert sum(s.split == "val" for s in ten) == 5  # val and test are never reduced
    assert limit_per_class(samples, 10, seed=1) == ten
    twenty = limit_per_class(samples, 20, seed=1)
    assert {s.path for s in ten} <= {s.path for s in twenty}  # more photos keep the fewer ones
    assert {s.path for s in limit_per_class(samples, 10, seed=2)} != {s.path for s in ten}
