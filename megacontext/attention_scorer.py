"""The training-free focus scorer (``lens: attention``): the base model's own
query-key affinity between the newest tokens and every working-context (WC) entry.

InfLLM, Quest and SnapKV score KV blocks this way; here the "blocks" are the WC's
entries (tokens and gists) and everything is read from what a session already
computes: the post-RoPE keys of every entry in the
:class:`~megacontext.cache.MegaContextCache` and the post-RoPE queries of the
newest ``m`` real tokens, kept by the hook's :class:`~megacontext.hook.QueryRecorder`
for a few layers ``ℓ ∈ S``.

Probabilities. For each recorded layer ``ℓ``, query head ``h`` (GQA: key head
``h // (H / H_kv)``, as the model reads it) and query row ``r``::

    a[ℓ, h, r, i] = softmax_i( q[ℓ, r, h] · k[ℓ, h // g, i] · scaling_ℓ ),   i ∈ [s, N)
    p[i]          = mean_{ℓ, h, r} a[ℓ, h, r, i]                              (Σ_i p_i = 1)

The first ``s = SINK_ENTRIES`` entries may be left out (``p = 0``, utility 0): a
model whose first position holds a BOS token attends to it whatever the query
(the attention sink, StreamingLLM). The default is ``s = 0``: in a working context
the first entry is usually the oldest far-memory gist, not a BOS token, and it is
where a far needle sits (in two SmolLM2 passkey histories, 1,500 tokens at W = 256,
the first entry, an LOD2 gist, got 8-12% of the mass, on a par with the next few
entries: not a sink's share). The newest tokens see every entry (no
causal mask among them): the question may refer to what precedes or follows any
token of it.

Utility (a fixed calibration, not fitted): with ``n = N - s`` scored entries, block
size ``bs`` and each entry's *share* ``P[i]``::

    u[i] = tanh( log(P[i] · n) / log(bs) )  ∈ [-1, 1]
    P[i] = p[i]                                  (share "entry", the default)

``P · n = 1`` is one entry's uniform share (``u = 0``); ``bs`` times it gives
``tanh(1) ≈ 0.76``, ``1 / bs`` of it ``-0.76``. The base is ``bs`` because that is
the trade the allocator makes: expanding a gist spends ``bs - 1`` more entries,
collapsing a block frees them. At the default thresholds (``±0.2``,
``atanh(0.2) ≈ 0.203``) an entry pays to expand above about ``bs^0.2 ≈ 2×`` its
uniform share (``bs = 32``) and is collapsible below half of it.

Share ``"block"`` (``attention_share``) judges a token by its whole block instead,
``P[i] = Σ p[j]`` over the WC's tokens ``j`` of ``i``'s block (gists keep
``p[i]``): the allocator collapses a block on the mean of its tokens' scores and the
block then becomes one gist with about that share, so the verdicts on the same
content agree before and after an action. Per entry, a just-expanded block reads
about ``1 / bs`` of its gist's share per token and is collapsed back as soon as
hysteresis allows (seen on SmolLM2 passkey histories: expand, then collapse three
steps later); per block, a small WC whose few token blocks share most of the
attention never offers a collapse, so expands that need room do not happen either.

Queries recorded before a refocus moved their tokens' positions (bounded position
schemes re-pack positions) are re-rotated by the move (RoPE rotations compose, as
the cache does for keys); a recorded token that is no longer an LOD0 entry takes its
covering entry's position. Entries the allocator cannot act on (the protected tail,
LOD0 expands) are masked by the allocator.

How the utilities act is ``MegaContextConfig.lens_plan``. The default (``auto``) is
``retrieval``: the gists above ``tau_expand`` are opened, and room comes from the
token blocks with the lowest mean utility, so nothing else moves. ``scores`` sends them
straight to the allocator, where, uncalibrated, they collapse what no budget asks for
(``FocusLoop.scores``, docs/runtime.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .errors import ConfigError, InvariantError
from .hook import QueryRecorder
from .kernels.kv_splice import rope_rotate

__all__ = [
    "SINK_ENTRIES",
    "AttentionScorer",
    "attention_probs",
    "attention_utility",
    "default_layers",
]

SINK_ENTRIES = 0


def default_layers(num_layers: int) -> list[int]:
    """Every 4th layer from the middle up, ``range(L // 2, L, 4)``: early layers
    attend by position (previous tokens, the sink) more than by content, retrieval
    heads sit in the middle and upper layers (Wu et al. 2024, "Retrieval Head"), and
    a handful of layers spread over that range averages out single heads' quirks at
    a fraction of the cost of all ``L``. Chosen a priori, not tuned on evaluations."""
    return list(range(num_layers // 2, num_layers, 4)) or [num_layers - 1]


def attention_probs(
    queries: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    scaling: Sequence[float],
    sink: int = SINK_ENTRIES,
) -> torch.Tensor:
    """float32 ``[N]``: the mean attention of ``queries[ℓ] [H, m, D]`` over
    ``keys[ℓ] [H_kv, N, D]`` (post-RoPE, ``H`` a multiple of ``H_kv``), softmax over
    entries ``[sink, N)`` at ``scaling[ℓ]``, averaged over heads, rows and layers;
    the first ``sink`` entries (default none) get 0. Sums to 1 (when ``N > sink``)."""
    n = keys[0].shape[-2]
    total = torch.zeros(n, dtype=torch.float32, device=keys[0].device)
    if n <= sink:
        return total
    for q, k, scale in zip(queries, keys, scaling, strict=True):
        h, m, d = q.shape
        hkv = k.shape[0]
        # query heads g*j .. g*j+g-1 read key head j (transformers' repeat_kv)
        qg = q.reshape(hkv, (h // hkv) * m, d).to(torch.float32)
        logits = torch.matmul(qg, k[:, sink:, :].to(torch.float32).transpose(-1, -2)) * scale
        total[sink:] += torch.softmax(logits, dim=-1).mean(dim=(0, 1))
    return total / len(keys)


def attention_utility(
    p: torch.Tensor,
    block_size: int,
    sink: int = SINK_ENTRIES,
    levels: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 ``[N]`` in ``[-1, 1]``: ``tanh(log(P · n) / log(block_size))`` with
    ``n = N - sink`` and ``P`` the entries' shares (see the module docstring): with
    ``levels`` and ``starts [N]`` (the WC's), a token's share is the sum of ``p``
    over the WC's tokens of its block; without them ``P = p``. The sink entries get 0."""
    n = p.numel() - sink
    u = torch.zeros_like(p, dtype=torch.float32)
    if n <= 0:
        return u
    share = p.float()
    if levels is not None and starts is not None and p.numel():
        starts = starts.to(torch.int64)
        blocks = int(starts.max()) // block_size + 2  # the WC's starts live on the CPU
        token = levels.to(p.device) == 0
        block = torch.div(starts.to(p.device), block_size, rounding_mode="floor")
        # gists go to one spare slot whose sum is never read: only tokens aggregate
        key = torch.where(token, block, blocks - 1)
        total = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        total.index_add_(0, key, share)
        share = torch.where(token, total[key], share)
    u[sink:] = torch.tanh(torch.log(share[sink:] * n) / math.log(block_size))  # p = 0 -> -1
    return u


def _scaling(model: Any, layer: int, head_dim: int) -> float:
    layers = getattr(getattr(model, "model", None), "layers", None)
    attn = getattr(layers[layer], "self_attn", None) if layers is not None else None
    scale = getattr(attn, "scaling", None)
    return float(scale) if scale is not None else head_dim**-0.5


class AttentionScorer:
    """Scores a session's WC from its KV cache and its recorded queries.

    Args:
        model: the base model (a transformers Llama-family causal LM): its shapes and
            per-layer ``scaling``.
        cache: the session's :class:`~megacontext.cache.MegaContextCache` (batch row 0).
        block_size: the tree's block size (the utility's calibration).
        layers: recorded layers (default :func:`default_layers`).
        rows: newest query rows kept per layer (``attention_queries``).
        share: ``"entry"`` or ``"block"`` (``attention_share``, see the module doc).

    Attributes:
        recorder: the :class:`~megacontext.hook.QueryRecorder` the session arms for
            every forward of real tokens (ingest prefill, decode).

    Calling ``scorer(wc, positions)`` (``positions [N]``: the entries' current RoPE
    positions) returns float32 ``[N]`` utilities on the CPU, zeros when no query is
    recorded yet (e.g. a session reopened from disk before its first forward).
    """

    def __init__(
        self,
        model: Any,
        cache: Any,
        block_size: int,
        layers: Sequence[int] | None = None,
        rows: int = 32,
        share: str = "entry",
    ):
        cfg = model.config
        num_layers = int(cfg.num_hidden_layers)
        layers = default_layers(num_layers) if layers is None else list(layers)
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(
                f"invalid value for field 'attention_layers': {layers} (layer {bad[0]} is "
                f"outside the base model's {num_layers} layers)",
                field="attention_layers",
                value=layers,
            )
        heads = int(cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        self.cache = cache
        self.block_size = int(block_size)
        self.layers = list(layers)
        self.scaling = [_scaling(model, i, self.head_dim) for i in self.layers]
        self.sink = SINK_ENTRIES  # entries left out of the softmax (utility 0)
        self.share = share
        self.recorder = QueryRecorder(
            self.layers, rows, heads, self.head_dim, device=cache.kv.device, dtype=cache.kv.dtype
        )

    def queries(self, wc: Any, positions: torch.Tensor) -> list[torch.Tensor]:
        """The recorded queries ``[H, m, D]`` per layer, of the rows whose token is in
        the history, re-rotated to their tokens' current positions (``m = 0``: none)."""
        rec = self.recorder
        valid = (rec.tokens >= 0) & (rec.tokens < wc.num_tokens)
        rows = torch.nonzero(valid).squeeze(1)
        if rows.numel() == 0:
            return []
        starts = wc.starts.cpu().to(torch.int64)
        entry = torch.searchsorted(starts, rec.tokens[rows], right=True) - 1
        delta = positions.cpu().to(torch.int64)[entry] - rec.positions[rows]
        q = rec.q[:, rows.to(rec.q.device)].transpose(1, 2)  # [L_rec, H, m, D]
        if bool((delta != 0).any()):
            inv = self.cache.inv_freq
            if inv is None:
                raise InvariantError(
                    "the attention scorer re-rotates queries: the cache has no inv_freq"
                )
            q = rope_rotate(q, delta.to(q.device), inv)
        return list(q.unbind(0))

    def probs(self, wc: Any, positions: torch.Tensor) -> torch.Tensor:
        """float32 ``[N]`` (device): :func:`attention_probs` of the WC (zeros with no
        recorded query)."""
        return self._probs(wc, self.queries(wc, positions))

    def _probs(self, wc: Any, queries: list[torch.Tensor]) -> torch.Tensor:
        n = len(wc)
        held = self.cache.lengths[0]
        if held != n:
            raise InvariantError(
                f"attention scorer: the cache holds {held} rows, the working context {n} entries"
            )
        if not queries:
            return torch.zeros(n, dtype=torch.float32, device=self.cache.kv.device)
        kv = self.cache.kv
        keys = [kv[layer, 0, 0, :, :n, :] for layer in self.layers]
        return attention_probs(queries, keys, self.scaling, self.sink)

    @torch.no_grad()
    def __call__(self, wc: Any, positions: torch.Tensor) -> torch.Tensor:
        """float32 ``[N]`` utilities on the CPU (one device-to-host copy); zeros
        with no recorded query."""
        queries = self.queries(wc, positions)
        if not queries:
            return torch.zeros(len(wc), dtype=torch.float32)
        p = self._probs(wc, queries)
        if self.share == "block":
            u = attention_utility(p, self.block_size, self.sink, wc.levels, wc.starts)
        else:
            u = attention_utility(p, self.block_size, self.sink)
        return u.cpu()
