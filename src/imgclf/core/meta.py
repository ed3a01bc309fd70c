"""``model.json``: what a model folder says about itself (architecture, classes in order,
hierarchy, preprocessing, calibration, settings), read and validated in one place for the
PyTorch bundle and the ONNX export alike. Torch-free."""

from __future__ import annotations

import json
from pathlib import Path

from imgclf.core.atomic import atomic_write
from imgclf.core.errors import BundleError
from imgclf.core.preprocessing import Preprocessing

FORMAT = "imgclf-bundle"
FORMAT_VERSION = 1
META = "model.json"
REQUIRED = ("format", "format_version", "architecture", "classes", "preprocessing")
LEVEL_SEP = " > "


def read_meta(folder: str | Path) -> dict:
    """The validated ``model.json`` of a bundle or export folder; a clear BundleError otherwise."""
    path = Path(folder) / META
    if not path.exists():
        raise BundleError(f"{folder}: no {META} here (is this a run folder or model bundle?)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}); export or train the model again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{path}: not an imgclf model description")
    missing = [key for key in REQUIRED if key not in meta]
    if missing:
        raise BundleError(f"{path}: missing field(s) {', '.join(missing)}")
    if not isinstance(meta["format_version"], int) or meta["format_version"] > FORMAT_VERSION:
        raise BundleError(
            f"{path}: made by a newer imgclf (bundle format {meta['format_version']}, "
            f"this one reads up to {FORMAT_VERSION}); upgrade imgclf"
        )
    classes = meta["classes"]
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or not all(isinstance(c, str) for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise BundleError(f"{path}: 'classes' must list at least 2 distinct class names")
    try:
        Preprocessing.from_dict(meta["preprocessing"])
    except ValueError as exc:
        raise BundleError(f"{path}: {exc}") from None
    if "temperature" in meta:
        try:
            meta["temperature"] = float(meta["temperature"])
        except (TypeError, ValueError):
            raise BundleError(f"{path}: 'temperature' is not a number") from None
        if not 0 < meta["temperature"] < float("inf"):  # NaN is refused too
            raise BundleError(f"{path}: 'temperature' must be a positive number, not {meta['temperature']}")
    chosen = meta.get("threshold")
    if chosen is not None:
        value = chosen.get("threshold") if isinstance(chosen, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise BundleError(f"{path}: 'threshold.threshold' must be a probability in [0, 1], not {value!r}")
    return meta


def preprocessing(meta: dict) -> Preprocessing:
    return Preprocessing.from_dict(meta["preprocessing"])


def separator(meta: dict) -> str:
    """The hierarchy separator the labels were built with (" > " unless the bundle says otherwise)."""
    return (meta.get("hierarchy") or {}).get("separator", LEVEL_SEP)


def write_meta(folder: str | Path, meta: dict) -> None:
    text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
    atomic_write(Path(folder) / META, lambda temp: Path(temp).write_text(text, encoding="utf-8"))


def update_meta(folder: str | Path, fields: dict) -> dict:
    """Add or replace fields of a model.json (atomically); the weights are untouched."""
    meta = read_meta(folder)
    meta.update(fields)
    write_meta(folder, meta)
    return meta
