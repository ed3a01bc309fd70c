"""``evaluate``: a trained run on its test split (or on other labelled data) -> metrics.json,
pictures (confusion, curves, reliability), report.md and a self-contained report.html."""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from imgclf.data.dataset import open_sample, prefetch_batches
from imgclf.data.images import ImageError
from imgclf.data.scan import Sample, scan
from imgclf.data.split import read_split_csv
from imgclf.data.transforms import eval_tensor
from imgclf.evaluation.calibration import precision_at, reliability, softmax
from imgclf.evaluation.html import write_report_html
from imgclf.evaluation.metrics import compute_metrics, rollup_confusion
from imgclf.evaluation.plots import plot_confusion, plot_history, plot_reliability
from imgclf.evaluation.report import write_report_md
from imgclf.predict import Classifier, load

def samples_to_evaluate(run_dir: Path, data: str | None) -> tuple[list[Sample], str]:
    """The run's own test split (val when it has none), or the test split / all of ``data``."""
    if data is None:
        samples = read_split_csv(run_dir / "split.csv")
        test = [s for s in samples if s.split == "test"]
        return (test, "test") if test else ([s for s in samples if s.split == "val"], "val")
    scanned = scan(data).samples
    test = [s for s in scanned if s.split == "test"]
    return (test, "test") if test else (scanned, "all")


def sample_logits(clf: Classifier, samples: list[Sample], progress: bool) -> tuple[np.ndarray, list[int], list[dict]]:
    """Raw logits for the samples that decode; returns (logits, kept indices, failures). Decoding
    runs ahead of the model in threads, a few batches at a time (the predictor's own pipeline)."""
    prep = clf.preprocessing
    failures: list[dict] = []

    def load(index: int) -> torch.Tensor | None:
        try:
            return eval_tensor(open_sample(samples[index], prep), prep)
        except ImageError as exc:
            failures.append({"path": exc.path, "reason": exc.reason})
            return None

    logits, kept = [], []
    with tqdm(total=len(samples), desc="evaluate", unit="img", disable=not progress, file=sys.stderr) as bar:
        for chunk, good, batch in prefetch_batches(len(samples), load, clf.batch_size):
            if batch is not None:
                logits.append(clf.logits_of_batch(batch))
                kept += good
            bar.update(len(chunk))
    return (np.concatenate(logits) if logits else np.zeros((0, len(clf.classes_)))), kept, failures


def calibration_report(logits: np.ndarray, targets: np.ndarray, meta: dict) -> dict:
    """ECE before and after the bundle's temperature, and how its confidence threshold (chosen on
    the validation split) does on these images."""
    temperature = float(meta.get("temperature", 1.0))
    before, after = reliability(softmax(logits), targets), reliability(softmax(logits, temperature), targets)
    report = {"temperature": temperature, "ece_before": before["ece"], "ece_after": after["ece"],
              "bins_before": before["bins"], "bins_after": after["bins"]}
    chosen = meta.get("threshold")
    if chosen:
        measured = precision_at(softmax(logits, temperature), targets, chosen["threshold"])
        report["threshold"] = {**chosen, "measured": measured}
    return report


def calibrate(run_dir: str | Path, target_precision: float = 0.95, progress: bool = False) -> dict:
    """Fit the temperature and the confidence threshold on the run's validation split and store
    both in model.json, so every later prediction uses them."""
    run_dir = Path(run_dir)
    clf = load(run_dir)
    val = [s for s in read_split_csv(run_dir / "split.csv") if s.split == "val" and s.label in set(clf.classes_)]
    logits, kept, _ = sample_logits(clf, val, progress)
    return calibrate_from_logits(run_dir, clf.meta, logits, [val[i] for i in kept], target_precision)


def calibrate_from_logits(run_dir: Path, meta: dict, logits: np.ndarray, samples: list[Sample],
                          target_precision: float) -> dict:
    from imgclf.bundle import update_meta
    from imgclf.evaluation.calibration import fit_temperature, threshold_for_precision

    if not samples:
        return {}
    index = {label: i for i, label in enumerate(meta["classes"])}
    targets = np.array([index[s.label] for s in samples], dtype=np.int64)
    temperature = fit_temperature(logits, targets)
    chosen = threshold_for_precision(softmax(logits, temperature), targets, target_precision)
    if not chosen["reliable"]:
        chosen["note"] = (f"only {chosen['n']} validation images: too few to promise {target_precision:.0%} "
                          f"precision at this threshold")
    update_meta(run_dir, {"temperature": temperature, "threshold": chosen})
    meta.update({"temperature": temperature, "threshold": chosen})
    print(f"calibration on {len(targets)} validation images: temperature {temperature:.3f}; "
          f"{target_precision:.0%} precision at confidence >= {chosen['threshold']:.3f} "
          f"(decides {chosen['coverage']:.0%} of images)", file=sys.stderr)
    return {"temperature": temperature, "threshold": chosen}


def write_pictures(run_dir: Path, metrics: dict, meta: dict) -> None:
    """confusion.png (and one per hierarchy level), curves.png, reliability.png."""
    plot_confusion(metrics["confusion"], run_dir / "confusion.png")
    for level in (metrics.get("levels") or [])[:-1]:  # the deepest level is confusion.png itself
        plot_confusion(rollup_confusion(metrics["confusion"], level["depth"]),
                       run_dir / f"confusion_level{level['depth']}.png", title=f"Confusion at depth {level['depth']}")
    history = read_history(run_dir)
    if history:
        plot_history(history, run_dir / "curves.png", best_epoch=meta.get("epoch"))
    if metrics.get("calibration"):
        plot_reliability(metrics["calibration"], run_dir / "reliability.png")


def read_history(run_dir: Path) -> list[dict]:
    path = run_dir / "history.csv"
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [{k: (float(v) if v not in ("", None) else math.nan) for k, v in row.items()}
                for row in csv.DictReader(handle)]


def evaluate(run_dir: str | Path, data: str | None = None, progress: bool = True) -> dict:
    """Evaluate a run; writes metrics.json, the pictures, report.md and report.html into it."""
    run_dir = Path(run_dir)
    clf = load(run_dir)
    samples, split = samples_to_evaluate(run_dir, data)
    known = set(clf.classes_.tolist())
    unknown = [s for s in samples if s.label not in known]
    samples = [s for s in samples if s.label in known]
    if unknown:
        print(f"warning: {len(unknown)} images have labels the model does not know; left out", file=sys.stderr)
    logits, kept, failures = sample_logits(clf, samples, progress)
    for failure in failures:
        print(f"skipped {failure['path']}: {failure['reason']}", file=sys.stderr)
    extra = {"split": split, "data": data or "run split", "skipped": failures, "unknown_labels": len(unknown)}
    return report_from_logits(run_dir, clf.meta, logits, [samples[i] for i in kept], extra)


def report_from_logits(run_dir: Path, meta: dict, logits: np.ndarray, samples: list[Sample], extra: dict) -> dict:
    """Metrics, pictures and reports from the logits of labelled samples (whatever computed them)."""
    classes = list(meta["classes"])
    index = {label: i for i, label in enumerate(classes)}
    targets = np.array([index[s.label] for s in samples], dtype=np.int64)
    probs = softmax(logits, float(meta.get("temperature", 1.0)))
    metrics = compute_metrics(probs, targets, classes, [s.name for s in samples])
    metrics.update({"architecture": meta["architecture"], **extra,
                    "calibration": calibration_report(logits, targets, meta)})
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
    write_pictures(run_dir, metrics, meta)
    report = write_report_md(run_dir, metrics, meta, has_curves=(run_dir / "curves.png").exists())
    write_report_html(run_dir, metrics, meta)
    if (run_dir / "tensorboard").is_dir():
        from imgclf.evaluation.embed import log_to_tensorboard

        log_to_tensorboard(run_dir, samples)
    print(f"{metrics['split']} top-1 {metrics['top1']:.3f}, top-5 {metrics['top5']:.3f} on {metrics['n']} "
          f"images; report: {report}", file=sys.stderr)
    return metrics
