"""One error base class for everything a user can cause and fix.

Every message names the file or setting at fault and what to do. The CLI catches
:class:`ImgclfError` alone and prints one line (exit status 2); the service maps the same class to
a 4xx response with its ``code``. Anything else that escapes is a bug and keeps its traceback.
The subclasses keep the built-in base they had (``ValueError``, ``RuntimeError``) so code that
caught those still works.
"""

from __future__ import annotations

import contextlib


class ImgclfError(Exception):
    """A problem with the user's input, files, settings or machine, with what to do about it."""

    code = "imgclf_error"


class SettingsError(ImgclfError, ValueError):
    """A setting name or value that imgclf does not accept."""

    code = "invalid_setting"


class DataError(ImgclfError, ValueError):
    """A data source that cannot be used as given, with the reason."""

    code = "invalid_data"


class ImageError(ImgclfError):
    """An image that cannot be used, with the file and the reason."""

    code = "invalid_image"

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class ModelError(ImgclfError, ValueError):
    """A model name or weights that cannot be used, with the reason."""

    code = "invalid_model"


class WeightsError(ModelError):
    """Pretrained weights that are not available or do not fit, with what to do about it."""

    code = "weights_unavailable"


class BundleError(ImgclfError, ValueError):
    """A model folder that cannot be loaded, with the file and the reason."""

    code = "invalid_bundle"


class CheckpointError(ImgclfError, RuntimeError):
    """A checkpoint that cannot be written or read, with the file and reason."""

    code = "checkpoint_error"


class TrainError(ImgclfError, RuntimeError):
    """Training cannot start or go on, with the reason and what to do."""

    code = "train_error"


class ExportError(ImgclfError, RuntimeError):
    """An export that failed its check against PyTorch: it is not written as done."""

    code = "export_failed"


class BackendError(ImgclfError, RuntimeError):
    """The asked-for engine cannot run here (not installed, or the export lacks the file)."""

    code = "backend_unavailable"


class NoThresholdError(ImgclfError, ValueError):
    """``min_confidence="auto"`` with a model that has no recommended threshold."""

    code = "no_threshold"


class OutputError(ImgclfError, OSError):
    """A folder or file imgclf must write cannot be made there (a file in the way, no permission,
    a full disk), with the path and what to do."""

    code = "output_error"


class MemoryLimitError(ImgclfError, MemoryError):
    """A batch of images did not fit in memory (the GPU's or the CPU's) outside a training:
    evaluate, predict, embed, on PyTorch, ONNX Runtime or OpenVINO; says which batch size to try."""

    code = "out_of_memory"


class Stopped(Exception):
    """A stop token was set: the step in progress ended cleanly. Not an error (exit status 3);
    what was done is kept and a run continues with ``--resume``."""

    def __init__(self, reason: str = "stop requested"):
        super().__init__(reason)
        self.reason = reason


def out_of_memory(exc: BaseException) -> bool:
    """A failed allocation, on a GPU (torch.OutOfMemoryError, known here by name: core imports no
    torch) or in the CPU's memory (PyTorch's allocator raises a plain RuntimeError; Python a
    MemoryError), in training, evaluation or prediction alike."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()  # PyTorch's CPU allocator, CUDA, ONNX Runtime's arena, OpenVINO
    return any(
        words in text for words in ("can't allocate memory", "not enough memory", "out of memory", "failed to allocate")
    )


def last_line(exc: BaseException) -> str:
    """The line that says what failed (PyTorch's allocator puts it last)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]


@contextlib.contextmanager
def batch_memory(batch_size: int, what: str = "running the model"):
    """Turn a failed allocation inside the block into a :class:`MemoryLimitError` that says what
    to change; any other error passes through."""
    try:
        yield
    except Exception as exc:  # ONNX Runtime's errors derive from Exception alone
        if isinstance(exc, ImgclfError) or not out_of_memory(exc):
            raise
        raise MemoryLimitError(
            f"out of memory {what} on a batch of {batch_size} images ({last_line(exc)}); "
            f"try --predict-batch-size {max(1, batch_size // 2)} (predict_batch_size in Python), "
            "a smaller model, or close other programs"
        ) from None
