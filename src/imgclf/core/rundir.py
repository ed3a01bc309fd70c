"""A run folder: every file name it holds, and atomic reads and writes of its JSON records.

Nothing else in imgclf spells these names. ``run.json`` is the run's own record (data source,
classes, preprocessing, head, status); ``settings.json`` the resolved settings; the rest are
what training and evaluation produce.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from pathlib import Path
from typing import Any

from imgclf.core.atomic import atomic_write
from imgclf.core.errors import OutputError


class RunDir:
    SETTINGS = "settings.json"
    RUN = "run.json"
    AUDIT = "audit.json"
    SPLIT = "split.csv"
    HISTORY = "history.csv"
    TENSORBOARD = "tensorboard"
    CHECKPOINT = "checkpoint.safetensors"
    WEIGHTS = "model.safetensors"
    META = "model.json"
    METRICS = "metrics.json"
    REPORT_MD = "report.md"
    REPORT_HTML = "report.html"
    CONFUSION = "confusion.png"
    CURVES = "curves.png"
    RELIABILITY = "reliability.png"
    ONNX = "onnx"
    # what makes a self-contained copy of a finished run's model and its report
    DELIVERABLES = (WEIGHTS, META, METRICS, REPORT_MD, REPORT_HTML, CONFUSION, CURVES, RELIABILITY)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    def make(self) -> None:
        """Create the folder, or :class:`OutputError` saying why it cannot be."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise OutputError(f"{self.path}: a file is in the way of the run folder; choose another --out") from None
        except OSError as exc:
            raise OutputError(
                f"{self.path}: cannot create the run folder ({exc.strerror or exc}); choose another --out"
            ) from None

    def confusion_at(self, depth: int) -> Path:
        return self.path / f"confusion_level{depth}.png"

    def deliverables(self) -> list[Path]:
        """The files of :attr:`DELIVERABLES` present here, with the per-level confusion pictures."""
        present = [self.path / name for name in self.DELIVERABLES if (self.path / name).exists()]
        return present + sorted(self.path.glob("confusion_level*.png"))

    # JSON records -------------------------------------------------------------------------
    def read_json(self, name: str, default: Any = None) -> Any:
        path = self.path / name
        if not path.exists():
            return default
        return json.loads(path.read_text(encoding="utf-8"))

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        self.make()
        atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8", errors="backslashreplace"))
        return path

    def read_run(self) -> dict:
        return self.read_json(self.RUN, {})

    def update_run(self, **fields: Any) -> dict:
        """Merge ``fields`` into run.json, atomically: a crash leaves the old record or the new one."""
        run = self.read_run()
        run.update(fields)
        self.write_json(self.RUN, run)
        return run

    @contextlib.contextmanager
    def lock(self, wait_s: float = 120.0):
        """Hold the run folder for one training at a time: a second process waits up to
        ``wait_s`` for the first to end (a stopped run finishing its last step), then gives up
        with TimeoutError. Released when the process ends, however it ends."""
        self.make()
        try:
            handle = open(self.path / ".lock", "w")
        except OSError as exc:
            raise OutputError(
                f"{self.path}: cannot write in the run folder ({exc.strerror or exc}); choose another --out"
            ) from None
        with handle:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self.path} is being trained by another process") from None
                    time.sleep(0.2)
            self._remove_leftovers()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _remove_leftovers(self, older_than_s: float = 60.0) -> None:
        """Temporary files of writes that a kill cut short (``atomic_write``'s ``NAME….tmp``): gone
        once the next training holds the folder. Only old ones: a report being written this
        moment by an ``imgclf evaluate`` beside it keeps its own."""
        now = time.time()
        for leftover in self.path.rglob("*.tmp"):
            try:
                if leftover.is_file() and now - leftover.stat().st_mtime > older_than_s:
                    leftover.unlink()
            except OSError:
                pass

    # state ----------------------------------------------------------------------------------
    @property
    def is_run(self) -> bool:
        return (self.path / self.RUN).exists() and (self.path / self.SETTINGS).exists()

    @property
    def status(self) -> str:
        """new (nothing here yet), running (or killed), stopped, finished or failed."""
        return self.read_run().get("status", "new") if self.is_run else "new"

    @property
    def has_checkpoint(self) -> bool:
        return (self.path / self.CHECKPOINT).exists()
