"""A trained model as a folder: ``model.safetensors`` (weights) + ``model.json`` (everything else:
architecture, classes in order, hierarchy, preprocessing, settings, metrics, library versions).

Loading never unpickles: weights are read only through safetensors, whose header is validated
before any tensor is touched; anything else in the folder is refused, not tried.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from imgclf.atomic import atomic_write

from imgclf.data.transforms import Preprocessing

FORMAT = "imgclf-bundle"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "model.json"
REQUIRED = ("format", "format_version", "architecture", "classes", "preprocessing")
_PICKLE_NAMES = ("model.pt", "model.pth", "model.bin", "model.ckpt", "model.pkl", "pytorch_model.bin")
MAX_HEADER_BYTES = 100 * 1024 * 1024


class BundleError(ValueError):
    """A model folder that cannot be loaded, with the file and the reason."""


@dataclass
class Bundle:
    model: nn.Module
    meta: dict

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.meta["preprocessing"])


def library_versions() -> dict:
    import timm
    import torchvision

    from imgclf import __version__

    return {"imgclf": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__}


def save_bundle(folder: str | Path, model: nn.Module, meta: dict) -> None:
    """Write weights then metadata, each atomically, into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta,
            "num_classes": len(meta["classes"]), "versions": library_versions(),
            "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    atomic_write(folder / WEIGHTS, lambda p: save_file(state, p, metadata={"format": "pt"}))
    text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
    atomic_write(folder / META, lambda p: Path(p).write_text(text, encoding="utf-8"))


def update_meta(folder: str | Path, fields: dict) -> dict:
    """Add or replace fields of a bundle's model.json (atomically); the weights are untouched."""
    meta = read_meta(folder)
    meta.update(fields)
    text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
    atomic_write(Path(folder) / META, lambda p: Path(p).write_text(text, encoding="utf-8"))
    return meta


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / META
    if not path.exists():
        raise BundleError(f"{folder}: no {META} here (is this a run folder or model bundle?)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{path}: not an imgclf model description")
    missing = [key for key in REQUIRED if key not in meta]
    if missing:
        raise BundleError(f"{path}: missing field(s) {', '.join(missing)}")
    if not isinstance(meta["format_version"], int) or meta["format_version"] > FORMAT_VERSION:
        raise BundleError(f"{path}: made by a newer imgclf (bundle format {meta['format_version']}, "
                          f"this one reads up to {FORMAT_VERSION}); upgrade imgclf")
    return meta


def _check_safetensors_header(path: Path) -> None:
    """Refuse files that are not safetensors before handing them to any reader."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        raise BundleError(f"{path}: too short to be a safetensors file")
    header_len = int.from_bytes(head[:8], "little")
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size or head[8:9] != b"{":
        raise BundleError(f"{path}: not a safetensors file (imgclf reads weights only as safetensors and "
                          f"never unpickles; a pickle or zip file here is refused)")


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    path = folder / WEIGHTS
    if not path.exists():
        pickles = [name for name in _PICKLE_NAMES if (folder / name).exists()]
        hint = f" ({', '.join(pickles)} is a pickle format and is not loaded)" if pickles else ""
        raise BundleError(f"{folder}: no {WEIGHTS}{hint}")
    if path.is_symlink() and not os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep):
        raise BundleError(f"{path}: a link pointing outside the model folder is not followed")
    _check_safetensors_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{path}: damaged safetensors file ({exc})") from None


def load_bundle(folder: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Rebuild the model from a bundle folder (a run folder is one) and load its weights strictly."""
    from imgclf.models.factory import ModelError, create_model

    meta = read_meta(folder)
    state = load_weights(folder)
    try:
        model = create_model(meta["architecture"], len(meta["classes"]),
                             drop_rate=float(meta.get("settings", {}).get("model", {}).get("drop_rate", 0.0)))
        from imgclf.training.transfer import install_saved_head

        install_saved_head(model, meta)
        model.load_state_dict(state, strict=True)
    except (ModelError, RuntimeError) as exc:
        raise BundleError(f"{folder}: weights do not fit {meta['architecture']} ({exc})") from None
    if "temperature" in meta:
        meta["temperature"] = float(meta["temperature"])
    return Bundle(model.to(device).eval(), meta)
