"""Choose between a Triton kernel and its PyTorch reference; helpers every kernel shares.

``MEGACONTEXT_KERNELS`` (read at every call, so tests may change it):

- unset, ``""`` or ``"auto"``: Triton on CUDA tensors (when Triton is installed),
  the PyTorch reference otherwise;
- ``"reference"``: always the PyTorch reference;
- ``"triton"``: always the Triton kernel. CPU tensors then need Triton's
  interpreter (``TRITON_INTERPRET=1`` set before the kernel module is imported),
  which is how the tests run the kernels without a GPU.

The helpers below the dispatch are what every kernel module needs around its launch:
the dtypes it accepts (:data:`FLOAT_DTYPES`, :data:`INDEX_DTYPES`) and the typed
error for any other (:func:`check_float_dtype`), a printable shape for error
messages (:func:`shape_of`), the check that a tensor matches another's dtype and
device (:func:`check_like`), whether a ``@triton.jit`` function runs under the
interpreter (:func:`is_interpreted`) and whether a launch can run at all
(:func:`require_runnable`), the device a launch runs under (:func:`device_guard`),
and the Triton dtypes of an input and of its ``tl.dot`` operands (:func:`tl_dtype`,
:func:`dot_dtype`). Triton is imported only inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any

import torch

from ..errors import BackendUnavailableError, ConfigError

__all__ = [
    "FLOAT_DTYPES",
    "INDEX_DTYPES",
    "check_float_dtype",
    "check_like",
    "device_guard",
    "dot_dtype",
    "import_triton",
    "interpreter_enabled",
    "is_interpreted",
    "kernel_mode",
    "require_runnable",
    "shape_of",
    "tl_dtype",
    "triton_available",
    "use_triton",
]

# What the kernels take: floating rows (fp32, fp16, bf16; every reduction in fp32) and
# integer index tensors.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)

_MODES = ("auto", "reference", "triton")


def kernel_mode() -> str:
    """The requested path: ``"auto"``, ``"reference"`` or ``"triton"``."""
    raw = os.environ.get("MEGACONTEXT_KERNELS", "")
    mode = raw.strip().lower() or "auto"
    if mode not in _MODES:
        raise ConfigError(
            f"MEGACONTEXT_KERNELS={raw!r} is not one of {', '.join(_MODES)}",
            field="MEGACONTEXT_KERNELS",
            value=raw,
        )
    return mode


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it needs no GPU to import)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to run kernels on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def use_triton(*tensors: torch.Tensor, op: str = "kernel") -> bool:
    """Whether ``op`` on ``tensors`` should run the Triton kernel.

    Raises ``BackendUnavailableError`` when ``MEGACONTEXT_KERNELS=triton`` is forced
    but cannot be honoured (Triton missing, or CPU tensors without the interpreter).
    """
    mode = kernel_mode()
    if mode == "reference":
        return False
    on_cuda = len(tensors) > 0 and all(t.is_cuda for t in tensors)
    if mode == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise BackendUnavailableError(
            f"MEGACONTEXT_KERNELS=triton but triton is not installed (needed by {op})"
        )
    if not on_cuda and not interpreter_enabled():
        devices = sorted({str(t.device) for t in tensors})
        raise BackendUnavailableError(
            f"MEGACONTEXT_KERNELS=triton for {op} on {', '.join(devices) or 'no tensors'}: "
            "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set it before importing "
            "megacontext.kernels)"
        )
    return True


# ----------------------------------------------------------------------------------------
# helpers shared by the kernel modules


def import_triton() -> tuple[Any, Any]:
    """``(triton, triton.language)``, or ``(None, None)`` when Triton is not installed:
    importing a kernel module must not need it (its kernels are then not defined, and
    :func:`require_runnable` reports why the Triton path cannot run)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:  # pragma: no cover - triton is installed wherever tests run
        return None, None
    return triton, tl


def shape_of(t: object) -> object:
    """``tuple(t.shape)`` for a tensor, else the type's name (for error messages)."""
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def check_float_dtype(op: str, name: str, t: torch.Tensor) -> None:
    """ConfigError naming ``op`` and ``name`` unless ``t`` is fp32, fp16 or bf16."""
    if t.dtype not in FLOAT_DTYPES:
        raise ConfigError(
            f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}",
            field=name,
            value=str(t.dtype),
        )


def check_like(op: str, name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    """ConfigError naming ``name`` unless ``t`` has ``ref``'s dtype and device."""
    if t.dtype != ref.dtype:
        raise ConfigError(
            f"{op}: {name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}",
            field=name,
            value=str(t.dtype),
        )
    if t.device != ref.device:
        raise ConfigError(
            f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}",
            field=name,
            value=str(t.device),
        )


def is_interpreted(kernel: object) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` function) runs under Triton's interpreter.

    ``TRITON_INTERPRET`` is read when the decorator runs, i.e. when the kernel's module
    is imported, so this looks at the kernel object rather than the environment.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def require_runnable(op: str, kernel: object, t: torch.Tensor, name: str = "x") -> None:
    """BackendUnavailableError unless ``kernel`` (None without Triton) can run on ``t``.

    It runs on CUDA tensors, and on CPU tensors when it was defined under the
    interpreter (``TRITON_INTERPRET=1`` set before ``megacontext.kernels.<op>`` was
    imported).
    """
    if kernel is None:
        raise BackendUnavailableError(f"{op}: the Triton kernel needs triton installed")
    if t.device.type not in ("cuda", "cpu"):
        raise BackendUnavailableError(
            f"{op}: {name} is on {t.device}; the Triton kernel runs on cuda (or cpu under "
            "TRITON_INTERPRET=1) tensors"
        )
    if not t.is_cuda and not is_interpreted(kernel):
        raise BackendUnavailableError(
            f"{op}: {name} is on {t.device}; the Triton kernel runs on CPU tensors only when "
            f"TRITON_INTERPRET=1 was set before megacontext.kernels.{op} was imported"
        )


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``t``'s CUDA device (Triton launches on the current device); no-op on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def tl_dtype(dtype: torch.dtype) -> Any:
    """The ``triton.language`` dtype of a floating torch dtype."""
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[
        dtype
    ]


def dot_dtype(t: torch.Tensor) -> Any:
    """The dtype a kernel rounds its ``tl.dot`` operands to: ``t``'s own, except bf16
    under the interpreter, whose ``tl.dot`` is wrong for bf16: there the operands are
    rounded to bf16 and multiplied in fp32, the products a bf16 tensor-core dot gives."""
    import triton.language as tl

    if t.dtype == torch.bfloat16 and not t.is_cuda:
        return tl.float32
    return tl_dtype(t.dtype)
