"""LoRA adapters on the base model (peft), placed as the guide says.

Targets: the input embedding (``lora.embedding``) and the Q/K/V/O projections of
either the first two or the last two decoder blocks (``lora_blocks: first|last``,
never both). Adapters are injected in place (the model keeps its class, so
:class:`~megacontext.base.Base` and the attention hook work unchanged); ``B`` starts
at zero, so a fresh adapter leaves the model's outputs unchanged. Saved in peft's
format: ``adapter_config.json`` + ``adapter_model.safetensors``.

This module sits below the runtime, the trainer and the evaluation: the trainer
injects and saves adapters, a checkpoint loads them (:mod:`megacontext.checkpoint`),
the evaluation asks whether a system's base carries one (:func:`has_lora`).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .errors import StorageError

__all__ = [
    "LoraConfig",
    "has_lora",
    "inject_lora",
    "load_lora",
    "lora_parameters",
    "lora_targets",
    "read_lora_config",
    "save_lora",
]


class LoraConfig(BaseModel):
    """The adapter (the trainer config's ``lora:`` section, see docs/training.md)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    r: int = Field(8, ge=4, le=16)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    lora_blocks: Literal["first", "last"] = "first"
    embedding: bool = Field(True, description="LoRA on the input embedding too")
    keepalive_weight: float = Field(0.1, ge=0, description="weak substitutability keep-alive")


def lora_targets(model: Any, placement: str, embedding: bool) -> list[str]:
    """Full module names of the adapted modules."""
    n = int(model.config.num_hidden_layers)
    blocks = [0, 1] if placement == "first" else [n - 2, n - 1]
    blocks = sorted({b for b in blocks if 0 <= b < n})
    names = [
        f"model.layers.{b}.self_attn.{p}"
        for b in blocks
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    ]
    if embedding:
        names.insert(0, "model.embed_tokens")
    return names


def _peft_config(model: Any, lc: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=lora_targets(model, lc.lora_blocks, lc.embedding),
        bias="none",
    )


def inject_lora(model: Any, lc: LoraConfig, seed: int = 0) -> None:
    """Inject adapters in place; ``A`` initialised from ``seed`` (global RNG untouched)."""
    from peft import inject_adapter_in_model

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft warns when an adapted embedding is tied to the LM head: by design only
        # the input side is adapted (the guide's "input embedding projection")
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        torch.manual_seed(seed)
        inject_adapter_in_model(_peft_config(model, lc), model)
    model.requires_grad_(False)


def has_lora(model: Any) -> bool:
    """True when ``model`` carries adapter parameters (``lora_*``)."""
    return any("lora_" in name for name, _ in model.named_parameters())


def lora_parameters(model: Any) -> list[torch.nn.Parameter]:
    return [p for name, p in model.named_parameters() if "lora_" in name]


def save_lora(model: Any, lc: LoraConfig, directory: str | os.PathLike[str]) -> Path:
    """Write the adapter in peft's format into ``directory``."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()},
        str(directory / "adapter_model.safetensors"),
    )
    cfg = _peft_config(model, lc).to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"])
    (directory / "adapter_config.json").write_text(json.dumps(cfg, indent=1, default=str))
    (directory / "megacontext_lora.json").write_text(json.dumps(lc.model_dump(), indent=1))
    return directory


def read_lora_config(path: str | os.PathLike[str]) -> LoraConfig:
    """The :class:`LoraConfig` in ``megacontext_lora.json``; unreadable JSON, a top
    level that is not an object, an unknown field or a bad value is a
    :class:`StorageError` naming the file and the field."""
    from pydantic import ValidationError

    path = Path(path)
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StorageError(f"{path}: unreadable ({exc})", path=str(path), field="json") from None
    if not isinstance(raw, dict):
        raise StorageError(
            f"{path}: top level is {type(raw).__name__}, not an object",
            path=str(path),
            field="json",
        )
    try:
        return LoraConfig(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err.get("loc", ())) or "json"
        got = raw.get(field, err.get("input"))
        raise StorageError(
            f"{path}: field {field!r} = {got!r}: {err['msg']}", path=str(path), field=field
        ) from None


def load_lora(model: Any, directory: str | os.PathLike[str], inject: bool = True) -> LoraConfig:
    """Load an adapter saved by :func:`save_lora` (injecting it first unless ``inject=False``)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = directory / "megacontext_lora.json"
    weights = directory / "adapter_model.safetensors"
    if not meta.is_file() or not weights.is_file():
        missing = meta if not meta.is_file() else weights
        raise StorageError(f"{missing}: LoRA adapter file missing", path=str(missing))
    lc = read_lora_config(meta)
    if inject:
        inject_lora(model, lc)
    state = load_file(str(weights))
    dev = next(model.parameters()).device
    result = set_peft_model_state_dict(model, {k: v.to(dev) for k, v in state.items()})
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise StorageError(
            f"{weights}: adapter keys not in the model: {unexpected[:4]}", path=str(weights)
        )
    model.requires_grad_(False)
    return lc
