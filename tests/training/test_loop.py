"""The training step: the loss and accuracy read lazily (as on a GPU) add up to what reading
every step gives, and a non-finite loss is still caught."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from imgclf.core.events import StopToken, ignore
from imgclf.core.preprocessing import Preprocessing
from imgclf.models.device import resolve_runtime
from imgclf.training.loop import EpochControl, EpochProgress, NonFiniteLossError, TrainStep, train_one_epoch


class _LossTurningNaN(nn.CrossEntropyLoss):
    """Cross-entropy that becomes NaN at its ``at``-th call (as a diverging run's would)."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, logits, targets):
        self.calls += 1
        loss = super().forward(logits, targets)
        return loss * float("nan") if self.calls == self.at else loss


def _step(read_every: int, nan_at: int = 0) -> TrainStep:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    prep = Preprocessing(8, (0.5,) * 3, (0.25,) * 3)
    runtime = resolve_runtime("cpu", "fp32", "off")
    return TrainStep(model, optimizer, scheduler, _LossTurningNaN(nan_at), runtime, prep, read_every=read_every)


def _batches(n: int = 10):
    generator = torch.Generator().manual_seed(1)
    for _ in range(n):
        images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=generator)
        targets = torch.randint(0, 4, (6,), generator=generator)
        yield images, targets, []


def _epoch(step: TrainStep, batches) -> EpochProgress:
    progress, _ = train_one_epoch(step, list(batches), EpochProgress(), EpochControl(StopToken()), 0, 1, ignore)
    return progress


def test_lazy_reads_give_the_same_totals_and_weights():
    eager, lazy = _step(1), _step(4)
    a, b = _epoch(eager, _batches()), _epoch(lazy, _batches())
    assert (a.step, a.seen, a.correct) == (b.step, b.seen, b.correct) == (10, 60, a.correct)
    assert a.loss_sum == pytest.approx(b.loss_sum, rel=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(eager.model.parameters(), lazy.model.parameters()))


def test_a_loss_that_is_not_finite_stops_training_read_eagerly_or_lazily():
    with pytest.raises(NonFiniteLossError, match="was not updated"):
        _epoch(_step(1, nan_at=3), _batches())
    with pytest.raises(NonFiniteLossError, match="within the 4 steps up to 4"):
        _epoch(_step(4, nan_at=3), _batches())
