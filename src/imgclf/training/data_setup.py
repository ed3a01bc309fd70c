"""The data side of a run: scan, audit, split and validate once (or reload exactly on resume);
decode images into memory caches and build the loaders."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from imgclf.core.errors import DataError
from imgclf.core.events import Events, StopToken, ignore, info, skipped, warn
from imgclf.core.machine import available_memory_bytes
from imgclf.core.preprocessing import Preprocessing
from imgclf.core.rundir import RunDir
from imgclf.core.settings import Settings
from imgclf.data.audit import audit, summary_line
from imgclf.data.dataset import EpochSampler, ImageDataset, ShareSampler, collate_skip_bad, decode_all
from imgclf.data.sources import Sample, scan
from imgclf.data.split import (
    assign_splits,
    keep_copies_together,
    limit_per_class,
    read_split_csv,
    write_split_csv,
)
from imgclf.data.transforms import eval_tensor, train_augmentation, train_cache_tensor
from imgclf.training.distributed import Distributed, per_node


@dataclass
class RunData:
    classes: list[str]
    samples: list[Sample]  # every usable sample, with its split

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def targets(self, samples: list[Sample]) -> list[int]:
        index = {label: i for i, label in enumerate(self.classes)}
        return [index[s.label] for s in samples]


def skipped_summary(problems: list[dict]) -> str:
    """How many files were left out, why, and the setting that lets the commonest kind in."""
    if not problems:
        return ""
    reasons = Counter(p["reason"].split(" (")[0] for p in problems)
    why = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common(4))
    hint = {
        "too small": "; lower --min-side to keep smaller images",
        "too many pixels": "; raise --max-pixels to read larger images",
    }.get(reasons.most_common(1)[0][0], "")
    return f" ({len(problems)} files were skipped: {why}{hint}; imgclf check lists them)"


def validate_for_training(samples: list[Sample], problems: list[dict] = ()) -> list[str]:
    """Refuse data that cannot train a classifier, before any time is spent; return the classes."""
    counts = Counter(s.label for s in samples)
    if len(counts) < 2:
        found = f"only '{next(iter(counts))}'" if counts else "none"
        left_out = skipped_summary(list(problems))
        raise DataError(f"need at least 2 classes with usable images to train a classifier, found {found}{left_out}")
    lonely = sorted(label for label, n in counts.items() if n < 2)
    if lonely:
        raise DataError(
            f"classes with a single usable image cannot be split for training and testing: "
            f"{', '.join(lonely)}; add images or remove these folders"
        )
    train_counts = Counter(s.label for s in samples if s.split == "train")
    missing = sorted(label for label in counts if not train_counts.get(label))
    if missing:
        raise DataError(f"classes with no training image: {', '.join(missing)}")
    return sorted(counts)


def _check_held_out(samples: list[Sample], events: Events) -> None:
    """Before any training: a run with no test image could never say how good it is (refused); one
    with no validation image trains, choosing its best epoch by training loss (said)."""
    splits = Counter(s.split for s in samples)
    if not splits.get("test"):
        raise DataError(
            "no test images after the split (test_fraction is 0 and the data names no test split), so the "
            "model could not be measured; set --test-fraction (e.g. 0.1) or add a test split"
        )
    if not splits.get("val"):
        warn(
            events,
            "no validation images after the split: the best epoch is chosen by training loss and no confidence "
            "threshold is calibrated; set --val-fraction (e.g. 0.1) for both",
        )


def prepare_data(
    source: str, settings: Settings, run: RunDir, ranks: Distributed, events: Events, stop: StopToken
) -> RunData:
    """Scan and audit the source, split it, and write split.csv and audit.json into the run folder."""
    report = audit(scan(source, settings.data.allow_outside), settings.data, settings.system, events, stop)
    if ranks.is_main:
        report.write_json(run / RunDir.AUDIT)
        for problem in report.problems:
            skipped(events, problem["path"], problem["reason"])
        leaks = [d for d in report.duplicates if d["kind"] in ("across_splits", "conflicting_labels")]
        if leaks:
            warn(
                events,
                f"{len(leaks)} duplicate image(s) across splits or labels (see audit.json)",
                str(run / RunDir.AUDIT),
            )
    samples = assign_splits(report.usable, settings.data.val_fraction, settings.data.test_fraction)
    samples = keep_copies_together(samples, report.usable, report.duplicates, events if ranks.is_main else ignore)
    samples = limit_per_class(samples, settings.data.per_class, settings.train.seed)
    classes = validate_for_training(samples, report.problems)
    _check_held_out(samples, events if ranks.is_main else ignore)
    if ranks.is_main:
        write_split_csv(samples, run / RunDir.SPLIT)
        info(events, summary_line(report))
    return RunData(classes, samples)


def reload_data(run: RunDir) -> RunData:
    """The exact samples and classes of an earlier run (for --resume)."""
    return RunData(list(run.read_run()["classes"]), read_split_csv(run / RunDir.SPLIT))


def use_memory_cache(setting: str, n_train: int, n_eval: int, prep: Preprocessing, ranks: Distributed) -> bool:
    """Cache decoded images when they fit comfortably (a third of this process's share of free
    memory: the node's processes each cache their own)."""
    if setting != "auto":
        return setting == "ram"
    side = prep.resize_size
    needed = n_train * 3 * side * side * 1.4 + n_eval * 3 * prep.image_size**2
    return needed < per_node(available_memory_bytes(), ranks) / 3


def worker_count(setting: int, cached: bool, ranks: Distributed = Distributed()) -> int:
    """Workers only help when decoding happens per step; with a cache they fight the model for
    cores. The node's cores are shared among its processes."""
    if setting >= 0:
        return setting
    if cached:
        return 0
    return max(1, min(8, int(per_node(os.cpu_count() or 2, ranks)) - 1))


def _cached_dataset(
    samples: list[Sample],
    targets: list[int],
    prep: Preprocessing,
    train: bool,
    cache: bool,
    stage: str,
    ctx: tuple[Events, StopToken, int],
) -> tuple[list[Sample], list[int], list | None]:
    """Decode into memory (dropping files that fail, each reported) or leave decoding to the loader."""
    if not cache:
        return samples, targets, None
    events, stop, max_pixels = ctx
    to_tensor = (lambda im: train_cache_tensor(im, prep)) if train else (lambda im: eval_tensor(im, prep))
    tensors, failures = decode_all(samples, to_tensor, prep, stage, events, stop, max_pixels)
    for failure in failures:
        skipped(events, failure.path, failure.reason)
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


def build_loaders(
    run_data: RunData, prep: Preprocessing, settings: Settings, ranks: Distributed, events: Events, stop: StopToken
) -> Loaders:
    t, system = settings.train, settings.system
    train_samples, val_samples = run_data.split("train"), run_data.split("val")
    cache = use_memory_cache(system.cache, len(train_samples), len(val_samples), prep, ranks)
    ctx = (events, stop, system.max_pixels)
    train_samples, train_targets, train_cache = _cached_dataset(
        train_samples, run_data.targets(train_samples), prep, True, cache, "decode train", ctx
    )
    val_samples, val_targets, val_cache = _cached_dataset(
        val_samples, run_data.targets(val_samples), prep, False, cache, "decode val", ctx
    )
    train_set = ImageDataset(
        train_samples,
        train_targets,
        prep,
        True,
        train_augmentation(t.augment, prep),
        t.seed,
        train_cache,
        system.max_pixels,
    )
    sampler = EpochSampler(len(train_set), t.seed, True, ranks.rank, ranks.world_size, t.batch_size, t.accumulate)
    workers = worker_count(system.workers, cache, ranks)
    train_loader = DataLoader(
        train_set,
        t.batch_size,
        sampler=sampler,  # whole global steps only (see EpochSampler)
        num_workers=workers,
        collate_fn=collate_skip_bad,
        pin_memory=torch.cuda.is_available(),
        generator=_own_generator(t.seed),
    )
    val_loader = None
    if val_samples:
        val_set = ImageDataset(val_samples, val_targets, prep, False, cache=val_cache, max_pixels=system.max_pixels)
        val_loader = DataLoader(
            val_set,
            t.batch_size * 2,
            sampler=ShareSampler(len(val_set), ranks.rank, ranks.world_size),  # gathered on rank 0
            num_workers=workers,
            collate_fn=collate_skip_bad,
            generator=_own_generator(t.seed),
        )
    return Loaders(train_loader, sampler, val_loader, train_set)
