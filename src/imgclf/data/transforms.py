"""Preprocessing that travels with a model, and the training augmentations (torchvision v2).

Images become uint8 CHW tensors once (resize + crop); normalisation to float happens per batch,
so cached images stay small and the same photo gives the same tensor in every path.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from imgclf.core.errors import SettingsError
from imgclf.core.preprocessing import Preprocessing
from imgclf.data.preprocess import eval_array, resize_short_side, to_chw

AUGMENT_PRESETS = ("none", "light", "strong")


def interpolation_mode(prep: Preprocessing) -> InterpolationMode:
    return InterpolationMode(prep.interpolation)


def eval_tensor(image: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """The deterministic model input of one photo: short side resize, centre crop, uint8 CHW.
    Pillow does the resizing (see :mod:`imgclf.data.preprocess`) so the ONNX predictor, which has
    no PyTorch, computes exactly the same input."""
    return torch.from_numpy(eval_array(image, prep.image_size, prep.resize_size, prep.interpolation))


def train_cache_tensor(image: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """What the training cache keeps: short side at the resize size, whole picture, uint8."""
    return torch.from_numpy(to_chw(resize_short_side(image, prep.resize_size, prep.interpolation)))


def train_augmentation(preset: str, prep: Preprocessing) -> v2.Transform:
    """uint8 CHW (short side ``resize_size``) -> uint8 CHW ``image_size`` square, randomly varied."""
    size = [prep.image_size, prep.image_size]
    if preset == "none":
        return v2.Compose([v2.Resize(prep.resize_size, interpolation_mode(prep), antialias=True), v2.CenterCrop(size)])
    crop = v2.RandomResizedCrop(
        size,
        scale=(0.35, 1.0) if preset == "strong" else (0.6, 1.0),
        interpolation=interpolation_mode(prep),
        antialias=True,
    )
    steps: list[v2.Transform] = [crop, v2.RandomHorizontalFlip()]
    if preset == "strong":
        steps += [
            v2.RandomAffine(
                degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=10, interpolation=InterpolationMode.BILINEAR
            ),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05),
        ]
    elif preset == "light":
        steps.append(v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15))
    elif preset != "none":
        raise SettingsError(f"unknown augmentation preset '{preset}' (use {', '.join(AUGMENT_PRESETS)})")
    return v2.Compose(steps)


def normalize_batch(batch: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 NCHW -> float NCHW scaled to [0, 1] then standardised with the model's mean/std."""
    mean = torch.tensor(prep.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, device=batch.device).view(1, 3, 1, 1)
    return (batch.float() / 255.0 - mean) / std


def measure_mean_std(tensors: list[torch.Tensor], limit: int = 2000) -> tuple[tuple, tuple]:
    """Per-channel mean and std of uint8 CHW tensors (for models trained from scratch)."""
    step = max(1, len(tensors) // limit)
    sums = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    for tensor in tensors[::step]:
        pixels = tensor.reshape(3, -1).double() / 255.0
        sums += pixels.sum(1)
        squares += (pixels * pixels).sum(1)
        count += pixels.shape[1]
    mean = sums / count
    std = (squares / count - mean * mean).clamp_min(1e-6).sqrt()
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)
