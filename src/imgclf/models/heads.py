"""The classifier end of a network: finding it, replacing it with a linear or MLP head, rebuilding
a recorded head before weights load, and the pooled features just before it."""

from __future__ import annotations

import torch
from torch import nn

from imgclf.models.small_cnns import SmallCNN


def make_head(in_features: int, num_classes: int, hidden: int = 0, dropout: float = 0.2) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(in_features, num_classes)
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
    )


def classifier_name(model: nn.Module) -> str:
    """Dotted name of the final classifier layer (timm records it in the pretrained config)."""
    if isinstance(model, SmallCNN):
        return "fc"
    return getattr(model, "pretrained_cfg", {}).get("classifier", "fc")


def set_classifier(model: nn.Module, head: nn.Module) -> None:
    """Replace the final classifier layer with ``head`` (a Linear or a small MLP)."""
    parent_name, _, leaf = classifier_name(model).rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, head)


def head_info(model: nn.Module, hidden: int) -> dict:
    """Shape of the classifier head, so a bundle can rebuild an MLP head before loading weights."""
    return {"hidden": hidden, "in_features": int(getattr(model, "head_hidden_size", None) or model.num_features)}


def install_saved_head(model: nn.Module, meta: dict) -> None:
    """Rebuild an MLP head recorded in a bundle (or run.json) before its weights are loaded."""
    hidden = int((meta.get("head") or {}).get("hidden", 0))
    if hidden:
        in_features = int(meta["head"]["in_features"])
        set_classifier(model, make_head(in_features, len(meta["classes"]), hidden))


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The penultimate-layer vector timm models expose (``forward_head(pre_logits=True)``)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)
