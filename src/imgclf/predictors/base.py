"""What every predictor shares, with no PyTorch here: the scikit-learn manners (``predict``,
``predict_proba``, ``classes_``), the confidence threshold, and streaming many files with bad
ones reported. A predictor supplies how one image becomes a model input (``_input``), how inputs
are stacked (``_stack``) and how a batch becomes probabilities (``_proba_of_batch``)."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from imgclf.core.errors import ImageError, NoThresholdError
from imgclf.core.events import Events, StopToken, Tracker, channel, stop_token
from imgclf.core.preprocessing import Preprocessing
from imgclf.data.images import DEFAULT_MAX_PIXELS, load_image, to_rgb
from imgclf.data.preprocess import eval_array, prefetch_batches

UNKNOWN = "unknown"  # the label given below the confidence threshold


@dataclass
class FilePrediction:
    """The top-k of one file, or why it could not be read."""

    path: str
    labels: list[str] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    error: str = ""
    label: str = ""  # the decision: the top label, or "unknown" below the confidence threshold

    def to_dict(self) -> dict:
        if self.error:
            return {"path": self.path, "error": self.error}
        return {
            "path": self.path,
            "label": self.label,
            "top": [{"label": lab, "prob": round(p, 6)} for lab, p in zip(self.labels, self.probs)],
        }


class BasePredictor:
    backend: str
    classes_: np.ndarray
    meta: dict
    preprocessing: Preprocessing
    batch_size: int
    max_pixels: int = DEFAULT_MAX_PIXELS
    _stack: Callable

    def _input(self, item):  # one image (path, PIL image or HWC array) -> its CHW model input
        raise NotImplementedError

    def _pixels(self, item) -> np.ndarray:
        """One image as the uint8 CHW centre crop the model sees: the same code for every backend."""
        if isinstance(item, Image.Image):
            image = to_rgb(item)
        elif isinstance(item, np.ndarray):
            image = to_rgb(Image.fromarray(item))
        else:
            image = load_image(item, draft_size=self.preprocessing.resize_size, max_pixels=self.max_pixels)
        prep = self.preprocessing
        return eval_array(image, prep.image_size, prep.resize_size, prep.interpolation)

    def _proba_of_batch(self, batch) -> np.ndarray:  # stacked inputs -> (n, classes) probabilities
        raise NotImplementedError

    def _batch_runner(self, batches: int) -> tuple[int, Callable]:
        """How many batches of a job of ``batches`` may run on the model at once, and the function
        that runs one; one at a time unless a predictor measured better."""
        return 1, self._proba_of_batch

    def _run_batches(self, prefetched: Iterator, batches: int) -> Iterator[tuple[list[int], list[int], object]]:
        """``(chunk, good, probabilities)`` for each prefetched ``(chunk, good, batch)``, in order,
        with as many batches on the model at once as ``_batch_runner`` allows."""
        at_once, run = self._batch_runner(batches)
        if at_once == 1:  # on this thread: handing one batch to another cost 2-3 ms of latency
            for chunk, good, batch in prefetched:
                yield chunk, good, None if batch is None else run(batch)
            return
        with ThreadPoolExecutor(at_once) as pool:
            running: deque = deque()
            for chunk, good, batch in prefetched:
                running.append((chunk, good, None if batch is None else pool.submit(run, batch)))
                # a batch of only bad files has nothing to wait for
                while len(running) >= at_once or (running and running[0][2] is None):
                    chunk, good, future = running.popleft()
                    yield chunk, good, None if future is None else future.result()
            for chunk, good, future in running:
                yield chunk, good, None if future is None else future.result()

    def predict_proba(self, images) -> np.ndarray:
        """(n, n_classes) probabilities, columns in the order of ``classes_``. Raises ImageError."""
        items = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        if not items:
            return np.zeros((0, len(self.classes_)), dtype=np.float32)
        return np.concatenate(
            [
                self._proba_of_batch(self._stack([self._input(x) for x in items[i : i + self.batch_size]]))
                for i in range(0, len(items), self.batch_size)
            ]
        )

    def predict(self, images, k: int = 1, min_confidence: float | str | None = None) -> np.ndarray:
        """Labels: shape (n,) for ``k=1``, else (n, k) ranked best first. With ``min_confidence``
        (a probability, or "auto" for the model's recommended threshold), a top label below it
        becomes "unknown"."""
        proba = self.predict_proba(images)
        labels = self.classes_[np.argsort(-proba, axis=1)[:, :k]]
        threshold = self.confidence_threshold(min_confidence)
        if threshold is not None:
            labels[:, 0] = np.where(proba.max(axis=1) >= threshold, labels[:, 0], UNKNOWN)
        return labels[:, 0] if k == 1 else labels

    def confidence_threshold(self, value: float | str | None) -> float | None:
        """None (decide always), a number, or "auto": the threshold chosen on the validation split."""
        if value in (None, ""):
            return None
        if value == "auto":
            chosen = self.meta.get("threshold")
            if not chosen:
                raise NoThresholdError(
                    "this model has no recommended threshold (it was not calibrated); "
                    "give --min-confidence a number instead"
                )
            return float(chosen["threshold"])
        return float(value)

    def predict_files(
        self,
        paths: Iterable[str],
        k: int = 5,
        workers: int | None = None,
        min_confidence: float | str | None = None,
        events: Events | None = None,
        stop: StopToken | None = None,
    ) -> Iterator[FilePrediction]:
        """Top-k for many files, in order, decoding the next batches while this one runs.

        A file that cannot be read gives a FilePrediction with ``error`` and the rest go on.
        Memory stays bounded: at most three batches are decoded at a time. A stop ends the
        stream after the current batch (raising Stopped).
        """
        paths, k = list(paths), min(k, len(self.classes_))
        threshold, errors = self.confidence_threshold(min_confidence), {}
        stop = stop_token(stop)

        def decode(index: int):
            try:
                return self._input(paths[index])
            except ImageError as exc:
                errors[index] = exc.reason
                return None

        batches = -(-len(paths) // self.batch_size)
        tracker = Tracker(channel(events), "predict", len(paths))
        prefetched = prefetch_batches(len(paths), decode, self.batch_size, self._stack, workers)
        for chunk, good, proba in self._run_batches(prefetched, batches):
            rows = dict(zip(good, proba)) if proba is not None else {}
            for index in chunk:
                if index not in rows:
                    yield FilePrediction(paths[index], error=errors.pop(index, "cannot decode"))
                    continue
                order = np.argsort(-rows[index])[:k]
                top = float(rows[index][order[0]])
                label = str(self.classes_[order[0]]) if threshold is None or top >= threshold else UNKNOWN
                yield FilePrediction(
                    paths[index],
                    [str(self.classes_[j]) for j in order],
                    [float(rows[index][j]) for j in order],
                    label=label,
                )
            tracker.advance(len(chunk))
            stop.check()
