"""report.md: what a person reads after training, with the pictures beside it."""

from __future__ import annotations

import json
from pathlib import Path

from imgclf.core.rundir import RunDir


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _per_class_table(per_class: dict) -> list[str]:
    rows = sorted(per_class.items(), key=lambda item: (item[1]["f1"], item[0]))
    lines = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    lines += [
        f"| {label} | {_pct(m['precision'])} | {_pct(m['recall'])} | {m['f1']:.3f} | {m['support']} |"
        for label, m in rows
    ]
    return lines


def write_report_md(run_dir: Path, metrics: dict, meta: dict, has_curves: bool) -> Path:
    """Summary, curves, confusion matrix, per-class table (worst first), confusions and mistakes."""
    settings = meta.get("settings", {})
    lines = [
        f"# imgclf report: {run_dir.name}",
        "",
        f"Model **{meta['architecture']}** at {meta['preprocessing']['image_size']} px, "
        f"{len(meta['classes'])} classes, best epoch {meta.get('epoch', '?')}.",
        "",
        "| split | images | top-1 | top-5 | macro F1 | balanced accuracy |",
        "|---|---:|---:|---:|---:|---:|",
        f"| {metrics['split']} | {metrics['n']} | {_pct(metrics['top1'])} | {_pct(metrics['top5'])} | "
        f"{metrics['macro_f1']:.3f} | {_pct(metrics['balanced_accuracy'])} |",
        "",
    ]
    if metrics.get("levels"):
        lines += ["## Accuracy per level of the hierarchy", "", "| depth | accuracy | images |", "|---:|---:|---:|"]
        lines += [f"| {lv['depth']} | {_pct(lv['accuracy'])} | {lv['n']} |" for lv in metrics["levels"]]
        lines.append("")
    if has_curves:
        lines += ["## Training curves", "", f"![training curves]({RunDir.CURVES})", ""]
    lines += [
        "## Confusion matrix",
        "",
        "Rows are the true class, normalised per row.",
        "",
        f"![confusion matrix]({RunDir.CONFUSION})",
        "",
        "## Per class (worst first)",
        "",
    ]
    lines += _per_class_table(metrics["per_class"]) + [""]
    if metrics["most_confused"]:
        lines += ["## Most confused", "", "| true | predicted as | images |", "|---|---|---:|"]
        lines += [f"| {c['true']} | {c['predicted']} | {c['count']} |" for c in metrics["most_confused"]]
        lines.append("")
    if metrics["mistakes"]:
        lines += ["## Most confidently wrong", "", "| image | true | predicted (top-3) |", "|---|---|---|"]
        for mistake in metrics["mistakes"][:20]:
            top3 = ", ".join(f"{label} {_pct(p)}" for label, p in mistake["top3"])
            lines.append(f"| {mistake['path']} | {mistake['true']} | {top3} |")
        lines.append("")
    lines += ["## Settings", "", "```json"]
    lines += [json.dumps(settings, indent=2), "```", ""]
    return RunDir(run_dir).write_text(RunDir.REPORT_MD, "\n".join(lines))
