"""Frozen-backbone features, computed once and cached on disk.

The cache is keyed by the file's content hash, the model, its weights and the preprocessing, so a
second run, a new head, or the same photos under another name cost nothing. Feature extraction is
inference, run on the fastest path the machine has (channels_last + bf16 autocast where the CPU
has AMX/AVX-512-BF16, detected). View 0 is the centre crop; views 1..K are seeded augmentations
("distortions" in TensorFlow's retrain.py).

A weights file counts by its content (SHA-256), so one replaced in place under the same path is a
new cache. Writers merge what is on disk under a lock on the cache folder, then replace the file
atomically: two trainings at once lose no features and never leave a torn file. A cache that
cannot be written (disk full, read-only folder) is a warning; the features stay in memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from imgclf.core.atomic import atomic_write
from imgclf.core.events import Events, StopToken, Tracker, channel, skipped, warn
from imgclf.core.preprocessing import Preprocessing
from imgclf.core.settings import PREDICT_BATCH_SIZE
from imgclf.data.audit import cache_dir
from imgclf.data.dataset import open_for, prefetch_batches
from imgclf.data.images import DEFAULT_MAX_PIXELS, ImageError
from imgclf.data.sources import Sample
from imgclf.data.transforms import eval_tensor, train_augmentation, train_cache_tensor
from imgclf.predictors import weights_digest

# (path, size, mtime_ns, inode, ctime_ns) -> SHA-256: a weights file is read once per process
# while it stays the same file; any replacement (even with size and mtime kept) changes the stamp
_WEIGHTS_DIGESTS: dict[tuple, str] = {}
_DIGESTS_LOCK = threading.Lock()


def weights_key(weights: str) -> str:
    """What cached features depend on: the content of a weights file, or the name of built-in
    weights ("imagenet"). Keying on the path alone would reuse features of weights since replaced."""
    try:
        info = os.stat(weights)
    except (OSError, ValueError):  # a built-in name, not a file (ValueError: a NUL in it)
        return weights
    if not stat.S_ISREG(info.st_mode):
        return weights
    stamp = (os.path.abspath(weights), info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns)
    with _DIGESTS_LOCK:
        known = _WEIGHTS_DIGESTS.get(stamp)
    if known is not None:
        return known
    try:
        key = f"sha256:{weights_digest(weights)}"
    except OSError:  # unreadable: loading the weights reports that; the stamp still tells versions apart
        return "|".join(str(part) for part in stamp)
    with _DIGESTS_LOCK:
        _WEIGHTS_DIGESTS[stamp] = key
    return key


def _read_vectors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        return {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            hashes = json.loads(handle.metadata()["hashes"])
            return dict(zip(hashes, handle.get_tensor("features")))
    except (OSError, ValueError, KeyError, SafetensorError):
        return {}  # a damaged cache is only lost time


@contextlib.contextmanager
def _folder_locked(folder: Path):
    """One writer at a time in the cache folder, across threads and processes (flock on the folder
    itself: no lock file to leave behind). Released however the writer ends."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError:  # NFS can refuse a lock on a folder: the write is still atomic, only unmerged
            pass
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


class FeatureStore:
    """``content hash -> feature vector`` for one (model, weights, preprocessing, view) on disk."""

    def __init__(self, model_name: str, weights_id: str, prep: Preprocessing, view: int, engine: str = "torch"):
        # features of another engine differ in the last digits: each engine has its own cache
        parts = [model_name, weights_key(weights_id), prep.to_dict(), view] + ([engine] if engine != "torch" else [])
        key = json.dumps(parts, sort_keys=True)
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        self.path = cache_dir() / "features" / f"{model_name}-v{view}-{digest}.safetensors"
        self.vectors: dict[str, torch.Tensor] = _read_vectors(self.path)
        self.dirty = False

    def save(self, events: Events | None = None) -> bool:
        """Write the vectors, with those another writer saved meanwhile, atomically. A cache that
        cannot be written is a warning, not an error: the vectors stay in memory for this run.
        Returns whether the cache on disk is up to date."""
        if not self.dirty or not self.vectors:
            return True
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with _folder_locked(folder):
                merged = {**_read_vectors(self.path), **self.vectors}
                hashes = list(merged)
                stacked = torch.stack([merged[h] for h in hashes]).contiguous()
                # one file, the hashes in its header: vectors and their keys can never disagree
                metadata = {"hashes": json.dumps(hashes)}
                atomic_write(self.path, lambda temp: save_file({"features": stacked}, temp, metadata=metadata))
        except (OSError, SafetensorError) as exc:  # safetensors reports a failed write as its own error
            warn(
                channel(events),
                f"feature cache not written to {folder} ({exc}); training goes on with the features in memory. "
                "Free some space there or set IMGCLF_CACHE_DIR to a writable folder to keep them for the next run",
                str(folder),
            )
            return False
        self.vectors, self.dirty = merged, False
        return True


def _view_loader(
    samples: list[Sample], hashes: list[str], prep: Preprocessing, view: int, seed: int, events: Events, max_pixels: int
):
    augment = train_augmentation("light", prep) if view else None

    def load(index: int) -> torch.Tensor | None:
        try:
            image = open_for(samples[index], prep, max_pixels)
        except ImageError as exc:
            skipped(events, exc.path, exc.reason)
            return None
        if augment is None:
            return eval_tensor(image, prep)
        with torch.random.fork_rng(devices=[]):
            # seeded by content, so a cached view never depends on what else was extracted with it
            torch.manual_seed((int(hashes[index][:12], 16) + 1_000_003 * view + seed) & 0x7FFF_FFFF_FFFF)
            return augment(train_cache_tensor(image, prep))

    return load


@torch.no_grad()
def extract_features(
    forward: Callable[[torch.Tensor], torch.Tensor],
    samples: list[Sample],
    hashes: list[str],
    store: FeatureStore,
    prep: Preprocessing,
    events: Events,
    stop: StopToken,
    view: int = 0,
    seed: int = 0,
    batch_size: int = PREDICT_BATCH_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[torch.Tensor, list[int]]:
    """Features (float32) for the samples that decode, and their indices; cached ones are reused.
    ``forward``: uint8 NCHW batch -> features, on the engine measured fastest (see ``engines``).
    A stop saves the features computed so far (a rerun starts where this one ended) and raises Stopped."""
    todo = [i for i, h in enumerate(hashes) if h not in store.vectors]
    if todo:
        load = _view_loader([samples[i] for i in todo], [hashes[i] for i in todo], prep, view, seed, events, max_pixels)
        tracker = Tracker(events, f"features (view {view})", len(todo))
        try:
            for chunk, positions, batch in prefetch_batches(len(todo), load, batch_size):
                if batch is not None:
                    vectors = forward(batch)
                    for position, vector in zip(positions, vectors):
                        store.vectors[hashes[todo[position]]] = vector.to(torch.float16)
                    store.dirty = True
                tracker.advance(len(chunk))
                stop.check()
        finally:
            store.save(events)
    kept = [i for i, h in enumerate(hashes) if h in store.vectors]
    if not kept:
        return torch.zeros(0, 0), []
    return torch.stack([store.vectors[hashes[i]] for i in kept]).float(), kept
