"""A trained model as a folder: ``model.safetensors`` (weights) + ``model.json`` (everything else:
architecture, classes in order, hierarchy, preprocessing, settings, metrics, library versions).

Loading never unpickles: weights are read only through safetensors, whose header is validated
before any tensor is touched; anything else in the folder is refused, not tried.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from imgclf.core import __version__
from imgclf.core.atomic import atomic_write
from imgclf.core.errors import BundleError, ModelError
from imgclf.core.meta import FORMAT, FORMAT_VERSION, read_meta, write_meta
from imgclf.core.preprocessing import Preprocessing
from imgclf.core.rundir import RunDir
from imgclf.models.factory import create_model
from imgclf.models.heads import install_saved_head

WEIGHTS = RunDir.WEIGHTS
_PICKLE_NAMES = ("model.pt", "model.pth", "model.bin", "model.ckpt", "model.pkl", "pytorch_model.bin")
MAX_HEADER_BYTES = 100 * 1024 * 1024


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
    return {
        "imgclf": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
    }


def save_bundle(folder: str | Path, model: nn.Module, meta: dict) -> None:
    """Write weights then metadata, each atomically, into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **meta,
        "num_classes": len(meta["classes"]),
        "versions": library_versions(),
        "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write(folder / WEIGHTS, lambda p: save_file(state, p, metadata={"format": "pt"}))
    write_meta(folder, meta)


def _check_safetensors_header(path: Path) -> None:
    """Refuse files that are not safetensors before handing them to any reader."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        raise BundleError(f"{path}: too short to be a safetensors file")
    header_len = int.from_bytes(head[:8], "little")
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size or head[8:9] != b"{":
        raise BundleError(
            f"{path}: not a safetensors file (imgclf reads weights only as safetensors and "
            f"never unpickles; a pickle or zip file here is refused)"
        )


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


def _check_class_count(folder, model: torch.nn.Module, state: dict, classes: int) -> None:
    """Name the usual cause of a size mismatch: a model.json from another model (its class list)."""
    for name, param in model.state_dict().items():
        saved = state.get(name)
        if saved is not None and saved.shape != param.shape and param.shape[:1] == (classes,) and saved.ndim:
            raise BundleError(
                f"{folder}: the weights give {saved.shape[0]} scores but model.json lists {classes} classes; "
                "the weights and model.json do not belong together"
            )


def load_bundle(folder: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Rebuild the model from a bundle folder (a run folder is one) and load its weights strictly."""
    meta = read_meta(folder)
    state = load_weights(folder)
    try:
        model = create_model(
            meta["architecture"],
            len(meta["classes"]),
            drop_rate=float(meta.get("settings", {}).get("model", {}).get("drop_rate", 0.0)),
        )
        install_saved_head(model, meta)
        _check_class_count(folder, model, state, len(meta["classes"]))
        model.load_state_dict(state, strict=True)
    except (ModelError, RuntimeError) as exc:
        raise BundleError(f"{folder}: weights do not fit {meta['architecture']} ({exc})") from None
    return Bundle(model.to(device).eval(), meta)
