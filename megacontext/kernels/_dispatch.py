"""Choose between a Triton kernel and its PyTorch reference.

``MEGACONTEXT_KERNELS`` (read at every call, so tests may change it):

- unset, ``""`` or ``"auto"``: Triton on CUDA tensors (when Triton is installed),
  the PyTorch reference otherwise;
- ``"reference"``: always the PyTorch reference;
- ``"triton"``: always the Triton kernel. CPU tensors then need Triton's
  interpreter (``TRITON_INTERPRET=1`` set before the kernel module is imported),
  which is how the tests run the kernels without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..errors import BackendUnavailableError, ConfigError

__all__ = ["interpreter_enabled", "kernel_mode", "triton_available", "use_triton"]

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
