"""``evaluate``: a trained run on its test split (or on other labelled data) -> metrics.json,
confusion-matrix and training-curve pictures, report.md."""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

from imgclf.data.dataset import decode_all
from imgclf.data.scan import Sample, scan
from imgclf.data.split import read_split_csv
from imgclf.data.transforms import eval_tensor
from imgclf.evaluation.metrics import compute_metrics
from imgclf.evaluation.plots import plot_confusion, plot_history
from imgclf.evaluation.report import write_report_md
from imgclf.predict import Classifier, load

CHUNK = 1024  # images decoded at a time: bounded memory on large test sets


def samples_to_evaluate(run_dir: Path, data: str | None) -> tuple[list[Sample], str]:
    """The run's own test split (val when it has none), or the test split / all of ``data``."""
    if data is None:
        samples = read_split_csv(run_dir / "split.csv")
        test = [s for s in samples if s.split == "test"]
        return (test, "test") if test else ([s for s in samples if s.split == "val"], "val")
    scanned = scan(data).samples
    test = [s for s in scanned if s.split == "test"]
    return (test, "test") if test else (scanned, "all")


def predict_samples(clf: Classifier, samples: list[Sample], progress: bool) -> tuple[np.ndarray, list[int], list[dict]]:
    """Probabilities for the samples that decode; returns (probs, kept indices, failures)."""
    prep = clf.preprocessing
    probs, kept, failures = [], [], []
    for start in range(0, len(samples), CHUNK):
        chunk = samples[start:start + CHUNK]
        tensors, chunk_failures = decode_all(chunk, lambda im: eval_tensor(im, prep), prep, "evaluate", progress)
        failures += chunk_failures
        good = [i for i, t in enumerate(tensors) if t is not None]
        for b in range(0, len(good), clf.batch_size):
            batch = good[b:b + clf.batch_size]
            probs.append(clf._proba_of_tensors([tensors[i] for i in batch]))
        kept += [start + i for i in good]
    return (np.concatenate(probs) if probs else np.zeros((0, len(clf.classes_)))), kept, failures


def read_history(run_dir: Path) -> list[dict]:
    path = run_dir / "history.csv"
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [{k: (float(v) if v not in ("", None) else math.nan) for k, v in row.items()}
                for row in csv.DictReader(handle)]


def evaluate(run_dir: str | Path, data: str | None = None, progress: bool = True) -> dict:
    """Evaluate a run; writes metrics.json, confusion.png, curves.png and report.md into it."""
    run_dir = Path(run_dir)
    clf = load(run_dir)
    samples, split = samples_to_evaluate(run_dir, data)
    known = set(clf.classes_.tolist())
    unknown = [s for s in samples if s.label not in known]
    samples = [s for s in samples if s.label in known]
    if unknown:
        print(f"warning: {len(unknown)} images have labels the model does not know; left out", file=sys.stderr)
    probs, kept, failures = predict_samples(clf, samples, progress)
    for failure in failures:
        print(f"skipped {failure['path']}: {failure['reason']}", file=sys.stderr)
    index = {label: i for i, label in enumerate(clf.classes_.tolist())}
    targets = np.array([index[samples[i].label] for i in kept], dtype=np.int64)
    names = [samples[i].name for i in kept]
    metrics = compute_metrics(probs, targets, clf.classes_.tolist(), names)
    metrics.update({"split": split, "data": data or "run split", "architecture": clf.meta["architecture"],
                    "skipped": failures, "unknown_labels": len(unknown)})
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
    plot_confusion(metrics["confusion"], run_dir / "confusion.png")
    history = read_history(run_dir)
    if history:
        plot_history(history, run_dir / "curves.png", best_epoch=clf.meta.get("epoch"))
    report = write_report_md(run_dir, metrics, clf.meta, has_curves=bool(history))
    print(f"{split} top-1 {metrics['top1']:.3f}, top-5 {metrics['top5']:.3f} on {metrics['n']} images; "
          f"report: {report}", file=sys.stderr)
    return metrics
