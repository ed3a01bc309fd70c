"""Small CNNs trained from scratch, registered in timm's registry so every path that takes a
model name (``timm.create_model('cnn4')``) takes ours and timm's alike.

``cnn1``, ``cnn3`` and ``cnn4`` follow the three Keras CNNs of the Fashion-MNIST tutorial (1 conv;
3 conv; 4 conv with batch norm); ``alexnet_bn`` is an AlexNet-like 5-conv + 3-FC net with batch
norm. The Keras nets flatten a 28x28 feature map; ours pool it to a fixed grid first so the same
net works at any image size. Each follows timm's model interface (``forward_features``,
``forward_head(pre_logits=...)``, ``num_features``, ``get_classifier``, ``reset_classifier``),
which the embedding and transfer code rely on.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import register_model
from torch import nn

__all__ = ["SmallCNN", "cnn1", "cnn3", "cnn4", "alexnet_bn"]


def _conv(in_ch: int, out_ch: int, batch_norm: bool, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.ReLU(inplace=True))
    return layers


def _dense(in_features: int, out_features: int, batch_norm: bool, dropout: float) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Linear(in_features, out_features, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(out_features))
    layers += [nn.ReLU(inplace=True), nn.Dropout(dropout)]
    return layers


class SmallCNN(nn.Module):
    """Convolutional features, pooled to a fixed grid, flattened, then dense layers and a classifier."""

    def __init__(
        self,
        features: nn.Sequential,
        feature_channels: int,
        grid: int,
        dense: list[int],
        batch_norm: bool,
        dense_dropout: float,
        num_classes: int,
        drop_rate: float,
    ):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(grid)
        layers: list[nn.Module] = [nn.Flatten()]
        width = feature_channels * grid * grid
        for units in dense:
            layers += _dense(width, units, batch_norm, dense_dropout)
            width = units
        self.pre_logits = nn.Sequential(*layers)
        self.num_features = self.head_hidden_size = width  # timm: width of pre-logits features
        self.drop_rate = drop_rate
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(self.pool(x))
        return x if pre_logits else self.fc(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def _scratch_only(pretrained: bool, name: str) -> None:
    if pretrained:
        raise ValueError(f"{name} is trained from scratch: no pretrained weights exist for it")


# timm's create_model passes pretrained_cfg, pretrained_cfg_overlay and cache_dir to every entry
# point; our nets have no pretrained weights, so these are accepted and not used.
@register_model
def cnn1(
    pretrained: bool = False,
    num_classes: int = 10,
    in_chans: int = 3,
    drop_rate: float = 0.0,
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: Any = None,
    cache_dir: Any = None,
) -> SmallCNN:
    """Keras tutorial CNN 1: Conv(32) -> MaxPool -> Dropout(0.2) -> Dense(128) -> classes."""
    _scratch_only(pretrained, "cnn1")
    features = nn.Sequential(*_conv(in_chans, 32, False), nn.MaxPool2d(2), nn.Dropout(0.2))
    return SmallCNN(features, 32, 6, [128], False, 0.0, num_classes, drop_rate)


@register_model
def cnn3(
    pretrained: bool = False,
    num_classes: int = 10,
    in_chans: int = 3,
    drop_rate: float = 0.0,
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: Any = None,
    cache_dir: Any = None,
) -> SmallCNN:
    """Keras tutorial CNN 3: Conv(32)-Pool-Conv(64)-Pool-Conv(128) with dropout, Dense(128)."""
    _scratch_only(pretrained, "cnn3")
    features = nn.Sequential(
        *_conv(in_chans, 32, False),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
        *_conv(32, 64, False),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
        *_conv(64, 128, False),
        nn.Dropout(0.4),
    )
    return SmallCNN(features, 128, 4, [128], False, 0.3, num_classes, drop_rate)


@register_model
def cnn4(
    pretrained: bool = False,
    num_classes: int = 10,
    in_chans: int = 3,
    drop_rate: float = 0.0,
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: Any = None,
    cache_dir: Any = None,
) -> SmallCNN:
    """Keras tutorial CNN 4: four convs with batch norm (32, 32, 64, 128), Dense(512, 128) with BN."""
    _scratch_only(pretrained, "cnn4")
    features = nn.Sequential(
        *_conv(in_chans, 32, True),
        *_conv(32, 32, True),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
        *_conv(32, 64, True),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
        *_conv(64, 128, True),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
    )
    return SmallCNN(features, 128, 4, [512, 128], True, 0.5, num_classes, drop_rate)


@register_model
def alexnet_bn(
    pretrained: bool = False,
    num_classes: int = 10,
    in_chans: int = 3,
    drop_rate: float = 0.0,
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: Any = None,
    cache_dir: Any = None,
) -> SmallCNN:
    """AlexNet-like: five convs (64, 192, 384, 256, 256) with batch norm, then FC 1024-1024-classes.

    The 11x11 stride-4 stem of the original is a 5x5 stride-2 one here, to suit small photos.
    """
    _scratch_only(pretrained, "alexnet_bn")
    features = nn.Sequential(
        *_conv(in_chans, 64, True, kernel=5, stride=2),
        nn.MaxPool2d(3, 2, 1),
        *_conv(64, 192, True, kernel=5),
        nn.MaxPool2d(3, 2, 1),
        *_conv(192, 384, True),
        *_conv(384, 256, True),
        *_conv(256, 256, True),
        nn.MaxPool2d(3, 2, 1),
    )
    return SmallCNN(features, 256, 3, [1024, 1024], True, 0.5, num_classes, drop_rate)


SMALL_CNNS = ("cnn1", "cnn3", "cnn4", "alexnet_bn")
