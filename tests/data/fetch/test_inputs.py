"""URL lists in every accepted shape give the same class folders; hostile labels become safe
folders (issue 12, items 1 and 10)."""

from __future__ import annotations

import pytest

from imgclf import api
from imgclf.core.errors import DataError
from imgclf.data.fetch.inputs import normalise_url, read_rows
from imgclf.data.fetch.labels import folder_map, safe_folder
from tests.data.fetch.conftest import FAST, kept_files
from tests.data.fetch.server import Reply

WNIDS = {"shirt": "n04197391", "hat": "n03497657"}


def _shapes(tmp_path, urls: dict[str, list[str]]) -> dict[str, list]:
    """The same URLs written as per-class lists, CSV with and without a header, TSV and ImageNet lists."""
    shapes = {}
    folder = tmp_path / "per-class"
    folder.mkdir()
    for label, items in urls.items():
        (folder / f"{label}.txt").write_text("# shop export\n\n" + "\n".join(items) + "\n", encoding="utf-8")
    shapes["per-class"] = [folder]
    pairs = [(u, label) for label, items in urls.items() for u in items]
    for name, text in {
        "header.csv": "url,label\n" + "".join(f"{u},{label}\n" for u, label in pairs),
        "bare.csv": "".join(f"{u},{label}\n" for u, label in pairs),
        "labels.tsv": "label\turl\n" + "".join(f"{label}\t{u}\n" for u, label in pairs),
    }.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        shapes[name] = [tmp_path / name]
    for sep in ("\t", " "):
        lines = [f"{WNIDS[label]}_{i}{sep}{u}" for i, (u, label) in enumerate(pairs)]
        path = tmp_path / f"imagenet{'-tab' if sep == chr(9) else '-space'}.txt"
        path.write_bytes("\n".join(lines).encode("utf-8").replace("café".encode(), "café".encode("latin-1")) + b"\n")
        shapes[path.name] = [path]
    return shapes


def test_every_input_shape_gives_the_same_class_folders(tmp_path, serve, photos):
    s = serve({f"/p{i}.jpg": Reply(photos[i]) for i in range(6)} | {"/caf%C3%A9.jpg": Reply(photos[6])})
    urls = {
        "shirt": [s.url("/p0.jpg"), s.url("/p1.jpg"), s.url("/p2.jpg"), s.url("/café.jpg")],
        "hat": [s.url("/p3.jpg"), s.url("/p4.jpg"), s.url("/p5.jpg").replace("http", "HTTP", 1)],
    }
    names = tmp_path / "words.txt"
    names.write_text(f"{WNIDS['shirt']}\tshirt, sark\n{WNIDS['hat']}\that, chapeau\n", encoding="utf-8")
    shapes = _shapes(tmp_path, urls)
    assert b"caf\xe9" in (tmp_path / "imagenet-tab.txt").read_bytes()  # one line really is Latin-1
    results = {}
    for name, inputs in shapes.items():
        out = tmp_path / f"out-{name}"
        summary = api.fetch(inputs, out, FAST, names=names)
        assert summary.by_outcome == {"ok": 7}, name
        results[name] = kept_files(out)
    first = results["per-class"]
    assert len(first) == 7 and {f.split("/")[0] for f in first} == {"shirt", "hat"}
    assert all(files == first for files in results.values()), results


def test_normalising_urls():
    assert normalise_url("HTTP://Example.COM:80/a b.jpg#top") == ("http://example.com/a%20b.jpg", "")
    assert normalise_url("https://example.com:8443/x?q=1")[0] == "https://example.com:8443/x?q=1"
    for bad in ("file:///etc/passwd", "ftp://example.com/a.jpg", "javascript:alert(1)", "http:///nohost", "a.jpg"):
        url, reason = normalise_url(bad)
        assert reason, bad


def test_hostile_labels_become_safe_folders(tmp_path, serve, photos):
    labels = ["../etc", "a/b", "CON", "Chaussures été", "..", "nul.txt"]
    s = serve({f"/{i}.jpg": Reply(photos[20 + i]) for i in range(len(labels))})
    csv = tmp_path / "shop.csv"
    csv.write_text("url,label\n" + "".join(f'{s.url(f"/{i}.jpg")},"{label}"\n' for i, label in enumerate(labels)))
    out = tmp_path / "data"
    summary = api.fetch([csv], out, FAST)
    assert summary.by_outcome == {"ok": len(labels)}
    folders = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != ".imgclf")
    assert len(folders) == len(labels)
    for folder in folders:
        assert "/" not in folder and not folder.startswith(".") and folder.split(".")[0].lower() not in ("con", "nul")
        assert (out / folder).resolve().parent == out.resolve()
    assert "Chaussures été" in folders
    assert not (tmp_path / "etc").exists()
    import json

    back = json.loads((out / ".imgclf" / "fetch" / "labels.json").read_text())
    assert sorted(back.values()) == sorted(labels)  # the map back to the labels as given


def test_labels_differing_only_in_case_are_a_clear_error(tmp_path):
    csv = tmp_path / "shop.csv"
    csv.write_text("url,label\nhttp://127.0.0.1:9/a.jpg,Shoes\nhttp://127.0.0.1:9/b.jpg,shoes\n")
    with pytest.raises(DataError, match="'Shoes' and 'shoes' differ only in case"):
        api.fetch([csv], tmp_path / "data", FAST)
    assert not (tmp_path / "data").exists()


def test_safe_folder_names():
    assert safe_folder("../etc") == "_etc"
    assert safe_folder("a/b") == "a_b"
    assert safe_folder("CON") == "_CON"
    assert safe_folder("_rejected") != "_rejected"
    assert len(safe_folder("é" * 300).encode()) <= 100
    assert folder_map(["a/b", "a_b"]) == {"a/b": "a_b", "a_b": "a_b-" + folder_map(["a/b", "a_b"])["a_b"][-6:]}


def test_unreadable_or_empty_inputs_are_named(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_rows([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(DataError, match="no URLs found"):
        read_rows([tmp_path / "empty.txt"])
