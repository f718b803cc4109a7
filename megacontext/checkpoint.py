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

from .base import Base, load_base
from .config import MegaContextConfig, read_yaml_mapping
from .errors import ConfigError, StorageError
from .gistnet import GistNet
from .lensnet import LensNet
from .lora import has_lora, load_lora

__all__ = ["COMPLETE", "Checkpoint", "check_links", "read_checkpoint", "read_trainer_state"]

COMPLETE = "COMPLETE"  # written last: a directory without it is not a checkpoint


class Checkpoint(NamedTuple):
    """What a checkpoint holds for inference."""

    base: Base  # with the checkpoint's LoRA adapter loaded, if it has one
    gistnet: GistNet
    lensnet: LensNet
    config: MegaContextConfig


def check_links(root: str | os.PathLike[str]) -> None:
    """Refuse a checkpoint directory with a symbolic link (file or folder, at any depth,
    ``lora/`` included) whose target resolves outside ``root``: loading through it would
    read a file the checkpoint does not contain. :class:`StorageError` naming the link
    (``field="link"``). Links that stay inside ``root`` are allowed."""
    root_real = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            entry = os.path.join(dirpath, name)
            if not os.path.islink(entry):
                continue
            target = os.path.realpath(entry)
            if os.path.commonpath([root_real, target]) != root_real:
                raise StorageError(
                    f"{entry}: symbolic link to {target}, outside the checkpoint {root_real}",
                    path=entry,
                    field="link",
                )


# trainer.json: field -> (accepted types, what it must be)
_TRAINER_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "done": (int, "a non-negative integer (phases completed)"),
    "global_step": (int, "a non-negative integer (optimizer steps taken)"),
    "early": (dict, "an object (the early-stop state)"),
    "plan": (list, "a list of [phase, cycle] pairs"),
}
_EARLY_FIELDS = ("best", "bad", "stopped", "history")


def read_trainer_state(path: str | os.PathLike[str], resume: bool = False) -> dict[str, Any]:
    """``trainer.json`` of the complete checkpoint ``path``, checked: ``COMPLETE`` is
    present, no link leads out of the directory (:func:`check_links`), ``done`` is
    present, and ``done``, ``global_step``, ``early`` and ``plan`` have their types
    where present; with ``resume`` (what a resume reads) all four must be present.
    Anything else is a :class:`StorageError` naming the file and the field."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise StorageError(f"{path}: not a complete checkpoint (no {COMPLETE})", path=str(path))
    check_links(path)
    file = path / "trainer.json"
    try:
        state = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StorageError(f"{file}: unreadable ({exc})", path=str(file), field="json") from None
    if not isinstance(state, dict):
        raise StorageError(
            f"{file}: top level is {type(state).__name__}, not an object",
            path=str(file),
            field="json",
        )
    for field, (kind, what) in _TRAINER_FIELDS.items():
        if field not in state and (field != "done" and not resume):
            continue
        if field not in state:
            raise StorageError(f"{file}: field {field!r} is missing", path=str(file), field=field)
        value = state[field]
        bad = isinstance(value, bool) or not isinstance(value, kind)
        if not bad and kind is int and value < 0:
            bad = True
        if bad:
            raise StorageError(
                f"{file}: field {field!r} is {value!r}, not {what}", path=str(file), field=field
            )
    missing = [k for k in _EARLY_FIELDS if k not in state.get("early", _EARLY_FIELDS)]
    if missing:
        raise StorageError(f"{file}: field 'early' lacks {missing}", path=str(file), field="early")
    if "plan" in state and state["done"] > len(state["plan"]):
        raise StorageError(
            f"{file}: field 'done' is {state['done']}, more than the plan's "
            f"{len(state['plan'])} phases",
            path=str(file),
            field="done",
        )
    return state


def _inference_config(path: Path) -> tuple[str, str | None, MegaContextConfig]:
    """``(model, device, MegaContextConfig)`` from the checkpoint's ``config.yaml``."""
    file = path / "config.yaml"
    raw = read_yaml_mapping(file)
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
