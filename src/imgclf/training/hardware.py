"""What the machine can do, detected rather than assumed: device, bf16 support, memory layout."""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


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


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed for one run."""

    device: torch.device
    dtype: torch.dtype | None  # autocast dtype, None for plain fp32
    channels_last: bool

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def describe(self) -> str:
        precision = "bf16 autocast" if self.dtype == torch.bfloat16 else "fp32"
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{self.device}, {precision}, {layout}, {torch.get_num_threads()} threads"


def resolve_runtime(device: str = "auto", precision: str = "auto", channels_last: str = "auto",
                    local_rank: int = 0) -> Runtime:
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{device}' asked for, but no CUDA GPU is available")
    if precision == "auto":
        if torch_device.type == "cuda":
            use_bf16 = torch.cuda.is_bf16_supported()
        else:
            use_bf16 = cpu_has_fast_bf16()
    else:
        use_bf16 = precision == "bf16"
    layout = channels_last == "on" or (channels_last == "auto" and (torch_device.type == "cuda" or
                                                                   "avx512f" in cpu_flags() or use_bf16))
    return Runtime(torch_device, torch.bfloat16 if use_bf16 else None, layout)
