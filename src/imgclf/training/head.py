"""A classifier head trained on cached frozen-backbone features.

The linear head is multinomial logistic regression fitted with L-BFGS on standardised features,
its L2 strength chosen on the validation split; the MLP head is trained with AdamW and the best
validation step kept. Standardisation is folded back into the first layer, so the head applies
to the backbone's raw features exactly as the model's own classifier does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from imgclf.core.errors import TrainError
from imgclf.models.heads import make_head

L2_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


@dataclass
class HeadFit:
    head: nn.Module  # applies to raw backbone features
    val_loss: float
    val_top1: float
    l2: float
    train_loss: float
    train_acc: float


def class_weights(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over the samples: rare classes count as much as common ones."""
    counts = torch.bincount(targets, minlength=num_classes).float().clamp_min(1)
    return counts.sum() / (num_classes * counts)


def _fold_standardisation(head: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> nn.Module:
    """``head((x - mean) / std)`` == ``folded(x)``: adjust the first linear layer."""
    first = head if isinstance(head, nn.Linear) else head[0]
    with torch.no_grad():
        first.weight.div_(std)
        first.bias.sub_(first.weight @ mean)
    return head


def _evaluate(head: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module) -> tuple[float, float]:
    head.eval()
    with torch.no_grad():
        logits = head(x)
    return float(loss_fn(logits, y)), float((logits.argmax(1) == y).float().mean())


def _fit_linear(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, loss_fn: nn.Module, seed: int
) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(x.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=200, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


def _fit_mlp(
    x: torch.Tensor,
    y: torch.Tensor,
    vx: torch.Tensor,
    vy: torch.Tensor,
    num_classes: int,
    hidden: int,
    loss_fn: nn.Module,
    seed: int,
    steps: int = 200,
) -> nn.Module:
    torch.manual_seed(seed)
    head = make_head(x.shape[1], num_classes, hidden)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)
    best, best_state = math.inf, None
    for step in range(steps):
        head.train()
        order = torch.randperm(len(x))
        for start in range(0, len(x), 256):
            batch = order[start : start + 256]
            optimizer.zero_grad()
            loss_fn(head(x[batch]), y[batch]).backward()
            optimizer.step()
        if step % 10 == 9:
            val_loss, _ = _evaluate(head, vx, vy, loss_fn)
            if val_loss < best:
                best, best_state = val_loss, {k: v.clone() for k, v in head.state_dict().items()}
    if best_state is not None:
        head.load_state_dict(best_state)
    return head


def fit_head(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    *,
    hidden: int = 0,
    weights: torch.Tensor | None = None,
    label_smoothing: float = 0.1,
    seed: int = 0,
) -> HeadFit:
    """Fit a head on features; the L2 strength (linear) or stopping step (MLP) is chosen on val.
    Features or a fit that are not finite (NaN, inf) end the run with the reason: a head fitted
    on them would be saved as the model and answer nonsense."""
    for name, features in (("training", train_x), ("validation", val_x)):
        bad = int((~torch.isfinite(features)).any(dim=1).sum()) if len(features) else 0
        if bad:
            raise TrainError(
                f"{bad} of {len(features)} {name} feature vectors are not finite (the backbone gave NaN or inf: "
                "damaged --weights, or a precision too low for this model); try --precision fp32"
            )
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    x, vx = (train_x - mean) / std, (val_x - mean) / std
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)
    have_val = len(val_y) > 0
    if hidden > 0:
        head, l2 = (
            _fit_mlp(
                x, train_y, vx if have_val else x, val_y if have_val else train_y, num_classes, hidden, loss_fn, seed
            ),
            0.0,
        )
    else:
        fits = []
        for l2 in L2_GRID if have_val else (1e-3,):
            head = _fit_linear(x, train_y, num_classes, l2, loss_fn, seed)
            score = _evaluate(head, vx, val_y, loss_fn)[0] if have_val else 0.0
            fits.append((score, l2, head))
        _, l2, head = min(fits, key=lambda item: item[0])
    train_loss, train_acc = _evaluate(head, x, train_y, loss_fn)
    if not math.isfinite(train_loss):
        raise TrainError(f"the head's training loss became {train_loss}; no model was saved")
    val_loss, val_top1 = _evaluate(head, vx, val_y, loss_fn) if have_val else (math.nan, math.nan)
    return HeadFit(_fold_standardisation(head, mean, std), val_loss, val_top1, l2, train_loss, train_acc)
