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
    """A seeded permutation per epoch, laid out in global steps and shared among processes;
    yields ``(epoch, index)`` keys for this process.

    Each optimisation step takes the next ``batch_size x accumulate x world_size`` images of the
    permutation (the global batch), cut into micro-batches of ``batch_size``: micro-batch ``m`` of
    rank ``r`` is slice ``m * world_size + r`` of it (:meth:`slice_of`). So 2 ranks see, step by
    step, the same images as 1 process accumulating 2 micro-batches, and a resumed run skips whole
    global steps whatever the number of processes. Only whole global steps are taken (batch norm
    needs no 1-image batches, DDP needs equal steps everywhere) unless the data holds fewer than
    one: then the one step is what divides evenly among the processes.
    """

    def __init__(
        self,
        size: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
        accumulate: int = 1,
    ):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.accumulate = batch_size, accumulate
        self.epoch, self.skip_steps = 0, 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accumulate * self.world_size

    def set_epoch(self, epoch: int, skip_steps: int = 0) -> None:
        self.epoch, self.skip_steps = epoch, skip_steps

    @staticmethod
    def slice_of(micro: int, rank: int, world_size: int) -> int:
        """Which micro-batch of the global batch a rank's ``micro``-th micro-batch is."""
        return micro * world_size + rank

    def steps(self) -> int:
        """Optimisation steps in one epoch."""
        return self.size // self.global_batch if self.size >= self.global_batch else int(self.size >= self.world_size)

    def _indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        if self.size < self.global_batch:  # one short step, shared evenly
            share = self.size // self.world_size
            return order[self.rank * share : (self.rank + 1) * share] if self.skip_steps == 0 else []
        mine, b = [], self.batch_size
        for step in range(self.skip_steps, self.steps()):
            chunk = order[step * self.global_batch : (step + 1) * self.global_batch]
            for micro in range(self.accumulate):
                k = self.slice_of(micro, self.rank, self.world_size)
                mine += chunk[k * b : (k + 1) * b]
        return mine

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self._indices():
            yield self.epoch, index

    def __len__(self) -> int:
        return len(self._indices())


class ShareSampler(Sampler):
    """This process's share of an evaluation set: a contiguous block, no padding (every image
    evaluated exactly once over all processes), so the gathered results equal one process's."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.start, self.stop = (size * rank) // world_size, (size * (rank + 1)) // world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def prefetch_batches(
    count: int, load: Callable[[int], torch.Tensor | None], batch_size: int, workers: int | None = None
):
    """:func:`imgclf.data.preprocess.prefetch_batches` stacking torch tensors."""
    from imgclf.data.preprocess import prefetch_batches as prefetch

    return prefetch(count, load, batch_size, torch.stack, workers)
