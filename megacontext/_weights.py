"""Module weights as one safetensors file: atomic save, checked load.

Shared by :class:`~megacontext.gistnet.GistNet` and :class:`~megacontext.lensnet.LensNet`:
the file holds the state dict plus metadata ``format``, ``format_version`` and the
module's config as JSON. Loading checks all three and raises
:class:`~megacontext.errors.StorageError` naming the path and the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ._atomic import atomic_write
from .errors import ConfigError, StorageError

__all__ = ["load_weights", "require_materialised", "save_weights"]


def require_materialised(module: torch.nn.Module, op: str) -> None:
    """Refuse ``op`` (e.g. ``"GistNet.save"``) on a module whose parameters live on the
    ``meta`` device: they have shapes but no values, so a forward would return
    shapeless placeholders and a save or copy would fail deep inside torch."""
    p = next(module.parameters(), None)
    if p is not None and p.device.type == "meta":
        raise ConfigError(
            f"{op}: the parameters are on the meta device (shapes, no values); "
            "materialise them first (to_empty(device=...) then load weights)",
            field="device",
            value="meta",
        )


def save_weights(
    module: torch.nn.Module, path: str | os.PathLike[str], fmt: str, version: str, config_json: str
) -> Path:
    """Write ``module``'s state dict and config to ``path`` (temp file, fsync, rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    metadata = {"format": fmt, "format_version": version, "config": config_json}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_weights(
    path: str | os.PathLike[str],
    fmt: str,
    version: str,
    what: str,
    make: Any,
) -> torch.nn.Module:
    """Rebuild a module saved by :func:`save_weights`.

    ``make(config_dict)`` builds the module from the stored config (raising
    ConfigError/TypeError on a bad one); ``what`` names it in messages.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise StorageError(f"{path}: {what} checkpoint not found", path=str(path))
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise StorageError(f"{path}: not a safetensors file ({exc})", path=str(path)) from None
    if metadata.get("format") != fmt:
        raise StorageError(
            f"{path}: metadata 'format' is {metadata.get('format')!r}, expected {fmt!r}",
            path=str(path),
            field="format",
        )
    if metadata.get("format_version") != version:
        raise StorageError(
            f"{path}: unsupported format_version {metadata.get('format_version')!r}",
            path=str(path),
            field="format_version",
        )
    try:
        module = make(json.loads(metadata["config"]))
    except (KeyError, json.JSONDecodeError, ConfigError, TypeError) as exc:
        raise StorageError(
            f"{path}: bad 'config' metadata ({exc})", path=str(path), field="config"
        ) from None
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise StorageError(
            f"{path}: weights do not match the config ({exc})", path=str(path)
        ) from None
    return module
