"""The data side of a run: scan, audit, split and validate once, then reload exactly on resume;
decode images into memory caches and build the loaders."""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from imgclf.data.audit import audit, format_report
from imgclf.data.dataset import EpochSampler, ImageDataset, collate_skip_bad, decode_all
from imgclf.data.scan import DataError, Sample, scan
from imgclf.data.split import assign_splits, limit_per_class, read_split_csv, write_split_csv
from imgclf.data.transforms import Preprocessing, eval_tensor, train_augmentation, train_cache_tensor
from imgclf.settings import Settings
from imgclf.training.distributed import Distributed
from imgclf.training.hardware import available_memory_bytes


@dataclass
class RunData:
    classes: list[str]
    samples: list[Sample]  # every usable sample, with its split

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def targets(self, samples: list[Sample]) -> list[int]:
        index = {label: i for i, label in enumerate(self.classes)}
        return [index[s.label] for s in samples]


def validate_for_training(samples: list[Sample]) -> list[str]:
    """Refuse data that cannot train a classifier, before any time is spent; return the classes."""
    counts = Counter(s.label for s in samples)
    if len(counts) < 2:
        found = f"only '{next(iter(counts))}'" if counts else "none"
        raise DataError(f"need at least 2 classes with usable images to train a classifier, found {found}")
    lonely = sorted(label for label, n in counts.items() if n < 2)
    if lonely:
        raise DataError(f"classes with a single usable image cannot be split for training and testing: "
                        f"{', '.join(lonely)}; add images or remove these folders")
    train_counts = Counter(s.label for s in samples if s.split == "train")
    missing = sorted(label for label in counts if not train_counts.get(label))
    if missing:
        raise DataError(f"classes with no training image: {', '.join(missing)}")
    return sorted(counts)


def prepare_data(data: str, settings: Settings, out: Path, info: Distributed, progress: bool) -> RunData:
    """Scan and audit the source, split it, and write split.csv and audit.json into the run folder."""
    scanned = scan(data)
    report = audit(scanned, settings.data, progress=progress and info.is_main)
    if info.is_main:
        report.write_json(out / "audit.json")
        for problem in report.problems:
            print(f"skipped {problem['path']}: {problem['reason']}", file=sys.stderr)
        leaks = [d for d in report.duplicates if d["kind"] in ("across_splits", "conflicting_labels")]
        if leaks:
            print(f"warning: {len(leaks)} duplicate image(s) across splits or labels (see audit.json)",
                  file=sys.stderr)
    samples = assign_splits(report.usable, settings.data.val_fraction, settings.data.test_fraction)
    samples = limit_per_class(samples, settings.data.per_class, settings.train.seed)
    classes = validate_for_training(samples)
    if info.is_main:
        write_split_csv(samples, out / "split.csv")
        summary = format_report(report, max_rows=0).splitlines()[0]
        print(summary, file=sys.stderr)
    return RunData(classes, samples)


def reload_data(out: Path) -> RunData:
    """The exact samples and classes of an earlier run (for --resume)."""
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    return RunData(list(run["classes"]), read_split_csv(out / "split.csv"))


def use_memory_cache(setting: str, n_train: int, n_eval: int, prep: Preprocessing) -> bool:
    """Cache decoded images when they fit comfortably (a third of free memory)."""
    if setting != "auto":
        return setting == "ram"
    side = prep.resize_size
    needed = n_train * 3 * side * side * 1.4 + n_eval * 3 * prep.image_size ** 2
    return needed < available_memory_bytes() / 3


def worker_count(setting: int, cached: bool) -> int:
    """Workers only help when decoding happens per step; with a cache they fight the model for cores."""
    if setting >= 0:
        return setting
    if cached:
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _cached_dataset(samples: list[Sample], targets: list[int], prep: Preprocessing, train: bool,
                    cache: bool, progress: bool, desc: str) -> tuple[list[Sample], list[int], list | None]:
    """Decode into memory (dropping files that fail, each reported) or leave decoding to the loader."""
    if not cache:
        return samples, targets, None
    to_tensor = (lambda im: train_cache_tensor(im, prep)) if train else (lambda im: eval_tensor(im, prep))
    tensors, failures = decode_all(samples, to_tensor, prep, desc, progress)
    for failure in failures:
        print(f"skipped {failure['path']}: {failure['reason']}", file=sys.stderr)
    keep = [i for i, t in enumerate(tensors) if t is not None]
    return [samples[i] for i in keep], [targets[i] for i in keep], [tensors[i] for i in keep]


def _own_generator(seed: int) -> torch.Generator:
    """Loaders draw their worker seeds from this, not from the global RNG: otherwise starting an
    iterator shifts the dropout stream, and a run resumed mid-epoch would drift from the original."""
    return torch.Generator().manual_seed(seed)


@dataclass
class Loaders:
    train: DataLoader
    sampler: EpochSampler
    val: DataLoader | None
    train_dataset: ImageDataset


def build_loaders(run_data: RunData, prep: Preprocessing, settings: Settings, info: Distributed,
                  progress: bool) -> Loaders:
    t = settings.train
    train_samples, val_samples = run_data.split("train"), run_data.split("val")
    cache = use_memory_cache(t.cache, len(train_samples), len(val_samples), prep)
    show = progress and info.is_main
    train_samples, train_targets, train_cache = _cached_dataset(
        train_samples, run_data.targets(train_samples), prep, True, cache, show, "decode train")
    val_samples, val_targets, val_cache = _cached_dataset(
        val_samples, run_data.targets(val_samples), prep, False, cache, show, "decode val")
    train_set = ImageDataset(train_samples, train_targets, prep, True, train_augmentation(t.augment, prep),
                             t.seed, train_cache)
    sampler = EpochSampler(len(train_set), t.seed, True, info.rank, info.world_size)
    workers = worker_count(t.workers, cache)
    drop_last = len(train_set) // info.world_size > t.batch_size  # no 1-image batches for batch norm
    train_loader = DataLoader(train_set, t.batch_size, sampler=sampler, num_workers=workers,
                              collate_fn=collate_skip_bad, drop_last=drop_last,
                              pin_memory=torch.cuda.is_available(), generator=_own_generator(t.seed))
    val_loader = None
    if val_samples:
        val_set = ImageDataset(val_samples, val_targets, prep, False, cache=val_cache)
        val_loader = DataLoader(val_set, t.batch_size * 2, num_workers=workers, collate_fn=collate_skip_bad,
                                generator=_own_generator(t.seed))
    return Loaders(train_loader, sampler, val_loader, train_set)
