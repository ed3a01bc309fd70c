"""One epoch of training and one pass of evaluation, as plain functions (torchvision references style)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from imgclf.core.events import Events, StopToken, Tracker, info, skipped
from imgclf.core.preprocessing import Preprocessing
from imgclf.data.images import ImageError
from imgclf.models.device import Runtime, model_input
from imgclf.training.distributed import Distributed, agree


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training cannot go on from here (fit turns it into a TrainError)."""


@dataclass
class EpochProgress:
    """Running totals of one training epoch; saved in mid-epoch checkpoints to resume exactly."""

    step: int = 0  # optimisation steps done in this epoch
    seen: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        seen = max(self.seen, 1)
        return {
            "train_loss": self.loss_sum / seen,
            "train_acc": self.correct / seen,
            "images_per_s": self.seen / max(self.seconds, 1e-9),
        }


@dataclass
class TrainStep:
    """Everything one optimisation step needs."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.Module
    runtime: Runtime
    prep: Preprocessing
    frozen_bn: bool = False  # keep batch-norm statistics as pretrained (finetune on small data)
    # the batch -> logits function when the loader yields something else than images (split fine-tuning)
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    reported: set = field(default_factory=set)  # bad files already named (once per run, not per epoch)
    ranks: Distributed = field(default_factory=Distributed)
    accumulate: int = 1  # micro-batches per optimisation step
    seed: int = 0
    scaler: torch.amp.GradScaler | None = None  # fp16 on GPUs without bf16
    # steps between reading the loss and accuracy off the device: every step on a CPU (free, and a
    # NaN is caught before it updates the model); on a GPU each read waits for the queued work
    read_every: int = 1
    pending: list = field(default_factory=list)  # (loss sum, correct, images) not read yet
    skipped_steps: int = 0  # steps every process skipped: one had a micro-batch of no readable image


@dataclass
class EpochControl:
    """How an epoch may end early and when it saves on the way: the stop token, the step limit,
    and a mid-epoch checkpoint every ``checkpoint_s`` seconds (``save`` is called in every process)."""

    stop: StopToken
    max_steps: int = 0
    global_step: int = 0
    checkpoint_s: float = 0.0
    save: Callable[[EpochProgress], None] | None = None


def report_failures(failures: list[ImageError], events: Events, reported: set) -> None:
    for failure in failures:
        if failure.path not in reported:
            reported.add(failure.path)
            skipped(events, failure.path, failure.reason)


def _train_mode(step: TrainStep) -> None:
    step.model.train()
    if step.frozen_bn:
        for module in step.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _micro_batches(loader, accumulate: int):
    """The loader's batches grouped into optimisation steps: lists of ``accumulate`` micro-batches
    (fewer in the one short step of a data set smaller than a global batch)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == accumulate:
            yield group
            group = []
    if group:
        yield group


def train_one_epoch(
    step: TrainStep, loader, progress: EpochProgress, control: EpochControl, epoch: int, epochs: int, events: Events
) -> tuple[EpochProgress, bool]:
    """Train over ``loader`` from ``progress.step`` on. Returns the totals and whether the epoch
    ended early (the stop token was set in any process, or ``max_steps`` reached), always after a
    whole step and at the same step in every process."""
    _train_mode(step)
    tracker = Tracker(events, "train", math.ceil(len(loader) / step.accumulate), unit="batch")
    tracker.detail = {"epoch": epoch + 1, "epochs": epochs}
    started = last_save = time.perf_counter()
    interrupted = False
    for group in _micro_batches(loader, step.accumulate):
        for _, _, failures in group:
            report_failures(failures, events, step.reported)
        skipped_before = step.skipped_steps
        _optimisation_step(step, group, progress, epoch)
        if step.skipped_steps > skipped_before and step.skipped_steps <= 3:
            info(
                events,
                f"step {progress.step} of epoch {epoch + 1} skipped in every process: one had a micro-batch none of "
                f"whose images could be read{' (said for the first 3 only)' if step.skipped_steps == 3 else ''}",
            )
        progress.seconds += time.perf_counter() - started
        started = time.perf_counter()
        tracker.advance(
            loss=round(progress.loss_sum / max(progress.seen, 1), 4),
            images_per_s=round(progress.seen / max(progress.seconds, 1e-9), 1),
        )
        limit = control.max_steps and control.global_step + progress.step >= control.max_steps
        due = bool(control.checkpoint_s and control.save and started - last_save >= control.checkpoint_s)
        stop_now, save_now = agree([control.stop.is_set() or bool(limit), due], step.ranks)
        if stop_now or save_now:
            read_totals(step, progress, epoch)  # a checkpoint holds the totals so far
        if stop_now:
            interrupted = True
            break
        if save_now:
            control.save(progress)
            last_save = started = time.perf_counter()  # the save is not training time
    read_totals(step, progress, epoch)
    if not interrupted:
        tracker.finish()
    return progress, interrupted


def micro_seed(seed: int, epoch: int, step: int, micro: int) -> int:
    """The dropout seed of one micro-batch, from its place in the global batch: the same in 1
    process accumulating N micro-batches and in N processes, and again after a resume."""
    return (seed * 1_000_003 + epoch * 7919 + step * 104_729 + micro * 15_485_863) & 0x7FFF_FFFF_FFFF


def _optimisation_step(step: TrainStep, group: list, progress: EpochProgress, epoch: int) -> None:
    """Forward and backward each micro-batch (DDP synchronises gradients on the last only), then
    one optimiser step. Losses are divided by the micro-batch count, so the step's gradient is
    the mean over the global batch, as DDP's average over processes makes it."""
    world, rank = step.ranks.world_size, step.ranks.rank
    batches = [(images, targets) for images, targets, _ in group if images is not None]
    # DDP and the per-pass agreements need the same passes in every process: when one process has
    # a micro-batch none of whose images loaded (storage gone for a moment), every process skips
    # the step. One process just trains on the micro-batches it has.
    if step.ranks.enabled and agree([len(batches) < len(group)], step.ranks)[0]:
        batches = []
        step.skipped_steps += 1
    step.optimizer.zero_grad(set_to_none=True)
    for micro, (images, targets) in enumerate(batches):
        torch.manual_seed(micro_seed(step.seed, epoch, progress.step, micro * world + rank))
        targets = targets.to(step.runtime.device, non_blocking=True)
        last = micro == len(batches) - 1
        sync = step.model.no_sync() if step.ranks.enabled and not last else contextlib.nullcontext()
        with sync:
            with step.runtime.autocast():
                inputs = images if step.forward else model_input(images, step.runtime, step.prep)
                logits = (step.forward or step.model)(inputs)
                loss = step.loss_fn(logits.float(), targets)
            if step.read_every == 1:
                _refuse_non_finite(loss, step, progress, epoch)
            scaled = loss / len(batches)
            (step.scaler.scale(scaled) if step.scaler else scaled).backward()
        step.pending.append((loss.detach() * len(targets), (logits.argmax(1) == targets).sum(), len(targets)))
    if batches:
        if step.scaler:
            step.scaler.step(step.optimizer)
            step.scaler.update()
        else:
            step.optimizer.step()
    step.scheduler.step()
    progress.step += 1
    if progress.step % step.read_every == 0:
        read_totals(step, progress, epoch)


def read_totals(step: TrainStep, progress: EpochProgress, epoch: int) -> None:
    """Add the steps' losses and hits not read yet to the epoch's totals (one wait for the
    device). Read lazily, a non-finite loss is found after it has updated the model: said so."""
    if not step.pending:
        return
    losses, hits, images = zip(*step.pending)
    step.pending.clear()
    loss_sum = float(torch.stack(losses).sum())
    if agree([not math.isfinite(loss_sum)], step.ranks)[0]:
        raise NonFiniteLossError(
            f"loss became non-finite at epoch {epoch + 1}, within the {step.read_every} steps up to {progress.step}; "
            f"try a lower --lr (now {step.optimizer.param_groups[0]['lr']:.2g})"
        )
    progress.loss_sum += loss_sum
    progress.correct += int(torch.stack(hits).sum())
    progress.seen += sum(images)


def _refuse_non_finite(loss: torch.Tensor, step: TrainStep, progress: EpochProgress, epoch: int) -> None:
    """Stop before a NaN or infinite loss updates the model, in every process at once (a rank
    that raised alone would leave the others waiting in DDP)."""
    finite = math.isfinite(loss.item())
    if agree([not finite], step.ranks)[0]:
        raise NonFiniteLossError(
            f"loss became {loss.item() if not finite else 'non-finite in another process'} at epoch {epoch + 1}, "
            f"step {progress.step + 1}; the model was not updated with it. Try a lower --lr "
            f"(now {step.optimizer.param_groups[0]['lr']:.2g})"
        )


@torch.no_grad()
def evaluate_logits(
    model: nn.Module, loader, runtime: Runtime, prep: Preprocessing, events: Events, reported: set
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, CPU) and targets for every decodable image in ``loader``."""
    model.eval()
    all_logits, all_targets = [], []
    tracker = Tracker(events, "validate", len(loader), unit="batch")
    for images, targets, failures in loader:
        report_failures(failures, events, reported)
        if images is not None:
            with runtime.autocast():
                logits = model(model_input(images, runtime, prep))
            all_logits.append(logits.float().cpu())
            all_targets.append(targets)
        tracker.advance()
    if not all_logits:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(all_logits), torch.cat(all_targets)


def summarize_logits(logits: torch.Tensor, targets: torch.Tensor, loss_fn: nn.Module) -> dict:
    """Loss, top-1 and top-5 accuracy of a set of logits."""
    if len(targets) == 0:
        return {"loss": float("nan"), "top1": 0.0, "top5": 0.0}
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    return {
        "loss": float(loss_fn(logits, targets)),
        "top1": float((topk[:, 0] == targets).float().mean()),
        "top5": float((topk == targets[:, None]).any(1).float().mean()),
    }
