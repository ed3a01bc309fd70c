"""The audit of a data set: problems with reasons, usable counts, small classes, exact duplicates
(within a class, across labels, across splits), the per-file cache, and awkward file names."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import badfiles  # noqa: E402
import imgclf.data.audit as audit_module  # noqa: E402
from imgclf.core.settings import DataSettings, SystemSettings  # noqa: E402
from imgclf.data.audit import audit, format_report  # noqa: E402
from imgclf.data.images import load_image  # noqa: E402
from imgclf.data.sources import scan  # noqa: E402
from imgclf.data.sources.idx import write_idx  # noqa: E402

PER_CLASS = 12


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("IMGCLF_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def photos() -> dict[str, list[Path]]:
    return badfiles.clothing_photos(("hat", "shoes", "skirt", "dress"), per_class=PER_CLASS)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, photos) -> dict:
    """root/{hat,shoes}: 12 photos + 1 duplicate each; root/skirt: 4 photos; root/mixed: the bad files.

    hat/again.jpg is a copy of a hat photo (within_class); shoes/also_a_hat.jpg is a copy of
    another hat photo (conflicting_labels).
    """
    root = tmp_path_factory.mktemp("audit") / "data"
    copied = badfiles.make_photo_folder(
        root, {"hat": photos["hat"], "shoes": photos["shoes"], "skirt": photos["skirt"][:4]}
    )
    shutil.copyfile(copied["hat"][0], root / "hat" / "again.jpg")
    shutil.copyfile(copied["hat"][1], root / "shoes" / "also_a_hat.jpg")
    expected = badfiles.make_bad_folder(root / "mixed", photos["dress"][:3])
    return {"root": root, "copied": copied, "bad": expected}


@pytest.fixture()
def report(dataset):
    return audit(scan(dataset["root"]), DataSettings())


def by_name(problems: list[dict]) -> dict[str, str]:
    return {Path(p["path"]).name: p["reason"] for p in problems}


def of_kind(report, kind: str) -> list[dict]:
    return [d for d in report.duplicates if d["kind"] == kind]


# ---------------------------------------------------------------- problems, counts, small classes


def test_every_bad_file_is_named_with_its_reason(report, dataset):
    problems = by_name(report.problems)
    for name, reason in dataset["bad"].items():
        if reason == badfiles.OK:
            assert name not in problems, f"{name} is valid but reported: {problems.get(name)}"
        else:
            assert name in problems, f"{name} not reported"
            assert reason in problems[name], f"{name}: {problems[name]!r} lacks {reason!r}"
    assert "8x8" in problems["tiny.png"]
    assert len(report.problems) == len(badfiles.ERRORS) + 1  # + tiny.png, nothing else


def test_problem_paths_are_the_real_files(report, dataset):
    for problem in report.problems:
        assert Path(problem["path"]).parent == dataset["root"] / "mixed"


def test_usable_counts_per_class(report, dataset):
    n_valid = len(badfiles.VALID)
    assert report.classes == {"hat": PER_CLASS + 1, "shoes": PER_CLASS + 1, "skirt": 4, "mixed": n_valid}
    assert report.n_files == 2 * (PER_CLASS + 1) + 4 + len(dataset["bad"])
    assert len(report.usable) == sum(report.classes.values())
    usable_names = {Path(s.path).name for s in report.usable if s.label == "mixed"}
    assert usable_names == set(badfiles.VALID)
    assert report.splits == {"unsplit": report.classes}


def test_small_classes_and_imbalance(report):
    assert report.small_classes == ["mixed", "skirt"]  # under min_per_class = 10
    assert report.imbalance_ratio == round((PER_CLASS + 1) / 4, 2)


def test_min_per_class_setting(dataset):
    report = audit(scan(dataset["root"]), DataSettings(min_per_class=5))
    assert report.small_classes == ["skirt"]


def test_min_side_setting(dataset):
    report = audit(scan(dataset["root"]), DataSettings(min_side=4))
    assert "tiny.png" not in by_name(report.problems)
    assert report.classes["mixed"] == len(badfiles.VALID) + 1


# ---------------------------------------------------------------- duplicates


def test_duplicate_within_class(report, dataset):
    [dup] = of_kind(report, "within_class")
    assert sorted(Path(p).name for p in dup["paths"]) == sorted([dataset["copied"]["hat"][0].name, "again.jpg"])
    assert dup["labels"] == ["hat"]


def test_duplicate_with_conflicting_labels(report, dataset):
    [dup] = of_kind(report, "conflicting_labels")
    assert sorted(Path(p).name for p in dup["paths"]) == sorted([dataset["copied"]["hat"][1].name, "also_a_hat.jpg"])
    assert dup["labels"] == ["hat", "shoes"]


def test_no_duplicates_across_splits_without_splits(report):
    assert of_kind(report, "across_splits") == []
    assert len(report.duplicates) == 2


def test_duplicate_across_splits(tmp_path, photos):
    root = tmp_path / "data"
    train = badfiles.make_photo_folder(root / "train", {"hat": photos["hat"][:5], "shoes": photos["shoes"][:5]})
    badfiles.make_photo_folder(root / "test", {"hat": photos["hat"][5:7], "shoes": photos["shoes"][5:7]})
    shutil.copyfile(train["hat"][0], root / "test" / "hat" / "leak.jpg")
    report = audit(scan(root), DataSettings())
    [dup] = report.duplicates
    assert dup["kind"] == "across_splits"
    assert dup["splits"] == ["test", "train"] and dup["labels"] == ["hat"]
    assert sorted(dup["paths"]) == sorted([str(train["hat"][0]), str(root / "test" / "hat" / "leak.jpg")])
    assert report.splits == {"test": {"hat": 3, "shoes": 2}, "train": {"hat": 5, "shoes": 5}}


def test_unreadable_files_are_not_duplicates_of_each_other(tmp_path, photos):
    root = tmp_path / "data"
    badfiles.make_photo_folder(root, {"hat": photos["hat"][:3], "shoes": photos["shoes"][:3]})
    (root / "hat" / "e1.jpg").write_bytes(b"")
    (root / "shoes" / "e2.jpg").write_bytes(b"")
    report = audit(scan(root), DataSettings())
    assert report.duplicates == []
    assert by_name(report.problems) == {"e1.jpg": "empty file", "e2.jpg": "empty file"}


# ---------------------------------------------------------------- the report


def test_format_report_mentions_each_bad_file(report, dataset):
    text = format_report(report)
    for name, reason in dataset["bad"].items():
        if reason != badfiles.OK:
            assert name in text, name
    assert "(few images)" in text
    assert "within_class" in text and "conflicting_labels" in text
    assert "again.jpg" in text and "also_a_hat.jpg" in text


def test_format_report_truncates_long_lists(report):
    text = format_report(report, max_rows=2)
    assert f"and {len(report.problems) - 2} more" in text


def test_json_report(report, tmp_path):
    report.write_json(tmp_path / "audit.json")
    data = json.loads((tmp_path / "audit.json").read_text(encoding="utf-8"))
    assert data["n_usable"] == len(report.usable)
    assert by_name(data["problems"]) == by_name(report.problems)
    assert data["small_classes"] == ["mixed", "skirt"]


# ---------------------------------------------------------------- the cache


@pytest.fixture()
def small_dataset(tmp_path, photos) -> Path:
    root = tmp_path / "data"
    badfiles.make_photo_folder(root, {"hat": photos["hat"][:4], "shoes": photos["shoes"][:4]})
    (root / "shoes" / "empty.jpg").write_bytes(b"")
    (root / "hat" / "notes.jpg").write_text("hello", encoding="utf-8")
    return root


def _forbid_checks(monkeypatch):
    def fail(sample, max_pixels):
        raise AssertionError(f"check_file called for {sample.path}: the cache was not used")

    monkeypatch.setattr(audit_module, "check_file", fail)


def _record_checks(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = audit_module.check_file
    lock = threading.Lock()

    def record(sample, max_pixels):
        with lock:
            calls.append(Path(sample.path).name)
        return real(sample, max_pixels)

    monkeypatch.setattr(audit_module, "check_file", record)
    return calls


def test_second_audit_uses_the_cache(small_dataset, cache_dir, monkeypatch):
    first = audit(scan(small_dataset), DataSettings())
    assert list(cache_dir.glob("audit-*.json")), "no cache written"
    _forbid_checks(monkeypatch)
    second = audit(scan(small_dataset), DataSettings())
    assert second.to_dict() == first.to_dict()
    assert by_name(second.problems) == {"empty.jpg": "empty file", "notes.jpg": "not an image"}


def test_cache_lives_outside_the_data_folder(small_dataset, cache_dir):
    before = sorted(p.relative_to(small_dataset) for p in small_dataset.rglob("*"))
    audit(scan(small_dataset), DataSettings())
    assert sorted(p.relative_to(small_dataset) for p in small_dataset.rglob("*")) == before
    assert any(cache_dir.iterdir())


def test_modified_files_are_checked_again(small_dataset, photos, monkeypatch):
    audit(scan(small_dataset), DataSettings())
    calls = _record_checks(monkeypatch)
    target = small_dataset / "shoes" / photos["shoes"][0].name
    old = target.stat()
    target.write_bytes(photos["dress"][0].read_bytes())  # new content, other size
    os.utime(target, ns=(old.st_atime_ns, old.st_mtime_ns + 5_000_000_000))
    empty = small_dataset / "shoes" / "empty.jpg"  # and a broken file that got fixed
    shutil.copyfile(photos["dress"][1], empty)
    os.utime(empty, ns=(old.st_atime_ns, old.st_mtime_ns + 6_000_000_000))
    report = audit(scan(small_dataset), DataSettings())
    assert sorted(calls) == sorted([target.name, "empty.jpg"])
    assert by_name(report.problems) == {"notes.jpg": "not an image"}
    assert report.classes == {"hat": 4, "shoes": 5}


def test_a_file_that_breaks_is_reported(small_dataset, photos, monkeypatch):
    audit(scan(small_dataset), DataSettings())
    target = small_dataset / "hat" / photos["hat"][0].name
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    calls = _record_checks(monkeypatch)
    report = audit(scan(small_dataset), DataSettings())
    assert calls == [target.name]
    assert "truncated" in by_name(report.problems)[target.name]


def test_new_files_are_checked_and_old_ones_are_not(small_dataset, photos, monkeypatch):
    audit(scan(small_dataset), DataSettings())
    shutil.copyfile(photos["hat"][6], small_dataset / "hat" / "new.jpg")
    calls = _record_checks(monkeypatch)
    report = audit(scan(small_dataset), DataSettings())
    assert calls == ["new.jpg"]
    assert report.classes["hat"] == 5


def test_other_max_pixels_is_not_answered_from_the_cache(small_dataset, monkeypatch):
    audit(scan(small_dataset), DataSettings())
    calls = _record_checks(monkeypatch)
    report = audit(scan(small_dataset), DataSettings(), SystemSettings(max_pixels=1000))
    assert len(calls) == 10
    assert all(
        "too many pixels" in r
        for n, r in by_name(report.problems).items()
        if n.endswith(".jpg") and n not in ("empty.jpg", "notes.jpg")
    )


def test_corrupt_cache_is_ignored(small_dataset, cache_dir):
    first = audit(scan(small_dataset), DataSettings())
    for path in cache_dir.glob("audit-*.json"):
        path.write_text("{not json", encoding="utf-8")
    again = audit(scan(small_dataset), DataSettings())
    assert again.to_dict() == first.to_dict()


@pytest.mark.parametrize("how", ["in place", "renamed over"])
def test_a_file_replaced_with_its_size_and_mtime_kept_is_checked_again(small_dataset, monkeypatch, how):
    """rsync -a (a temporary file renamed over the old one) and an in-place rewrite both keep size
    and mtime; the inode or ctime still differ, so the old verdict is not reused."""
    audit(scan(small_dataset), DataSettings())
    target = small_dataset / "hat" / sorted(p.name for p in (small_dataset / "hat").glob("*.jpg"))[0]
    assert target.name != "notes.jpg"
    old = target.stat()
    junk = (b"not a photo " * old.st_size)[: old.st_size]
    if how == "in place":
        target.write_bytes(junk)
        os.utime(target, ns=(old.st_atime_ns, old.st_mtime_ns))
    else:
        temp = target.with_name(".rsync-temp")
        temp.write_bytes(junk)
        os.utime(temp, ns=(old.st_atime_ns, old.st_mtime_ns))
        os.replace(temp, target)
    new = target.stat()
    assert (new.st_size, new.st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    calls = _record_checks(monkeypatch)
    report = audit(scan(small_dataset), DataSettings())
    assert calls == [target.name]
    assert by_name(report.problems)[target.name] == "not an image"
    assert report.classes["hat"] == 3
    _forbid_checks(monkeypatch)  # and the new verdict is cached in its turn
    assert audit(scan(small_dataset), DataSettings()).to_dict() == report.to_dict()


# ---------------------------------------------------------------- names and links


def test_unicode_and_spaces_in_names(tmp_path, photos):
    root = tmp_path / "données photo"
    names = {
        "T-Shirt für Damen": ["photo 01 été.jpg", "帽子 2.jpg", "  spaced  .jpg"],
        "robe d'été": ["naïve café.jpg", "Ölbild #3.jpg", "emoji 👗.jpg"],
    }
    sources = iter(photos["hat"][:3] + photos["dress"][:3])
    for label, files in names.items():
        (root / label).mkdir(parents=True)
        for name in files:
            shutil.copyfile(next(sources), root / label / name)
    (root / "robe d'été" / "vide é.jpg").write_bytes(b"")
    scanned = scan(root)
    assert scanned.classes == sorted(names)
    assert sorted(Path(s.path).name for s in scanned.samples) == sorted(
        [n for files in names.values() for n in files] + ["vide é.jpg"]
    )
    for sample in scanned.samples:
        if sample.path.endswith("vide é.jpg"):
            continue
        assert load_image(sample.path).mode == "RGB"
    report = audit(scanned, DataSettings())
    assert report.classes == {label: 3 for label in names}
    assert by_name(report.problems) == {"vide é.jpg": "empty file"}
    assert "vide é.jpg" in format_report(report)
    report.write_json(tmp_path / "audit.json")
    assert "vide é.jpg" in (tmp_path / "audit.json").read_text(encoding="utf-8")


def _non_utf8_names_allowed(folder: Path) -> bool:
    try:
        Path(folder, os.fsdecode(b"probe\xe9")).write_bytes(b"")
    except (OSError, UnicodeError):  # macOS and Windows refuse names that are not Unicode
        return False
    Path(folder, os.fsdecode(b"probe\xe9")).unlink()
    return True


def test_names_that_are_not_utf8_are_checked_counted_and_reported(tmp_path, digits_dir):
    """A name with Latin-1 bytes (from an old camera or a Windows share) is an ordinary file: it is
    checked, counted and split; a broken one is reported by a readable name; audit.json stays JSON."""
    if not _non_utf8_names_allowed(tmp_path):
        pytest.skip("this file system accepts only Unicode file names")
    root = tmp_path / "data"
    for label in ("3", "5"):
        (root / label).mkdir(parents=True)
        for i, png in enumerate(sorted((digits_dir / label).glob("*.png"))[:8]):
            name = os.fsdecode(b"caf\xe9 %d.png" % i) if i < 3 else png.name
            shutil.copyfile(png, root / label / name)
    broken = os.fsdecode(b"cass\xe9\xff.png")
    (root / "5" / broken).write_bytes(b"<html>not a digit</html>")
    scanned = scan(root)
    assert len(scanned.samples) == 17
    report = audit(scanned, DataSettings())
    assert report.classes == {"3": 8, "5": 8}
    assert sum("caf\udce9" in s.path for s in report.usable) == 6
    assert report.problems == [{"path": str(root / "5" / broken), "reason": "not an image"}]

    text = format_report(report)
    assert "cass\\xe9\\xff.png: not an image" in text  # the bytes shown, printable on any terminal
    text.encode("utf-8")  # no lone surrogate left in what a terminal is given

    report.write_json(tmp_path / "audit.json")
    raw = (tmp_path / "audit.json").read_bytes()
    data = json.loads(raw.decode("utf-8"))  # valid UTF-8, valid JSON
    assert data["n_usable"] == 16
    assert os.fsencode(data["problems"][0]["path"]) == os.fsencode(root / "5") + b"/cass\xe9\xff.png"
    assert Path(data["problems"][0]["path"]).exists()  # the name in the report opens the file

    again = audit(scan(root), DataSettings())  # and the cache, keyed on these names, answers
    assert again.to_dict() == report.to_dict()


def _run_with_timeout(function, seconds: float):
    result: dict = {}

    def target():
        try:
            result["value"] = function()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not finish in {seconds} s (symlink loop followed?)"
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="needs symlinks")
def test_symlink_loop_does_not_hang(tmp_path, photos):
    root = tmp_path / "data"
    copied = badfiles.make_photo_folder(root, {"cls": photos["hat"][:3], "other": photos["shoes"][:3]})
    os.symlink(root, root / "cls" / "loop")
    scanned = _run_with_timeout(lambda: scan(root), 20)
    assert sorted(s.path for s in scanned.samples) == sorted(str(p) for ps in copied.values() for p in ps)
    assert any("symlink loop" in s["reason"] for s in scanned.skipped)
    report = _run_with_timeout(lambda: audit(scanned, DataSettings()), 20)
    assert report.classes == {"cls": 3, "other": 3}
    assert any("symlink loop" in p["reason"] for p in report.problems)


@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="needs symlinks")
def test_symlinked_class_folder_is_followed(tmp_path, photos):
    elsewhere = tmp_path / "elsewhere" / "hats"
    badfiles.make_photo_folder(elsewhere.parent, {"hats": photos["hat"][:2]})
    root = tmp_path / "data"
    badfiles.make_photo_folder(root, {"shoes": photos["shoes"][:2]})
    os.symlink(elsewhere, root / "hat")
    scanned = scan(root)
    assert scanned.classes == ["hat", "shoes"] and len(scanned.samples) == 4


# ---------------------------------------------------------------- IDX, and one file that must not abort


def _write_idx_folder(root: Path, n: int = 6) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    write_idx(root / "train-labels-idx1-ubyte.gz", (np.arange(n) % 3).astype(np.uint8))


def test_idx_images_are_checked_and_hashed(tmp_path):
    root = tmp_path / "idx"
    _write_idx_folder(root)
    report = audit(scan(root), DataSettings(min_side=16))
    assert report.classes == {"0": 2, "1": 2, "2": 2}
    assert report.duplicates == []


def test_idx_images_usable_with_default_settings(tmp_path):
    """MNIST-format images are 28x28 by design: min_side (32) is for photos, not for them."""
    root = tmp_path / "idx"
    _write_idx_folder(root)
    report = audit(scan(root), DataSettings())
    assert len(report.usable) == 6 and report.problems == []


def test_one_malformed_file_never_aborts_the_audit(tmp_path, photos):
    root = tmp_path / "data"
    badfiles.make_photo_folder(root, {"hat": photos["hat"][:3], "shoes": photos["shoes"][:3]})
    bad_exif = (
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x02\x01\x1f\x00\x02\x00\x00\x00\x04cam\x00"
        b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00"
    )
    Image.new("RGB", (64, 48), (90, 90, 90)).save(root / "hat" / "odd_exif.jpg", "JPEG", exif=bad_exif)
    report = audit(scan(root), DataSettings())
    assert report.classes["shoes"] == 3
    assert report.classes["hat"] in (3, 4)
