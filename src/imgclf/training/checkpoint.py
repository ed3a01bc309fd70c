"""Training checkpoints without pickle: one safetensors file whose header metadata holds the
non-tensor state as JSON. Written atomically (temp file, fsync, rename): a run killed while
saving leaves the previous checkpoint whole.

Any nested state (model, optimizer, scheduler, RNG states, counters) is split into a flat map
of tensors and a JSON tree in which each tensor is replaced by ``{"__tensor__": key}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from imgclf.core.atomic import atomic_write
from imgclf.core.errors import CheckpointError

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"


def _flatten(value: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(value, dict):
        return {"__dict__": [[_flatten(k, tensors, prefix), _flatten(v, tensors, prefix)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {_TUPLE: [_flatten(v, tensors, prefix) for v in value]}
    if isinstance(value, list):
        return [_flatten(v, tensors, prefix) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"cannot store a {type(value).__name__} in a checkpoint")


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if _TENSOR in value:
            return tensors[value[_TENSOR]]
        if _TUPLE in value:
            return tuple(_unflatten(v, tensors) for v in value[_TUPLE])
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` atomically. On failure (disk full...) the previous file stays intact."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, tensors, "")
    try:
        atomic_write(path, lambda temp: save_file(tensors, temp, metadata={"imgclf_state": json.dumps(tree)}))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc}") from None


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; never unpickles anything."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return _unflatten(json.loads(metadata["imgclf_state"]), tensors)
    except (OSError, SafetensorError, KeyError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
