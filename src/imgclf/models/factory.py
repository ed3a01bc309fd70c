"""Create any model by name through ``timm.create_model``, ours included, and say how it wants its
input (size, mean/std, interpolation, crop), as timm's pretrained config does."""
from __future__ import annotations

import difflib

import timm
from torch import nn

from imgclf.data.transforms import Preprocessing
from imgclf.models import small_cnns  # noqa: F401  (registers cnn1, cnn3, cnn4, alexnet_bn in timm)
from imgclf.models.small_cnns import SMALL_CNNS


class ModelError(ValueError):
    """A model name or weights that cannot be used, with the reason."""


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, list(SMALL_CNNS) + timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"unknown model '{name}'{hint} (ours: {', '.join(SMALL_CNNS)}; "
                         f"or any name from timm.list_models())")


def create_model(name: str, num_classes: int, *, pretrained: bool = False, drop_rate: float = 0.0,
                 weights: str = "", download: bool = False) -> nn.Module:
    """A freshly initialised network with ``num_classes`` outputs, or one with pretrained weights
    (see :mod:`imgclf.models.pretrained`: offline first, the network only when allowed)."""
    from imgclf.models.pretrained import WeightsError, load_pretrained

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


def preprocessing_for(model: nn.Module, name: str, image_size: int,
                      mean: tuple[float, float, float] | None = None,
                      std: tuple[float, float, float] | None = None) -> Preprocessing:
    """The input a model expects. Scratch models use the training split's mean/std (given here);
    timm models use their pretrained config (normalisation, interpolation, crop) at ``image_size``."""
    if is_scratch_model(name):
        if mean is None or std is None:
            raise ValueError("scratch models need the training split's mean and std")
        return Preprocessing(image_size, tuple(mean), tuple(std), "bilinear", 1.0)
    config = timm.data.resolve_data_config({}, model=model)
    return Preprocessing(image_size, tuple(config["mean"]), tuple(config["std"]),
                         config.get("interpolation", "bicubic"), float(config.get("crop_pct", 0.875)))
