"""NVTX ranges for Nsight Systems, near-free when not profiling.

``with megacontext.profiling.range("lens"):`` pushes an NVTX range when profiling
is enabled and CUDA is in use, and is a no-op context otherwise. Enable it with
``MEGACONTEXT_NVTX=1`` (or :func:`enable`); ``nsys profile`` then shows every
phase of the runtime loop by name. See ``docs/profiling.md``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["enable", "enabled", "range"]

_enabled: bool | None = None
_NULL = contextlib.nullcontext()


def _detect() -> bool:
    flag = os.environ.get("MEGACONTEXT_NVTX", "").strip().lower()
    if flag not in ("1", "true", "yes", "on"):
        return False
    try:
        import nvtx  # noqa: F401
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def enabled() -> bool:
    """Whether ranges are emitted (decided once, from ``MEGACONTEXT_NVTX`` and CUDA)."""
    global _enabled
    if _enabled is None:
        _enabled = _detect()
    return _enabled


def enable(on: bool = True) -> None:
    """Force ranges on or off for this process (overrides ``MEGACONTEXT_NVTX``)."""
    global _enabled
    _enabled = bool(on)


@contextlib.contextmanager
def _nvtx_range(name: str, color: str | None) -> Iterator[None]:
    import nvtx

    rng = nvtx.start_range(message=name, color=color, domain="megacontext")
    try:
        yield
    finally:
        nvtx.end_range(rng)


def range(name: str, color: str | None = None) -> contextlib.AbstractContextManager[None]:
    """A context manager marking ``name`` on the NVTX timeline (no-op when disabled)."""
    if _enabled is False or (_enabled is None and not enabled()):
        return _NULL
    return _nvtx_range(name, color)
