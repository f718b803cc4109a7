"""The losses of the warm start and of phases B1 (GistNet), B2 (LensNet), B3 (LoRA).

Each function takes one on-policy :class:`~megacontext.train.rollout.Snapshot` (its
tree, the window's tokens) and returns ``(loss, stats)``; the trainer averages them
over a microbatch. Shapes: ``H`` targets, ``N`` WC entries, ``V`` vocabulary.

- :func:`gist_loss` (warm start and B1): the snapshot's gists computed on the fly by
  GistNet (all gist entries, or only those the allocator inserted in this block) and
  ``kl``: ``mean_t w_t KL(p_full,t || p_wc,t)`` or ``dnll``: ``mean_t w_t (NLL_wc,t -
  NLL_full,t)``; ``w_t = 1 + boundary_weight`` for targets within ``boundary_tokens`` of
  a block edge, else 1 (normalised by ``sum w``); plus ``stability_weight *
  mean_i ||g_i - g_i^prev||^2 / d`` against the previous checkpoint's GistNet.
- :func:`lens_loss` (warm start and B2): LensNet's scores ``s [N]`` against the per-entry
  utilities ``u`` (:func:`~megacontext.train.labels.entry_targets`): regression
  ``mean (s - u)^2`` over labelled entries; ranking ``mean softplus(-(s_i - s_j))``
  over labelled pairs with ``u_i - u_j > margin``; zero-sum budget
  ``(sum_i c_i s_i / sum_i c_i)^2`` with ``c_i = bs - 1`` for an expandable gist and
  ``(bs - 1) / bs`` for a member of a collapsible group (the token cost its action
  moves); legality ``mean s_i^2`` over entries no action can touch (the protected
  tail, tokens outside any complete group): the allocator masks them at run time
  anyway, the penalty keeps them out of the budget term.
- :func:`lora_loss` (B3): task ``NLL@H`` through the discrete WC (gists read from the
  tree, tokens through the adapted embedding) plus ``keepalive_weight * KL(p_full ||
  p_wc)`` with both under the adapted base (weak substitutability keep-alive).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..config import MegaContextConfig
from ..focus import lens_scores
from .config import GistLossConfig, LensLossConfig
from .forward import (
    forward_rows,
    full_context_logp,
    kl_per_position,
    wc_embeddings,
    wc_row,
)
from .labels import candidates, entry_targets
from .rollout import Snapshot, snapshot_wc

__all__ = ["boundary_weights", "gist_loss", "lens_loss", "lora_loss"]


def boundary_weights(cursor: int, horizon: int, bs: int, weight: float, width: int) -> torch.Tensor:
    """``[H]`` target weights: ``1 + weight`` within ``width`` tokens of a block edge."""
    off = (torch.arange(cursor, cursor + horizon) % bs).float()
    edge = (off < width) | (off >= bs - width)
    return 1.0 + weight * edge.float()


def _nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -logp.gather(-1, targets.to(logp.device)[:, None])[:, 0]


def gist_loss(
    base: Any,
    gistnet: Any,
    tree: Any,
    tokens: torch.Tensor,
    snap: Snapshot,
    cfg: MegaContextConfig,
    lc: GistLossConfig,
    prev_gistnet: Any = None,
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Substitutability loss of one snapshot (``None`` when it has no gist to train)."""
    bs = cfg.block_size
    levels = snap.levels.cpu().to(torch.int64)
    nodes = snap.nodes.cpu().to(torch.int64)
    if lc.spans == "inserted":
        ins = set(snap.inserted)
        online = torch.tensor(
            [(int(a), int(b)) in ins for a, b in zip(levels, nodes, strict=True)],
            dtype=torch.bool,
        )
    else:
        online = levels > 0
    if not bool(online.any()):
        return None, {}
    emb = wc_embeddings(
        base, tokens, levels, nodes, bs, gists=gistnet, tree=tree, online_mask=online
    )
    row, start = wc_row(base, emb, levels, nodes, cfg)
    H = snap.targets.numel()
    logp = forward_rows(base, [row], [snap.targets], [start])[0]
    ref = full_context_logp(base, tokens, snap.cursor, H)
    if lc.loss == "kl":
        term = kl_per_position(ref, logp)
    else:
        term = _nll(logp, snap.targets) - _nll(ref, snap.targets)
    w = boundary_weights(snap.cursor, H, bs, lc.boundary_weight, lc.boundary_tokens).to(term.device)
    loss = (w * term).sum() / w.sum()
    stats = {"subst": float(loss.detach())}
    if prev_gistnet is not None and lc.stability_weight > 0:
        with torch.no_grad():
            old = wc_embeddings(
                base, tokens, levels, nodes, bs, gists=prev_gistnet, tree=tree, online_mask=online
            )
        idx = torch.nonzero(online).squeeze(1).to(emb.device)
        diff = (emb.index_select(0, idx).float() - old.index_select(0, idx).float()).pow(2)
        stab = diff.sum(-1).mean() / emb.shape[-1]
        loss = loss + lc.stability_weight * stab
        stats["stability"] = float(stab.detach())
    return loss, stats


def lens_loss(
    base: Any,
    lensnet: Any,
    tree: Any,
    snap: Snapshot,
    rows: Sequence[dict[str, Any]],
    cfg: MegaContextConfig,
    lc: LensLossConfig,
    margin: float | None = None,
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """LensNet's loss on one labelled snapshot (``None`` without labels). One LensNet
    call: the snapshot is one block boundary (update-every-K cadence)."""
    if not rows:
        return None, {}
    bs = cfg.block_size
    wc = snapshot_wc(snap, cfg)
    # a retrieval LensNet's query is the newest tokens at the snapshot
    s = lens_scores(lensnet, base, tree, wc, cfg, query_end=snap.cursor)[0]
    n = s.shape[0]
    u, lab = entry_targets(rows, n)
    u, lab = u.to(s.device), lab.to(s.device)
    reg = ((s - u)[lab]).pow(2).mean()
    idx = torch.nonzero(lab).squeeze(1)
    su, uu = s[idx], u[idx]
    m = lc.ranking_margin if margin is None else margin
    better = (uu[:, None] - uu[None, :]) > m
    rank = (
        F.softplus(-(su[:, None] - su[None, :]))[better].mean()
        if bool(better.any())
        else s.new_zeros(())
    )
    cost = torch.zeros(n, device=s.device)
    for c in candidates(snap.levels, snap.nodes, snap.cursor, cfg):
        if c.kind == "expand":
            cost[c.entry] = cost[c.entry] + (bs - 1)
        else:
            cost[c.entry : c.entry + bs] = cost[c.entry : c.entry + bs] + (bs - 1) / bs
    budget = ((cost * s).sum() / cost.sum().clamp(min=1e-6)).pow(2)
    illegal = cost == 0
    legality = s[illegal].pow(2).mean() if bool(illegal.any()) else s.new_zeros(())
    loss = (
        lc.regression_weight * reg
        + lc.ranking_weight * rank
        + lc.budget_weight * budget
        + lc.legality_weight * legality
    )
    return loss, {
        "regression": float(reg.detach()),
        "ranking": float(rank.detach()),
        "budget": float(budget.detach()),
        "legality": float(legality.detach()),
    }


def lora_loss(
    base: Any,
    tree: Any,
    tokens: torch.Tensor,
    snap: Snapshot,
    cfg: MegaContextConfig,
    keepalive_weight: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """B3's loss on one snapshot: task NLL@H through the discrete WC + keep-alive."""
    bs = cfg.block_size
    emb = wc_embeddings(base, tokens, snap.levels, snap.nodes, bs, gists="tree", tree=tree)
    row, start = wc_row(base, emb, snap.levels, snap.nodes, cfg)
    logp = forward_rows(base, [row], [snap.targets], [start])[0]
    task = _nll(logp, snap.targets).mean()
    loss = task
    stats = {"task_nll": float(task.detach())}
    if keepalive_weight > 0:
        ref = full_context_logp(base, tokens, snap.cursor, snap.targets.numel())
        keep = kl_per_position(ref, logp).mean()
        loss = loss + keepalive_weight * keep
        stats["keepalive"] = float(keep.detach())
    return loss, stats
