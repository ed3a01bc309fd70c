"""The frozen-backbone feature cache when things go wrong: a cache folder that cannot be written or
a full disk (training goes on, with a warning), a weights file replaced in place (a new cache, never
its old features), and two writers at once (nothing lost, never a torn file)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import torch

import imgclf.core.atomic as atomic_module
from imgclf.core.events import Message, StopToken
from imgclf.core.preprocessing import Preprocessing
from imgclf.data.sources import Sample
from imgclf.training.features import FeatureStore, extract_features

PREP = Preprocessing(16, (0.5,) * 3, (0.5,) * 3)


@pytest.fixture()
def digits(digits_dir) -> tuple[list[Sample], list[str]]:
    """Twelve real digit scans and their content hashes, as training hands them to the cache."""
    paths = [p for label in "123" for p in sorted((digits_dir / label).glob("*.png"))[:4]]
    samples = [Sample(str(p), p.parent.name) for p in paths]
    return samples, [hashlib.sha1(p.read_bytes()).hexdigest() for p in paths]


def forward(batch: torch.Tensor) -> torch.Tensor:
    """A stand-in backbone: the mean of each channel and of each image half (a real function of the
    pixels, so features of different images differ)."""
    x = batch.float()
    return torch.cat([x.mean(dim=(2, 3)), x[:, :, :8].mean(dim=(1, 2, 3))[:, None]], dim=1)


def extract(samples, hashes, store, events) -> tuple[torch.Tensor, list[int]]:
    return extract_features(forward, samples, hashes, store, PREP, events, StopToken(), batch_size=5)


def warnings_of(events: list) -> list[Message]:
    return [e for e in events if isinstance(e, Message) and e.level == "warning"]


# ---------------------------------------------------------------- a cache that cannot be written


def test_cache_folder_that_cannot_be_made_is_a_warning_and_features_are_kept(digits, tmp_path, monkeypatch):
    samples, hashes = digits
    monkeypatch.setenv("IMGCLF_CACHE_DIR", str(tmp_path / "good"))
    expected, _ = extract(samples, hashes, FeatureStore("m", "imagenet", PREP, 0), [].append)

    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "features").write_text("a file where the cache folder should be")  # chmod would not stop root
    monkeypatch.setenv("IMGCLF_CACHE_DIR", str(blocked))
    events: list = []
    store = FeatureStore("m", "imagenet", PREP, 0)
    x, kept = extract(samples, hashes, store, events.append)
    assert kept == list(range(12)) and torch.equal(x, expected)  # training goes on with these
    [warning] = warnings_of(events)
    assert warning.path == str(blocked / "features")
    assert f"feature cache not written to {blocked / 'features'}" in warning.text and "File exists" in warning.text
    assert store.dirty  # kept in memory, written by a later save that can
    assert (blocked / "features").read_text().startswith("a file")


def test_disk_full_while_caching_is_a_warning_and_the_old_cache_stays_whole(digits, monkeypatch):
    samples, hashes = digits
    first = FeatureStore("m", "imagenet", PREP, 0)
    extract(samples[:6], hashes[:6], first, [].append)
    before = first.path.read_bytes()

    def disk_full(descriptor: int) -> None:  # ext4 reports a full disk at fsync (delayed allocation)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    events: list = []
    store = FeatureStore("m", "imagenet", PREP, 0)
    with monkeypatch.context() as patch:  # only the save fails: not the cache folder set for the test
        patch.setattr(atomic_module.os, "fsync", disk_full)
        x, kept = extract(samples, hashes, store, events.append)
    assert kept == list(range(12)) and x.shape == (12, 4)
    [warning] = warnings_of(events)
    assert warning.path == str(store.path.parent) and "No space left on device" in warning.text
    assert store.path.read_bytes() == before  # the earlier cache, whole
    assert [p.name for p in store.path.parent.iterdir()] == [store.path.name]  # no temporary file left
    assert set(FeatureStore("m", "imagenet", PREP, 0).vectors) == set(hashes[:6])


def test_a_real_write_failure_inside_safetensors_is_a_warning_too(digits):
    """safetensors reports a failed write as its own error, not OSError: a file-size limit makes one."""
    resource = pytest.importorskip("resource")
    import signal

    samples, hashes = digits
    store = FeatureStore("m", "imagenet", PREP, 0)
    store.vectors = {h: torch.full((512,), float(i), dtype=torch.float16) for i, h in enumerate(hashes)}
    store.dirty = True
    events: list = []
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the process killed
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        saved = store.save(events.append)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert saved is False and not store.path.exists()
    [warning] = warnings_of(events)
    assert "File too large" in warning.text and warning.path == str(store.path.parent)
    assert store.save(events.append) is True and len(FeatureStore("m", "imagenet", PREP, 0).vectors) == 12


# ---------------------------------------------------------------- weights by content, two writers


def test_weights_replaced_in_place_are_a_new_cache(digits, tmp_path):
    samples, hashes = digits
    weights = tmp_path / "backbone.safetensors"
    weights.write_bytes(b"weights, version one")
    old = FeatureStore("m", str(weights), PREP, 0)
    extract(samples, hashes, old, [].append)
    assert len(FeatureStore("m", str(weights), PREP, 0).vectors) == 12  # unchanged weights: all cached

    stat = weights.stat()
    weights.write_bytes(b"weights, version two")  # same path, same size, mtime put back (rsync -a)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    new = FeatureStore("m", str(weights), PREP, 0)
    assert new.path != old.path and new.vectors == {}  # no stale features of the old weights

    copy = tmp_path / "elsewhere.safetensors"
    copy.write_bytes(b"weights, version one")
    assert FeatureStore("m", str(copy), PREP, 0).path == old.path  # the content counts, not the name


def test_built_in_weights_keep_their_cache(tmp_path, monkeypatch):
    """Keys of built-in weights are as before, so caches written by earlier versions stay in use."""
    monkeypatch.chdir(tmp_path)
    digest = hashlib.sha1(json.dumps(["m", "imagenet", PREP.to_dict(), 0], sort_keys=True).encode()).hexdigest()
    assert FeatureStore("m", "imagenet", PREP, 0).path.name == f"m-v0-{digest[:16]}.safetensors"


def test_two_writers_at_once_lose_nothing_and_leave_whole_files(digits):
    _, hashes = digits
    writers = [FeatureStore("m", "imagenet", PREP, 0) for _ in range(2)]
    for w, writer in enumerate(writers):  # each has features the other lacks
        writer.vectors = {f"{w}-{i}": torch.full((256,), float(w * 100 + i), dtype=torch.float16) for i in range(40)}
    start, errors = threading.Barrier(2), []

    def write(writer: FeatureStore) -> None:
        try:
            start.wait()
            for _ in range(5):
                writer.dirty = True
                assert writer.save()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(writer,)) for writer in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    back = FeatureStore("m", "imagenet", PREP, 0).vectors  # a torn file would read as empty
    assert len(back) == 80
    assert all(torch.equal(back[f"{w}-{i}"], torch.full((256,), float(w * 100 + i))) for w in (0, 1) for i in range(40))
    assert [p.suffix for p in Path(writers[0].path).parent.iterdir()] == [".safetensors"]
