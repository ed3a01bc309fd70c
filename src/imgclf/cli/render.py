"""What the command line shows: events drawn as bars and lines on stderr, results written to
stdout. The only module of imgclf that prints; the library emits events and returns values."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import threading
import time
from collections.abc import Iterable

from tqdm import tqdm

from imgclf.core.events import EpochEnd, Event, Message, Plan, Progress
from imgclf.predictors.base import FilePrediction

SLOW_LINE_S = 30.0  # without a terminal, a long stage still says how far it is this often
QUIET_STAGES = ("train", "validate")  # each epoch's line says it all


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def plan_lines(plan: Plan) -> list[str]:
    speeds = ", ".join(f"{name.replace('_', ' ')} {value:.0f}" for name, value in plan.speeds.items())
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in plan.stages.items())
    others = "; ".join(
        f"{c['plan']} {c['predicted_s'] / 60:.1f} min" for c in plan.candidates if c["plan"] != plan.plan
    )
    budget = f" of a {plan.budget_s / 60:.1f} min budget" if plan.budget_s else ""
    lines = [
        f"plan: {plan.plan} ({plan.why}); predicted {plan.predicted_s / 60:.1f} min in all{budget}",
        f"  measured here, img/s: {speeds}",
        f"  predicted stages: {stages}",
    ]
    return lines + ([f"  other plans: {others}"] if others else [])


def epoch_line(event: EpochEnd) -> str:
    row = event.row
    return (
        f"epoch {row['epoch']}/{event.epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f} | "
        f"val loss {row['val_loss']:.4f} top1 {row['val_top1']:.3f} top5 {row['val_top5']:.3f} | "
        f"{row['images_per_s']:.0f} img/s, {row['seconds']:.0f}s{' *best' if event.best else ''} | "
        f"ETA {format_eta(event.eta_s)}"
    )


class Terminal:
    """An events channel for a person: on a terminal, a tqdm bar per running stage; otherwise a
    line when a stage ends (and every half minute of a long one). Messages and epochs are lines.
    Thread-safe (decode workers report skipped files) and re-entrant (a signal handler may emit)."""

    def __init__(self, stream=None, bars: bool | None = None):
        self.stream = stream or sys.stderr
        self.bars = self.stream.isatty() if bars is None else bars
        self._lock = threading.RLock()
        self._bar: tqdm | None = None
        self._stage = ""
        self._said = 0.0

    def __call__(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, Progress):
                self._progress(event)
            elif isinstance(event, EpochEnd):
                self._close()
                self._line(epoch_line(event))
            elif isinstance(event, Plan):
                for line in plan_lines(event):
                    self._line(line)
            elif isinstance(event, Message):
                self._line(("warning: " if event.level == "warning" else "") + event.text)

    def _line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _progress(self, event: Progress) -> None:
        if event.stage != self._stage or event.done == 0:
            self._close()
            self._stage, self._said = event.stage, time.monotonic()
            if self.bars:
                self._bar = tqdm(
                    total=event.total,
                    desc=self._desc(event),
                    unit=event.unit,
                    file=self.stream,
                    leave=False,
                    dynamic_ncols=True,
                )
        if self._bar is not None:
            self._bar.set_description(self._desc(event), refresh=False)
            if event.detail.get("loss") is not None:
                self._bar.set_postfix(loss=f"{event.detail['loss']:.3f}", refresh=False)
            self._bar.update(event.done - self._bar.n)
        elif event.stage not in QUIET_STAGES and (
            (event.done >= event.total and event.elapsed_s >= 1.0) or time.monotonic() - self._said > SLOW_LINE_S
        ):
            self._said = time.monotonic()
            self._line(
                f"{self._desc(event)}: {event.done}/{event.total} {event.unit} in {event.elapsed_s:.1f} s "
                f"({event.rate:.0f} {event.unit}/s)"
                + (f", ETA {format_eta(event.eta_s)}" if event.done < event.total else "")
            )
        if event.done >= event.total:
            self._close()

    @staticmethod
    def _desc(event: Progress) -> str:
        detail = event.detail
        return f"epoch {detail['epoch']}/{detail['epochs']}" if "epoch" in detail else event.stage

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._stage = ""


def fetch_summary(summary) -> None:
    """The per-label table on stdout, then where things are and what to do next on stderr."""
    for line in summary.table():
        say(line)
    if summary.dry_run:
        for host, n in list(summary.hosts.items())[:20]:
            say(f"host {host}: {n} URLs")
        say(f"dry run: {summary.by_kind['to_request']} URLs to request, nothing requested or written")
        return
    outcomes = ", ".join(f"{k} {v}" for k, v in summary.by_outcome.items())
    print(
        f"{summary.inputs} input rows: {outcomes}; {summary.processed} URLs in {summary.elapsed_s:.1f} s "
        f"({summary.urls_per_s:.0f}/s). Manifest: {summary.out}/.imgclf/fetch/manifest.jsonl",
        file=sys.stderr,
        flush=True,
    )
    if summary.stopped:
        print("stopped: run the same command again to finish", file=sys.stderr, flush=True)


def say(text: str) -> None:
    """A result line on stdout."""
    print(text, flush=True)


def error_line(text: str) -> None:
    print(f"imgclf: error: {text}", file=sys.stderr, flush=True)


def prepare_streams() -> None:
    """File names that are not UTF-8 (bytes as Linux allows) are written back as the same bytes,
    as ls does, rather than failing the command with a UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")


def quiet_stdout() -> None:
    """After the reader of stdout went away: send the rest nowhere, so the exit's flush cannot fail."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def predictions(results: Iterable[FilePrediction], fmt: str, k: int, decided: bool = False) -> int:
    """Stream predictions as a table, a JSON array or CSV; returns the number of bad files.
    With ``decided`` (a confidence threshold in use) the decision comes first: a label or unknown."""
    bad = 0
    writer = csv.writer(sys.stdout) if fmt == "csv" else None
    if writer:
        writer.writerow(
            ["path", "error"]
            + (["label"] if decided else [])
            + [f"{c}{i}" for i in range(1, k + 1) for c in ("label", "prob")]
        )
    if fmt == "json":
        sys.stdout.write("[")
    try:
        for n, pred in enumerate(results):
            bad += bool(pred.error)
            if pred.error:
                print(f"error: {pred.path}: {pred.error}", file=sys.stderr)
            if fmt == "json":
                sys.stdout.write(("," if n else "") + "\n  " + _json_text(pred.to_dict()))
            elif writer:
                cells = [x for label, p in zip(pred.labels, pred.probs) for x in (label, f"{p:.6f}")]
                writer.writerow([pred.path, pred.error] + ([pred.label] if decided else []) + cells)
            elif not pred.error:
                first = [pred.label] if decided else []
                scores = (f"{label} {p:.3f}" for label, p in zip(pred.labels, pred.probs))
                print("\t".join([pred.path, *first, *scores]))
    finally:  # stopped in the middle: what was written is still one valid JSON array
        if fmt == "json":
            sys.stdout.write("\n]\n")
        sys.stdout.flush()
    return bad


def _json_text(value) -> str:
    """JSON with non-ASCII text as it is, unless a file name holds bytes that are not UTF-8
    (lone surrogates, which no UTF-8 output can carry): then escaped, still valid JSON."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return json.dumps(value)
