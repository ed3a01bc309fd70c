"""Writing files that must never be seen half-written (checkpoints, bundles, caches), without
PyTorch so that torch-free modules can use it too."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)`` on a temporary file beside ``path``, make it durable (fsync), then
    rename it over ``path`` and fsync the folder. Readers see the old file or the new one; if
    ``write`` or the disk fails, the temporary file is removed and the old file stays whole."""
    path = Path(path)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False)
    handle.close()
    try:
        write(handle.name)
        with open(handle.name, "rb") as written:
            os.fsync(written.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    try:  # the rename itself must reach the disk too
        directory = os.open(path.parent, os.O_RDONLY)
        os.fsync(directory)
        os.close(directory)
    except OSError:
        pass
