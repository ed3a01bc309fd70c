"""A CSV manifest someone sent: paths that lead outside its folder are refused unless asked for,
Windows-1252 text is read, and NUL bytes, empty labels and repeated rows are skipped with the
reason (BAD_INPUTS.md, the CSV cases of issue 14)."""

from __future__ import annotations

import pytest
from PIL import Image

import imgclf
from imgclf.core.errors import DataError
from imgclf.data.sources import scan


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
