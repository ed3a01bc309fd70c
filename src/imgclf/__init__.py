"""imgclf: turn folders of photos into an honest, usable image classifier.

The public API (the CLI and the service are thin faces over these same functions, in
:mod:`imgclf.api`)::

    import imgclf
    report = imgclf.check("photos/")                     # audit a data set
    result = imgclf.train("photos/", "runs/a", {"epochs": 10}, events=print)
    clf = imgclf.load("runs/a")                          # predict / predict_proba / classes_
    clf.predict(["x.jpg"], k=5)
    imgclf.evaluate("runs/a")                            # metrics.json, report.md, report.html
"""

from __future__ import annotations

from imgclf.core import __version__

__all__ = [
    "check",
    "train",
    "evaluate",
    "load",
    "export",
    "compare",
    "embed",
    "similar",
    "Settings",
    "StopToken",
    "ImgclfError",
    "__version__",
]

from imgclf.core.errors import ImgclfError
from imgclf.core.events import StopToken
from imgclf.core.settings import Settings


def __getattr__(name: str):
    # Lazy: `import imgclf` stays cheap (no torch import) until a verb is used.
    if name in __all__:
        from imgclf import api

        return getattr(api, name)
    raise AttributeError(f"module 'imgclf' has no attribute {name!r}")
