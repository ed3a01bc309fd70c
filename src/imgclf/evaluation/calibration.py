"""Can the model's confidence be trusted? Temperature scaling, expected calibration error, and a
confidence threshold chosen for a target precision (pure functions on logits and labels).

Temperature scaling (Guo et al., 2017) divides the logits by one number fitted on the validation
split; it never changes which class wins, only how sure the model says it is.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature that minimises the validation negative log-likelihood (1.0 without data)."""
    if len(targets) == 0:
        return 1.0
    x = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(targets, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    return temperature if math.isfinite(temperature) and 0.05 < temperature < 20 else 1.0


def reliability(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> dict:
    """Expected calibration error and the per-bin confidence/accuracy of a reliability diagram."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows, ece = [], 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if not inside.any():
            continue
        conf, acc = float(confidence[inside].mean()), float(correct[inside].mean())
        ece += inside.mean() * abs(acc - conf)
        rows.append(
            {"low": float(low), "high": float(high), "confidence": conf, "accuracy": acc, "n": int(inside.sum())}
        )
    return {"ece": float(ece), "bins": rows}


def threshold_for_precision(probs: np.ndarray, targets: np.ndarray, target: float) -> dict:
    """The lowest confidence threshold at which the predictions kept reach ``target`` precision on
    these images, with the share kept ("coverage"). ``reliable`` is False when too few images are
    above it for the estimate to mean much (fewer than the 1 / (1 - target) * 10 that would contain
    about ten errors at the target rate)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    order = np.argsort(-confidence, kind="stable")
    kept_correct = np.cumsum(correct[order])
    kept = np.arange(1, len(order) + 1)
    precision = kept_correct / kept
    ok = np.nonzero(precision >= target)[0]
    needed = int(math.ceil(10 / max(1e-9, 1 - target)))
    if len(ok) == 0:
        return {
            "target_precision": target,
            "threshold": 1.0,
            "coverage": 0.0,
            "precision": float("nan"),
            "n": int(len(targets)),
            "reliable": False,
        }
    last = int(ok[-1])  # the largest set (lowest threshold) that still meets the target
    return {
        "target_precision": target,
        "threshold": float(confidence[order][last]),
        "coverage": float(kept[last] / len(order)),
        "precision": float(precision[last]),
        "n": int(len(targets)),
        "reliable": bool(kept[last] >= needed),
    }


def precision_at(probs: np.ndarray, targets: np.ndarray, threshold: float) -> dict:
    """Precision and coverage of the predictions at or above a confidence threshold."""
    confidence = probs.max(axis=1)
    kept = confidence >= threshold
    correct = probs.argmax(axis=1) == targets
    return {
        "threshold": threshold,
        "coverage": float(kept.mean()) if len(kept) else 0.0,
        "precision": float(correct[kept].mean()) if kept.any() else float("nan"),
        "n_kept": int(kept.sum()),
    }
