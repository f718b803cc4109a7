"""LensNet: a signed focus score in [-1, 1] for every working-context entry.

``lens(entries [B, N, d], tail [B, 6, d], levels [B, N], span [B, N], distance [B, N],
mask=None) -> scores [B, N]``. ``u > 0``: the entry is worth more detail (expand);
``u < 0``: it can lose detail (collapse). Legality is not LensNet's job: every entry
gets a score; the allocator masks.

Architecture (widths: ``d`` in, ``dl = d_lens`` inside, ``H`` heads of ``dl / H``):

1. ``x = proj(entries) + E_level[level] + E_span[floor(log2 span)]
   + E_dist[floor(2 log2(1 + distance))]`` -> ``[B, N, dl]``;
   ``t = proj(tail) + E_slot`` -> ``[B, 6, dl]`` (the root gist and the 5 newest LOD1
   gists; the same projection: they live in the same space as the entries).
2. ``n_blocks`` dual blocks (pre-norm, residual). Stage 1: the 6 tail gists attend
   over all N entries, ``t += MHA(LN(t), LN(x))``, then ``t += MLP(LN(t))``. Stage 2:
   every entry attends to the 6 updated gists, ``x += MHA(LN(x), LN(t))``.
3. Head: ``score = tanh(w2 . gelu(W1 LN(x) + b1) + b2)``.

The attention is computed in "absorbed" form, which is what makes it cheap: stage
1's key projection is folded into the 6 x H queries and its value projection is
applied after the weighted sum, so no ``[N, dl]`` keys or values exist; stage 2's
queries, keys, values, output projection and LayerNorm affines fold into per-call
``[dl, 6H]`` and ``[6H, dl]`` matrices (``_TailFold``), so per entry stage 2 is two
skinny products and a 6-way softmax per head. The folded forms are exactly the
standard multi-head attention (tests/test_lensnet.py checks them against an
unfolded implementation). On CUDA, stage 1 runs the split-N Triton kernel
(``kernels/lens_stage1.py``) and the last block's stage 2 runs fused with the head
(``kernels/lens_stage2.py``); on the CPU the PyTorch references of those kernels
run. See docs/lensnet.md.

Causal variant (``causal=True``, the focus ablation): no score depends on entries
after it, nor on the tail (the tail gists are the newest entries). The 6 tail slots
start from learned vectors instead of the tail; entry ``i`` in chunk
``k = i // causal_chunk`` attends to the tail slots as updated (stage 1, every
block) from entries ``[0, k * causal_chunk)`` only, plus its own features (its
embedding, level, span and distance). The ``tail`` argument is checked but unread.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from ._weights import load_weights, require_materialised, save_weights
from .config import config_error
from .errors import ConfigError
from .kernels.lens_stage1 import lens_stage1
from .kernels.lens_stage2 import lens_stage2

__all__ = ["LensNet", "LensNetConfig", "cost_table"]

_FORMAT = "megacontext.lensnet"
_FORMAT_VERSION = "1"
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class LensNetConfig(BaseModel):
    """Hyper-parameters of a :class:`LensNet` (validated; bad values raise ConfigError)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: int = Field(gt=0, description="d: the base model's embedding width (entries, tail)")
    d_lens: int = Field(512, gt=0, description="internal width dl")
    heads: int = Field(8, gt=0, description="attention heads in both stages")
    n_blocks: int = Field(1, ge=1, le=3, description="stacked dual blocks")
    tail_size: int = Field(
        6, gt=0, description="tail rows: root gist, newest LOD1 gists, newest tokens' view"
    )
    mlp_ratio: int = Field(4, gt=0, description="stage-1 tail MLP width = mlp_ratio * dl")
    head_hidden: int = Field(128, gt=0, le=512, description="scoring head hidden width")
    n_levels: int = Field(8, gt=0, description="level embeddings (higher levels clamp)")
    n_span_buckets: int = Field(32, gt=0, description="floor(log2 span) buckets (clamped)")
    n_distance_buckets: int = Field(64, gt=0, description="floor(2 log2(1+dist)) buckets")
    relevance_buckets: int = Field(
        0,
        ge=0,
        description="0: no relevance input; R > 0: forward takes relevance [B, N] (the entry's "
        "lexical z-score for the newest tokens) and adds E_rel[bucket(z)], two buckets per "
        "octave of 1 + z (LensNet.relevance_bucket)",
    )
    causal: bool = Field(False, description="the causal ablation variant (see module doc)")
    causal_chunk: int = Field(256, gt=0, description="causal: entries per prefix chunk")
    norm_eps: float = Field(1e-5, gt=0)

    @model_validator(mode="after")
    def _check(self) -> LensNetConfig:
        if self.d_lens % self.heads:
            raise ValueError(f"d_lens: {self.d_lens} is not divisible by heads={self.heads}")
        if self.causal and self.relevance_buckets:
            # the relevance is computed from the newest tokens: a causal score may not read it
            raise ValueError("relevance_buckets: a causal LensNet cannot read the relevance input")
        return self

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc, data, "LensNetConfig") from None

    @property
    def head_dim(self) -> int:
        return self.d_lens // self.heads

    # Costs ------------------------------------------------------------------------

    def num_parameters(self) -> int:
        """Parameter count, from the formula (tests check it against the module)."""
        d, dl, T, r, hh = self.dim, self.d_lens, self.tail_size, self.mlp_ratio, self.head_hidden
        tables = (
            self.n_levels + self.n_span_buckets + self.n_distance_buckets + self.relevance_buckets
        )
        embed = (d * dl + dl) + tables * dl
        embed += T * dl  # tail slot embeddings
        stage1 = 3 * 2 * dl  # LayerNorms (weight + bias): tail queries, entries, MLP
        stage1 += 4 * dl * dl + 3 * dl  # q (bias), k (no bias: cancels), v (bias), o (bias)
        stage1 += (dl * r * dl + r * dl) + (r * dl * dl + dl)  # tail MLP
        stage2 = 2 * 2 * dl + 4 * dl * dl + 3 * dl  # entry/tail norms; q, k (no bias), v, o
        head = 2 * dl + (dl * hh + hh) + (hh + 1)
        return embed + self.n_blocks * (stage1 + stage2) + head

    def flops(self, n_entries: int, batch: int = 1) -> dict[str, int]:
        """Matmul FLOPs (2 per multiply-add) of one non-causal forward, by part.

        Counts the computation as the kernels run it (absorbed attention, folded
        stage 2); LayerNorms, softmaxes, GELU and embedding look-ups are not counted
        (O(N * dl) each, under 1% here). Keys: ``proj``, ``stage1`` (6H queries x N
        entries: scores and weighted sums), ``stage2`` (per entry: [dl] x [dl, 6H] and
        [6H] x [6H, dl]), ``tail`` (every O(6 * dl^2) product on the tail side:
        projections, folding, MLP), ``head``, and ``total``.
        """
        B, N, T = batch, n_entries, self.tail_size
        d, dl, H, r, hh = self.dim, self.d_lens, self.heads, self.mlp_ratio, self.head_hidden
        G = H * T
        proj = 2 * B * (N + T) * d * dl
        stage1 = 2 * 2 * B * G * N * dl
        stage2 = 2 * 2 * B * N * dl * G
        # stage 1: q, fold q into keys (G x dh x dl), v after the sum (G x dl x dh), o, MLP
        tail1 = 2 * B * T * dl * dl * 4 + 2 * B * T * (2 * r * dl * dl)
        # stage 2: k, v, fold a (G x dh x dl), fold c (G x dh x dl)
        tail2 = 2 * B * T * dl * dl * 4
        head = 2 * B * N * (dl * hh + hh)
        parts = {
            "proj": proj,
            "stage1": self.n_blocks * stage1,
            "stage2": self.n_blocks * stage2,
            "tail": self.n_blocks * (tail1 + tail2),
            "head": head,
        }
        parts["total"] = sum(parts.values())
        return parts


# ----------------------------------------------------------------------------------------
# blocks


class _TailFold:
    """Stage-2 tensors folded from the tail: ``a [B, dl, G]``, ``a0 [B, G]``, ``c [B, G, dl]``."""

    __slots__ = ("a", "a0", "c")

    def __init__(self, a: torch.Tensor, a0: torch.Tensor, c: torch.Tensor) -> None:
        self.a, self.a0, self.c = a, a0, c


class LensBlock(nn.Module):
    """One dual block: the tail attends over the entries, then the entries attend to the tail."""

    def __init__(self, config: LensNetConfig) -> None:
        super().__init__()
        dl, eps = config.d_lens, config.norm_eps
        self.heads, self.head_dim, self.eps = config.heads, config.head_dim, eps
        # stage 1: tail queries, entry keys/values; the key bias would add the same
        # amount to every score of a query and cancel in the softmax, so there is none
        self.norm_t1 = nn.LayerNorm(dl, eps=eps)
        self.norm_x1 = nn.LayerNorm(dl, eps=eps)
        self.q1 = nn.Linear(dl, dl)
        self.k1 = nn.Linear(dl, dl, bias=False)
        self.v1 = nn.Linear(dl, dl)
        self.o1 = nn.Linear(dl, dl)
        self.norm_mlp = nn.LayerNorm(dl, eps=eps)
        self.fc1 = nn.Linear(dl, config.mlp_ratio * dl)
        self.fc2 = nn.Linear(config.mlp_ratio * dl, dl)
        # stage 2: entry queries, tail keys/values (no key bias, same reason)
        self.norm_x2 = nn.LayerNorm(dl, eps=eps)
        self.norm_t2 = nn.LayerNorm(dl, eps=eps)
        self.q2 = nn.Linear(dl, dl)
        self.k2 = nn.Linear(dl, dl, bias=False)
        self.v2 = nn.Linear(dl, dl)
        self.o2 = nn.Linear(dl, dl)

    # stage 1 -------------------------------------------------------------------------

    def fold_queries(self, t: torch.Tensor) -> torch.Tensor:
        """``t [..., T, dl]`` -> absorbed stage-1 queries ``[..., H*T, dl]`` (row h*T + t).

        ``score(t, i) = q_{t,h} . k_{i,h} / sqrt(dh)`` with ``k_i = W_k LN(x_i)`` and
        ``LN(x) = xn * gamma + beta`` equals ``xn_i . (gamma * W_k,h^T q_{t,h}) /
        sqrt(dh)`` plus a per-query constant, which cancels in the softmax over ``i``.
        """
        *lead, T, dl = t.shape
        q = self.q1(self.norm_t1(t)).view(*lead, T, self.heads, self.head_dim)
        wk = self.k1.weight.view(self.heads, self.head_dim, dl)
        qf = torch.einsum("...the,hed->...htd", q, wk)
        qf = qf * (self.norm_x1.weight / math.sqrt(self.head_dim))
        return qf.reshape(*lead, self.heads * T, dl)

    def update_tail(self, t: torch.Tensor, o: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
        """Residual updates of ``t [..., T, dl]`` from the stage-1 sums.

        ``o [..., H*T, dl]`` holds ``sum_i p_i xn_i`` per (head, gist); ``empty [...,
        H*T]`` marks rows that saw no entry, whose attention output is 0.
        """
        *lead, T, dl = t.shape
        H, dh = self.heads, self.head_dim
        o = o.view(*lead, H, T, dl) * self.norm_x1.weight + self.norm_x1.bias  # sum_i p_i LN(x_i)
        v = torch.einsum("...htd,hed->...the", o, self.v1.weight.view(H, dh, dl))
        v = v + self.v1.bias.view(H, dh)
        seen = ~empty.view(*lead, H, T).transpose(-1, -2)  # [..., T, H]
        v = torch.where(seen.unsqueeze(-1), v, torch.zeros_like(v))
        att = self.o1(v.reshape(*lead, T, dl))
        # attention over no entry at all (a causal chunk with no visible predecessor, a
        # fully masked row) contributes nothing, not the output bias
        nothing = ~seen.flatten(-2).any(dim=-1)
        t = t + torch.where(nothing[..., None, None], torch.zeros_like(att), att)
        return t + self.fc2(F.gelu(self.fc1(self.norm_mlp(t))))

    def stage1(self, t: torch.Tensor, xn: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The tail ``t [B, T, dl]`` attends over all entries ``xn [B, N, dl]`` (normalised)."""
        o, lse = lens_stage1(self.fold_queries(t), xn, mask)
        return self.update_tail(t, o, torch.isneginf(lse))

    # stage 2 -------------------------------------------------------------------------

    def fold_tail(self, t: torch.Tensor) -> _TailFold:
        """Fold stage 2's projections, LayerNorm affine and output bias around ``t [B, T, dl]``.

        ``score(i, h, t) = xn_i . a[:, h*T+t] + a0[h*T+t]`` and the attention output
        is ``p_i @ c`` (each head's probabilities sum to 1, so ``c`` carries ``b_o / H``).
        """
        B, T, dl = t.shape
        H, dh = self.heads, self.head_dim
        tn = self.norm_t2(t)
        k = self.k2(tn).view(B, T, H, dh)
        v = self.v2(tn).view(B, T, H, dh)
        scale = 1.0 / math.sqrt(dh)
        wq = self.q2.weight.view(H, dh, dl)
        a = torch.einsum("bthe,hed->bdht", k, wq) * (self.norm_x2.weight * scale)[:, None, None]
        q_const = self.q2(self.norm_x2.bias).view(H, dh)  # beta W_q^T + b_q
        a0 = torch.einsum("bthe,he->bht", k, q_const) * scale
        c = torch.einsum("bthe,ohe->bhto", v, self.o2.weight.view(dl, H, dh))
        c = c + self.o2.bias / H
        return _TailFold(a.reshape(B, dl, H * T), a0.reshape(B, H * T), c.reshape(B, H * T, dl))

    def stage2(
        self, x: torch.Tensor, t: torch.Tensor, head: tuple[torch.Tensor, ...] | None
    ) -> torch.Tensor:
        """Entries ``x [B, N, dl]`` attend to ``t [B, T, dl]``; scores ``[B, N]`` with ``head``."""
        f = self.fold_tail(t)
        w = head if head is not None else (None, None, None, None)
        return lens_stage2(x, f.a, f.a0, f.c, *w, n_heads=self.heads, eps=self.eps)


# ----------------------------------------------------------------------------------------
# LensNet


class LensNet(nn.Module):
    """Dual cross-attention focus scorer. See the module docstring and docs/lensnet.md.

    ``LensNet(dim, d_lens=512, heads=8, n_blocks=1, ...)`` or ``LensNet(config=...)``.
    """

    def __init__(self, dim: int | None = None, *, config: LensNetConfig | None = None, **kw):
        super().__init__()
        if config is None:
            if dim is None:
                raise ConfigError(
                    "LensNet: give dim (the base model's width) or config", field="dim"
                )
            config = LensNetConfig(dim=dim, **kw)
        elif dim is not None or kw:
            raise ConfigError(
                "LensNet: give either config or dim and keyword options, not both",
                field="config",
            )
        self.config = config
        dl = config.d_lens
        self.proj = nn.Linear(config.dim, dl)
        self.level_emb = nn.Embedding(config.n_levels, dl)
        self.span_emb = nn.Embedding(config.n_span_buckets, dl)
        self.distance_emb = nn.Embedding(config.n_distance_buckets, dl)
        self.relevance_emb = (
            nn.Embedding(config.relevance_buckets, dl) if config.relevance_buckets else None
        )
        self.tail_emb = nn.Parameter(torch.empty(config.tail_size, dl))
        self.blocks = nn.ModuleList(LensBlock(config) for _ in range(config.n_blocks))
        self.head_norm = nn.LayerNorm(dl, eps=config.norm_eps)
        self.head_fc1 = nn.Linear(dl, config.head_hidden)
        self.head_fc2 = nn.Linear(config.head_hidden, 1)
        for emb in (self.level_emb, self.span_emb, self.distance_emb, self.relevance_emb):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
        nn.init.normal_(self.tail_emb, std=0.02)

    # inputs --------------------------------------------------------------------------

    def _check(
        self, entries, tail, levels, span, distance, mask, relevance=None
    ) -> tuple[int, int]:
        c = self.config
        if not isinstance(entries, torch.Tensor) or entries.dim() != 3:
            raise ConfigError(
                f"LensNet: entries must be [B, N, d={c.dim}], got {_shape(entries)}",
                field="entries",
                value=_shape(entries),
            )
        B, N, d = entries.shape
        if d != c.dim or N < 1 or not entries.is_floating_point():
            raise ConfigError(
                f"LensNet: entries must be a float [B, N, d={c.dim}] tensor with N >= 1, got "
                f"{tuple(entries.shape)} {entries.dtype}",
                field="entries",
                value=tuple(entries.shape),
            )
        if not isinstance(tail, torch.Tensor) or tuple(tail.shape) != (B, c.tail_size, c.dim):
            raise ConfigError(
                f"LensNet: tail must be [B, {c.tail_size}, d] = [{B}, {c.tail_size}, {c.dim}], "
                f"got {_shape(tail)}",
                field="tail",
                value=_shape(tail),
            )
        for name, t in (("levels", levels), ("span", span), ("distance", distance)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, N):
                raise ConfigError(
                    f"LensNet: {name} must be [B, N] = [{B}, {N}], got {_shape(t)}",
                    field=name,
                    value=_shape(t),
                )
            if t.dtype not in _INT_DTYPES:
                raise ConfigError(
                    f"LensNet: {name} must be an integer tensor, got {t.dtype}",
                    field=name,
                    value=str(t.dtype),
                )
        if mask is not None and (
            not isinstance(mask, torch.Tensor)
            or tuple(mask.shape) != (B, N)
            or mask.dtype != torch.bool
        ):
            raise ConfigError(
                f"LensNet: mask must be a bool [B, N] = [{B}, {N}] tensor (True = real entry), "
                f"got {_shape(mask)} {getattr(mask, 'dtype', '')}",
                field="mask",
                value=_shape(mask),
            )
        if c.relevance_buckets and (
            not isinstance(relevance, torch.Tensor)
            or tuple(relevance.shape) != (B, N)
            or not relevance.is_floating_point()
        ):
            raise ConfigError(
                f"LensNet: relevance must be a float [B, N] = [{B}, {N}] tensor (this LensNet "
                f"has relevance_buckets={c.relevance_buckets}), got {_shape(relevance)}",
                field="relevance",
                value=_shape(relevance),
            )
        if not c.relevance_buckets and relevance is not None:
            raise ConfigError(
                "LensNet: relevance given, but this LensNet has relevance_buckets=0",
                field="relevance",
                value=_shape(relevance),
            )
        return B, N

    def embed(
        self,
        entries: torch.Tensor,
        levels: torch.Tensor,
        span: torch.Tensor,
        distance: torch.Tensor,
        relevance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x [B, N, dl]``: projected entries plus level, span and distance embeddings
        (and the relevance embedding when the config has ``relevance_buckets``)."""
        lv, sb, db = self.buckets(levels, span, distance)
        x = self.proj(entries.to(self.proj.weight.dtype))
        x = x + self.level_emb(lv) + self.span_emb(sb) + self.distance_emb(db)
        if self.relevance_emb is not None and relevance is not None:
            x = x + self.relevance_emb(self.relevance_bucket(relevance))
        return x

    def relevance_bucket(self, relevance: torch.Tensor) -> torch.Tensor:
        """``0`` for ``z <= 0``, else ``clamp(1 + floor(2 log2(1 + z)), 1, R - 1)`` (int64;
        NaN counts as 0): two buckets per octave, because a robust z-score spans 0 to
        hundreds (a rare token found in one block among blocks that share nothing has
        a tiny MAD) and what it means changes by orders of magnitude, not units."""
        z = torch.nan_to_num(relevance.double(), nan=0.0, posinf=1e12, neginf=0.0).clamp(min=0.0)
        b = 1 + torch.floor(2.0 * torch.log2(1.0 + z))
        b = torch.where(z > 0, b, torch.zeros_like(b))
        return b.clamp(0, self.config.relevance_buckets - 1).long()

    def buckets(
        self, levels: torch.Tensor, span: torch.Tensor, distance: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embedding indices ``[B, N]`` (int64) of level, span width and distance.

        level: clamped to ``[0, n_levels)``; span: exact ``floor(log2 span)`` (spans below
        1 count as 1), clamped to ``n_span_buckets``; distance: ``floor(2 log2(1 +
        distance))`` (two buckets per octave; 0 -> 0, 1 -> 2, 2 -> 3, 3..4 -> 4, 5..6 -> 5,
        7..10 -> 6; negative distances count as 0), clamped to ``n_distance_buckets``.
        """
        c = self.config
        lv = levels.long().clamp(0, c.n_levels - 1)
        # exact floor(log2 span): the float64 log2 can round up just below a power of
        # two, so correct it against exact powers (frexp would do, but inductor's CPU
        # code generation mis-compiles its integer exponent)
        s = span.double().clamp(min=1.0)
        e = torch.floor(torch.log2(s))
        e = e - (torch.exp2(e) > s).double() + (torch.exp2(e + 1.0) <= s).double()
        sb = e.long().clamp(0, c.n_span_buckets - 1)
        db = torch.floor(2.0 * torch.log2(distance.double().clamp(min=0.0) + 1.0)).long()
        db = db.clamp(0, c.n_distance_buckets - 1)
        return lv, sb, db

    def _head(self) -> tuple[torch.Tensor, ...]:
        """The head with its LayerNorm affine folded in: ``w1 [dl, Hh], b1, w2 [Hh], b2 [1]``."""
        fc1 = self.head_fc1
        w1 = (self.head_norm.weight[:, None] * fc1.weight.t()).contiguous()
        b1 = fc1.bias + fc1.weight @ self.head_norm.bias
        return w1, b1, self.head_fc2.weight.reshape(-1), self.head_fc2.bias

    # forward -------------------------------------------------------------------------

    def forward(
        self,
        entries: torch.Tensor,
        tail: torch.Tensor,
        levels: torch.Tensor,
        span: torch.Tensor,
        distance: torch.Tensor,
        mask: torch.Tensor | None = None,
        relevance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores ``[B, N]`` in ``[-1, 1]`` (in the parameters' dtype).

        ``entries [B, N, d]``: the working context's embeddings (tokens and gists);
        ``tail [B, 6, d]``: the root gist and the 5 newest LOD1 gists; ``levels``,
        ``span`` (tokens covered), ``distance`` (tokens from the entry to the decode
        cursor): integer ``[B, N]``; ``mask [B, N]`` bool, True for real entries
        (False = padding, hidden from stage 1; padded entries still get a score);
        ``relevance [B, N]`` float, required exactly when ``relevance_buckets > 0``: each
        entry's lexical z-score (:func:`megacontext.lexical_scorer.entry_relevance`).
        """
        require_materialised(self, "LensNet.forward")
        self._check(entries, tail, levels, span, distance, mask, relevance)
        x = self.embed(entries, levels, span, distance, relevance)
        if self.config.causal:
            return self._forward_causal(x, mask)
        t = self.proj(tail.to(x.dtype)) + self.tail_emb
        eps = self.config.norm_eps
        for block in self.blocks[:-1]:
            t = block.stage1(t, F.layer_norm(x, x.shape[-1:], eps=eps), mask)
            x = block.stage2(x, t, None)
        last = self.blocks[-1]
        t = last.stage1(t, F.layer_norm(x, x.shape[-1:], eps=eps), mask)
        return last.stage2(x, t, self._head())

    def _forward_causal(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, N, dl = x.shape
        C = self.config.causal_chunk
        S = -(-N // C)
        pad = S * C - N
        visible = mask if mask is not None else torch.ones(B, N, dtype=torch.bool, device=x.device)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            visible = F.pad(visible, (0, pad), value=False)
        T = self.config.tail_size
        t = self.tail_emb.expand(B, T, dl)  # the same learned start for every chunk
        eps = self.config.norm_eps
        scores = x.new_empty(0)
        for i, block in enumerate(self.blocks):
            xn = F.layer_norm(x, (dl,), eps=eps)
            if i == 0:  # queries shared by every chunk: one pass plus a prefix merge
                o, empty = _prefix_attention_shared(block.fold_queries(t), xn, visible, C)
                t = block.update_tail(t.unsqueeze(1).expand(B, S, T, dl), o, empty)
            else:  # each chunk has its own tail state [B, S, T, dl]
                o, empty = _prefix_attention_per_chunk(block.fold_queries(t), xn, visible, C)
                t = block.update_tail(t, o, empty)
            xs, ts = x.reshape(B * S, C, dl), t.reshape(B * S, T, dl)
            if i < len(self.blocks) - 1:
                x = block.stage2(xs, ts, None).reshape(B, S * C, dl)
            else:
                scores = block.stage2(xs, ts, self._head()).reshape(B, S * C)[:, :N]
        return scores

    # persistence ---------------------------------------------------------------------

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write weights and config to one safetensors file, atomically (temp + rename)."""
        require_materialised(self, "LensNet.save")
        return save_weights(self, path, _FORMAT, _FORMAT_VERSION, self.config.model_dump_json())

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> LensNet:
        """Read a file written by :meth:`save`. Raises StorageError naming the path."""
        model = load_weights(
            path, _FORMAT, _FORMAT_VERSION, "LensNet", lambda c: cls(config=LensNetConfig(**c))
        )
        if device is not None and torch.device(device).type == "meta":
            raise ConfigError(
                f"LensNet.load: device='meta' would drop the weights just read from {path}",
                field="device",
                value="meta",
            )
        return model.to(device=device, dtype=dtype)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dim={c.dim}, d_lens={c.d_lens}, heads={c.heads}, n_blocks={c.n_blocks}, "
            f"tail_size={c.tail_size}, relevance_buckets={c.relevance_buckets}, causal={c.causal}"
        )


# ----------------------------------------------------------------------------------------
# causal stage 1: prefix attention over whole chunks


def _prefix_attention_shared(
    q: torch.Tensor, xn: torch.Tensor, visible: torch.Tensor, C: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-prefix attention with the same queries for every chunk.

    ``q [B, M, D]``, ``xn [B, S*C, D]``, ``visible [B, S*C]``. For chunk ``k`` the rows
    attend over entries ``[0, k*C)``: returns ``o [B, S, M, D]`` (``sum_i p_i xn_i``)
    and ``empty [B, S, M]``. Per-chunk online-softmax partials (max, sum of exps,
    weighted sum) are merged by an exclusive prefix over chunks, each chunk rescaled
    to the running max ``exp(m_s - max_{s' < k} m_s') <= 1``: O(N M D + S^2 M D).
    """
    B, M, D = q.shape
    S = xn.shape[1] // C
    s = torch.einsum("bmd,bnd->bmn", q.float(), xn.float())
    s = s.masked_fill(~visible.unsqueeze(1), float("-inf")).view(B, M, S, C)
    m_s = s.amax(dim=-1)  # [B, M, S]; -inf for chunks with nothing visible
    e = torch.exp(s - m_s.masked_fill(torch.isneginf(m_s), 0.0).unsqueeze(-1))
    l_s = e.sum(dim=-1)
    acc_s = torch.einsum("bmsc,bscd->bmsd", e, xn.float().view(B, S, C, D))
    run = torch.cummax(m_s, dim=-1).values
    prev = torch.cat([torch.full_like(run[..., :1], float("-inf")), run[..., :-1]], dim=-1)
    earlier = torch.ones(S, S, dtype=torch.bool, device=q.device).tril(-1)  # [k, s]: s < k
    arg = m_s.unsqueeze(-2) - prev.masked_fill(torch.isneginf(prev), 0.0).unsqueeze(-1)
    w = torch.exp(arg.masked_fill(~earlier, float("-inf")))  # [B, M, k, s]
    l_p = torch.einsum("bmks,bms->bmk", w, l_s)
    acc_p = torch.einsum("bmks,bmsd->bmkd", w, acc_s)
    empty = l_p <= 0.0
    o = acc_p / l_p.masked_fill(empty, 1.0).unsqueeze(-1)
    return o.transpose(1, 2).to(q.dtype), empty.transpose(1, 2)


def _prefix_attention_per_chunk(
    q: torch.Tensor, xn: torch.Tensor, visible: torch.Tensor, C: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-prefix attention with per-chunk queries ``q [B, S, M, D]`` (blocks after the first).

    Chunk ``k``'s queries attend over entries ``[0, k*C)`` through :func:`lens_stage1`
    (the Triton kernel on CUDA): O(N * S * M * D) in all. Returns like
    :func:`_prefix_attention_shared`.
    """
    B, S, M, D = q.shape
    outs = [q.new_zeros(B, M, D)]
    empties = [torch.ones(B, M, dtype=torch.bool, device=q.device)]
    for k in range(1, S):
        o, lse = lens_stage1(q[:, k], xn[:, : k * C], visible[:, : k * C])
        outs.append(o)
        empties.append(torch.isneginf(lse))
    return torch.stack(outs, dim=1), torch.stack(empties, dim=1)


def _shape(t: object) -> object:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


# ----------------------------------------------------------------------------------------
# cost table (docs/lensnet.md is generated from this: megacontext costs lensnet)


def cost_table(dims: tuple[int, ...] = (576, 2048), n_entries: int = 8192) -> str:
    """Markdown table of parameters and forward FLOPs per call at the default config."""
    rows = [
        f"| d | n_blocks | parameters | proj | stage 1 | stage 2 | tail side | head | "
        f"total FLOPs (N = {n_entries:,}, B = 1) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in dims:
        for n_blocks in (1, 2, 3):
            cfg = LensNetConfig(dim=d, n_blocks=n_blocks)
            f = cfg.flops(n_entries)
            g = {k: f"{v / 1e9:,.3f} G" for k, v in f.items()}
            rows.append(
                f"| {d} | {n_blocks} | {cfg.num_parameters():,} | {g['proj']} | {g['stage1']} | "
                f"{g['stage2']} | {g['tail']} | {g['head']} | {g['total']} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    print(cost_table())
