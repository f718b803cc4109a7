"""On-policy rollouts: the WCs that LensNet + the focus allocator actually produce.

:func:`rollout` runs the runtime's focus loop (:class:`megacontext.focus.FocusLoop`,
the same object a :class:`~megacontext.runtime.Session` drives) without the KV cache
(which does not change any focus decision): the first ``history`` tokens of a window
are ingested (tree appended, recency WC, one refocus when there is a LensNet, as
:meth:`Session.ingest` does), then each following block of ``K`` tokens is appended
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
from ..focus import FocusLoop
from ..tree import MegaContextTree
from ..working_context import WorkingContext

__all__ = ["Snapshot", "rollout", "snapshot_wc"]


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
    if lensnet is not None:
        loop.refocus()
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
