"""The embedded default data set: scikit-learn's bundled handwritten digits (1,797 real 8x8
scans), written out as a folder-per-class PNG data set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(folder: str | Path, scale: int = 4) -> Path:
    """Each 8x8 digit (values 0..16) as an 8-bit PNG, enlarged ``scale`` times with nearest
    neighbour so no pixel value is invented; ``folder/<digit>/<index>.png``."""
    from sklearn.datasets import load_digits

    folder = Path(folder)
    digits = load_digits()
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        class_dir = folder / str(target)
        class_dir.mkdir(parents=True, exist_ok=True)
        path = class_dir / f"{index:04d}.png"
        if not path.exists():
            array = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)
            Image.fromarray(array, "L").resize((8 * scale, 8 * scale), Image.NEAREST).save(path)
    return folder
