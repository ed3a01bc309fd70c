"""A CSV manifest someone sent: paths that lead outside its folder are refused unless asked for,
Windows-1252 text is read, and NUL bytes, empty labels, repeated rows and rows the CSV reader
cannot parse are skipped with the reason; a path given two labels is a label conflict; labels
that differ only in case are an error, in a CSV and in class folders alike (BAD_INPUTS.md, the
CSV cases of issue 14, and 44, 45, 46)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

import imgclf
from imgclf.core.errors import DataError
from imgclf.data.sources import scan
from tests.conftest import write_manifest


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "data" / "img").mkdir(parents=True)
    for n in range(4):
        Image.new("RGB", (40, 40), (60 * n, 20, 20)).save(tmp_path / "data" / "img" / f"{n}.png")
    Image.new("RGB", (40, 40), (0, 200, 0)).save(tmp_path / "secret.png")  # beside, not under, the CSV's folder
    return tmp_path


def test_paths_outside_the_csvs_folder_are_refused_unless_allowed(folder):
    csv = folder / "data" / "labels.csv"
    outside = folder / "secret.png"
    csv.write_text(f"path,label\nimg/0.png,a\nimg/1.png,b\n../secret.png,a\n{outside},b\nimg/../img/2.png,a\n")
    result = scan(csv)
    assert sorted(s.rel for s in result.samples) == sorted(["img/0.png", "img/1.png", "img/../img/2.png"])
    refused = [p for p in result.skipped if "outside the CSV's folder" in p["reason"]]
    assert sorted(p["path"] for p in refused) == sorted(["../secret.png", str(outside)])
    assert "--allow-outside" in refused[0]["reason"]
    assert len(scan(csv, allow_outside=True).samples) == 5
    report = imgclf.check(csv)
    assert "../secret.png" in {p["path"] for p in report.problems}  # named by the audit too


def test_windows_1252_nul_bytes_empty_labels_and_repeated_rows(folder):
    csv = folder / "data" / "labels.csv"
    text = (
        "img/0.png,Chaussures été\nimg/1.png,Men >  > Shoes\nimg/2.png, > \nimg/3.png,b\nimg/3.png,b\nimg/\x001.png,b\n"
    )
    csv.write_bytes(text.encode("cp1252"))
    result = scan(csv)
    assert sorted(s.label for s in result.samples) == sorted(["Chaussures été", "Men > Shoes", "b"])
    reasons = sorted(p["reason"] for p in result.skipped)
    assert reasons == ["NUL byte in the path", "duplicate row (the same as line 4)", "empty label"]
    csv.write_bytes(b"img/0.png,\x81\x8d\x8f\x90\x9d\n")  # bytes that are neither UTF-8 nor Windows-1252
    with pytest.raises(DataError, match="save it as UTF-8"):
        scan(csv)


def _manifest_lines(digits_dir, csv: Path) -> list[str]:
    """Two real digit scans of each of 0, 1 and 2: the header, then six ``path,label`` rows."""
    return write_manifest(digits_dir, csv, per_class=2, classes=range(3)).read_text().splitlines()


def test_an_oversized_field_skips_its_row_and_keeps_the_others(digits_dir, tmp_path):
    csv = tmp_path / "labels.csv"
    lines = _manifest_lines(digits_dir, csv)
    # line 3: a path far over the CSV reader's field limit; line 6: a label as long, in quotes across two lines
    lines[2:2] = ["x" * 200_000 + ",1"]
    lines[5:5] = ['img.png,"' + "y" * 100_000, "y" * 100_000 + '"']
    csv.write_text("\n".join(lines) + "\n")
    result = scan(csv)
    assert sorted(s.label for s in result.samples) == ["0", "0", "1", "1", "2", "2"]
    assert [p["path"] for p in result.skipped] == [f"{csv}:3", f"{csv}:7"]
    assert all("field larger than field limit" in p["reason"] for p in result.skipped)
    report = imgclf.check(csv)  # the audit goes on, naming the rows it could not read
    assert len(report.usable) == 6
    assert {f"{csv}:3", f"{csv}:7"} <= {p["path"] for p in report.problems}


def test_one_path_with_two_labels_is_a_label_conflict(digits_dir, tmp_path):
    csv = tmp_path / "labels.csv"
    lines = _manifest_lines(digits_dir, csv)
    zero = lines[1].split(",")[0]  # a scan of a 0
    lines += [f"{zero},1", f"./{zero},0", lines[3]]  # line 8: a second label; line 9: line 2 again, written another way
    csv.write_text("\n".join(lines) + "\n")
    result = scan(csv)
    assert zero not in {s.rel for s in result.samples}  # under neither label
    assert sorted(s.label for s in result.samples) == ["0", "1", "1", "2", "2"]
    reasons = {p["path"]: p["reason"] for p in result.skipped}
    assert reasons[f"{csv}:2"] == (
        f"label conflict: '{zero}' is labelled '0' (line 2) and '1' (line 8); neither is used, give it one label"
    )
    assert reasons[f"{csv}:9"] == "duplicate row (the same as line 2)"
    assert reasons[f"{csv}:10"] == "duplicate row (the same as line 4)"
    report = imgclf.check(csv)
    assert len(report.usable) == 5 and f"{csv}:2" in {p["path"] for p in report.problems}


def test_csv_labels_differing_only_in_case_are_a_clear_error(digits_dir, tmp_path):
    csv = tmp_path / "labels.csv"
    lines = _manifest_lines(digits_dir, csv)
    paths = [line.split(",")[0] for line in lines[1:]]
    csv.write_text(f"path,label\n{paths[0]},Shoes\n{paths[1]},Boots\n{paths[2]},shoes\n")
    with pytest.raises(DataError, match="'Shoes' and 'shoes' differ only in case") as error:
        scan(csv)
    assert str(error.value).startswith(f"{csv}: ") and "line 2" in str(error.value) and "line 4" in str(error.value)
    csv.write_text(f"{paths[0]},Men > Shoes\n{paths[1]},men>Boots\n")  # a hierarchy level in two cases
    with pytest.raises(DataError, match="'Men' and 'men' differ only in case"):
        scan(csv)
    csv.write_text(f"{paths[0]},Shoes\n{paths[1]},Shoes\n{paths[2]},Boots\n")
    assert scan(csv).classes == ["Boots", "Shoes"]


def _class_folder(digits_dir: Path, folder: Path, digit: int) -> Path:
    folder.mkdir(parents=True)
    for png in sorted((digits_dir / str(digit)).glob("*.png"))[:2]:
        shutil.copy(png, folder / png.name)
    return folder


def test_class_folders_differing_only_in_case_are_a_clear_error(digits_dir, tmp_path):
    _class_folder(digits_dir, tmp_path / "data" / "Cat", 3)
    _class_folder(digits_dir, tmp_path / "data" / "cat", 8)
    with pytest.raises(DataError, match="'Cat' and 'cat' differ only in case") as error:
        scan(tmp_path / "data")
    assert str(tmp_path / "data" / "Cat") in str(error.value) and str(tmp_path / "data" / "cat") in str(error.value)
    _class_folder(digits_dir, tmp_path / "split" / "train" / "Cat", 3)  # one in training, the other in validation
    _class_folder(digits_dir, tmp_path / "split" / "val" / "cat", 3)
    with pytest.raises(DataError, match="'Cat' and 'cat' differ only in case"):
        scan(tmp_path / "split")


def test_a_folder_named_with_the_level_separator(digits_dir, tmp_path):
    root = tmp_path / "data"
    _class_folder(digits_dir, root / "A > B", 1)
    _class_folder(digits_dir, root / "C", 2)
    assert scan(root).classes == ["A > B", "C"]  # the label a CSV row "x.png,A > B" gives
    _class_folder(digits_dir, root / "A" / "B", 7)
    with pytest.raises(DataError, match="folders 'A/B' and 'A > B' both give the label 'A > B'"):
        scan(root)
    shutil.rmtree(root / "A")
    _class_folder(digits_dir, root / "D > ", 4)  # an empty level, which a CSV would drop
    with pytest.raises(DataError, match="empty hierarchy level"):
        scan(root)
