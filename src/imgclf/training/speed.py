"""Speeds measured on this machine, on the run's own photos and network, before the plan is made:
a few timed batches of each stage, on a copy of the network and under a forked RNG, so the run
itself is the same as if nothing had been measured."""

from __future__ import annotations

import copy
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from imgclf.core.atomic import atomic_write
from imgclf.core.events import Events, StopToken, info
from imgclf.core.machine import cpu_model
from imgclf.core.settings import PREDICT_BATCH_SIZE
from imgclf.data.audit import cache_dir
from imgclf.data.dataset import ImageDataset, collate_skip_bad, open_for, prefetch_batches
from imgclf.data.images import ImageError
from imgclf.data.transforms import eval_tensor, train_augmentation, train_cache_tensor
from imgclf.models.device import Runtime, model_input
from imgclf.models.factory import freeze_early_layers
from imgclf.training.job import Job
from imgclf.training.split import PREFIX_BATCH, split_for

SAMPLE = 32  # photos timed per stage: about a second of work each on 2 cores


def _timed(work, repeats: int = 2) -> float:
    """Seconds per call of ``work`` after one warm-up call (oneDNN picks its kernels on the first)."""
    work()
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    return (time.perf_counter() - started) / repeats


def _decoded(job: Job) -> tuple[list, float]:
    """Up to SAMPLE training photos decoded as the training cache holds them, and decode img/s."""
    train = job.data.split("train")
    samples = train[:: max(1, len(train) // SAMPLE)][:SAMPLE]

    def decode(sample):
        try:
            return train_cache_tensor(open_for(sample, job.prep, job.settings.system.max_pixels), job.prep)
        except ImageError:
            return None

    started = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        tensors = [t for t in pool.map(decode, samples) if t is not None]
    return tensors, len(samples) / max(time.perf_counter() - started, 1e-6)


def _step_rate(forward, params, batch, targets, runtime: Runtime) -> float:
    """Images per second of one optimisation step (forward, backward, AdamW) at this batch."""
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-6)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        with runtime.autocast():
            loss = loss_fn(forward(batch).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return len(targets) / _timed(step, 2)


def eval_batch(job: Job, n: int = PREDICT_BATCH_SIZE) -> torch.Tensor | None:
    """Up to ``n`` training photos as the model's uint8 input (centre crops), to time engines on."""
    train = job.data.split("train")
    tensors = []
    for sample in train[:: max(1, len(train) // n)][:n]:
        try:
            tensors.append(eval_tensor(open_for(sample, job.prep, job.settings.system.max_pixels), job.prep))
        except ImageError:
            continue
    return torch.stack(tensors) if tensors else None


def measure(job: Job, model: nn.Module, features, want_finetune: bool, stop: StopToken) -> dict:
    """img/s of each stage the candidate plans have, measured now: decode (into the training
    cache), features (decode + frozen forward on the chosen engine, as extraction runs), evaluate
    (the same through PyTorch, as calibration and the test report run), and for training either the
    fine-tune step (frozen part and trained part apart, each precision) or the whole-network step."""
    with torch.random.fork_rng(devices=[]):
        tensors, decode_rate = _decoded(job)
        if not tensors:
            return {}

        def logits(batch: torch.Tensor) -> torch.Tensor:
            model.eval()
            with torch.no_grad(), job.runtime.autocast():
                return model(model_input(batch, job.runtime, job.prep))

        speeds = {"decode": decode_rate, "evaluate": _eval_rate(job, logits)}
        if features is not None:
            speeds["features"] = _eval_rate(job, features)
        stop.check()
        if want_finetune:
            speeds.update(_finetune_rates(job, model, tensors))
        elif job.mode == "full":
            speeds["train"] = _scratch_rate(job, model, tensors)
    return {name: round(value, 1) for name, value in speeds.items()}


def _eval_rate(job: Job, forward) -> float:
    """Photos per second from file to ``forward``'s output, as feature extraction and evaluation
    run it (decoding in threads beside the model, which shares the cores)."""
    samples = job.data.split("train")[::-1][: 2 * PREDICT_BATCH_SIZE]

    def load(index: int):
        try:
            return eval_tensor(open_for(samples[index], job.prep, job.settings.system.max_pixels), job.prep)
        except ImageError:
            return None

    def run(count: int) -> None:
        for _, _, batch in prefetch_batches(count, load, PREDICT_BATCH_SIZE):
            if batch is not None:
                forward(batch)

    run(min(PREDICT_BATCH_SIZE, len(samples)))  # warm-up, at the batch size that is timed (oneDNN plans per shape)
    started = time.perf_counter()
    run(len(samples))
    return len(samples) / max(time.perf_counter() - started, 1e-6)


def _augmented(job: Job, tensors: list, n: int) -> torch.Tensor:
    augment = train_augmentation(job.settings.train.augment, job.prep)
    views = ImageDataset([None] * len(tensors), [0] * len(tensors), job.prep, True, augment, 0, tensors)
    batch, _, _ = collate_skip_bad([views[(0, i % len(tensors))] for i in range(n)])
    return batch


def _finetune_rates(job: Job, model: nn.Module, tensors: list) -> dict:
    """The frozen part's forward (in the run's precision) and the trained part's step in fp32 and
    in the run's precision; and the whole step for comparison."""
    net = copy.deepcopy(model)
    freeze_early_layers(net, job.settings.train.freeze_stride)
    net.train()
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    n = min(job.settings.train.batch_size, 2 * SAMPLE)
    started = time.perf_counter()
    batch = _augmented(job, tensors, n)
    augment_s = (time.perf_counter() - started) / n  # the views are made beside the frozen layers, per photo
    targets = torch.randint(0, len(job.data.classes), (n,))
    x = model_input(batch, job.runtime, job.prep)
    fp32 = Runtime(job.runtime.device, None, job.runtime.channels_last)
    rates = {"finetune_whole": _step_rate(net, net.parameters(), x, targets, job.runtime)}
    split = split_for(net, job.settings.train.freeze_stride)
    if split is None:
        return rates
    with torch.no_grad(), job.runtime.autocast():
        h = split.prefix(x[:PREFIX_BATCH])
        frozen_s = _timed(lambda: split.prefix(x[:PREFIX_BATCH]), 1) / PREFIX_BATCH
    rates["frozen"] = 1.0 / (frozen_s + augment_s)
    h = torch.cat([h] * (n // len(h) + 1))[:n].float().contiguous(memory_format=job.runtime.memory_format)
    rates["trained_fp32"] = _step_rate(split.suffix, net.parameters(), h, targets, fp32)
    if job.runtime.dtype is not None:
        rates["trained_bf16"] = _step_rate(split.suffix, net.parameters(), h, targets, job.runtime)
    return rates


def _scratch_rate(job: Job, model: nn.Module, tensors: list) -> float:
    """A whole step of a network trained from scratch, augmentation included (it runs on the same cores)."""
    net = copy.deepcopy(model).train()
    n = min(job.settings.train.batch_size, 4 * SAMPLE)
    targets = torch.randint(0, len(job.data.classes), (n,))
    started = time.perf_counter()
    batch = _augmented(job, tensors, n)
    augment_s = time.perf_counter() - started
    step_rate = _step_rate(net, net.parameters(), model_input(batch, job.runtime, job.prep), targets, job.runtime)
    return 1.0 / (1.0 / step_rate + augment_s / n)


def _layouts_path() -> Path:
    return cache_dir() / "engines" / "layouts.json"


@torch.no_grad()
def choose_layout(job: Job, model: nn.Module, events: Events) -> bool:
    """Whether this network runs faster in channels_last than in NCHW on this CPU, in the run's
    precision: measured once per (CPU model, network, input size, precision) and remembered in the
    cache folder, never assumed from CPU flags (on an AVX2 machine without AVX-512 channels_last
    was 1.9x faster, where imgclf used to turn it off)."""
    precision = "bf16" if job.runtime.dtype is not None else "fp32"
    key = f"{cpu_model()}|{job.settings.model.model}|{job.prep.image_size}|{precision}"
    try:
        known = json.loads(_layouts_path().read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return bool(known[key]["channels_last"])
    x = torch.randn(16, 3, job.prep.image_size, job.prep.image_size, device=job.runtime.device)
    model.eval()
    rates = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        model.to(memory_format=layout)
        batch = x.contiguous(memory_format=layout)

        def forward(batch=batch):
            with job.runtime.autocast():
                model(batch)

        rates["channels_last" if layout == torch.channels_last else "nchw"] = round(len(x) / _timed(forward, 2), 1)
    choice = rates["channels_last"] >= rates["nchw"]
    info(
        events,
        f"memory layout: {'channels_last' if choice else 'NCHW'} (measured here: channels_last "
        f"{rates['channels_last']:.0f} img/s, NCHW {rates['nchw']:.0f} img/s; remembered for this CPU)",
    )
    known[key] = {"channels_last": choice, "images_per_s": rates}
    try:
        _layouts_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write(_layouts_path(), lambda temp: Path(temp).write_text(json.dumps(known, indent=1)))
    except OSError:
        pass  # not remembered: measured again next time
    return choice
