"""``imgclf shard``: WebDataset tar shards of real photos (clothing-small) that give back the very
classes, splits, bytes and pixels of the folder, train bit-identical weights, survive a SIGKILL and
split over machines (--part); damage is a clear error naming the file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from imgclf import api
from imgclf.cli import main
from imgclf.core.errors import DataError, ImageError, SettingsError, Stopped
from imgclf.core.events import StopToken
from imgclf.core.preprocessing import Preprocessing
from imgclf.core.rundir import RunDir
from imgclf.core.settings import as_settings
from imgclf.data import shards as writer
from imgclf.data.audit import audit
from imgclf.data.sources import open_sample, read_sample, scan
from imgclf.data.sources.shards import index_name, parse_location
from imgclf.data.split import assign_splits
from imgclf.data.transforms import eval_tensor

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory) -> Path:
    """One audit cache for the module's runs over clothing-small (each photo is checked once)."""
    return tmp_path_factory.mktemp("shard-cache")


@pytest.fixture(scope="module")
def clothing_shards(clothing, warm_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clothing-shards") / "shards"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMGCLF_CACHE_DIR", str(warm_cache))
        assert main(["shard", str(clothing), str(out)]) == 0
    return out


def _small_folder(clothing: Path, root: Path, per_class: int = 30) -> Path:
    """3 classes of real photos, copied (a plain class-folder source: splits come from hashing)."""
    for label in ("dress", "hat", "shoes"):
        (root / label).mkdir(parents=True)
        for photo in sorted((clothing / "train" / label).glob("*.jpg"))[:per_class]:
            shutil.copy(photo, root / label / photo.name)
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_shards_keep_the_class_map_counts_splits_and_order(clothing, clothing_shards):
    folder = scan(clothing)
    report = audit(folder)
    expected = assign_splits(report.usable)  # as training splits the folder (split folders: kept)
    shards = scan(clothing_shards)
    assert shards.kind == "shards" and all(s.kind == "shard" for s in shards.samples)
    assert json.loads((clothing_shards / "classes.json").read_text()) == folder.classes == shards.classes
    # same names, labels, splits, in the folder's own order (training indexes samples in that order)
    assert [(s.name, s.label, s.split) for s in shards.samples] == [(s.name, s.label, s.split) for s in expected]
    stats = json.loads((clothing_shards / "stats.json").read_text())
    counts = Counter((s.label, s.split) for s in expected)
    assert stats["classes"] == {c: {s: n for (c2, s), n in sorted(counts.items()) if c2 == c} for c in folder.classes}
    assert stats["samples"] == len(expected) == 3781 and stats["skipped"] == []
    tars = sorted(clothing_shards.glob("*.tar"))
    assert stats["shards"] == len(tars) and stats["bytes"] == sum(t.stat().st_size for t in tars)


def test_timm_reads_the_info_and_the_tars_are_webdataset(clothing_shards):
    from timm.data.readers.reader_wds import _parse_split_info

    info = json.loads((clothing_shards / "_info.json").read_text())
    classes = json.loads((clothing_shards / "classes.json").read_text())
    total = 0
    for split in ("train", "val", "test"):
        parsed = _parse_split_info(split, info)  # what timm's ReaderWds reads
        assert parsed.num_samples == sum(parsed.shard_lengths) and all(
            (clothing_shards / f).is_file() for f in parsed.filenames
        )
        total += parsed.num_samples
    assert total == 3781
    first = clothing_shards / info["splits"]["val"]["filenames"][0]
    index = json.loads((clothing_shards / index_name(first.name)).read_text())
    with tarfile.open(first) as tar:
        members = tar.getmembers()
        data = {m.name: m for m in members}
        for entry in index["samples"]:
            member = data[f"{entry['key']}.{entry['ext']}"]
            assert (member.offset_data, member.size) == (entry["offset"], entry["size"])  # one seek + read
            assert tar.extractfile(data[f"{entry['key']}.cls"]).read() == str(entry["cls"]).encode()
            meta = json.loads(tar.extractfile(data[f"{entry['key']}.json"]).read())
            assert (meta["label"], meta["split"], meta["name"]) == (entry["label"], "val", entry["name"])
            assert classes[entry["cls"]] == entry["label"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}
    assert len({entry["label"] for entry in index["samples"][:100]}) > 3  # shuffled: classes mixed


def test_every_sample_decodes_to_the_same_tensor(clothing, clothing_shards):
    folder, shards = scan(clothing).samples, scan(clothing_shards).samples
    assert [s.name for s in folder] == [s.name for s in shards]
    prep = Preprocessing(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    for a, b in zip(folder, shards):
        assert read_sample(a) == read_sample(b), a.name
        ta = eval_tensor(open_sample(a, draft_size=32), prep)
        tb = eval_tensor(open_sample(b, draft_size=32), prep)
        assert torch.equal(ta, tb), a.name


def test_training_from_shards_and_from_the_folder_gives_identical_weights(clothing, tmp_path):
    source = _small_folder(clothing, tmp_path / "photos")
    api.shard(source, tmp_path / "shards", {"shard_samples": 16})
    tiny = {"model": "cnn4", "image_size": 32, "epochs": 2, "batch_size": 16, "patience": 0}
    tiny |= {"time_budget": "0", "threads": 1, "workers": 0, "device": "cpu", "precision": "fp32"}
    weights = []
    for name in ("photos", "shards"):
        api.train(tmp_path / name, tmp_path / f"run-{name}", tiny, evaluate=False)
        weights.append(load_file(tmp_path / f"run-{name}" / RunDir.WEIGHTS))
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def _tiny_shards(clothing: Path, tmp_path: Path, **settings) -> Path:
    source = _small_folder(clothing, tmp_path / "photos", per_class=6)
    out = tmp_path / "shards"
    api.shard(source, out, {"shard_samples": 4, **settings})
    return out


def _members_of(samples: list, tar: Path) -> list[tuple[int, int, object]]:
    """(data offset, size, sample) of the samples inside one shard, in shard order."""
    found = [(*parse_location(s)[1:], s) for s in samples if parse_location(s)[0] == str(tar)]
    return sorted(found, key=lambda row: row[0])


def test_a_missing_truncated_or_changed_shard_is_a_clear_error(clothing, tmp_path):
    out = _tiny_shards(clothing, tmp_path)
    samples = scan(out).samples
    victim = out / "train-000001.tar"
    data, members = victim.read_bytes(), _members_of(samples, victim)
    cut = members[-1][0]  # the last photo's bytes are gone
    victim.write_bytes(data[:cut])
    with pytest.raises(DataError, match=r"train-000001\.tar: .* truncated"):
        scan(out)
    with pytest.raises(ImageError, match=r"train-000001\.tar@.* the shard is truncated"):
        read_sample(members[-1][2])  # read after a scan that saw it whole
    assert read_sample(members[0][2]) == data[members[0][0] : members[0][0] + members[0][1]]
    victim.write_bytes(data[:512] + bytes(len(data) - 512))  # the same size, other bytes
    with pytest.raises(ImageError, match="changed since it was indexed"):
        read_sample(members[-1][2])
    victim.unlink()
    with pytest.raises(DataError, match=r"train-000001\.tar: shard missing"):
        scan(out)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda text: text[:-20], "damaged shard index"),
        (lambda text: text.replace('"offset":', '"offs":'), "field 'offset' missing"),
        (lambda text: text.replace('"imgclf-shards/1"', '"x"'), "not an index of imgclf shards"),
    ],
)
def test_a_damaged_index_is_a_clear_error(clothing, tmp_path, damage, message):
    out = _tiny_shards(clothing, tmp_path)
    index = out / "val-000000.index.json"
    index.write_text(damage(index.read_text()))
    with pytest.raises(DataError, match=rf"val-000000\.index\.json: .*{message}"):
        scan(out)
    assert main(["check", str(out)]) == 2  # the CLI says it in one line


def test_a_killed_shard_run_finishes_byte_identical(clothing, warm_cache, clothing_shards, tmp_path, monkeypatch):
    """SIGKILL as soon as the first shard file appears, rerun: the very bytes of one whole run."""
    monkeypatch.setenv("IMGCLF_CACHE_DIR", str(warm_cache))  # the audit cached by clothing_shards
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    command = [sys.executable, "-m", "imgclf.cli", "shard", str(clothing), str(killed), "--shard-samples", "40"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(killed.glob("*.tar")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "stats.json").exists()  # killed part-way
    assert subprocess.run(command, env=env, capture_output=True, timeout=120).returncode == 0
    api.shard(clothing, whole, {"shard_samples": 40})
    assert _files(killed) == _files(whole)


def test_a_stopped_run_with_leftovers_finishes_byte_identical(clothing, tmp_path, monkeypatch):
    """Stopped after two shards, with what a kill leaves (a temporary file, a shard without its
    index, a shard of an older plan): the rerun writes the same bytes as one run."""
    source = _small_folder(clothing, tmp_path / "photos", per_class=8)
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    api.shard(source, whole, {"shard_samples": 3})
    stop, real, calls = StopToken(), writer._write_shard, []

    def two_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            stop.set("test")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "_write_shard", two_then_stop)
    with pytest.raises(Stopped, match="test"):
        api.shard(source, stopped, {"shard_samples": 3}, stop=stop)
    monkeypatch.setattr(writer, "_write_shard", real)
    (stopped / "train-000002.tar").write_bytes(b"half a shard")  # renamed, index never written
    (stopped / "train-000003.tar12345.tmp").write_bytes(b"temporary")
    summary = api.shard(source, stopped, {"shard_samples": 3})
    assert summary.kept == 2 and summary.complete
    assert _files(stopped) == _files(whole)
    api.shard(source, stopped, {"shard_samples": 4})  # another plan: the old shards go
    listed = json.loads((stopped / "_info.json").read_text())["splits"].values()
    assert sorted(p.name for p in stopped.glob("*.tar")) == sorted(
        name for split in listed for name in split["filenames"]
    )


def test_two_parts_together_equal_one_run(clothing, tmp_path):
    source = _small_folder(clothing, tmp_path / "photos", per_class=8)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    api.shard(source, whole, {"shard_samples": 3})
    first = api.shard(source, parts, {"shard_samples": 3, "shard_part": "0/2"})
    assert not first.complete and not (parts / "stats.json").exists()
    with pytest.raises(DataError, match=r"index\.json: shard index is missing; the shard set is incomplete"):
        scan(parts)
    assert main(["shard", str(source), str(parts), "--shard-samples", "3", "--part", "1/2"]) == 0
    assert _files(parts) == _files(whole)
    assert first.mine + api.shard(source, parts, {"shard_samples": 3, "shard_part": "1/2"}).kept == first.shards


def test_bad_parts_max_side_and_outputs_are_refused(clothing, tmp_path):
    source = _small_folder(clothing, tmp_path / "photos", per_class=4)
    for part in ("2/2", "1", "a/b"):
        with pytest.raises(SettingsError, match="shard_part"):
            api.shard(source, tmp_path / "out", {"shard_part": part})
    with pytest.raises(DataError, match="inside the source"):
        api.shard(source, source / "shards")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds other files"):
        api.shard(source, tmp_path / "busy")
    small = tmp_path / "small"
    assert main(["shard", str(source), str(small), "--max-side", "64"]) == 0
    for sample in scan(small).samples:
        image = open_sample(sample)
        assert max(image.size) <= 64 and np.asarray(image).std() > 0
        assert sample.name.endswith(".jpg") and read_sample(sample)[:2] == b"\xff\xd8"


def test_settings_section(tmp_path):
    s = as_settings({"shard_samples": 7, "shard_part": "1/3", "shard_max_side": 512})
    assert (s.shard.shard_samples, s.shard.shard_part, s.shard.shard_max_side) == (7, "1/3", 512)
    with pytest.raises(SettingsError, match="shard_samples"):
        as_settings({"shard_samples": 0})
