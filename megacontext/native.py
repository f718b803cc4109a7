"""Lazy access to the compiled extension ``megacontext._C``.

Importing megacontext never loads the extension; the first call that needs it
does. ``MEGACONTEXT_BACKEND`` (``python``, ``cpp`` or ``cuda``) forces the backend
that ``backend="auto"`` resolves to, for debugging and benchmarks.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Any

from .errors import BackendUnavailableError, ConfigError

__all__ = ["available", "build_info", "cuda_available", "extension", "forced_backend"]

_BACKENDS = ("python", "cpp", "cuda")


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        from . import _C
    except ImportError as exc:  # not built (e.g. a source checkout without a build)
        return None, str(exc)
    return _C, None


def available() -> bool:
    """Whether the compiled extension can be imported."""
    return _load()[0] is not None


def extension() -> ModuleType:
    """The ``megacontext._C`` module; BackendUnavailableError when it is not built."""
    mod, why = _load()
    if mod is None:
        raise BackendUnavailableError(
            f"megacontext._C is not available ({why}); reinstall megacontext so that its "
            "extension is built (pip install . / uv sync)"
        )
    return mod


def build_info() -> dict[str, Any]:
    """The extension's build facts, or ``{"available": False, "error": ...}``."""
    mod, why = _load()
    if mod is None:
        return {"available": False, "error": why}
    return {"available": True, **mod.build_info()}


def cuda_available() -> bool:
    """CUDA kernels compiled into _C *and* a device visible to torch."""
    mod, _ = _load()
    if mod is None or not mod.build_info()["cuda_compiled"]:
        return False
    import torch

    return bool(torch.cuda.is_available())


def forced_backend() -> str | None:
    """The backend forced by ``MEGACONTEXT_BACKEND``, validated; None when unset."""
    value = os.environ.get("MEGACONTEXT_BACKEND", "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in _BACKENDS:
        raise ConfigError(
            f"MEGACONTEXT_BACKEND={value!r} is not one of auto, {', '.join(_BACKENDS)}",
            field="MEGACONTEXT_BACKEND",
            value=value,
        )
    return value
