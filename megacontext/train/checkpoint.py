"""Phase checkpoints: ``artifacts/checkpoints/<run>/cycle<c>-<phase>/``.

A checkpoint directory holds ``gistnet.safetensors``, ``lensnet.safetensors``,
``lora/`` (peft format, when the base carries adapters), ``optimizer.pt`` (the
phase's AdamW and scheduler state), ``rng.pt`` (torch, numpy and Python RNG states),
``trainer.json`` (progress, early-stop state, weight hashes), ``config.yaml`` (the
resolved :class:`~megacontext.train.config.TrainConfig`) and ``COMPLETE``.

Written atomically: everything goes into a temporary sibling directory, ``COMPLETE``
is written last, then the directory is renamed into place, so a killed run never
leaves a directory that looks complete. :func:`latest_checkpoint` only considers
directories with ``COMPLETE``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import StorageError

__all__ = [
    "COMPLETE",
    "latest_checkpoint",
    "load_checkpoint",
    "read_trainer_state",
    "rng_state",
    "set_rng_state",
    "write_checkpoint",
]

COMPLETE = "COMPLETE"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def write_checkpoint(final: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Create checkpoint directory ``final`` atomically: ``write(tmp_dir)`` fills a
    temporary sibling, then ``COMPLETE`` is written, files are fsynced and the
    directory renamed into place (an existing ``final`` is replaced)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        (tmp / COMPLETE).write_text("ok\n")
        _fsync_tree(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_trainer_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise StorageError(f"{path}: not a complete checkpoint (no {COMPLETE})", path=str(path))
    try:
        return json.loads((path / "trainer.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise StorageError(f"{path / 'trainer.json'}: unreadable ({exc})", path=str(path)) from None


def latest_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint under ``root`` that is furthest along (``None``: none)."""
    root = Path(root)
    if not root.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for d in root.iterdir():
        if d.name.startswith(".") or not (d / COMPLETE).is_file():
            continue
        done = int(read_trainer_state(d)["done"])
        if best is None or done > best[0]:
            best = (done, d)
    return None if best is None else best[1]


def load_checkpoint(path: str | os.PathLike[str], base: Any = None, device: str | None = None):
    """A :class:`megacontext.MegaContext` with the checkpoint's GistNet, LensNet and
    LoRA adapter (for inference). ``base``: an already loaded base *without* adapters
    (default: loaded by the checkpoint config's model name)."""
    from ..base import load_base
    from ..gistnet import GistNet
    from ..lensnet import LensNet
    from ..runtime import MegaContext
    from .config import load_train_config
    from .lora import has_lora, load_lora

    path = Path(path)
    read_trainer_state(path)
    cfg = load_train_config(path / "config.yaml")
    if base is None:
        base = load_base(cfg.model, device=device or cfg.device)
    if (path / "lora").is_dir():
        load_lora(base.model, path / "lora", inject=not has_lora(base.model))
    p = next(base.model.parameters())
    gistnet = GistNet.load(path / "gistnet.safetensors").to(p.device)
    lensnet = LensNet.load(path / "lensnet.safetensors").to(p.device)
    gistnet.eval()
    lensnet.eval()
    return MegaContext(base, gistnet, lensnet, cfg.mc_config())
