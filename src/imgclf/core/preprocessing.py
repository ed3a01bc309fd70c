"""How a model wants its input (timm's ``PretrainedCfg`` in spirit): stored in the bundle and in
the ONNX export, never worked out again. Torch-free, so every predictor reads the same record."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    @property
    def resize_size(self) -> int:
        """Short side before the centre crop (timm's ``crop_pct`` convention)."""
        return int(math.floor(self.image_size / self.crop_pct))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        """Read and validate a stored record; raises ValueError naming the field at fault."""
        if not isinstance(data, dict):
            raise ValueError("preprocessing is not an object")
        missing = [k for k in ("image_size", "mean", "std", "interpolation", "crop_pct") if k not in data]
        if missing:
            raise ValueError(f"preprocessing lacks {', '.join(missing)}")
        try:
            prep = cls(
                int(data["image_size"]),
                tuple(float(v) for v in data["mean"]),
                tuple(float(v) for v in data["std"]),
                str(data["interpolation"]),
                float(data["crop_pct"]),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"preprocessing has a value of the wrong type ({exc})") from None
        if prep.image_size < 1 or len(prep.mean) != 3 or len(prep.std) != 3 or min(prep.std) <= 0:
            raise ValueError("preprocessing needs a positive image_size and 3 means and 3 positive stds")
        if prep.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"preprocessing interpolation '{prep.interpolation}' is not one of {', '.join(INTERPOLATIONS)}"
            )
        if not 0 < prep.crop_pct <= 1:
            raise ValueError(f"preprocessing crop_pct {prep.crop_pct} is not in (0, 1]")
        return prep
