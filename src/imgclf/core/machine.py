"""What this machine is, read rather than assumed (torch-free): CPU model and flags, free memory."""

from __future__ import annotations

import functools
import os


def _cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo_field("flags").split())


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    return _cpuinfo_field("model name") or "unknown CPU"


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX-512 BF16: bf16 autocast pays on such CPUs (2x+ measured); elsewhere it is slower."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
