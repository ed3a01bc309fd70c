"""Frozen-backbone features, computed once and cached on disk.

The cache is keyed by the file's content hash, the model, its weights and the preprocessing, so a
second run, a new head, or the same photos under another name cost nothing. Feature extraction is
inference, run on the fastest path the machine has (channels_last + bf16 autocast where the CPU
has AMX/AVX-512-BF16, detected). View 0 is the centre crop; views 1..K are seeded augmentations
("distortions" in TensorFlow's retrain.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from imgclf.core.atomic import atomic_write
from imgclf.core.events import Events, StopToken, Tracker, skipped
from imgclf.core.preprocessing import Preprocessing
from imgclf.core.settings import PREDICT_BATCH_SIZE
from imgclf.data.audit import cache_dir
from imgclf.data.dataset import open_for, prefetch_batches
from imgclf.data.images import DEFAULT_MAX_PIXELS, ImageError
from imgclf.data.sources import Sample
from imgclf.data.transforms import eval_tensor, train_augmentation, train_cache_tensor


class FeatureStore:
    """``content hash -> feature vector`` for one (model, weights, preprocessing, view) on disk."""

    def __init__(self, model_name: str, weights_id: str, prep: Preprocessing, view: int, engine: str = "torch"):
        # features of another engine differ in the last digits: each engine has its own cache
        parts = [model_name, weights_id, prep.to_dict(), view] + ([engine] if engine != "torch" else [])
        key = json.dumps(parts, sort_keys=True)
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        self.path = cache_dir() / "features" / f"{model_name}-v{view}-{digest}.safetensors"
        self.vectors: dict[str, torch.Tensor] = {}
        if self.path.exists():
            try:
                with safe_open(str(self.path), framework="pt") as handle:
                    hashes = json.loads(handle.metadata()["hashes"])
                    self.vectors = dict(zip(hashes, handle.get_tensor("features")))
            except (OSError, ValueError, KeyError, SafetensorError):
                self.vectors = {}  # a damaged cache is only lost time
        self.dirty = False

    def save(self) -> None:
        if not self.dirty or not self.vectors:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        hashes = list(self.vectors)
        stacked = torch.stack([self.vectors[h] for h in hashes]).contiguous()
        # one file, the hashes in its header: vectors and their keys can never disagree
        atomic_write(
            self.path, lambda temp: save_file({"features": stacked}, temp, metadata={"hashes": json.dumps(hashes)})
        )
        self.dirty = False


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
            store.save()
    kept = [i for i, h in enumerate(hashes) if h in store.vectors]
    if not kept:
        return torch.zeros(0, 0), []
    return torch.stack([store.vectors[hashes[i]] for i in kept]).float(), kept
