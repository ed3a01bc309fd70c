"""Predictors behind one chooser: ``load(path, backend=...)``, for the CLI, the Python API and
the service alike.

- ``torch``: the bundle itself (a run folder or model folder), in PyTorch.
- ``onnx``: the folder ``imgclf export`` wrote (``RUN_DIR/onnx``, or that folder given directly),
  on ONNX Runtime; ``int8=True`` runs its int8 model.
- ``openvino``: the same export on OpenVINO.
- ``auto``: the export when there is one and it was made from the current weights, on whichever
  engine export measured faster here; else the bundle in PyTorch.

This package imports no PyTorch unless the torch backend is asked for, so the ONNX path works
where PyTorch is not installed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from imgclf.core.errors import BundleError, SettingsError
from imgclf.core.events import Events, channel, info, warn
from imgclf.core.rundir import RunDir
from imgclf.core.settings import PREDICT_BATCH_SIZE
from imgclf.data.images import DEFAULT_MAX_PIXELS
from imgclf.predictors.base import UNKNOWN, BasePredictor, FilePrediction
from imgclf.predictors.onnx import FP32_FILE, choose_backend, load_onnx, onnx_meta

BACKENDS = ("auto", "torch", "onnx", "openvino")

__all__ = ["BACKENDS", "UNKNOWN", "BasePredictor", "FilePrediction", "load", "export_folder", "weights_digest"]


def export_folder(path: str | os.PathLike) -> Path | None:
    """Where the ONNX export of ``path`` is: ``path/onnx``, or ``path`` itself when it is one."""
    for folder in (Path(path) / RunDir.ONNX, Path(path)):
        if (folder / FP32_FILE).exists():
            return folder
    return None


def weights_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a bundle's weights file: what an export records it was made from."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stale(path: Path, folder: Path) -> bool:
    """Whether the export in ``folder`` was made from other weights than the bundle at ``path`` has
    now, or does not say which (an export from before the hash was recorded, or copied in)."""
    weights = path / RunDir.WEIGHTS
    recorded = onnx_meta(folder)["onnx"].get("weights_sha256")
    return folder != path and weights.exists() and (not recorded or recorded != weights_digest(weights))


def _choose(path: Path, backend: str, int8: bool, events: Events) -> tuple[str, Path | None]:
    if backend not in BACKENDS:
        raise SettingsError(f"setting 'backend': '{backend}' is not one of {', '.join(BACKENDS)}")
    if int8 and backend == "torch":
        raise SettingsError(
            "setting 'int8': the int8 model runs on ONNX Runtime; use --backend onnx or auto, not torch"
        )
    folder = export_folder(path)
    if backend == "torch" or (backend == "auto" and folder is None and not int8):
        return "torch", None
    if folder is None:
        raise BundleError(f"{path}: no ONNX export here; run imgclf export {path}{' --int8' if int8 else ''} first")
    if _stale(path, folder):
        if backend == "auto" and not int8:
            warn(
                events,
                f"the ONNX export in {folder} was made from earlier weights (or does not say which); using "
                f"PyTorch (run imgclf export {path} again)",
                str(folder),
            )
            return "torch", None
        warn(events, f"the ONNX export in {folder} was made from earlier weights than {path} has now", str(folder))
    return ("onnx" if int8 else choose_backend(folder)) if backend == "auto" else backend, folder


def load(
    path: str | os.PathLike,
    backend: str = "auto",
    *,
    int8: bool = False,
    batch_size: int = PREDICT_BATCH_SIZE,
    device: str = "auto",
    precision: str = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    events: Events | None = None,
) -> BasePredictor:
    """A predictor for a run folder, model bundle or export folder on the chosen engine."""
    events, path = channel(events), Path(path)
    chosen, folder = _choose(path, backend, int8, events)
    if chosen == "torch":
        # imported here: PyTorch is an optional dependency of this package (the ONNX path has none)
        from imgclf.predictors.pytorch import load_torch

        clf = load_torch(path, device, precision, batch_size, max_pixels)
    else:
        clf = load_onnx(folder, int8=int8, batch_size=batch_size, backend=chosen, max_pixels=max_pixels)
    info(events, f"backend: {clf.backend}{' int8' if int8 else ''} ({folder or path})", str(folder or path))
    return clf
