"""``evaluate``: a trained run on its test split (or on other labelled data) -> metrics.json,
pictures (confusion, curves, reliability), report.md and a self-contained report.html."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

from imgclf.core.errors import DataError
from imgclf.core.events import Events, StopToken, Tracker, channel, info, skipped, stop_token, warn
from imgclf.core.meta import separator, update_meta
from imgclf.core.numeric import softmax
from imgclf.core.rundir import RunDir
from imgclf.core.settings import Settings
from imgclf.data.audit import content_hashes
from imgclf.data.dataset import open_for, prefetch_batches
from imgclf.data.images import ImageError
from imgclf.data.sources import Sample, scan
from imgclf.data.split import read_split_csv
from imgclf.data.transforms import eval_tensor
from imgclf.evaluation.calibration import fit_temperature, precision_at, reliability, threshold_for_precision
from imgclf.evaluation.embed import log_to_tensorboard
from imgclf.evaluation.html import write_report_html
from imgclf.evaluation.metrics import compute_metrics, rollup_confusion
from imgclf.evaluation.plots import plot_confusion, plot_history, plot_reliability
from imgclf.evaluation.report import write_report_md
from imgclf.predictors.pytorch import Classifier, load_torch


def load_for_evaluation(run_dir: Path, settings: Settings) -> Classifier:
    s = settings.system
    return load_torch(run_dir, s.device, s.precision, settings.predict.predict_batch_size, s.max_pixels)


def samples_to_evaluate(run_dir: Path, data: str | None, allow_outside: bool = False) -> tuple[list[Sample], str]:
    """The run's own test split (val when it has none), or the test split / all of ``data``."""
    if data is None:
        samples = read_split_csv(run_dir / RunDir.SPLIT)
        test = [s for s in samples if s.split == "test"]
        return (test, "test") if test else ([s for s in samples if s.split == "val"], "val")
    scanned = scan(data, allow_outside).samples
    test = [s for s in scanned if s.split == "test"]
    return (test, "test") if test else (scanned, "all")


def overlap_with_training(run_dir: Path, samples: list[Sample], data: str, settings: Settings, events, stop) -> dict:
    """Which of the other data's photos the model was trained on (the same bytes, whatever their
    names): a test on them flatters it. Hashes come from the audit cache where the files were
    audited before; training photos no longer at hand are left out of the comparison."""
    trained = [s for s in read_split_csv(run_dir / RunDir.SPLIT) if s.split in ("train", "val")]
    root = str(RunDir(run_dir).read_run().get("data") or run_dir)
    max_pixels = settings.system.max_pixels
    seen = set(content_hashes(trained, settings.data, root, max_pixels, stop)) - {""}
    hashes = content_hashes(samples, settings.data, data, max_pixels, stop)
    shared = [s.ref for s, h in zip(samples, hashes) if h and h in seen]
    if shared:
        warn(
            events,
            f"{len(shared)} of the {len(samples)} images were used in training (the same photos): their "
            f"scores flatter the model; first: {shared[0]}",
        )
    return {"overlap_with_training": len(shared), "overlap_examples": shared[:20]}


def sample_logits(
    clf: Classifier, samples: list[Sample], events: Events, stop: StopToken, stage: str = "evaluate"
) -> tuple[np.ndarray, list[int], list[ImageError]]:
    """Raw logits for the samples that decode; returns (logits, kept indices, failures). Decoding
    runs ahead of the model in threads, a few batches at a time (the predictor's own pipeline)."""
    prep = clf.preprocessing
    failures: list[ImageError] = []

    def load(index: int) -> torch.Tensor | None:
        try:
            return eval_tensor(open_for(samples[index], prep, clf.max_pixels), prep)
        except ImageError as exc:
            failures.append(exc)
            return None

    logits, kept = [], []
    tracker = Tracker(events, stage, len(samples))
    for chunk, good, batch in prefetch_batches(len(samples), load, clf.batch_size):
        if batch is not None:
            logits.append(clf.logits_of_batch(batch))
            kept += good
        tracker.advance(len(chunk))
        stop.check()
    return (np.concatenate(logits) if logits else np.zeros((0, len(clf.classes_)))), kept, failures


def calibration_report(logits: np.ndarray, targets: np.ndarray, meta: dict) -> dict:
    """ECE before and after the bundle's temperature, and how its confidence threshold (chosen on
    the validation split) does on these images."""
    temperature = float(meta.get("temperature", 1.0))
    before, after = reliability(softmax(logits), targets), reliability(softmax(logits, temperature), targets)
    report = {
        "temperature": temperature,
        "ece_before": before["ece"],
        "ece_after": after["ece"],
        "bins_before": before["bins"],
        "bins_after": after["bins"],
    }
    chosen = meta.get("threshold")
    if chosen:
        measured = precision_at(softmax(logits, temperature), targets, chosen["threshold"])
        report["threshold"] = {**chosen, "measured": measured}
    return report


def calibrate(
    run_dir: str | Path, settings: Settings, events: Events | None = None, stop: StopToken | None = None
) -> dict:
    """Fit the temperature and the confidence threshold on the run's validation split and store
    both in model.json, so every later prediction uses them."""
    run_dir, events, stop = Path(run_dir), channel(events), stop_token(stop)
    clf = load_for_evaluation(run_dir, settings)
    known = set(clf.classes_)
    val = [s for s in read_split_csv(run_dir / RunDir.SPLIT) if s.split == "val" and s.label in known]
    logits, kept, _ = sample_logits(clf, val, events, stop, "calibrate")
    return calibrate_from_logits(
        run_dir, clf.meta, logits, [val[i] for i in kept], settings.evaluate.target_precision, events
    )


def calibrate_from_logits(
    run_dir: Path, meta: dict, logits: np.ndarray, samples: list[Sample], target_precision: float, events: Events
) -> dict:
    if not samples:
        return {}
    index = {label: i for i, label in enumerate(meta["classes"])}
    targets = np.array([index[s.label] for s in samples], dtype=np.int64)
    temperature = fit_temperature(logits, targets)
    chosen = threshold_for_precision(softmax(logits, temperature), targets, target_precision)
    if not chosen["reliable"]:
        chosen["note"] = (
            f"only {chosen['n']} validation images: too few to promise {target_precision:.0%} "
            f"precision at this threshold"
        )
    update_meta(run_dir, {"temperature": temperature, "threshold": chosen})
    meta.update({"temperature": temperature, "threshold": chosen})
    info(
        events,
        f"calibration on {len(targets)} validation images: temperature {temperature:.3f}; "
        f"{target_precision:.0%} precision at confidence >= {chosen['threshold']:.3f} "
        f"(decides {chosen['coverage']:.0%} of images)",
    )
    return {"temperature": temperature, "threshold": chosen}


def write_pictures(out: Path, metrics: dict, meta: dict, history: list[dict]) -> None:
    """confusion.png (and one per hierarchy level), curves.png, reliability.png."""
    folder = RunDir(out)
    plot_confusion(metrics["confusion"], folder / RunDir.CONFUSION)
    for level in (metrics.get("levels") or [])[:-1]:  # the deepest level is confusion.png itself
        plot_confusion(
            rollup_confusion(metrics["confusion"], level["depth"], separator(meta)),
            folder.confusion_at(level["depth"]),
            title=f"Confusion at depth {level['depth']}",
        )
    if history:
        plot_history(history, folder / RunDir.CURVES, best_epoch=meta.get("epoch"))
    if metrics.get("calibration"):
        plot_reliability(metrics["calibration"], folder / RunDir.RELIABILITY)


def read_history(run_dir: Path) -> list[dict]:
    path = run_dir / RunDir.HISTORY
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [
            {k: (float(v) if v not in ("", None) else math.nan) for k, v in row.items()}
            for row in csv.DictReader(handle)
        ]


def evaluate(
    run_dir: str | Path,
    data: str | None = None,
    out: str | Path | None = None,
    settings: Settings | None = None,
    events: Events | None = None,
    stop: StopToken | None = None,
) -> dict:
    """Evaluate a run on its test split, or on other labelled ``data``; writes metrics.json, the
    pictures, report.md and report.html into ``out`` (the run folder by default)."""
    run_dir, events, stop = Path(run_dir), channel(events), stop_token(stop)
    clf = load_for_evaluation(run_dir, settings or Settings())
    samples, split = samples_to_evaluate(run_dir, data, (settings or Settings()).data.allow_outside)
    known = set(clf.classes_.tolist())
    unknown = [s for s in samples if s.label not in known]
    samples = [s for s in samples if s.label in known]
    if unknown:
        warn(events, f"{len(unknown)} images have labels the model does not know; left out")
    logits, kept, failures = sample_logits(clf, samples, events, stop)
    for failure in failures:
        skipped(events, failure.path, failure.reason)
    if not kept:
        first = f" (first: {failures[0].path}: {failures[0].reason})" if failures else ""
        raise DataError(f"no image to evaluate on: {len(samples)} with known labels, {len(failures)} unreadable{first}")
    extra = {
        "split": split,
        "data": str(data) if data else "run split",
        "skipped": [{"path": f.path, "reason": f.reason} for f in failures],
        "unknown_labels": len(unknown),
    }
    if data:
        kept_samples = [samples[i] for i in kept]
        extra.update(overlap_with_training(run_dir, kept_samples, str(data), settings or Settings(), events, stop))
    return report_from_logits(run_dir, clf.meta, logits, [samples[i] for i in kept], extra, events, out)


def after_training(
    run_dir: str | Path,
    logits: dict | None,
    settings: Settings,
    events: Events | None = None,
    stop: StopToken | None = None,
) -> dict:
    """Calibrate a freshly trained run on its validation split, then report on its test split.
    ``logits`` ({split: (logits, samples)}, as head mode hands them on) saves running the model."""
    run_dir, events, stop = Path(run_dir), channel(events), stop_token(stop)
    if not logits:
        calibrate(run_dir, settings, events, stop)
        return evaluate(run_dir, settings=settings, events=events, stop=stop)
    meta = RunDir(run_dir).read_json(RunDir.META)
    if "val" in logits:
        calibrate_from_logits(run_dir, meta, *logits["val"], settings.evaluate.target_precision, events)
    split = "test" if "test" in logits else "val"
    extra = {"split": split, "data": "run split", "skipped": [], "unknown_labels": 0}
    return report_from_logits(run_dir, meta, *logits[split], extra, events)


def report_from_logits(
    run_dir: Path,
    meta: dict,
    logits: np.ndarray,
    samples: list[Sample],
    extra: dict,
    events: Events,
    out: str | Path | None = None,
) -> dict:
    """Metrics, pictures and reports from the logits of labelled samples (whatever computed them)."""
    out = Path(out or run_dir)
    classes = list(meta["classes"])
    index = {label: i for i, label in enumerate(classes)}
    targets = np.array([index[s.label] for s in samples], dtype=np.int64)
    probs = softmax(logits, float(meta.get("temperature", 1.0)))
    metrics = compute_metrics(probs, targets, classes, [s.name for s in samples], separator(meta))
    metrics.update(
        {"architecture": meta["architecture"], **extra, "calibration": calibration_report(logits, targets, meta)}
    )
    RunDir(out).write_json(RunDir.METRICS, metrics)
    history = read_history(run_dir)
    write_pictures(out, metrics, meta, history)
    report = write_report_md(out, metrics, meta, has_curves=bool(history))
    write_report_html(out, metrics, meta, RunDir(run_dir).read_json(RunDir.AUDIT, {}))
    if (run_dir / RunDir.TENSORBOARD).is_dir() and out == run_dir:
        log_to_tensorboard(run_dir, samples)
    info(
        events,
        f"{metrics['split']} top-1 {metrics['top1']:.3f}, top-5 {metrics['top5']:.3f} on {metrics['n']} "
        f"images; report: {report}",
        str(report),
    )
    return metrics
