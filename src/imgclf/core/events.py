"""How the library tells the world what it is doing, and how the world tells it to stop.

The library never prints. Every long step takes ``events=``, a callable that receives typed
events (:class:`Progress`, :class:`EpochEnd`, :class:`Message`), and ``stop=``, a
:class:`StopToken`. Each face decides what to do with them: the CLI draws bars and lines, a
JSON-lines file feeds other programs (the service tails one per job), a test collects them in a
list, and a process other than rank 0 passes :func:`ignore`.
"""

from __future__ import annotations

import copy
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imgclf.core.errors import Stopped


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` units of one stage. The first event of a stage has ``done == 0`` and
    the last ``done == total``; ``detail`` carries what the stage adds (epoch, running loss)."""

    stage: str
    done: int
    total: int
    unit: str = "img"
    elapsed_s: float = 0.0
    detail: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Units per second so far."""
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float:
        """Seconds left at the rate so far (nan before the first unit)."""
        return (self.total - self.done) / self.rate if self.rate > 0 else math.nan


@dataclass(frozen=True)
class EpochEnd:
    """One finished training epoch: the ``history.csv`` row, whether it is the best so far, and
    the estimated seconds left for the epochs still to run."""

    row: dict
    epochs: int
    best: bool
    eta_s: float


@dataclass(frozen=True)
class Message:
    """Something a person should read. ``level`` is info or warning; ``path`` names the file it
    is about (a skipped image, a written report), when there is one."""

    level: str
    text: str
    path: str = ""


@dataclass(frozen=True)
class Plan:
    """What a training will do and why, decided from speeds measured on this machine before the
    work starts: the chosen plan, the measured speeds (img/s), the predicted seconds of each stage
    and in all, the budget (0: none), and the other plans considered with their predicted times."""

    plan: str
    why: str
    speeds: dict
    stages: dict
    predicted_s: float
    budget_s: float
    candidates: list = field(default_factory=list)


Event = Progress | EpochEnd | Message | Plan
Events = Callable[[Event], None]
EVENT_NAMES = {Progress: "progress", EpochEnd: "epoch_end", Message: "message", Plan: "plan"}


def ignore(event: Event) -> None:
    """The channel that drops everything (no face listening, or not the main rank)."""


def channel(events: Events | None) -> Events:
    return events if events is not None else ignore


def info(events: Events, text: str, path: str = "") -> None:
    events(Message("info", text, str(path)))


def warn(events: Events, text: str, path: str = "") -> None:
    events(Message("warning", text, str(path)))


def skipped(events: Events, path: str, reason: str) -> None:
    """One file left out, named with the reason (the same words in every path that reads files)."""
    events(Message("warning", f"skipped {path}: {reason}", str(path)))


def _plain(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null (strict JSON has no NaN), tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # NumPy / torch scalars
        return _plain(value.item())
    return value


def to_dict(event: Event) -> dict:
    """``{"event": name, "time": unix seconds, ...fields}``, JSON-safe."""
    data = {"event": EVENT_NAMES[type(event)], "time": round(time.time(), 3), **asdict(event)}
    if isinstance(event, Progress):
        data["rate"], data["eta_s"] = event.rate, event.eta_s
    return _plain(data)


class JsonLines:
    """An events channel that appends one strict JSON object per event to a file (thread-safe,
    flushed at once, so that another process can follow it as it grows)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8", errors="backslashreplace")
        self._lock = threading.RLock()  # re-entrant: a signal handler in the same thread may emit

    def __call__(self, event: Event) -> None:
        line = json.dumps(to_dict(event), ensure_ascii=False, allow_nan=False)
        with self._lock:
            self._handle.write(line + "\n")
            self._handle.flush()

    def close(self) -> None:
        with self._lock:
            self._handle.close()


def tee(*channels: Events) -> Events:
    """One channel that hands every event to each of ``channels``."""

    def send(event: Event) -> None:
        for each in channels:
            each(event)

    return send


class Tracker:
    """Emits :class:`Progress` for one stage: the start, then at most every ``interval`` seconds,
    and always the end, so a face sees ``done == total`` without an event per image."""

    def __init__(self, events: Events, stage: str, total: int, unit: str = "img", interval: float = 0.2):
        self.events, self.stage, self.total, self.unit, self.interval = events, stage, int(total), unit, interval
        self.done, self.detail = 0, {}
        self.started = self._last = time.perf_counter()
        self._emit()

    def _emit(self) -> None:
        elapsed = time.perf_counter() - self.started
        detail = copy.deepcopy(self.detail)  # a face may keep the event; the detail goes on changing
        self.events(Progress(self.stage, self.done, self.total, self.unit, round(elapsed, 3), detail))
        self._last = time.perf_counter()

    def advance(self, n: int = 1, **detail: Any) -> None:
        self.done += n
        self.detail.update(detail)
        if self.done >= self.total or time.perf_counter() - self._last >= self.interval:
            self._emit()

    def finish(self) -> None:
        """Mark the stage complete (items that were skipped still count as handled)."""
        if self.done < self.total:
            self.done = self.total
            self._emit()


class StopToken:
    """Set from any thread (a signal handler, a service's cancel button, a test) to end the work
    in progress after its current step. Long steps look at it between steps; training then writes
    a checkpoint, so nothing done is lost. A child token (:meth:`child`) is set by its parent too,
    so a run can stop itself (at its time budget) without setting the caller's token."""

    def __init__(self, parent: StopToken | None = None) -> None:
        self._flag = threading.Event()
        self._parent = parent
        self._reason = ""

    def set(self, reason: str = "stop requested") -> None:
        self._reason = self._reason or reason
        self._flag.set()

    def is_set(self) -> bool:
        return self._flag.is_set() or (self._parent is not None and self._parent.is_set())

    @property
    def reason(self) -> str:
        if self._parent is not None and self._parent.is_set():
            return self._parent.reason
        return self._reason

    def child(self) -> StopToken:
        return StopToken(self)

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking when the token is set; returns whether it is."""
        deadline = time.monotonic() + seconds
        while not self.is_set() and (left := deadline - time.monotonic()) > 0:
            self._flag.wait(min(left, 0.1))
        return self.is_set()

    def check(self) -> None:
        """Raise :class:`Stopped` when the token is set (for steps that have nothing to save)."""
        if self.is_set():
            raise Stopped(self.reason)


def stop_token(stop: StopToken | None) -> StopToken:
    return stop if stop is not None else StopToken()
