"""One epoch of training and one pass of evaluation, as plain functions (torchvision references style)."""
from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from imgclf.data.transforms import Preprocessing, normalize_batch
from imgclf.training.hardware import Runtime


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite: training cannot go on from here."""


class StopRequest:
    """Set by SIGINT/SIGTERM: the loop finishes the current step, then checkpoints and stops."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: stopping after this step "
              f"(send it again to quit at once)", file=sys.stderr)
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> "StopRequest":
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


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
        return {"train_loss": self.loss_sum / seen, "train_acc": self.correct / seen,
                "images_per_s": self.seen / max(self.seconds, 1e-9)}


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


def model_input(batch: torch.Tensor, runtime: Runtime, prep: Preprocessing) -> torch.Tensor:
    """uint8 NCHW batch -> normalised float on the device, in the run's memory layout."""
    x = normalize_batch(batch.to(runtime.device, non_blocking=True), prep)
    return x.contiguous(memory_format=torch.channels_last) if runtime.channels_last else x


def train_one_epoch(step: TrainStep, loader, progress: EpochProgress, stop: StopRequest,
                    epoch: int, epochs: int, max_steps: int = 0, global_step: int = 0,
                    show: bool = True) -> tuple[EpochProgress, bool]:
    """Train over ``loader`` from ``progress.step`` on. Returns the totals and whether the epoch
    ended early (a stop was requested or ``max_steps`` reached)."""
    step.model.train()
    if step.frozen_bn:
        for module in step.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
               disable=not show, file=sys.stderr, leave=False)
    started = time.perf_counter()
    interrupted = False
    for batch in loader:
        if batch is None:
            continue
        images, targets = batch
        targets = targets.to(step.runtime.device, non_blocking=True)
        with step.runtime.autocast():
            logits = step.model(model_input(images, step.runtime, step.prep))
            loss = step.loss_fn(logits.float(), targets)
        if not math.isfinite(loss.item()):
            bar.close()
            raise NonFiniteLossError(
                f"loss became {loss.item()} at epoch {epoch + 1}, step {progress.step + 1}; "
                f"the model was not updated with it. Try a lower --lr (now {step.optimizer.param_groups[0]['lr']:.2g})")
        step.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        step.optimizer.step()
        step.scheduler.step()
        progress.step += 1
        progress.seen += len(targets)
        progress.loss_sum += loss.item() * len(targets)
        progress.correct += int((logits.argmax(1) == targets).sum())
        progress.seconds += time.perf_counter() - started
        started = time.perf_counter()
        bar.set_postfix(loss=f"{progress.loss_sum / progress.seen:.3f}",
                        img_s=f"{progress.seen / max(progress.seconds, 1e-9):.0f}", refresh=False)
        bar.update(1)
        if stop.requested or (max_steps and global_step + progress.step >= max_steps):
            interrupted = True
            break
    bar.close()
    return progress, interrupted


@torch.no_grad()
def evaluate_logits(model: nn.Module, loader, runtime: Runtime, prep: Preprocessing,
                    show: bool = False, desc: str = "evaluate") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, CPU) and targets for every decodable image in ``loader``."""
    model.eval()
    all_logits, all_targets = [], []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not show, file=sys.stderr, leave=False):
        if batch is None:
            continue
        images, targets = batch
        with runtime.autocast():
            logits = model(model_input(images, runtime, prep))
        all_logits.append(logits.float().cpu())
        all_targets.append(targets)
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
