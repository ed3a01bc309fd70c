"""Calibration: temperature scaling recovers a known temperature and never hurts ECE on data like
what it was fitted on; the threshold reaches its target precision on a constructed case."""

from __future__ import annotations

import numpy as np
import pytest

from imgclf.core.numeric import softmax
from imgclf.evaluation.calibration import fit_temperature, precision_at, reliability, threshold_for_precision


def _sample(n: int, temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose true class probabilities are softmax(logits / temperature)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(n, 6))
    probs = softmax(logits, temperature)
    targets = np.array([rng.choice(6, p=p) for p in probs])
    return logits, targets


def test_fit_temperature_recovers_the_true_one():
    logits, targets = _sample(6000, 2.5, seed=0)
    assert fit_temperature(logits, targets) == pytest.approx(2.5, rel=0.1)


def test_scaling_lowers_ece_of_an_overconfident_model_on_new_data():
    val_logits, val_targets = _sample(3000, 2.0, seed=1)
    test_logits, test_targets = _sample(3000, 2.0, seed=2)
    temperature = fit_temperature(val_logits, val_targets)
    before = reliability(softmax(test_logits), test_targets)["ece"]
    after = reliability(softmax(test_logits, temperature), test_targets)["ece"]
    assert before > 0.1 and after < before / 2


def test_reliability_bins_cover_all_images():
    logits, targets = _sample(500, 1.0, seed=3)
    result = reliability(softmax(logits), targets, bins=10)
    assert sum(b["n"] for b in result["bins"]) == 500 and 0 <= result["ece"] < 0.1


def test_threshold_for_precision_on_a_constructed_case():
    # 10 images, confidence falling; wrong answers at ranks 4 and 8 (0-based 3 and 7)
    confidence = np.linspace(0.95, 0.5, 10)
    probs = np.stack([confidence, 1 - confidence], axis=1)
    targets = np.zeros(10, dtype=int)
    targets[[3, 7]] = 1
    # precision of the k most confident: 1, 1, 1, .75, .8, .833, .857, .75, .778, .8
    chosen = threshold_for_precision(probs, targets, target=0.8)
    assert chosen["coverage"] == pytest.approx(1.0)  # all 10 kept still gives 8/10 = 0.8
    strict = threshold_for_precision(probs, targets, target=0.85)
    assert strict["coverage"] == pytest.approx(0.7) and strict["precision"] == pytest.approx(6 / 7)
    assert strict["threshold"] == pytest.approx(confidence[6]) and strict["reliable"] is False
    measured = precision_at(probs, targets, strict["threshold"])
    assert measured["n_kept"] == 7 and measured["precision"] == pytest.approx(6 / 7)
    assert threshold_for_precision(probs, targets, target=0.99)["coverage"] == pytest.approx(0.3)
