"""Where and how tensors are computed, detected rather than assumed: device, bf16 autocast,
memory layout; and how a uint8 batch becomes the model's input there."""

from __future__ import annotations

import contextlib
import ctypes
import functools
from dataclasses import dataclass

import torch

from imgclf.core.errors import SettingsError
from imgclf.core.machine import cpu_flags, cpu_has_fast_bf16
from imgclf.core.preprocessing import Preprocessing
from imgclf.data.transforms import normalize_batch


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
        precision = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}.get(self.dtype, "fp32")
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{self.device}, {precision}, {layout}, {torch.get_num_threads()} threads"

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


# glibc's mallopt parameters, and the size up to which freed memory stays in the process
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _KEEP_BYTES = -1, -3, 1 << 30


@functools.lru_cache(maxsize=1)
def tune_allocator() -> bool:
    """Keep freed tensor memory in the process instead of returning it to the kernel (glibc only).

    By default glibc maps blocks above a threshold afresh for every allocation and unmaps them on
    free, so each training step faults in, and zeroes, its activation memory again. Measured on 2
    cores (docs/benchmarks.md): the trained half of an EfficientNet-Lite0 fine-tune step went from
    53 to 72 img/s and a frozen forward pass from 115 to 179 img/s; on an AVX2 machine the same
    change took system time from 5.5 s to 1.3 s. Process-wide, once; freed memory up to 1 GiB is
    kept for reuse. Returns whether the allocator was tuned.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (not glibc: musl and others have other knobs)
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)) and bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES))


def resolve_runtime(
    device: str = "auto", precision: str = "auto", channels_last: str = "auto", local_rank: int = 0
) -> Runtime:
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        raise SettingsError(f"setting 'device': '{device}' is not a device (auto, cpu, cuda or cuda:N)") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(
            f"setting 'device': '{device}' asked for, but no CUDA GPU is available here; use --device cpu (or auto)"
        )
    if torch_device.type == "cpu":
        tune_allocator()
    if precision == "auto":
        use_bf16 = torch.cuda.is_bf16_supported() if torch_device.type == "cuda" else cpu_has_fast_bf16()
    else:
        use_bf16 = precision == "bf16"
    layout = channels_last == "on" or (
        channels_last == "auto" and (torch_device.type == "cuda" or "avx512f" in cpu_flags() or use_bf16)
    )
    dtype = torch.bfloat16 if use_bf16 else None
    if torch_device.type == "cuda" and (precision == "fp16" or (precision == "auto" and not use_bf16)):
        dtype = torch.float16  # GPUs before Ampere: half precision, training with a gradient scaler
    return Runtime(torch_device, dtype, layout)


def model_input(batch: torch.Tensor, runtime: Runtime, prep: Preprocessing) -> torch.Tensor:
    """uint8 NCHW batch -> normalised float on the device, in the run's memory layout."""
    x = normalize_batch(batch.to(runtime.device, non_blocking=True), prep)
    return x.contiguous(memory_format=torch.channels_last) if runtime.channels_last else x
