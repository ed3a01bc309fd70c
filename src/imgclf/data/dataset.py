"""Feeding images to a model: decoded-image caches, datasets and a resumable seeded sampler.

Augmentation is seeded per (seed, epoch, image), so a run gives the same batches whatever the
number of DataLoader workers, and a resumed run replays exactly what the killed one would have.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from imgclf.core.events import Events, StopToken, Tracker, channel, stop_token
from imgclf.core.preprocessing import Preprocessing
from imgclf.data.images import DEFAULT_MAX_PIXELS, ImageError
from imgclf.data.sources import Sample, open_sample
from imgclf.data.transforms import eval_tensor, train_cache_tensor


def open_for(sample: Sample, prep: Preprocessing | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A sample's picture, JPEGs decoded at the draft scale that ``prep`` allows. Raises ImageError."""
    return open_sample(sample, prep.resize_size if prep else None, max_pixels)


def decode_all(
    samples: list[Sample],
    to_tensor: Callable[[Image.Image], torch.Tensor],
    prep: Preprocessing,
    stage: str,
    events: Events | None = None,
    stop: StopToken | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[list, list[ImageError]]:
    """Decode samples in parallel threads (Pillow releases the GIL) into uint8 tensors.

    Returns the tensors (None where a file failed) and the failures. A stop raises Stopped.
    """
    stop = stop_token(stop)

    def work(sample: Sample):
        if stop.is_set():
            return None, None
        try:
            return to_tensor(open_for(sample, prep, max_pixels)), None
        except ImageError as exc:
            return None, exc

    tensors, failures = [], []
    tracker = Tracker(channel(events), stage, len(samples))
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for tensor, failure in pool.map(work, samples):
            tensors.append(tensor)
            if failure:
                failures.append(failure)
            tracker.advance()
    stop.check()
    return tensors, failures


class ImageDataset(Dataset):
    """Labelled images as uint8 CHW tensors, from a cache or decoded on demand.

    Items are keyed ``(epoch, index)``; in training mode the augmentation for that pair is seeded
    from ``(seed, epoch, index)``. An image that fails to decode yields its ImageError, which
    collate hands on beside the batch: loader workers are other processes, so the report of a bad
    file travels with the data to the process that emits events.
    """

    def __init__(
        self,
        samples: list[Sample],
        targets: list[int],
        prep: Preprocessing,
        train: bool,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        seed: int = 0,
        cache: list[torch.Tensor | None] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.samples, self.targets, self.prep = samples, targets, prep
        self.train, self.augment, self.seed, self.cache = train, augment, seed, cache
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def _base_tensor(self, index: int) -> torch.Tensor | ImageError:
        if self.cache is not None:
            return self.cache[index]
        try:
            image = open_for(self.samples[index], self.prep, self.max_pixels)
        except ImageError as exc:
            return exc
        return train_cache_tensor(image, self.prep) if self.train else eval_tensor(image, self.prep)

    def __getitem__(self, key: tuple[int, int] | int):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        tensor = self._base_tensor(index)
        if isinstance(tensor, ImageError):
            return tensor
        if self.train and self.augment is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF)
                tensor = self.augment(tensor)
        return tensor, self.targets[index]


def collate_skip_bad(batch: list) -> tuple[torch.Tensor | None, torch.Tensor | None, list[ImageError]]:
    """``(images, targets, failures)``: the batch stacked without the images that failed to
    decode (None, None when all did), and those failures."""
    failures = [item for item in batch if isinstance(item, ImageError)]
    good = [item for item in batch if not isinstance(item, ImageError)]
    if not good:
        return None, None, failures
    return torch.stack([t for t, _ in good]), torch.tensor([y for _, y in good], dtype=torch.long), failures


class EpochSampler(Sampler):
    """A seeded permutation per epoch, sharded over ``world_size`` processes, able to skip the
    first ``skip`` items (to resume mid-epoch). Yields ``(epoch, index)`` keys."""

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))[self.rank :: self.world_size]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        # every process gets the same number of items (DDP steps in lock-step)
        per_rank = len(order) // self.world_size if self.world_size > 1 else len(order)
        return order[self.rank :: self.world_size][:per_rank]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self._indices()[self.skip :]:
            yield self.epoch, index

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.skip)


def prefetch_batches(
    count: int, load: Callable[[int], torch.Tensor | None], batch_size: int, workers: int | None = None
):
    """:func:`imgclf.data.preprocess.prefetch_batches` stacking torch tensors."""
    from imgclf.data.preprocess import prefetch_batches as prefetch

    return prefetch(count, load, batch_size, torch.stack, workers)
