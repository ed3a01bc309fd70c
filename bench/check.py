"""Audit speed: the first check of a data set (every image decoded) against a second check of the
unchanged folder (cache hits), side by side in one run with a fresh cache folder.

    .venv/bin/python bench/check.py ../shared/datasets/clothing-small
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time


def main(data: str) -> None:
    os.environ["IMGCLF_CACHE_DIR"] = tempfile.mkdtemp(prefix="imgclf-bench-cache-")
    import imgclf

    times = []
    for _ in range(2):
        started = time.perf_counter()
        report = imgclf.check(data)
        times.append(time.perf_counter() - started)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"data: {data}: {report.n_files} files, {len(report.usable)} usable, {len(report.classes)} classes")
    print(f"first check (decode all): {times[0]:.2f} s ({report.n_files / times[0]:.0f} img/s)")
    print(f"second check (cached):    {times[1]:.2f} s")
    print(f"speed-up: {times[0] / times[1]:.1f}x")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets/clothing-small")
