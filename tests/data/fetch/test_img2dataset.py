"""``imgclf fetch --from-img2dataset``: an img2dataset output (parquet per shard, pictures as
files or in a tar) becomes class folders and the same manifest (issue 12, item 11)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from imgclf.cli import main
from imgclf.core.errors import DataError
from tests.data.fetch.conftest import kept_files

pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")


def _shard(root, shard: str, rows: list[dict], pictures: dict[str, bytes], as_tar: bool) -> None:
    """What img2dataset writes for one shard: NNNNN.parquet, and NNNNN/<key>.jpg or NNNNN.tar."""
    pq.write_table(pa.Table.from_pylist(rows), root / f"{shard}.parquet")
    if as_tar:
        with tarfile.open(root / f"{shard}.tar", "w") as tar:
            for key, data in pictures.items():
                for name, blob in ((f"{key}.jpg", data), (f"{key}.json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    else:
        (root / shard).mkdir()
        for key, data in pictures.items():
            (root / shard / f"{key}.jpg").write_bytes(data)
            (root / shard / f"{key}.json").write_text(json.dumps({"key": key}))


def _row(key, label, status="success", error=None):
    return {"key": key, "url": f"https://shop.example/{key}.jpg", "caption": None, "status": status,
            "error_message": error, "width": 256, "height": 256, "label": label}  # fmt: skip


def test_img2dataset_output_becomes_class_folders(tmp_path, photos, capsys):
    source = tmp_path / "crawl"
    source.mkdir()
    first = {f"00000000{i}": photos[i] for i in range(4)}
    _shard(source, "00000", [_row(k, "shirt" if i % 2 else "hat") for i, k in enumerate(first)]
           + [_row("000000009", "hat", "failed_to_download", "HTTP Error 404")], first, as_tar=False)  # fmt: skip
    second = {f"00001000{i}": photos[10 + i] for i in range(3)}
    second["000010003"] = b"<html>moved</html>"  # img2dataset kept something that is not a picture
    _shard(source, "00001", [_row(k, "dress") for k in second], second, as_tar=True)
    out = tmp_path / "data"
    assert main(["fetch", "--from-img2dataset", str(source), "--out", str(out)]) == 0
    files = kept_files(out)
    assert {f.split("/")[0] for f in files} == {"shirt", "hat", "dress"} and len(files) == 7
    records = [json.loads(line) for line in (out / ".imgclf" / "fetch" / "manifest.jsonl").read_text().splitlines()]
    last = {r["source"]: r for r in records}
    assert len(last) == 9
    assert last["00000.parquet:000000009"]["outcome"] == "import_failed"
    assert "HTTP Error 404" in last["00000.parquet:000000009"]["error"]
    assert last["00001.parquet:000010003"]["outcome"] == "not_image"
    table = capsys.readouterr().out
    assert "dress" in table and "shirt" in table


def test_img2dataset_without_the_label_column_says_how_to_add_it(tmp_path, photos):
    source = tmp_path / "crawl"
    source.mkdir()
    rows = [{k: v for k, v in _row("000000000", "hat").items() if k != "label"}]
    _shard(source, "00000", rows, {"000000000": photos[0]}, as_tar=False)
    from imgclf import api

    with pytest.raises(DataError, match="--save_additional_columns"):
        api.fetch(source, tmp_path / "data", from_img2dataset=True)
