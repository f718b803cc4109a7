"""The drop-in attention hook: ``mc.patch(model)`` / ``mc.unpatch(model)``.

The hook goes through transformers' public extension points only: an attention
function registered with ``AttentionInterface`` under the name ``"megacontext"`` and
selected with the model's ``set_attn_implementation``, plus a ``Cache`` subclass
(:class:`megacontext.cache.MegaContextCache`) that holds keys after RoPE. No
per-model forward code is copied, so every Llama-family model (Llama, SmolLM2/3,
Qwen2/3, Mistral) is covered by the same hook.

With no MegaContext state attached (a plain forward, or any ordinary cache), the
hook computes exactly what PyTorch's scaled-dot-product attention computes, so a
patched model's outputs equal the unpatched model's. Under a MegaContext session
the runtime feeds the working context's embeddings (``inputs_embeds``) with each
entry's position under the configured scheme (``position_ids``, docs/positions.md) and an explicit ``[B, 1, q, kv]`` mask in
working-context order; the attention then reads the preallocated cache.

Attention backend: flash-attn when installed (optional extra ``flash``) and the call
is a plain causal one on CUDA; PyTorch SDPA otherwise (the path that is always there
and always tested). ``MEGACONTEXT_ATTENTION=sdpa|flash`` forces one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import torch

from .base import SUPPORTED_MODEL_TYPES
from .errors import ConfigError, UnsupportedModelError

__all__ = ["ATTENTION_NAME", "attention_backend", "is_patched", "patch", "patched", "unpatch"]

ATTENTION_NAME = "megacontext"
_ORIGINAL = "_megacontext_original_attn"


@functools.cache
def _flash_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def attention_backend(device: torch.device | str | None = None) -> str:
    """``"flash"`` or ``"sdpa"``: what the hook uses for plain causal calls on ``device``."""
    forced = os.environ.get("MEGACONTEXT_ATTENTION", "").strip().lower()
    if forced and forced not in ("sdpa", "flash"):
        raise ConfigError(
            f"MEGACONTEXT_ATTENTION={forced!r} is not one of sdpa, flash",
            field="MEGACONTEXT_ATTENTION",
            value=forced,
        )
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if forced == "flash":
        if not _flash_installed():
            raise ConfigError(
                "MEGACONTEXT_ATTENTION=flash but flash-attn is not installed "
                "(uv sync --extra flash)",
                field="MEGACONTEXT_ATTENTION",
                value=forced,
            )
        return "flash"
    if forced == "sdpa":
        return "sdpa"
    return "flash" if on_cuda and _flash_installed() else "sdpa"


def _flash_causal(module, query, key, value, scaling):
    from flash_attn import flash_attn_func

    # flash-attn takes [B, S, H, D]; GQA is native; causal masks align bottom-right,
    # which is what a cache with q new rows after k - q old rows means.
    out = flash_attn_func(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        softmax_scale=scaling,
        causal=query.shape[2] > 1,
    )
    return out, None


def megacontext_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over ``query [B, H, q, D]`` and the cached ``key/value [B, Hkv, k, D]``.

    Returns ``([B, q, H, D], None)`` like transformers' own attention functions.
    ``attention_mask`` is the model's mask or the session's explicit
    ``[B, 1, q, k]`` mask (True / 0.0 = attend).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (
        attention_mask is None
        and dropout == 0.0
        and query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and attention_backend(query.device) == "flash"
    ):
        return _flash_causal(module, query, key, value, scaling)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, megacontext_attention)
    # The model builds its own masks (when the session gives none) the SDPA way.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _check_model(model: Any) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"cannot patch a {model_type!r} model ({type(model).__name__}); megacontext "
            f"supports Llama-family decoders ({', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
        )


def is_patched(model: Any) -> bool:
    """Whether ``model`` currently routes attention through the hook."""
    return getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME


def patch(model: Any) -> Any:
    """Route ``model``'s attention through the MegaContext hook (idempotent).

    Returns the model. Raises :class:`UnsupportedModelError` for a model outside
    the Llama family.
    """
    _check_model(model)
    _register()
    if is_patched(model):
        return model
    setattr(model, _ORIGINAL, model.config._attn_implementation)
    model.set_attn_implementation(ATTENTION_NAME)
    return model


def unpatch(model: Any) -> Any:
    """Restore the attention implementation ``model`` had before :func:`patch`."""
    if not is_patched(model):
        return model
    original = getattr(model, _ORIGINAL, None) or "sdpa"
    model.set_attn_implementation(original)
    with contextlib.suppress(AttributeError):
        delattr(model, _ORIGINAL)
    return model


@contextlib.contextmanager
def patched(model: Any) -> Iterator[Any]:
    """``with mc.patched(model):`` patch for the block, then restore (also on error)."""
    was = is_patched(model)
    patch(model)
    try:
        yield model
    finally:
        if not was:
            unpatch(model)
