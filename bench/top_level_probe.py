"""What should the top level of a long history be? A training-split probe.

The shipped memory's GistNet makes levels 1-2; with ``levels: 3`` the runtime
mean-pools level 3 from its level-2 gists (``FocusLoop``). Histories past 32k tokens
put LOD3 gists in the recency working context at W = 1,024 (128k: 960 tokens, 2 LOD1,
31 LOD2, 3 LOD3), and the far-reading runs never saw one (7,936-token histories). On
**training-split** text only (the ``train`` split of ``artifacts/data/stdlib``, tag
``code`` or ``doc``), the 64 tokens ending at a target are scored after ``T`` tokens of
history by truncation, StreamingLLM and the recency WC of the shipped config (three
levels, the sink, ``nearby`` positions, the default gap) read four ways:

- ``mean LOD3``: as the runtime does now;
- ``no LOD3``: the same WC with its LOD3 entries left out (every other entry keeps
  its position);
- ``gistnet LOD3``: level 3 made by the GistNet, its level-2 embedding reused for
  level 3 (its weights are shared across levels);
- ``two levels``: ``levels: 2`` (no LOD3; the recency WC then holds what fits).

Held-out text is never read here. Targets as in ``bench/far_gap_probe.py``; rows to
``OUT/rows.json``, the table (minus truncation) to ``OUT/results.md``. Run (one
thread)::

    OMP_NUM_THREADS=1 uv run python bench/top_level_probe.py --tag code \\
        --out docs/results/2026-12-04-train-probe/top-level-code
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from far_gap_probe import far_target, recency_wc  # bench/, beside this script
from sink_levels_probe import MEMORY, per_level_notes, probe_parser, run_probe

import megacontext as mc
from megacontext.eval.peers import View, view_nll
from megacontext.focus import position_gap
from megacontext.working_context import entry_positions, with_sink


def top_level_gistnet(gistnet: mc.GistNet, levels: int) -> mc.GistNet:
    """``gistnet`` (shared weights across levels) serving ``levels`` levels: the levels
    it was not trained on reuse its top level's embedding."""
    cfg = gistnet.config
    if not cfg.shared_levels:
        raise SystemExit("top_level_gistnet: needs a GistNet with shared_levels=True")
    wider = mc.GistNet(config=cfg.model_copy(update={"levels": levels}))
    state = gistnet.state_dict()
    emb = state.pop("level_embed", None)
    wider.load_state_dict(state, strict=False)
    with torch.no_grad():
        if emb is not None:
            wider.level_embed[: emb.shape[0]] = emb
            wider.level_embed[emb.shape[0] :] = emb[-1]
    return wider.eval()


def view_nll_of(base, wc, emb, targets, gap: int, keep: torch.Tensor | None = None) -> float:
    pos, nxt = entry_positions(wc.levels, wc.nodes, wc.block_size, "nearby", max_gap=gap)
    levels = wc.levels
    if keep is not None:
        emb, pos, levels = emb[keep], pos[keep], levels[keep]
    e, p = with_sink(base, emb, pos, levels, True)
    return float(view_nll(base, View("mc", e, p, nxt), targets).mean())


def main() -> None:
    ap = probe_parser(__doc__, [32768, 131072])
    ap.add_argument("--gistnet", type=Path, default=MEMORY / "gistnet.safetensors")
    args = ap.parse_args()
    torch.manual_seed(0)
    base = mc.load_base("smollm2-135m")
    gistnet = mc.GistNet.load(args.gistnet)
    wider = top_level_gistnet(gistnet, 3)
    cfg3 = mc.MegaContextConfig(model=base.name, w_max=args.w, levels=3)
    cfg2 = mc.MegaContextConfig(model=base.name, w_max=args.w, levels=2)
    gap3, gap2 = position_gap(cfg3, base), position_gap(cfg2, base)

    def method_rows(hist: torch.Tensor, targets: torch.Tensor) -> dict:
        wc, emb = recency_wc(base, gistnet, hist, cfg3)
        row = {"mean LOD3": view_nll_of(base, wc, emb, targets, gap3)}
        row["no LOD3"] = view_nll_of(base, wc, emb, targets, gap3, keep=wc.levels != 3)
        wc_g, emb_g = recency_wc(base, wider, hist, cfg3)
        row["gistnet LOD3"] = view_nll_of(base, wc_g, emb_g, targets, gap3)
        wc2, emb2 = recency_wc(base, gistnet, hist, cfg2)
        row["two levels"] = view_nll_of(base, wc2, emb2, targets, gap2)
        row["per_level"] = torch.bincount(wc.levels.long(), minlength=4).tolist()
        return row

    title = (
        f"# Training-split top-level probe ({args.tag}, W = {args.w:,}, GistNet "
        f"{os.path.relpath(args.gistnet)}): next-64-token NLL minus truncation"
    )

    def notes(rows: list[dict]) -> list[str]:
        return per_level_notes(rows, "the three-level WC")

    run_probe(args, base, far_target, method_rows, title, "top_level_probe.py", notes)


if __name__ == "__main__":
    main()
