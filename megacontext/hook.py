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

Query recording (opt-in, for the training-free attention scorer): inside
``with recording([recorder, ...])`` the hook hands each recorded layer's post-RoPE
query of batch row ``b`` to ``recorder[b]`` (:class:`QueryRecorder`), which keeps
the newest ``rows`` query rows per layer in a ring buffer on the device (a slice and
an ``index_copy_`` per recorded layer, no host sync). Outside the block the hook
reads one context variable and records nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .base import SUPPORTED_MODEL_TYPES
from .errors import ConfigError, UnsupportedModelError

__all__ = [
    "ATTENTION_NAME",
    "QueryRecorder",
    "attention_backend",
    "is_patched",
    "patch",
    "patched",
    "recording",
    "unpatch",
]

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


class QueryRecorder:
    """The post-RoPE queries of the newest ``rows`` positions a model computed, for
    ``layers``: a ring buffer ``q [len(layers), rows, H, D]`` on the device, with
    each row's RoPE position and the history index of its token (CPU int64 ``[rows]``,
    token ``-1``: empty). Arming rows of tokens ``>= t`` drops recorded rows of
    tokens ``>= t`` first, so a token is never held twice.

    The caller says what the next forward's rows are (:meth:`arm`: their positions
    and token indices; only the last ``min(q, rows)`` are kept), then runs the forward
    inside :func:`recording`; the hook writes each recorded layer's rows with
    :meth:`write`. A forward run without :meth:`arm` (e.g. a cache update over
    inserted gists) records nothing, so the buffer only ever holds real tokens.
    """

    def __init__(
        self,
        layers: Sequence[int],
        rows: int,
        num_heads: int,
        head_dim: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if not layers or rows < 1:
            raise ConfigError(
                f"QueryRecorder needs layers and rows >= 1, got layers={list(layers)}, rows={rows}",
                field="attention_layers" if not layers else "attention_queries",
                value=list(layers) if not layers else rows,
            )
        self.layers = tuple(int(i) for i in layers)
        self._index = {layer: i for i, layer in enumerate(self.layers)}
        self.rows = int(rows)
        self.q = torch.zeros(
            len(self.layers), self.rows, num_heads, head_dim, dtype=dtype, device=device
        )
        self.positions = torch.full((self.rows,), -1, dtype=torch.int64)
        self.tokens = torch.full((self.rows,), -1, dtype=torch.int64)
        self._next = 0  # the ring's next write row
        self._take = 0  # rows the armed forward writes (its last ones)
        self._dst: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget every recorded row."""
        self.positions.fill_(-1)
        self.tokens.fill_(-1)
        self._next, self._take, self._dst = 0, 0, None

    def arm(self, positions: torch.Tensor, tokens: torch.Tensor) -> None:
        """The next forward's rows: RoPE ``positions [q]`` and history token indices
        ``tokens [q]`` (int64). The last ``min(q, rows)`` rows are kept."""
        positions = positions.detach().cpu().to(torch.int64).flatten()
        tokens = tokens.detach().cpu().to(torch.int64).flatten()
        m = min(positions.numel(), self.rows)
        if m == 0:
            self._take, self._dst = 0, None
            return
        kept = tokens[tokens.numel() - m :]
        # rows of the same or later tokens (recorded before a rollback, or recomputed
        # now) are superseded: no token is counted twice. The ring is in token order,
        # so they are the newest rows written: rewind over them.
        stale = self.tokens >= int(kept.min())
        self.tokens[stale] = -1
        self._next = (self._next - int(stale.sum())) % self.rows
        dst = (self._next + torch.arange(m)) % self.rows
        self.positions[dst] = positions[positions.numel() - m :]
        self.tokens[dst] = kept
        self._next = (self._next + m) % self.rows
        self._take = m
        self._dst = dst.to(self.q.device)

    def write(self, layer: int, query: torch.Tensor) -> None:
        """Keep the last armed rows of ``query [H, q, D]`` (one batch row) at ``layer``."""
        i = self._index.get(layer)
        if i is None or self._dst is None or self._take == 0:
            return
        rows = query[:, query.shape[1] - self._take :, :].transpose(0, 1)
        self.q[i].index_copy_(0, self._dst, rows.to(self.q.dtype))

    def disarm(self) -> None:
        self._take, self._dst = 0, None

    def state(self) -> tuple[torch.Tensor, ...]:
        """A copy of the recorded state (for a rollback)."""
        return self.q.clone(), self.positions.clone(), self.tokens.clone(), torch.tensor(self._next)

    def load_state(self, state: tuple[torch.Tensor, ...]) -> None:
        q, positions, tokens, nxt = state
        self.q.copy_(q)
        self.positions.copy_(positions)
        self.tokens.copy_(tokens)
        self._next, self._take, self._dst = int(nxt), 0, None


# batch row b -> the recorder of that row (None: not recorded); empty: no recording
_RECORDERS: contextvars.ContextVar[tuple[QueryRecorder | None, ...]] = contextvars.ContextVar(
    "megacontext_recorders", default=()
)


@contextlib.contextmanager
def recording(recorders: Sequence[QueryRecorder | None]) -> Iterator[None]:
    """Within the block the hook gives batch row ``b``'s queries to ``recorders[b]``
    (armed recorders only); each recorder is disarmed on exit."""
    plan = tuple(recorders)
    token = _RECORDERS.set(plan)
    try:
        yield
    finally:
        _RECORDERS.reset(token)
        for rec in plan:
            if rec is not None:
                rec.disarm()


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

    recorders = _RECORDERS.get()
    if recorders:
        layer = getattr(module, "layer_idx", None)
        for b, rec in enumerate(recorders):
            if rec is not None and layer is not None:
                rec.write(layer, query[b])
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
