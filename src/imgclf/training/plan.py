"""The plan of a training, fitted to its time budget from speeds measured on this machine.

Each candidate plan (fine-tune for N epochs, head on augmented views, head alone; or N epochs from
scratch) gets a predicted time per stage from the measured speeds and the run's own counts; the
most accurate one that fits the budget is taken. The log and a :class:`~imgclf.core.events.Plan`
event say which, why, the speeds and the predicted time, before the work starts. A run that runs
over still stops at the budget, with its best checkpoint, but never before its first model
(``budget.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from imgclf.core.events import Events, Plan, StopToken
from imgclf.core.rundir import RunDir
from imgclf.core.settings import apply_overrides, parse_duration
from imgclf.data.audit import content_hashes
from imgclf.models.device import Runtime
from imgclf.training.engines import feature_engine
from imgclf.training.features import FeatureStore
from imgclf.training.job import Job
from imgclf.training.speed import choose_layout, eval_batch, measure
from imgclf.training.split import split_for

CPU_BUDGET_S = 600.0  # "auto" on a CPU: 10 minutes, everything included
REPORT_S = 3.0  # metrics, pictures, report.md and report.html (measured 2-3 s on clothing-small)
MIN_FINETUNE_EPOCHS = 2  # one epoch is all warm-up; below two the head alone does as well


def budget_seconds(setting: str, runtime: Runtime) -> float:
    if setting == "auto":
        return 0.0 if runtime.device.type == "cuda" else CPU_BUDGET_S
    return parse_duration(setting)


@dataclass(frozen=True)
class Counts:
    train: int
    val: int
    test: int
    uncached: int  # photos whose frozen features are not cached yet (all splits, view 0)


@dataclass(frozen=True)
class Candidate:
    name: str
    mode: str
    epochs: int = 0
    views: int = 0
    split: bool = False
    precision: str = "run"  # of the trained layers: "fp32" or the run's ("run")


def _train_rate(speeds: dict, candidate: Candidate) -> float:
    if candidate.mode == "full":
        return speeds["train"]
    if candidate.split:
        trained = speeds["trained_fp32"] if candidate.precision == "fp32" else speeds["trained_bf16"]
        return 1.0 / (1.0 / speeds["frozen"] + 1.0 / trained)
    return speeds["finetune_whole"]


def stage_times(candidate: Candidate, counts: Counts, speeds: dict) -> dict[str, float]:
    """Predicted seconds of each stage still to come."""
    times: dict[str, float] = {}
    rate = speeds.get("evaluate") or speeds["features"]  # through PyTorch, as the report runs
    evaluate = REPORT_S + min(counts.test, 1000) / rate  # reports, TensorBoard's embeddings
    if candidate.mode in ("head", "finetune"):
        times["features"] = (counts.uncached + candidate.views * counts.train) / speeds["features"]
        times["head"] = 1.0 + counts.train * 5e-4
    if candidate.mode in ("finetune", "full"):
        times["decode"] = (counts.train + counts.val) / speeds["decode"]
        epoch = counts.train / _train_rate(speeds, candidate) + counts.val / rate
        times["epochs"] = candidate.epochs * epoch
        evaluate += (counts.val + counts.test) / rate  # calibration and test: head mode has its logits
    times["evaluate"] = evaluate
    return {name: round(seconds, 1) for name, seconds in times.items()}


def candidates(asked: str, mode: str, max_epochs: int, split: bool, speeds: dict) -> list[Candidate]:
    """The plans to consider, most accurate first."""
    if mode == "full":
        return [Candidate(f"{n} epochs", "full", n) for n in range(max_epochs, 0, -1)]
    if mode == "head":
        return [Candidate("head", "head")]
    precision = "run"
    if split and speeds.get("trained_fp32", 0) > speeds.get("trained_bf16", 0):
        precision = "fp32"
    split = split and _train_rate(speeds, Candidate("", "finetune", split=True, precision=precision)) > speeds.get(
        "finetune_whole", 0
    )
    lowest = MIN_FINETUNE_EPOCHS if asked == "auto" else 1
    plans = [
        Candidate(f"finetune {n} epochs", "finetune", n, split=split, precision=precision)
        for n in range(max_epochs, lowest - 1, -1)
    ]
    if asked == "auto":
        # a head on augmented views is not offered: on clothing-small 2 views gave 87.9% test top-1
        # against 90.9% for the head alone (docs/benchmarks.md)
        plans.append(Candidate("head", "head"))
    return plans


def choose(plans: list[Candidate], counts: Counts, speeds: dict, elapsed: float, budget: float):
    """The first plan predicted to fit the budget (the last, quickest, when none does); with the
    predicted total of each plan."""
    totals = [(plan, elapsed + sum(stage_times(plan, counts, speeds).values())) for plan in plans]
    fitting = [(plan, total) for plan, total in totals if not budget or total <= budget]
    chosen = fitting[0] if fitting else totals[-1]
    return chosen[0], chosen[1], totals


def _counts(job: Job, engine: str, stop: StopToken) -> Counts:
    samples = job.data.samples
    hashes = content_hashes(samples, job.settings.data, job.source, job.settings.system.max_pixels, stop)
    store = FeatureStore(job.settings.model.model, job.settings.model.weights or "imagenet", job.prep, 0, engine)
    uncached = sum(h not in store.vectors for h in hashes)
    return Counts(len(job.data.split("train")), len(job.data.split("val")), len(job.data.split("test")), uncached)


def make_plan(job: Job, model, events: Events, stop: StopToken, started: float) -> tuple[Job, dict]:
    """Measure, choose, say so, and record the plan in run.json (resolved epochs in settings.json)."""
    t, asked = job.settings.train, job.run.read_run().get("asked_mode", job.mode)
    split = job.mode == "finetune" and split_for(model, t.freeze_stride) is not None and job.ranks.world_size == 1
    if job.settings.system.channels_last == "auto" and job.runtime.device.type == "cpu":
        layout = choose_layout(job, model, events)
        job.runtime = replace(job.runtime, channels_last=layout)
        model.to(memory_format=job.runtime.memory_format)
        job.settings = apply_overrides(job.settings, {"channels_last": "on" if layout else "off"})
        t = job.settings.train
    engine, features = None, None
    if job.mode in ("head", "finetune"):
        engine, features = feature_engine(model, job, eval_batch(job), events)
    speeds = measure(job, model, features, job.mode == "finetune", stop)
    budget = budget_seconds(job.settings.system.time_budget, job.runtime)
    if not speeds:  # no training photo decodes: the data stage has said why
        return job, {}
    counts = (
        _counts(job, engine, stop)
        if job.mode != "full"
        else Counts(*(len(job.data.split(s)) for s in ("train", "val", "test")), 0)
    )
    max_epochs = t.epochs if job.mode == "full" else t.finetune_epochs
    plans = candidates(asked, job.mode, max_epochs, split, speeds)
    chosen, total, totals = choose(plans, counts, speeds, time.monotonic() - started, budget)
    why = _why(chosen, total, budget, plans)
    record = {
        "plan": chosen.name,
        "mode": chosen.mode,
        "epochs": chosen.epochs,
        "views": chosen.views,
        "split": chosen.split,
        "engine": engine,
        "precision": chosen.precision,
        "speeds": speeds,
        "budget_s": budget,
        "stages": stage_times(chosen, counts, speeds),
        "predicted_s": round(total, 1),
    }
    events(
        Plan(
            chosen.name,
            why,
            speeds,
            record["stages"],
            record["predicted_s"],
            budget,
            [{"plan": p.name, "predicted_s": round(s, 1)} for p, s in totals],
        )
    )
    settings = job.settings
    if chosen.mode != job.mode or chosen.epochs != max_epochs or chosen.views:
        key = "epochs" if chosen.mode == "full" else "finetune_epochs"
        settings = apply_overrides(
            settings,
            {"mode": chosen.mode, key: chosen.epochs or max_epochs, "distortions": chosen.views or t.distortions},
        )
    if job.ranks.is_main:
        job.run.write_json(RunDir.SETTINGS, settings.to_dict())
        job.run.update_run(plan=record)
    job.settings = settings
    return job, record


def _why(chosen: Candidate, total: float, budget: float, plans: list[Candidate]) -> str:
    if not budget:
        return "no time budget: the most accurate plan"
    if total > budget:
        return f"no plan fits the {budget / 60:.1f} min budget; this is the quickest (it runs over to its first model)"
    if chosen == plans[0]:
        return f"the most accurate plan, and it fits the {budget / 60:.1f} min budget"
    return f"the most accurate plan that fits the {budget / 60:.1f} min budget"
