"""imgclf: turn folders of photos into an honest, usable image classifier.

The public API (the CLI and the service are thin faces over these same functions)::

    import imgclf
    report = imgclf.check("photos/")             # audit a data set
    result = imgclf.train("photos/", out="runs/a", overrides={"epochs": 10})
    clf = imgclf.load("runs/a")                   # predict / predict_proba / classes_
    clf.predict(["x.jpg"], k=5)
    imgclf.evaluate("runs/a")                     # metrics.json, report.md
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["check", "train", "evaluate", "load", "Classifier", "__version__"]


def __getattr__(name: str):
    # Lazy: `import imgclf` stays cheap (no torch import) until a function is used.
    if name == "check":
        from imgclf.api import check

        return check
    if name == "train":
        from imgclf.training.fit import train

        return train
    if name == "evaluate":
        from imgclf.evaluation.run import evaluate

        return evaluate
    if name in ("load", "Classifier"):
        from imgclf import predict

        return getattr(predict, name)
    raise AttributeError(f"module 'imgclf' has no attribute {name!r}")
