"""What a training checkpoint holds besides the weights, and how it is saved and restored, so a
run resumed from any checkpoint (end of epoch or mid-epoch) continues exactly."""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from imgclf.core.atomic import atomic_write
from imgclf.training.checkpoint import load_checkpoint
from imgclf.training.distributed import unwrap
from imgclf.training.loop import EpochProgress, TrainStep

HISTORY_FIELDS = (
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_top1",
    "val_top5",
    "lr",
    "seconds",
    "images_per_s",
)


@dataclass
class RunState:
    """What a checkpoint restores besides model and optimizer."""

    epoch: int = 0  # epoch in progress (0-based)
    progress: EpochProgress | None = None  # set when the checkpoint is mid-epoch
    global_step: int = 0
    history: list = None  # type: ignore[assignment]
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    def __post_init__(self) -> None:
        self.history = self.history or []


def checkpoint_state(step: TrainStep, state: RunState) -> dict:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "model": unwrap(step.model).state_dict(),
        "optimizer": step.optimizer.state_dict(),
        "scheduler": step.scheduler.state_dict(),
        "epoch": state.epoch,
        "progress": asdict(state.progress) if state.progress else None,
        "global_step": state.global_step,
        "history": state.history,
        "best_loss": state.best_loss,
        "best_epoch": state.best_epoch,
        "bad_epochs": state.bad_epochs,
        "rng": rng,
    }


def restore_state(step: TrainStep, path: Path) -> RunState:
    saved = load_checkpoint(path)
    unwrap(step.model).load_state_dict(saved["model"])
    step.optimizer.load_state_dict(saved["optimizer"])
    step.scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    progress = EpochProgress(**saved["progress"]) if saved["progress"] else None
    return RunState(
        saved["epoch"],
        progress,
        saved["global_step"],
        saved["history"],
        saved["best_loss"],
        saved["best_epoch"],
        saved["bad_epochs"],
    )


def write_history(path: Path, history: list[dict]) -> None:
    """history.csv, one row per epoch, written atomically."""

    def write(temp: str) -> None:
        with open(temp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS)
            writer.writeheader()
            writer.writerows(history)

    atomic_write(path, write)
