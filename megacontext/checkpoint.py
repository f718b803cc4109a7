"""Reading a trainer checkpoint for inference: the one place a checkpoint is loaded.

A checkpoint directory (written by :mod:`megacontext.train.checkpoint`) holds
``gistnet.safetensors``, ``lensnet.safetensors``, ``lora/`` (when the base carries
an adapter), ``config.yaml`` (the trainer's config), ``trainer.json`` and
``COMPLETE``; the trainer's own files (optimizer, RNG) are not needed here.

:func:`read_checkpoint` returns the parts a :class:`megacontext.MegaContext` is
built from; :meth:`megacontext.MegaContext.from_checkpoint` builds it, and
:func:`megacontext.train.load_checkpoint` is that same call. This module sits below
the runtime and the trainer, so both use it without importing each other.

From ``config.yaml`` inference reads ``model`` (the base model's name), ``device``
and the ``megacontext:`` section (the :class:`~megacontext.config.MegaContextConfig`,
``model`` filled in, exactly as ``TrainConfig.mc_config()``); the trainer's other
sections are the trainer's business and are validated when a run resumes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from .base import Base, load_base
from .config import MegaContextConfig
from .errors import ConfigError, StorageError
from .gistnet import GistNet
from .lensnet import LensNet
from .lora import has_lora, load_lora

__all__ = ["COMPLETE", "Checkpoint", "read_checkpoint", "read_trainer_state"]

COMPLETE = "COMPLETE"  # written last: a directory without it is not a checkpoint


class Checkpoint(NamedTuple):
    """What a checkpoint holds for inference."""

    base: Base  # with the checkpoint's LoRA adapter loaded, if it has one
    gistnet: GistNet
    lensnet: LensNet
    config: MegaContextConfig


def read_trainer_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``trainer.json`` of a complete checkpoint (progress, early-stop state, hashes)."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise StorageError(f"{path}: not a complete checkpoint (no {COMPLETE})", path=str(path))
    try:
        return json.loads((path / "trainer.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise StorageError(f"{path / 'trainer.json'}: unreadable ({exc})", path=str(path)) from None


def _inference_config(path: Path) -> tuple[str, str | None, MegaContextConfig]:
    """``(model, device, MegaContextConfig)`` from the checkpoint's ``config.yaml``."""
    file = path / "config.yaml"
    try:
        raw: Any = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found", field="config") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML ({exc})", field="config") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a mapping, got {type(raw).__name__}")
    model = raw.get("model", MegaContextConfig.model_fields["model"].default)
    device = raw.get("device")
    section = raw.get("megacontext") or {}
    for field, value, ok in (
        ("model", model, isinstance(model, str)),
        ("device", device, device is None or isinstance(device, str)),
        ("megacontext", section, isinstance(section, dict)),
    ):
        if not ok:
            raise ConfigError(
                f"{file}: invalid field {field!r}: {value!r}", field=field, value=value
            )
    try:
        config = MegaContextConfig(**{"model": model, **section})
    except ConfigError as exc:
        raise ConfigError(
            f"{file}: megacontext: {exc}", field=f"megacontext.{exc.field}", value=exc.value
        ) from None
    return model, device, config


def read_checkpoint(
    path: str | os.PathLike[str], base: Base | None = None, device: str | None = None
) -> Checkpoint:
    """The checkpoint's GistNet, LensNet (both in eval mode, on the base's device),
    its config, and ``base`` with the checkpoint's LoRA adapter loaded into it.

    ``base``: an already loaded base model *without* adapters (it is adapted in
    place); default: loaded by the config's ``model`` on ``device`` (default: the
    config's ``device``). An incomplete directory raises :class:`StorageError`, a bad
    ``config.yaml`` :class:`ConfigError`, both naming the file."""
    path = Path(path)
    read_trainer_state(path)
    model, cfg_device, config = _inference_config(path)
    if base is None:
        base = load_base(model, device=device or cfg_device)
    if (path / "lora").is_dir():
        load_lora(base.model, path / "lora", inject=not has_lora(base.model))
    p = next(base.model.parameters())
    gistnet = GistNet.load(path / "gistnet.safetensors").to(p.device).eval()
    lensnet = LensNet.load(path / "lensnet.safetensors").to(p.device).eval()
    return Checkpoint(base, gistnet, lensnet, config)
