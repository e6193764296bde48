"""Numeric precision and batch size of the network forward, per device.

Only the network's forward pass runs in reduced precision (autocast); everything around
it (normalisation, Gaussian blending, flows, tracking) stays float32, and the network's
output is cast back to float32 straight after the forward.

``auto`` picks the fastest precision the device computes natively:

* CPU: bfloat16 when the CPU has AMX-BF16 or AVX512-BF16 units (``/proc/cpuinfo`` flags
  ``amx_bf16`` / ``avx512_bf16``, or torch's own capability check), else float32.
* CUDA: bfloat16 from compute capability 8.0 (Ampere) on, float16 before it.
* anything else (Apple MPS): float32.

float16 is refused on a CPU: oneDNN has no float16 convolution kernels for CPUs without
AVX512-FP16/AMX-FP16 (it converts and runs slower than float32), float16's range (max
65504) can overflow where bfloat16 cannot, and bfloat16 gives CPUs the same speed-up.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch

from mediar_ray.errors import UserError

__all__ = [
    "PRECISIONS",
    "PrecisionError",
    "autocast",
    "cpu_has_native_bf16",
    "default_batch_size",
    "exact_fp32",
    "free_device_cache",
    "is_oom",
    "resolve_precision",
    "tf32_allowed",
]

#: The values of ``--precision``.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: Windows per forward when the user does not say: 4 on CPUs (MEDIAR's; larger batches
#: gave no speed-up on CPUs, bench/forward_layout.py), 32 on CUDA GPUs, where a batch of
#: 4 leaves most of the chip idle (an OOM halves it, :mod:`mediar_ray.inference`).
DEFAULT_BATCH = {"cpu": 4, "cuda": 32}

_EXACT = [False]  # set by exact_fp32(): float32 without TF32 on CUDA


class PrecisionError(UserError):
    """A precision the device cannot run (or an unknown one)."""


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 in hardware (AMX-BF16 or AVX512-BF16).

    Read from the ``flags`` line of ``/proc/cpuinfo`` (Linux); elsewhere from torch's
    oneDNN check.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def _device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(str(device))


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """The precision a forward on ``device`` runs in: "fp32", "bf16" or "fp16".

    Parameters
    ----------
    precision : str
        One of :data:`PRECISIONS`; "auto" as in the module docstring.
    device : str or torch.device
        A resolved device ("cpu", "cuda", "cuda:1", "mps").

    Raises
    ------
    PrecisionError
        An unknown precision, or fp16 on a CPU.
    """
    dev = _device(device)
    if precision not in PRECISIONS:
        raise PrecisionError(
            f"--precision {precision}: not a precision; use one of {', '.join(PRECISIONS)}"
        )
    if precision == "auto":
        if dev.type == "cuda":
            major, _ = torch.cuda.get_device_capability(dev)
            return "bf16" if major >= 8 else "fp16"
        if dev.type == "cpu":
            return "bf16" if cpu_has_native_bf16() else "fp32"
        return "fp32"
    if precision == "fp16" and dev.type == "cpu":
        raise PrecisionError(
            "--precision fp16: not supported on a CPU (no float16 "
            "convolution kernels here; slower than fp32); use --precision "
            "bf16 or auto on a CPU, fp16 on a CUDA GPU"
        )
    return precision


def default_batch_size(device: str | torch.device) -> int:
    """Windows per forward on ``device`` when the user does not say
    (:data:`DEFAULT_BATCH`; 4 elsewhere)."""
    return DEFAULT_BATCH.get(_device(device).type, 4)


@contextlib.contextmanager
def tf32_allowed(allowed: bool) -> Iterator[None]:
    """TF32 tensor-core math for float32 matmuls and convolutions on CUDA, for the
    duration (torch's flags are process-wide; restored after)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """IEEE float32 forwards for the duration: no TF32 on CUDA, "highest" float32 matmul
    precision everywhere. For parity checks against reference outputs (1e-5)."""
    before, saved = _EXACT[0], torch.get_float32_matmul_precision()
    _EXACT[0] = True
    torch.set_float32_matmul_precision("highest")
    try:
        with tf32_allowed(False):
            yield
    finally:
        _EXACT[0] = before
        torch.set_float32_matmul_precision(saved)


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """The context the network forward runs in for a resolved ``precision``
    ("fp32", "bf16", "fp16"): autocast to the reduced type, or float32 with TF32 on CUDA
    (unless inside :func:`exact_fp32`)."""
    if precision in _DTYPES:
        with torch.autocast(device_type=device.type, dtype=_DTYPES[precision]):
            yield
    elif device.type == "cuda" and not _EXACT[0]:
        with tf32_allowed(True):
            yield
    else:
        yield


def is_oom(err: BaseException) -> bool:
    """A device out-of-memory error (torch's class, or the message of older releases)."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(err, oom) or "out of memory" in str(err).lower()


def free_device_cache() -> None:
    """Return the CUDA caching allocator's free blocks (after an out-of-memory error)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
