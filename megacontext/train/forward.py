"""Differentiable Loss@H of a working context (WC).

A WC is given by its entries ``(levels [N], nodes [N])`` over a history of token ids
``tokens [T]``. :func:`wc_embeddings` builds its input rows ``[N, d]``:

- LOD0 entry ``t``: the base model's embedding of ``tokens[t]`` (through any LoRA on
  the input embedding);
- LOD ``l >= 1`` entry ``b``: either read from a tree (``gists="tree"``, no gradient,
  what the runtime does) or computed *on the fly* from its children
  (``gists=gistnet``): ``g_1(b) = G_1(E[tokens[b·bs : (b+1)·bs]])`` and
  ``g_l(b) = G_l([g_{l-1}(b·bs + j)]_{j<bs})``, so gradients reach GistNet.

:func:`forward_rows` runs many WCs (rows) in one forward of the base model through
:func:`megacontext.nll.nll_after`: each row is ``entries ++ E[targets[:-1]]`` at the
entries' positions (:func:`wc_positions`, the runtime's scheme) followed by
``start, start+1, ...``, left-padded with an
explicit mask, so the last ``H`` positions of every row predict its ``H`` targets.

Loss@H (nats): ``nll`` = mean over the H targets of ``-log p(target)``; ``kl`` =
mean over the H positions of ``KL(p_full || p_wc)`` where ``p_full`` is the base
model reading the whole history (:func:`full_context_logp`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..nll import nll_after
from ..tree import mean_pool
from ..working_context import entry_positions, with_sink

__all__ = [
    "forward_rows",
    "full_context_logp",
    "gists_online",
    "kl_per_position",
    "wc_embeddings",
    "wc_positions",
    "wc_row",
]


def wc_positions(
    levels: torch.Tensor, nodes: torch.Tensor, config: Any, base: Any = None
) -> tuple[torch.Tensor, int]:
    """``(positions int64 [N], start)``: the RoPE positions of the entries and of the
    first target under ``config.positions`` — the runtime's positions
    (:meth:`megacontext.focus.FocusLoop.positions`, the same
    :func:`~megacontext.working_context.entry_positions` and ``max_gap`` from
    ``base``'s context), so training reads what inference reads. Under ``global``:
    a token its index, a gist the centre of its span, ``start`` the history length."""
    from ..focus import position_gap

    gap = position_gap(config, base)
    pos, start = entry_positions(
        levels.cpu(), nodes.cpu(), config.block_size, config.positions, max_gap=gap
    )
    return pos, start


def wc_row(
    base: Any, embeds: torch.Tensor, levels: torch.Tensor, nodes: torch.Tensor, config: Any
) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
    """``((embeds [S + N, d], positions [S + N]), start)``: one row of
    :func:`forward_rows` for the WC ``(levels, nodes)`` with input rows ``embeds [N, d]``,
    read as the runtime reads it: :func:`wc_positions`, behind the attention sink when
    ``config.attention_sink`` and the WC starts with a gist (``S = 1``,
    :func:`~megacontext.working_context.with_sink`)."""
    pos, start = wc_positions(levels, nodes, config, base)
    return with_sink(base, embeds, pos, levels, config.attention_sink, config.sink_at), start


def _gist_call(gistnet: Any, x: torch.Tensor, level: int) -> torch.Tensor:
    if gistnet is None:
        return mean_pool(x)
    p = next(gistnet.parameters(), None) if hasattr(gistnet, "parameters") else None
    if p is not None:
        x = x.to(device=p.device, dtype=p.dtype)
    at_level = getattr(gistnet, "at_level", None)
    return gistnet(x, level=level) if callable(at_level) else gistnet(x)


def gists_online(
    base: Any, gistnet: Any, tokens: torch.Tensor, level: int, nodes: torch.Tensor, block_size: int
) -> torch.Tensor:
    """``[n, d]``: the LOD ``level`` gists of ``nodes [n]`` computed from the tokens
    (recursively through every lower level) with ``gistnet`` (``None``: mean pooling)."""
    bs = block_size
    nodes = nodes.cpu().to(torch.int64)
    if level < 1:
        raise ConfigError(f"gists_online: level must be >= 1, got {level}", field="level")
    if nodes.numel() == 0:
        return torch.empty(0, base.dim, device=base.device, dtype=base.dtype)
    if level == 1:
        idx = nodes[:, None] * bs + torch.arange(bs)[None]  # [n, bs]
        x = base.embed(tokens[idx.flatten()].to(torch.int64)).reshape(len(nodes), bs, -1)
    else:
        children = (nodes[:, None] * bs + torch.arange(bs)[None]).flatten()
        x = gists_online(base, gistnet, tokens, level - 1, children, bs)
        x = x.reshape(len(nodes), bs, -1)
    return _gist_call(gistnet, x, level)


def wc_embeddings(
    base: Any,
    tokens: torch.Tensor,
    levels: torch.Tensor,
    nodes: torch.Tensor,
    block_size: int,
    gists: Any = "tree",
    tree: Any = None,
    online_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[N, d]`` input rows of the WC ``(levels, nodes)`` over ``tokens``.

    ``gists="tree"`` reads every gist from ``tree.gists(level)``; otherwise ``gists`` is
    a GistNet (or ``None`` for mean pooling) and gist entries are computed on the fly.
    ``online_mask [N]`` (bool) restricts the on-the-fly computation to those entries
    (the rest come from ``tree``).
    """
    levels = levels.cpu().to(torch.int64)
    nodes = nodes.cpu().to(torch.int64)
    tok_idx = torch.nonzero(levels == 0).squeeze(1)
    tok = base.embed(tokens[nodes[tok_idx]].to(torch.int64))
    out_dtype = tok.dtype
    parts = [(tok_idx, tok)]
    top = int(levels.max()) if levels.numel() else 0
    for level in range(1, top + 1):
        sel = levels == level
        if not bool(sel.any()):
            continue
        if isinstance(gists, str):
            if gists != "tree" or tree is None:
                raise ConfigError(
                    f"wc_embeddings: gists={gists!r} needs a tree", field="gists", value=gists
                )
            idx = torch.nonzero(sel).squeeze(1)
            parts.append((idx, tree.gists(level).index_select(0, nodes[idx]).to(tok.device)))
            continue
        if online_mask is not None:
            on = sel & online_mask.cpu()
            off = sel & ~online_mask.cpu()
            if bool(off.any()):
                if tree is None:
                    raise ConfigError("wc_embeddings: online_mask needs a tree", field="tree")
                idx = torch.nonzero(off).squeeze(1)
                parts.append((idx, tree.gists(level).index_select(0, nodes[idx]).to(tok.device)))
        else:
            on = sel
        idx = torch.nonzero(on).squeeze(1)
        if idx.numel():
            parts.append((idx, gists_online(base, gists, tokens, level, nodes[idx], block_size)))
    order = torch.cat([p[0] for p in parts])
    values = torch.cat([p[1].to(device=tok.device, dtype=out_dtype) for p in parts])
    # a differentiable scatter: invert the permutation instead of in-place writes
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel())
    return values.index_select(0, inv.to(values.device))


def forward_rows(
    base: Any,
    rows: Sequence[tuple[torch.Tensor, torch.Tensor]],
    targets: Sequence[torch.Tensor],
    cursors: Sequence[int],
) -> torch.Tensor:
    """Log-probabilities ``[R, H, V]`` (float32) of the next ``H`` tokens for each row.

    ``rows[r] = (embeds [N_r, d], positions [N_r])``; ``targets[r]`` int64 ``[H]`` (one
    H for all rows); ``cursors[r]`` the history length (the first target's position).
    One base forward for all rows: :func:`megacontext.nll.nll_after`.
    """
    H = int(targets[0].numel()) if targets else 0
    if not targets or any(int(t.numel()) != H for t in targets) or H < 1:
        raise ConfigError("forward_rows: every row needs the same H >= 1 targets", field="targets")
    return nll_after(base, rows, targets, cursors, log_probs=True)


def full_context_logp(base: Any, tokens: torch.Tensor, cursor: int, horizon: int) -> torch.Tensor:
    """``[H, V]`` log-probabilities of ``tokens[cursor : cursor+H]`` given the whole
    history ``tokens[:cursor]`` (the full-context model, no gradient)."""
    ids = tokens[: cursor + horizon - 1].to(torch.int64)
    with torch.no_grad():
        out = base.model(input_ids=ids[None].to(base.device), logits_to_keep=horizon)
    return out.logits[0].float().log_softmax(-1)


def kl_per_position(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``KL(p_ref || p)`` per position: ``[..., H, V] -> [..., H]`` (nats)."""
    return F.kl_div(logp, ref_logp, log_target=True, reduction="none").sum(-1)
