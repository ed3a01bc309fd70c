"""The optimisation of a run: AdamW with its parameter groups, the learning-rate schedule, the
loss, and the one :class:`TrainStep` they make with the model (compiled, wrapped for DDP)."""

from __future__ import annotations

import math

import torch
from torch import nn

from imgclf.core.settings import Settings
from imgclf.models.heads import classifier_name
from imgclf.training.data_setup import Loaders
from imgclf.training.distributed import Distributed, unwrap, wrap_model
from imgclf.training.head import class_weights
from imgclf.training.job import Job
from imgclf.training.loop import TrainStep
from imgclf.training.transfer import use_class_weights

GPU_READ_EVERY = 25  # steps between reads of the loss off a GPU (a read waits for its queue to drain)
COMPILE_MIN_STEPS = 2000  # torch.compile's minute or two of compiling pays back over this many GPU steps


def loop_epochs(settings: Settings) -> int:
    return settings.train.finetune_epochs if settings.train.mode == "finetune" else settings.train.epochs


def _optimizer(model: nn.Module, settings: Settings) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and normalisation weights (1-D parameters). In finetune
    mode the pretrained layers learn ``backbone_lr_scale`` times slower than the new head."""
    t = settings.train
    head_prefix = classifier_name(unwrap(model)) + "."
    groups = []
    for is_head in (False, True):
        scale = 1.0 if is_head or t.mode != "finetune" else t.backbone_lr_scale
        params = [
            (n, p)
            for n, p in unwrap(model).named_parameters()
            if p.requires_grad and n.startswith(head_prefix) == is_head
        ]
        groups += [
            {"params": [p for _, p in params if p.ndim > 1], "weight_decay": t.weight_decay, "lr": t.lr * scale},
            {"params": [p for _, p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": t.lr * scale},
        ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr)


def _scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, settings: Settings):
    """Linear warm-up, then cosine decay to 1% of the peak, stepped every optimisation step."""
    total = max(1, loop_epochs(settings) * steps_per_epoch)
    warmup = min(total - 1, int(settings.train.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return 0.01 + 0.99 * step / max(1, warmup)
        done = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * done))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _compiled(model: nn.Module, job: Job, steps: int) -> nn.Module:
    """torch.compile before DDP (the order PyTorch documents), when asked, or on a GPU for a run
    long enough to pay the compile time back."""
    setting = job.settings.system.compile
    if setting == "on" or (setting == "auto" and job.runtime.device.type == "cuda" and steps >= COMPILE_MIN_STEPS):
        return torch.compile(model)
    return model


def build_step(model: nn.Module, job: Job, loaders: Loaders, ranks: Distributed) -> TrainStep:
    settings, num_classes = job.settings, len(job.data.classes)
    steps_per_epoch = loaders.sampler.steps()
    model = _compiled(model, job, loop_epochs(settings) * steps_per_epoch)
    model = wrap_model(model, ranks, job.runtime.device, settings.train.sync_bn)
    optimizer = _optimizer(model, settings)
    targets = torch.tensor(loaders.train_dataset.targets, dtype=torch.long)
    weights = None
    if use_class_weights(settings.train.class_weights, targets, num_classes):
        weights = class_weights(targets, num_classes).to(job.runtime.device)
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=settings.train.label_smoothing)
    scheduler = _scheduler(optimizer, steps_per_epoch, settings)
    scaler = torch.amp.GradScaler("cuda") if job.runtime.dtype == torch.float16 else None
    return TrainStep(
        model,
        optimizer,
        scheduler,
        loss_fn,
        job.runtime,
        job.prep,
        frozen_bn=job.mode == "finetune",
        ranks=ranks,
        accumulate=settings.train.accumulate,
        seed=settings.train.seed,
        scaler=scaler,
        read_every=GPU_READ_EVERY if job.runtime.device.type == "cuda" else 1,
    )
