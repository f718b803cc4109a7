"""Phase checkpoints: ``artifacts/checkpoints/<run>/cycle<c>-<phase>/``.

A checkpoint directory holds ``gistnet.safetensors``, ``lensnet.safetensors``,
``lora/`` (peft format, when the base carries adapters), ``optimizer.pt`` (the
phase's AdamW and scheduler state, written for inspection and never loaded),
``rng.safetensors`` + ``rng.json`` (torch, numpy and Python RNG states; no pickle),
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

from ..checkpoint import COMPLETE, check_links, read_trainer_state
from ..errors import ConfigError, StorageError
from ..runtime import MegaContext
from .config import load_train_config

__all__ = [
    "COMPLETE",
    "RESUME_FREE_FIELDS",
    "check_links",
    "check_resume",
    "latest_checkpoint",
    "load_checkpoint",
    "load_rng_state",
    "read_trainer_state",
    "resume_mismatch",
    "rng_state",
    "save_rng_state",
    "set_rng_state",
    "write_checkpoint",
]

RNG_TENSORS = "rng.safetensors"
RNG_JSON = "rng.json"


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


def save_rng_state(directory: str | os.PathLike[str], state: dict[str, Any] | None = None) -> None:
    """Write an RNG state (default: the current one) as ``rng.safetensors`` (the
    generators' tensors) plus ``rng.json`` (their scalars) in ``directory``: no pickle,
    so a checkpoint from someone else cannot run code when it is resumed."""
    from safetensors.torch import save_file

    state = rng_state() if state is None else state
    directory = Path(directory)
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    py_version, py_internal, py_gauss = state["python"]
    tensors = {
        "torch": state["torch"].contiguous(),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "python_internal": torch.tensor(py_internal, dtype=torch.int64),
    }
    for i, t in enumerate(state.get("cuda", [])):
        tensors[f"cuda_{i}"] = t.contiguous()
    meta = {
        "format": 1,
        "numpy": {
            "kind": np_kind,
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": int(py_version), "gauss_next": py_gauss},
        "cuda_devices": len(state.get("cuda", [])),
    }
    save_file(tensors, str(directory / RNG_TENSORS))
    (directory / RNG_JSON).write_text(json.dumps(meta, indent=1))


def load_rng_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The RNG state :func:`save_rng_state` wrote in ``directory``; a missing, corrupt
    or inconsistent file raises :class:`StorageError` naming it. Never unpickles: a
    legacy ``rng.pt`` (pickle) is refused, not loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    tpath, jpath = directory / RNG_TENSORS, directory / RNG_JSON
    if not tpath.is_file() and (directory / "rng.pt").is_file():
        raise StorageError(
            f"{directory / 'rng.pt'}: a pickled RNG state from an older version; it is never "
            "loaded (pickle can run code). Resume from a checkpoint written by this version",
            path=str(directory / "rng.pt"),
            field="rng",
        )
    try:
        tensors = load_file(str(tpath))
    except (OSError, SafetensorError) as exc:
        raise StorageError(
            f"{tpath}: unreadable RNG state ({exc})", path=str(tpath), field="rng"
        ) from None
    try:
        meta = json.loads(jpath.read_text())
        npm, pym = meta["numpy"], meta["python"]
        keys = tensors["numpy_keys"].numpy()
        internal = tensors["python_internal"].tolist()
        if keys.shape != (624,) or keys.min() < 0 or keys.max() >= 2**32 or len(internal) != 625:
            raise ValueError("generator state of the wrong size or range")
        state: dict[str, Any] = {
            "torch": tensors["torch"],
            "numpy": (
                str(npm["kind"]),
                keys.astype(np.uint32),
                int(npm["pos"]),
                int(npm["has_gauss"]),
                float(npm["cached_gaussian"]),
            ),
            "python": (
                int(pym["version"]),
                tuple(int(v) for v in internal),
                None if pym["gauss_next"] is None else float(pym["gauss_next"]),
            ),
        }
        n_cuda = int(meta.get("cuda_devices", 0))
        if n_cuda:
            state["cuda"] = [tensors[f"cuda_{i}"] for i in range(n_cuda)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StorageError(
            f"{jpath}: invalid RNG state ({type(exc).__name__}: {exc})",
            path=str(jpath),
            field="rng",
        ) from None
    return state


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


# TrainConfig fields that do not change what a run computes: where files go
# (``artifacts``, ``runs_dir``), the run's name, the device it runs on, and the
# allocator backend (the backends agree bit for bit, docs/allocator.md). Every other
# field (seed, model, data, architecture, schedule, losses, early stop ...) must match
# for a resume to continue the same run.
RESUME_FREE_FIELDS = frozenset({"run", "artifacts", "runs_dir", "device", "allocator_backend"})


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        if not value and prefix:
            out[prefix[:-1]] = {}
        return out
    return {prefix[:-1]: value}


def _resolved(cfg: Any) -> dict[str, Any]:
    """``cfg.dump()`` with the ``megacontext`` section resolved against its defaults,
    so ``{}`` and ``{block_size: 32}`` compare equal."""
    dump = cfg.dump()
    dump["megacontext"] = cfg.mc_config().model_dump(mode="json")
    return {k: v for k, v in _flatten(dump).items() if k.split(".")[0] not in RESUME_FREE_FIELDS}


def resume_mismatch(path: str | os.PathLike[str], cfg: Any) -> list[tuple[str, Any, Any]]:
    """``(field, in the checkpoint, in cfg)`` for every field outside
    :data:`RESUME_FREE_FIELDS` where the checkpoint ``path``'s ``config.yaml`` differs
    from the :class:`~megacontext.train.config.TrainConfig` ``cfg``. Reads only
    ``config.yaml`` (a missing or invalid one is a :class:`StorageError`)."""
    path = Path(path)
    file = path / "config.yaml"
    if not file.is_file():
        raise StorageError(f"{file}: missing (the run's config)", path=str(file), field="config")
    try:
        saved = load_train_config(file)
    except (ConfigError, OSError, UnicodeDecodeError) as exc:
        raise StorageError(f"{file}: unreadable ({exc})", path=str(file), field="config") from None
    old, new = _resolved(saved), _resolved(cfg)
    return [
        (k, old.get(k, "<absent>"), new.get(k, "<absent>"))
        for k in sorted(set(old) | set(new))
        if old.get(k, "<absent>") != new.get(k, "<absent>")
    ]


def check_resume(path: str | os.PathLike[str], cfg: Any) -> dict[str, Any]:
    """Everything a resume from checkpoint ``path`` needs checked before a byte of
    weights is read: :func:`read_trainer_state` (completeness, links, fields) and a
    config that matches ``cfg`` in every field that affects the result
    (:func:`resume_mismatch`). A mismatch is a :class:`~megacontext.ConfigError` that
    lists every differing field (``field`` is the first one). Returns the trainer state.
    """
    state = read_trainer_state(path, resume=True)
    diff = resume_mismatch(path, cfg)
    if diff:
        listed = "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, a, b in diff)
        raise ConfigError(
            f"{path}: cannot resume, the checkpoint was written by a run with another "
            f"config ({listed}). Start a fresh run (another 'run' name or without --resume) "
            "or resume with the checkpoint's config",
            field=diff[0][0],
            value=diff[0][2],
        )
    return state


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


def load_checkpoint(
    path: str | os.PathLike[str], base: Any = None, device: str | None = None
) -> MegaContext:
    """A :class:`megacontext.MegaContext` with the checkpoint's GistNet, LensNet and
    LoRA adapter (for inference): :meth:`MegaContext.from_checkpoint`, which reads
    the directory with :func:`megacontext.checkpoint.read_checkpoint`. ``base``: an
    already loaded base *without* adapters (default: loaded by the config's model)."""
    return MegaContext.from_checkpoint(path, base=base, device=device)
