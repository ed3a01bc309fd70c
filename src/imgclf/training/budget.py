"""The time budget as a stop that never leaves a run empty-handed.

At the deadline the run's stop token is set, so training ends after the step in progress with a
checkpoint and its best model. Before the run has a first model (the head fitted, or the first
epoch validated) the stop waits for it: a run stopped with nothing to show is worth less to the
person who asked than one that ran over, and the overrun is said (a machine slower than its
plan measured, or a budget no plan fits). Every other stop (Ctrl-C, SIGTERM, a service's cancel,
``--max-steps``) is not deferred.
"""

from __future__ import annotations

import threading
import time

from imgclf.core.events import StopToken

REASON = "time budget"


class BudgetStop:
    def __init__(self, stop: StopToken, seconds: float, has_model: bool) -> None:
        self._stop, self._lock = stop, threading.Lock()
        self._due_at: float | None = None
        self._has_model = has_model
        self._timer = threading.Timer(max(0.0, seconds), self._due)
        self._timer.daemon = True
        self._timer.start()

    def _due(self) -> None:
        with self._lock:
            self._due_at = time.monotonic()
            if self._has_model:
                self._stop.set(REASON)

    def model_made(self) -> float | None:
        """The run has a model now. When the budget was spent already, the stop is set now and
        the seconds it ran over are returned (None otherwise)."""
        with self._lock:
            first, self._has_model = not self._has_model, True
            if self._due_at is None or not first:
                return None
            self._stop.set(REASON)
            return time.monotonic() - self._due_at

    def cancel(self) -> None:
        self._timer.cancel()
