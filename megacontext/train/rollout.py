"""On-policy rollouts: the WCs that LensNet + the focus allocator actually produce.

:func:`rollout` replays the runtime's loop without the KV cache (which does not
change any focus decision): the first ``history`` tokens of a window are ingested
(tree appended, recency WC, one refocus when there is a LensNet, as
:meth:`Session.ingest` does), then each following block of ``K`` tokens is appended
and refocused (LensNet scores, allocator step, a recency rebuild when hysteresis held
back every collapse of an over-budget WC, as :meth:`Session.refocus` does). After
every block boundary a :class:`Snapshot` records the WC, the cursor, the next ``H``
target tokens and the gists this block's actions inserted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..allocator import FocusAllocator
from ..config import MegaContextConfig
from ..errors import InputError
from ..tree import MegaContextTree
from ..working_context import WorkingContext

__all__ = ["Snapshot", "lens_inputs", "lens_scores", "rollout", "snapshot_wc"]

TAIL_GISTS = 6


@dataclass
class Snapshot:
    """One on-policy WC at a block boundary.

    ``levels``/``nodes``: the WC entries; ``cursor``: tokens in the history;
    ``targets``: int64 ``[H]`` (the tokens after the cursor); ``inserted``: the
    ``(level, node)`` gists the allocator created in this block (collapse parents);
    ``n_expand``/``n_collapse``: this block's actions by kind; ``actions``: their trace
    rows (``step, kind, level, node, score, cost_delta, residency`` as the runtime's
    telemetry); ``step``: block index within the window.
    """

    doc: int
    step: int
    cursor: int
    levels: torch.Tensor
    nodes: torch.Tensor
    targets: torch.Tensor
    inserted: list[tuple[int, int]] = field(default_factory=list)
    n_expand: int = 0
    n_collapse: int = 0
    forced: bool = False
    actions: list[dict[str, Any]] = field(default_factory=list)


def snapshot_wc(snap: Snapshot, cfg: MegaContextConfig) -> WorkingContext:
    return WorkingContext(
        snap.levels,
        snap.nodes,
        block_size=cfg.block_size,
        max_level=cfg.levels,
        w_max=cfg.w_max,
        recent_tokens=cfg.protected_tokens,
        num_tokens=snap.cursor,
    )


def _tail(base: Any, tree: MegaContextTree, cursor: int, levels: int) -> torch.Tensor:
    """``[6, d]``: the newest top-level gist then the 5 newest LOD1 gists of the first
    ``cursor`` tokens (zeros where missing), as :meth:`Session._tail`."""
    bs = tree.block_size
    tail = torch.zeros(TAIL_GISTS, base.dim, dtype=base.dtype, device=base.device)
    for level in range(levels, 0, -1):
        n = cursor // bs**level
        if n:
            tail[0] = tree.gists(level)[n - 1].to(device=base.device, dtype=tail.dtype)
            break
    n1 = cursor // bs
    k = min(TAIL_GISTS - 1, n1)
    if k:
        tail[TAIL_GISTS - k :] = tree.gists(1)[n1 - k : n1].to(device=base.device, dtype=tail.dtype)
    return tail


def lens_inputs(
    base: Any, tree: MegaContextTree, wc: WorkingContext, levels: int
) -> tuple[torch.Tensor, ...]:
    """LensNet's inputs for ``wc`` (batch of one): ``entries [1, N, d]``, ``tail [1, 6, d]``,
    ``levels``, ``span``, ``distance`` ``[1, N]`` (as :meth:`Session.scores`)."""
    entries = wc.embeddings(base, tree)
    spans = wc.spans.cpu()
    ends = wc.starts.cpu() + spans
    distance = (wc.num_tokens - ends).clamp(min=0)
    tail = _tail(base, tree, wc.num_tokens, levels)
    return (
        entries[None],
        tail[None],
        wc.levels.cpu().to(torch.long)[None],
        spans[None],
        distance[None],
    )


def lens_scores(lensnet: Any, base: Any, tree: MegaContextTree, wc: WorkingContext, levels: int):
    """float32 ``[N]`` scores (zeros without a LensNet), no gradient."""
    if lensnet is None:
        return torch.zeros(len(wc), dtype=torch.float32)
    p = next(lensnet.parameters())
    entries, tail, lv, sp, dist = lens_inputs(base, tree, wc, levels)
    with torch.no_grad():
        out = lensnet(
            entries.to(device=p.device, dtype=p.dtype),
            tail.to(device=p.device, dtype=p.dtype),
            lv.to(p.device),
            sp.to(p.device),
            dist.to(p.device),
        )
    return out[0].float().cpu()


@torch.no_grad()
def rollout(
    base: Any,
    gistnet: Any,
    lensnet: Any,
    cfg: MegaContextConfig,
    window: torch.Tensor,
    history: int,
    blocks: int,
    horizon: int,
    doc: int = 0,
    allocator_backend: str = "python",
) -> tuple[MegaContextTree, list[Snapshot]]:
    """Run the focus loop over ``window`` (int64 ``[>= history + blocks*K + horizon]``).

    Returns the tree (gisted with ``gistnet``; ``None`` = mean pooling) and one
    :class:`Snapshot` per block boundary after the history.
    """
    bs = cfg.block_size
    window = torch.as_tensor(window).to(torch.int64).cpu()
    need = history + blocks * bs + horizon
    if window.numel() < need or history < 1 or blocks < 1 or history % bs:
        raise InputError(
            f"rollout: window of {window.numel()} tokens; need history ({history}) + "
            f"blocks ({blocks}) x {bs} + horizon ({horizon}) = {need}, history and blocks >= 1, history a multiple of the block size"
        )
    tree = MegaContextTree(
        base.dim,
        block_size=bs,
        levels=cfg.levels,
        dtype=torch.bfloat16 if base.dtype == torch.bfloat16 else torch.float16,
        model_name=getattr(base, "name", ""),
    )

    def embed(ids: torch.Tensor) -> torch.Tensor:
        return base.embed(ids.cpu())

    gist = gistnet
    tree.append(window[:history], embed, gist)
    wc = WorkingContext.from_tree(tree, cfg.w_max, cfg.protected_tokens)
    allocator = FocusAllocator(cfg, backend=allocator_backend)

    def refocus() -> tuple[list, bool]:
        nonlocal wc
        scores = lens_scores(lensnet, base, tree, wc, cfg.levels)
        step = allocator.step_count
        before = {lv: allocator.last_changed(lv).clone() for lv in range(1, cfg.levels + 1)}
        actions = allocator.step(wc, scores)
        for a in actions:
            # steps the node spent at its previous LOD (as Session.refocus reports it)
            states = before.get(a.level)
            last = int(states[a.node]) if states is not None and a.node < len(states) else -1
            trace.append({**a._asdict(), "residency": step - max(last, 0)})
        forced = False
        if wc.cost > cfg.w_max:
            forced = True
            wc = WorkingContext.from_tree(tree, cfg.w_max, cfg.protected_tokens)
        return actions, forced

    trace: list[dict[str, Any]] = []
    if lensnet is not None:
        refocus()
    snaps: list[Snapshot] = []
    t = history
    for b in range(blocks):
        tree.append(window[t : t + bs], embed, gist)
        t += bs
        wc.extend(t)
        trace.clear()
        actions, forced = refocus()
        wc.check(tree)
        snaps.append(
            Snapshot(
                doc=doc,
                step=b,
                cursor=t,
                levels=wc.levels.clone(),
                nodes=wc.nodes.clone(),
                targets=window[t : t + horizon].clone(),
                inserted=[(a.level, a.node) for a in actions if a.kind == "collapse"],
                n_expand=sum(a.kind == "expand" for a in actions),
                n_collapse=sum(a.kind == "collapse" for a in actions),
                forced=forced,
                actions=list(trace),
            )
        )
    return tree, snaps
