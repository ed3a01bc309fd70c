"""The time budget stops a run, but never before it has a model (training/budget.py)."""

from __future__ import annotations

import json
import time

from imgclf import api
from imgclf.core.events import Message, StopToken
from imgclf.training.budget import BudgetStop
from tests.conftest import write_manifest


def test_a_budget_spent_before_the_first_model_stops_when_it_is_made():
    stop = StopToken()
    budget = BudgetStop(stop, 0.05, has_model=False)
    time.sleep(0.3)
    assert not stop.is_set()  # due, but nothing to keep yet
    over = budget.model_made()
    assert stop.is_set() and stop.reason == "time budget" and over is not None and over >= 0.2
    assert budget.model_made() is None  # said once


def test_a_budget_with_a_model_stops_at_its_time():
    stop = StopToken()
    BudgetStop(stop, 0.05, has_model=True)
    assert not stop.is_set()
    assert stop.wait(2.0) and stop.reason == "time budget"


def test_a_cancelled_budget_never_stops():
    stop = StopToken()
    BudgetStop(stop, 0.05, has_model=True).cancel()
    assert not stop.wait(0.3)


def test_a_head_run_whose_budget_ends_in_feature_extraction_still_ends_with_a_model(digits_dir, tmp_path):
    """The budget is spent by the plan's own measuring: before this, the run stopped inside
    feature extraction with no model (CI on a slower machine, tests/data/test_small_images.py)."""
    manifest = write_manifest(digits_dir, tmp_path / "m.csv", per_class=20)
    out, events = tmp_path / "run", []
    settings = {"model": "tf_efficientnet_lite0", "mode": "head", "image_size": 64, "time_budget": "0.5s"}
    result = api.train(manifest, out, settings, events=events.append)
    assert result.status == "finished" and (out / "model.json").exists()
    assert result.metrics["top1"] > 0.1 + 0.3, result.metrics  # 10 classes: chance is 0.1
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_a_full_run_whose_budget_ends_before_its_first_epoch_ends_after_it(digits_dir, tmp_path):
    manifest = write_manifest(digits_dir, tmp_path / "m.csv", per_class=30)
    out, events = tmp_path / "run", []
    settings = {"model": "cnn1", "image_size": 16, "epochs": 3, "patience": 0, "time_budget": "0.01s"}
    result = api.train(manifest, out, settings, events=events.append)
    assert result.epochs_done == 1 and (out / "model.json").exists() and result.metrics["n"] > 0
    said = [e.text for e in events if isinstance(e, Message)]
    assert any("before the first model was ready; training ends with it" in text for text in said), said
    if result.status == "stopped":  # the plan gave it more than one epoch: it can go on
        assert api.train(None, out, {"time_budget": "none"}, resume=True).status == "finished"
