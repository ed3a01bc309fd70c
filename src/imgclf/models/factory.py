"""Create any model by name through ``timm.create_model``, ours included, and say how it wants its
input (size, mean/std, interpolation, crop), as timm's pretrained config does."""

from __future__ import annotations

import difflib

import timm
from torch import nn

from imgclf.core.errors import ModelError, WeightsError
from imgclf.core.preprocessing import Preprocessing
from imgclf.models.pretrained import lite_weights_file, load_pretrained
from imgclf.models.small_cnns import SMALL_CNNS  # importing it registers cnn1, cnn3, cnn4, alexnet_bn in timm


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, list(SMALL_CNNS) + timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(
            f"unknown model '{name}'{hint} (ours: {', '.join(SMALL_CNNS)}; or any name from timm.list_models())"
        )


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    drop_rate: float = 0.0,
    weights: str = "",
    download: bool = False,
) -> nn.Module:
    """A freshly initialised network with ``num_classes`` outputs, or one with pretrained weights
    (see :mod:`imgclf.models.pretrained`: offline first, the network only when allowed)."""
    check_model_name(name)
    if pretrained and is_scratch_model(name):
        raise ModelError(f"{name} is trained from scratch: no pretrained weights exist for it")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
        if pretrained and load_pretrained(model, name, weights, download) == "hub":
            model = timm.create_model(name, pretrained=True, num_classes=num_classes, drop_rate=drop_rate)
        return model
    except WeightsError as exc:
        raise ModelError(str(exc)) from None
    except (RuntimeError, OSError, ValueError) as exc:
        if pretrained:
            raise ModelError(f"cannot get pretrained weights for '{name}': {exc}") from None
        raise ModelError(f"cannot create model '{name}': {exc}") from None


def is_scratch_model(name: str) -> bool:
    return name in SMALL_CNNS


def preprocessing_for(
    model: nn.Module,
    name: str,
    image_size: int,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    interpolation: str = "auto",
) -> Preprocessing:
    """The input a model expects. Scratch models use the training split's mean/std (given here);
    timm models use their pretrained config (normalisation, crop) at ``image_size``.
    ``interpolation``: the resampling filter, or "auto" for the pretrained config's (bilinear for
    our CNNs). Fine-tuning adapts to either; see the ``interpolation`` setting for the default."""
    if is_scratch_model(name):
        if mean is None or std is None:
            raise ModelError(f"{name} is trained from scratch: its mean and std come from the training split")
        return Preprocessing(image_size, tuple(mean), tuple(std), _filter(interpolation, "bilinear"), 1.0)
    config = timm.data.resolve_data_config({}, model=model)
    return Preprocessing(
        image_size,
        tuple(config["mean"]),
        tuple(config["std"]),
        _filter(interpolation, config.get("interpolation", "bicubic")),
        float(config.get("crop_pct", 0.875)),
    )


def _filter(setting: str, own: str) -> str:
    return own if setting == "auto" else setting


def resolve_pretrained(setting: str, name: str, weights: str = "", download: bool = False) -> bool:
    """``auto``: pretrained whenever weights are at hand (built in, a local file, or download allowed)."""
    if setting != "auto":
        return setting == "on"
    return not is_scratch_model(name) and bool(weights or lite_weights_file(name) or download)


def resolve_image_size(setting: int, name: str, model: nn.Module) -> int:
    """0 means the model's own input size (its pretrained config), or 64 px for our small CNNs."""
    if setting:
        return setting
    if is_scratch_model(name):
        return 64
    return int(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1])


def freeze_early_layers(model: nn.Module, max_reduction: int) -> int:
    """Freeze every parameter up to and including the deepest stage whose output stride is at most
    ``max_reduction`` (timm's ``feature_info``). Early stages hold few weights but, at full
    resolution, most of the compute: freezing them makes fine-tuning much cheaper on a CPU, and
    their generic edge/texture filters need no retraining. Returns the number of frozen tensors."""
    info = getattr(model, "feature_info", None)
    if not max_reduction or not info:
        return 0
    info = info.info if hasattr(info, "info") else info
    stages = [entry["module"] for entry in info if entry["reduction"] <= max_reduction]
    if not stages:
        return 0
    last = stages[-1] + "."
    names = [name for name, _ in model.named_parameters()]
    ends = [i for i, name in enumerate(names) if name.startswith(last)]
    if not ends:
        return 0
    frozen = 0
    for _name, param in list(model.named_parameters())[: ends[-1] + 1]:
        param.requires_grad_(False)
        frozen += 1
    return frozen
