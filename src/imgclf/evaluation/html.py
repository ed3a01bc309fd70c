"""report.html: one self-contained page (pictures embedded, no network, opens from disk) that
answers what a user asks after training: how good, where it fails, which photos, can its
confidence be trusted."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from imgclf.core.rundir import RunDir
from imgclf.data.images import ImageError, load_image

THUMB = 112
GALLERY = 48

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{margin-bottom:.2rem} h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0} td,th{padding:.25rem .6rem;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left} .muted{color:#777} .kpi{display:inline-block;margin-right:2rem}
.kpi b{font-size:1.6rem;display:block} img.pic{max-width:100%} .gallery{display:flex;flex-wrap:wrap;gap:.6rem}
.card{width:140px;font-size:.75rem} .card img{width:112px;height:112px;object-fit:cover;display:block}
.bad{color:#b00}
"""


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def thumbnail(path: str) -> str:
    """A small JPEG of a photo as a data URL (empty when it cannot be read)."""
    try:
        image = load_image(path, draft_size=THUMB)
    except (ImageError, OSError):
        return ""
    image.thumbnail((THUMB * 2, THUMB * 2))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _picture(run_dir: Path, name: str, alt: str) -> str:
    path = run_dir / name
    return f'<img class="pic" alt="{html.escape(alt)}" src="{_png(path)}">' if path.exists() else ""


def _card(mistake: dict) -> str:
    src = thumbnail(mistake["path"])
    top3 = "<br>".join(f"{html.escape(label)} {100 * p:.0f}%" for label, p in mistake["top3"])
    image = (
        f'<img alt="{html.escape(mistake["path"])}" src="{src}">' if src else "<div class='muted'>(no preview)</div>"
    )
    return (
        f'<div class="card" title="{html.escape(mistake["path"])}">{image}'
        f'<div>true: <b>{html.escape(mistake["true"])}</b></div><div class="bad">{top3}</div></div>'
    )


def _summary(metrics: dict, meta: dict, audit: dict) -> str:
    settings = meta.get("settings", {})
    kpis = "".join(
        f'<span class="kpi"><b>{v}</b>{k}</span>'
        for k, v in (
            ("top-1", f"{100 * metrics['top1']:.1f}%"),
            ("top-5", f"{100 * metrics['top5']:.1f}%"),
            ("images", metrics["n"]),
            ("classes", len(meta["classes"])),
        )
    )
    problems = audit.get("problems", [])
    counts = ", ".join(f"{html.escape(k)} {v}" for k, v in sorted(audit.get("classes", {}).items()))
    return (
        f"<p>{kpis}</p><p>Model <b>{html.escape(meta['architecture'])}</b> "
        f"({html.escape(str(meta.get('mode', '')))}), {meta['preprocessing']['image_size']} px, "
        f"best epoch {meta.get('epoch', '?')}; evaluated on the {html.escape(metrics['split'])} split.</p>"
        f"<p class='muted'>Data: {counts}. {len(problems)} file(s) skipped by the audit; "
        f"imbalance ratio {audit.get('imbalance_ratio', '?')}.</p>"
        f"<details><summary>Settings</summary><pre>{html.escape(json.dumps(settings, indent=2))}</pre></details>"
    )


def _per_class(metrics: dict) -> str:
    rows = sorted(metrics["per_class"].items(), key=lambda item: (item[1]["f1"], item[0]))
    body = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{100 * m['precision']:.1f}%</td>"
        f"<td>{100 * m['recall']:.1f}%</td><td>{m['f1']:.3f}</td><td>{m['support']}</td></tr>"
        for label, m in rows
    )
    return (
        "<table id='per-class'><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>"
        f"<th>support</th></tr>{body}</table>"
    )


def _confused_pairs(metrics: dict) -> str:
    parts = []
    for pair in metrics["most_confused"]:
        examples = [m for m in metrics["mistakes"] if m["true"] == pair["true"] and m["predicted"] == pair["predicted"]]
        thumbs = "".join(
            f'<img alt="" title="{html.escape(m["path"])}" src="{src}" width="64" height="64">'
            for m in examples[:4]
            if (src := thumbnail(m["path"]))
        )
        parts.append(
            f"<tr><td>{html.escape(pair['true'])}</td><td>{html.escape(pair['predicted'])}</td>"
            f"<td>{pair['count']}</td><td style='text-align:left'>{thumbs}</td></tr>"
        )
    return (
        "<table id='confused'><tr><th>true</th><th>predicted as</th><th>images</th><th>examples</th></tr>"
        + "".join(parts)
        + "</table>"
    )


def _calibration(run_dir: Path, metrics: dict) -> str:
    calibration = metrics.get("calibration")
    if not calibration:
        return "<p class='muted'>Not calibrated.</p>"
    text = (
        f"<p>Expected calibration error {calibration['ece_before']:.3f} before, "
        f"{calibration['ece_after']:.3f} after temperature scaling (T = {calibration['temperature']:.2f}, "
        f"fitted on the validation split).</p>"
    )
    chosen = calibration.get("threshold")
    if chosen:
        measured = chosen["measured"]
        text += (
            f"<p>Recommended confidence threshold for {100 * chosen['target_precision']:.0f}% precision: "
            f"<b>{chosen['threshold']:.3f}</b> (chosen on validation, where it decided "
            f"{100 * chosen['coverage']:.0f}% of images). On these images it decides "
            f"{100 * measured['coverage']:.0f}% with precision {100 * measured['precision']:.1f}%; "
            f"the rest are answered <i>unknown</i> (<code>imgclf predict --min-confidence auto</code>).</p>"
        )
        if chosen.get("note"):
            text += f"<p class='bad'>{html.escape(chosen['note'])}.</p>"
    return text + _picture(run_dir, RunDir.RELIABILITY, "reliability diagram")


def write_report_html(run_dir: Path, metrics: dict, meta: dict, audit: dict) -> Path:
    """Write report.html into ``run_dir`` from metrics.json's content and the pictures beside it."""
    levels = "".join(
        f"<tr><td>depth {lv['depth']}</td><td>{100 * lv['accuracy']:.1f}%</td></tr>"
        for lv in metrics.get("levels") or []
    )
    rollups = "".join(
        _picture(run_dir, RunDir(run_dir).confusion_at(lv["depth"]).name, f"confusion at depth {lv['depth']}")
        for lv in (metrics.get("levels") or [])[:-1]
    )
    gallery = "".join(_card(m) for m in metrics["mistakes"][:GALLERY])
    sections = [
        ("Summary", _summary(metrics, meta, audit)),
        ("Training curves", _picture(run_dir, RunDir.CURVES, "training curves")),
        ("Confusion matrix", _picture(run_dir, RunDir.CONFUSION, "confusion matrix")),
        ("Per class, worst first", _per_class(metrics)),
        ("Most confused pairs", _confused_pairs(metrics)),
        ("Most confidently wrong", f"<div class='gallery' id='gallery'>{gallery}</div>"),
        ("Calibration and confidence threshold", _calibration(run_dir, metrics)),
    ]
    if levels:
        sections.insert(3, ("Accuracy per level", f"<table id='levels'>{levels}</table>{rollups}"))
    body = "".join(f"<h2>{title}</h2>{content}" for title, content in sections if content)
    page = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>imgclf report: "
        f"{html.escape(run_dir.name)}</title><style>{CSS}</style></head><body>"
        f"<h1>imgclf report: {html.escape(run_dir.name)}</h1>{body}</body></html>"
    )
    return RunDir(run_dir).write_text(RunDir.REPORT_HTML, page)
