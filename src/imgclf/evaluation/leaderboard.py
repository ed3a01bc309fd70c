"""The leaderboard of ``compare``: one row per trained candidate, ranked by validation top-1
(never by test, which stays an honest estimate of the chosen model), as Markdown, CSV, JSON and a
chart, and the best run's model and report copied to ``best/``.

A candidate is ``MODEL[:MODE]``, e.g. ``cnn4`` or ``tf_efficientnet_lite0:head``. With
``per_class`` sizes, accuracy is also drawn against the number of photos per class ("how many
photos do I need?").
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from imgclf.core.errors import SettingsError
from imgclf.core.rundir import RunDir
from imgclf.evaluation.plots import plot_accuracy_vs_n, plot_leaderboard

COLUMNS = (
    "candidate",
    "per_class",
    "mode",
    "val_top1",
    "test_top1",
    "test_top5",
    "train_seconds",
    "train_images_per_s",
    "parameters",
    "size_mb",
    "run_dir",
)


@dataclass
class Leaderboard:
    rows: list[dict]
    best: dict
    out: Path


def parse_candidate(spec: str) -> dict:
    model, _, mode = spec.strip().partition(":")
    if not model:
        raise SettingsError(f"--models: empty candidate in '{spec}' (expected MODEL[:MODE], comma-separated)")
    return {"model": model, "mode": mode or "auto"}


def _parameters(bundle: Path) -> int:
    with safe_open(str(bundle / RunDir.WEIGHTS), framework="pt") as handle:
        return sum(
            math.prod(handle.get_slice(k).get_shape())
            for k in handle.keys()
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
        )


def leaderboard_row(spec: str, per_class: int, run_dir: Path, seconds: float) -> dict:
    run = RunDir(run_dir)
    meta, metrics = run.read_json(RunDir.META), run.read_json(RunDir.METRICS)
    with open(run / RunDir.HISTORY, newline="") as handle:
        speeds = [float(r["images_per_s"]) for r in csv.DictReader(handle) if r["images_per_s"] not in ("", "nan")]
    return {
        "candidate": spec,
        "per_class": per_class or "all",
        "mode": meta.get("mode", ""),
        "val_top1": meta["metrics"]["val_top1"],
        "test_top1": metrics["top1"],
        "test_top5": metrics["top5"],
        "train_seconds": round(seconds, 1),
        "train_images_per_s": round(sum(speeds) / len(speeds), 1) if speeds else None,  # head: no epochs
        "parameters": _parameters(run_dir),
        "size_mb": round((run / RunDir.WEIGHTS).stat().st_size / 2**20, 2),
        "run_dir": str(run_dir),
    }


def write_leaderboard(rows: list[dict], out: Path, per_class: list[int] | None) -> Leaderboard:
    """Rank the rows, keep the best bundle (by validation, among the largest per-class size) in
    ``out/best``, and write the leaderboard files."""
    largest = [r for r in rows if r["per_class"] == (per_class[-1] if per_class else "all")]
    best = max(largest, key=lambda r: (r["val_top1"], -r["train_seconds"]))
    _keep_best(best, out)
    _write(rows, best, out, bool(per_class))
    return Leaderboard(rows, best, out)


def _keep_best(best: dict, out: Path) -> None:
    target = out / "best"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    for source in RunDir(best["run_dir"]).deliverables():
        shutil.copy2(source, target / source.name)


def _write(rows: list[dict], best: dict, out: Path, few_shot: bool) -> None:
    ranked = sorted(rows, key=lambda r: -r["val_top1"])
    (out / "leaderboard.json").write_text(json.dumps({"best": best, "rows": ranked}, indent=2) + "\n")
    with open(out / "leaderboard.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(ranked)
    lines = [
        "# Leaderboard",
        "",
        f"Best by validation top-1: **{best['candidate']}** (bundle in `best/`).",
        "",
        "| candidate | photos/class | mode | val top-1 | test top-1 | test top-5 | train s | train img/s "
        "| parameters | size MB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ranked:
        lines.append(
            f"| {r['candidate']} | {r['per_class']} | {r['mode']} | {100 * r['val_top1']:.1f}% | "
            f"{100 * r['test_top1']:.1f}% | {100 * r['test_top5']:.1f}% | {r['train_seconds']:.0f} | "
            f"{r['train_images_per_s'] if r['train_images_per_s'] is not None else '-'} | "
            f"{r['parameters']:,} | {r['size_mb']} |"
        )
    plot_leaderboard(ranked, out / "leaderboard.png")
    lines += ["", "![leaderboard](leaderboard.png)"]
    if few_shot:
        plot_accuracy_vs_n(rows, out / "accuracy_vs_photos.png")
        lines += ["", "![test top-1 against photos per class](accuracy_vs_photos.png)"]
    (out / "leaderboard.md").write_text("\n".join(lines) + "\n")
