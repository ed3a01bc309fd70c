"""Which resampling filter to resize photos with, side by side in one run on a run's ONNX export:
Pillow's time per photo for each filter (decoded photos, the centre region resized to the model
input, best of five passes; decoding timed the same way for scale), and the model's top-1 on the
validation and test splits with each filter at prediction, without retraining.

    .venv/bin/python bench/interpolation.py RUN_DIR      # needs RUN_DIR/onnx (imgclf export)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

FILTERS = ("bicubic", "bilinear", "hamming", "box")


def _best_ms_per_item(call, items: list, passes: int = 5) -> float:
    best = float("inf")
    for _ in range(passes):
        started = time.perf_counter()
        for item in items:
            call(item)
        best = min(best, time.perf_counter() - started)
    return best / len(items) * 1000


def main(run_dir: str) -> None:
    from imgclf.data.images import decode_image_bytes
    from imgclf.data.preprocess import eval_array
    from imgclf.data.split import read_split_csv
    from imgclf.runtime import OnnxClassifier

    run = Path(run_dir)
    clf = OnnxClassifier(run / "onnx", batch_size=32)
    split = read_split_csv(run / "split.csv")
    samples = {name: [s for s in split if s.split == name] for name in ("val", "test")}
    data = [Path(s.path).read_bytes() for s in samples["test"]]
    photos = [decode_image_bytes(d, "photo", draft_size=clf.resize_size) for d in data]
    print(
        f"{len(photos)} test photos, model input {clf.image_size} px from a {clf.resize_size} px short side; "
        f"trained with {clf.interpolation}"
    )
    decode = _best_ms_per_item(lambda d: decode_image_bytes(d, "photo", draft_size=clf.resize_size), data)
    print(f"decoding: {decode:.2f} ms per photo")
    print("| filter at prediction | resize ms per photo | validation top-1 | test top-1 |")
    print("|---|---:|---:|---:|")
    trained = clf.interpolation
    for name in FILTERS:
        resize = _best_ms_per_item(lambda im: eval_array(im, clf.image_size, clf.resize_size, name), photos)
        clf.interpolation = name
        accuracy = {
            split: float(np.mean(clf.predict([s.path for s in group]) == np.array([s.label for s in group])))
            for split, group in samples.items()
        }
        mark = " (as trained)" if name == trained else ""
        print(
            f"| {name}{mark} | {resize:.2f} | {accuracy['val']:.1%} ({len(samples['val'])}) "
            f"| {accuracy['test']:.1%} ({len(samples['test'])}) |",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1])
