"""The embedded default job: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans)
written out as a folder-per-class PNG data set, then check -> train -> evaluate -> predict."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

DEMO_OVERRIDES = {"model": "cnn3", "image_size": 32, "epochs": 12, "batch_size": 32, "lr": 3e-3,
                  "augment": "none", "patience": 0}


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


def run_demo(data_dir: str | Path = "demo_data/digits", out: str | Path = "runs/digits") -> dict:
    import imgclf

    data = write_digits(data_dir)
    print(f"wrote the scikit-learn digits to {data}", file=sys.stderr)
    report = imgclf.check(data)
    print(f"check: {len(report.usable)} usable images, {len(report.problems)} problems", file=sys.stderr)
    out = Path(out)
    resume = (out / "checkpoint.safetensors").exists() and not (out / "metrics.json").exists()
    if (out / "metrics.json").exists():
        import shutil

        shutil.rmtree(out)  # a finished demo run is redone from scratch
    result = imgclf.train(None if resume else str(data), out, None if resume else DEMO_OVERRIDES, resume=resume)
    clf = imgclf.load(out)
    examples = sorted(Path(data).glob("*/000*.png"))[:5]
    for path, label in zip(examples, clf.predict([str(p) for p in examples])):
        print(f"  {path}: predicted {label} (true {path.parent.name})")
    metrics = result.metrics or {}
    print(f"\ntest top-1 {metrics.get('top1', float('nan')):.3f} on {metrics.get('n', 0)} images; "
          f"report: {out / 'report.md'}")
    return metrics
