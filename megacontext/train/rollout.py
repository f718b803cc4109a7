"""On-policy rollouts: the WCs that LensNet + the focus allocator actually produce.

:func:`rollout` runs the runtime's focus loop (:class:`megacontext.focus.FocusLoop`,
the same object a :class:`~megacontext.runtime.Session` drives) without the KV cache
(which does not change any focus decision): the first ``history`` tokens of a window
are ingested (tree appended, recency WC, ``refocus_iterations`` refocuses when
there is a LensNet, as :meth:`Session.ingest` does), then each following block of ``K`` tokens is appended
and refocused (:meth:`FocusLoop.refocus`). After
every block boundary a :class:`Snapshot` records the WC, the cursor, the next ``H``
target tokens and the gists this block's actions inserted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import MegaContextConfig
from ..errors import InputError
from ..focus import FocusLoop, refocus_after_ingest
from ..tree import MegaContextTree
from ..working_context import WorkingContext

__all__ = ["Snapshot", "region_snapshot", "rollout", "snapshot_wc"]


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
    loop = FocusLoop(base, gistnet, lensnet, cfg, allocator_backend=allocator_backend)
    loop.ingest(window[:history])
    if loop.scoring:
        # as Session.ingest, but unchecked (no verify): the snapshots are the scorer's
        # own focus, which training studies; a veto would leave only recency ones
        refocus_after_ingest(cfg, lambda: loop.refocus().actions)
    snaps: list[Snapshot] = []
    t = history
    for b in range(blocks):
        loop.append(window[t : t + bs])
        t += bs
        res = loop.refocus()
        wc = loop.wc
        assert wc is not None
        actions = res.actions
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
                forced=res.forced,
                actions=[
                    {**a._asdict(), "residency": r}
                    for a, r in zip(actions, res.residencies, strict=True)
                ],
            )
        )
    return loop.tree, snaps


def region_snapshot(
    window: torch.Tensor,
    cfg: MegaContextConfig,
    region: Any,
    horizon: int,
    generator: torch.Generator,
    doc: int = 0,
) -> Snapshot:
    """A snapshot whose WC reads one aligned region of the history as gists.

    ``window`` int64 ``[T + horizon]`` with ``T`` a multiple of the block size ``bs``;
    ``region`` a :class:`~megacontext.train.config.RegionConfig`. The WC tiles ``[0, T)``:
    tokens ``[0, a)``, the region ``[a, b)`` as LOD1 gists (``(b - a) / bs`` of them) or
    as one LOD2 gist (``b - a = bs^2``, with probability ``region.lod2_fraction``),
    tokens ``[b, T)``; the targets are ``window[T : T + horizon]``. Deterministic in
    ``generator``.
    """
    bs = cfg.block_size
    window = torch.as_tensor(window).to(torch.int64).cpu()
    T = window.numel() - horizon
    if T % bs or bs > T or horizon < 1:
        raise InputError(
            f"region_snapshot: a window of {window.numel()} tokens with horizon {horizon} "
            f"leaves a history of {T}, not a positive multiple of the block size {bs}"
        )
    n_blocks = T // bs
    lo, hi = region.suffix_blocks

    def uniform(a: int, b: int) -> int:  # inclusive
        return a + int(torch.randint(b - a + 1, (1,), generator=generator))

    lod2 = float(torch.rand((), generator=generator)) < region.lod2_fraction
    if lod2 and cfg.levels >= 2 and n_blocks >= bs + lo:
        node = (n_blocks - lo) // bs - 1  # the newest LOD2 node with >= lo blocks after it
        a, b = node * bs * bs, (node + 1) * bs * bs
        mid_levels, mid_nodes = torch.tensor([2]), torch.tensor([node])
    else:
        pre = uniform(0, max(min(region.prefix_blocks, n_blocks - lo - 1), 0))
        suf = uniform(lo, min(hi, n_blocks - pre - 1))
        a, b = pre * bs, T - suf * bs
        mid_nodes = torch.arange(a // bs, b // bs)
        mid_levels = torch.ones_like(mid_nodes)
    levels = torch.cat(
        [torch.zeros(a, dtype=torch.int64), mid_levels, torch.zeros(T - b, dtype=torch.int64)]
    )
    nodes = torch.cat([torch.arange(a), mid_nodes, torch.arange(b, T)])
    return Snapshot(
        doc=doc, step=0, cursor=T, levels=levels, nodes=nodes, targets=window[T:].clone()
    )
