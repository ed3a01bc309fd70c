"""One epoch of training and one pass of evaluation, as plain functions (torchvision references style)."""

from __future__ import annotations

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


def train_one_epoch(
    step: TrainStep,
    loader,
    progress: EpochProgress,
    stop: StopToken,
    epoch: int,
    epochs: int,
    events: Events,
    max_steps: int = 0,
    global_step: int = 0,
) -> tuple[EpochProgress, bool]:
    """Train over ``loader`` from ``progress.step`` on. Returns the totals and whether the epoch
    ended early (the stop token was set or ``max_steps`` reached), always after a whole step."""
    _train_mode(step)
    tracker = Tracker(events, "train", len(loader), unit="batch")
    tracker.detail = {"epoch": epoch + 1, "epochs": epochs}
    started = time.perf_counter()
    interrupted = False
    for images, targets, failures in loader:
        report_failures(failures, events, step.reported)
        if images is not None:
            _optimisation_step(step, images, targets, progress, epoch)
        progress.seconds += time.perf_counter() - started
        started = time.perf_counter()
        tracker.advance(
            loss=round(progress.loss_sum / max(progress.seen, 1), 4),
            images_per_s=round(progress.seen / max(progress.seconds, 1e-9), 1),
        )
        if _stops_here(stop, epoch, events, tracker) or (max_steps and global_step + progress.step >= max_steps):
            interrupted = True
            break
    if not interrupted:
        tracker.finish()
    return progress, interrupted


def _stops_here(stop: StopToken, epoch: int, events: Events, tracker: Tracker) -> bool:
    """Whether to end the epoch now. A time budget that runs out in the very first epoch lets it
    end, so that a run stopped by its budget always keeps a model (said once); any other stop
    (Ctrl-C, a cancel) ends it at once."""
    if not stop.is_set():
        return False
    if stop.reason == "time budget" and epoch == 0:
        if not getattr(tracker, "said_over_budget", False):
            tracker.said_over_budget = True
            info(events, "the time budget ran out in the first epoch; finishing it, so that the run has a model")
        return False
    return True


def _optimisation_step(
    step: TrainStep, images: torch.Tensor, targets: torch.Tensor, progress: EpochProgress, epoch: int
) -> None:
    targets = targets.to(step.runtime.device, non_blocking=True)
    with step.runtime.autocast():
        logits = step.forward(images) if step.forward else step.model(model_input(images, step.runtime, step.prep))
        loss = step.loss_fn(logits.float(), targets)
    if not math.isfinite(loss.item()):
        raise NonFiniteLossError(
            f"loss became {loss.item()} at epoch {epoch + 1}, step {progress.step + 1}; the model was not updated "
            f"with it. Try a lower --lr (now {step.optimizer.param_groups[0]['lr']:.2g})"
        )
    step.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    step.optimizer.step()
    step.scheduler.step()
    progress.step += 1
    progress.seen += len(targets)
    progress.loss_sum += loss.item() * len(targets)
    progress.correct += int((logits.argmax(1) == targets).sum())


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
