"""Helpers shared by the plugins' Triton kernels and torch ops.

Nothing here imports Triton at module level: ``interpreting`` reads the environment
only, and ``current`` imports Triton when a kernel is about to be launched.
"""

from __future__ import annotations

import os

import torch

# The spellings Triton's own getenv_bool takes as true (case-insensitive).
_TRUE = ("1", "true", "on", "yes")

FLOAT_DTYPES = (torch.float32, torch.float16)


def interpreting() -> bool:
    """Whether TRITON_INTERPRET is set: Triton kernels then run on the CPU, in the
    interpreter, and the torch ops send CPU tensors through them too."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


_rejitted: dict = {}


def current(kernel):
    """``kernel`` (a ``@triton.jit`` function) for the mode Triton is in now.

    ``triton.jit`` picks compiled or interpreted when the decorator runs, i.e. when the
    kernel module is imported: a module imported before TRITON_INTERPRET was set (or
    after it was unset) would hold a kernel of the other kind. This re-wraps the
    kernel's Python function once for the current mode instead.

    That works only for kernels that call triton.language *builtins*: the parts of Triton's
    library written as ``@triton.jit`` functions (``tl.zeros``, ``tl.max``, ``tl.sum``,
    ``tl.cdiv``, ...) were built in the mode Triton was imported in, and a kernel of the
    other mode fails calling them ("Cannot call @triton.jit'd outside of the scope of a
    kernel"). The plugins' kernels use ``tl.full``, ``tl.maximum`` and the like instead."""
    from triton.runtime.interpreter import InterpretedFunction

    want = interpreting()
    if isinstance(kernel, InterpretedFunction) == want:
        return kernel
    key = (kernel.fn, want)
    if key not in _rejitted:
        import triton

        _rejitted[key] = triton.jit(kernel.fn)
    return _rejitted[key]


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float16, got {t.dtype}")


def check_index(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 (as the ONNX node takes it) or int64, got {t.dtype}")


def check_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"inputs on several devices: {sorted(map(str, devices))}")
    (device,) = devices
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU ones), got {device}")
