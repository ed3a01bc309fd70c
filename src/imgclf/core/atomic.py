"""Writing files that must never be seen half-written (checkpoints, bundles, caches), without
PyTorch so that torch-free modules can use it too."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from imgclf.core.errors import OutputError


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
    except BaseException as exc:
        Path(handle.name).unlink(missing_ok=True)
        code = None if isinstance(exc, OutputError) else _os_error_code(exc)
        if code is None:
            raise
        full = code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        todo = "free some disk space and run again (a training continues with --resume)" if full else "check the folder"
        reason = os.strerror(code)
        raise OutputError(f"{path}: cannot write it ({reason}); the file there before is whole; {todo}") from exc
    try:  # the rename itself must reach the disk too
        directory = os.open(path.parent, os.O_RDONLY)
        os.fsync(directory)
        os.close(directory)
    except OSError:
        pass


def _os_error_code(exc: BaseException) -> int | None:
    """The errno of a failed write: an OSError's own, or the one a Rust library (safetensors)
    puts in its message as "(os error N)"."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    found = re.search(r"\(os error (\d+)\)", str(exc))
    return int(found.group(1)) if found else None
