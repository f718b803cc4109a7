"""How far back should the far memory sit? The probe behind ``far_gap``.

On **training-split** text only (the ``train`` split of the shard directory that
``megacontext ingest`` made of the standard library: tag ``code`` or ``doc``), the 64
tokens ending at a target are scored after ``T`` tokens of history at ``W = 1,024``:
truncation, StreamingLLM, and the recency working context of the shipped memory's
config (three levels, the attention sink, ``nearby`` positions) read with its GistNet
and with mean pooling, the far memory (the gists) pushed back by at most ``g``
positions (``MegaContextConfig.far_gap``; the largest ``g`` is what the position bound
allows, the default). Two more rows read no gists at all: the sink and the WC's recent
tokens, numbered right after the sink (``nogist near``) or where the default puts them
(``nogist far``). Held-out text is never read here: ``bench/positions_long_history.py
--texts heldout --far-gap G`` and ``bench/needle_bar.py --set far_gap=G`` measure a
choice.

Targets: ``23,333 + 37,003·k + 11,111·(T // 16,384) + T`` tokens into the split's
documents concatenated in id order, ``k < --targets``. Rows go to ``OUT/rows.json`` as
they finish and ``OUT/results.md`` is rewritten (means minus truncation). Run (one
thread)::

    OMP_NUM_THREADS=1 uv run python bench/far_gap_probe.py --tag code \\
        --out docs/results/2026-12-04-train-probe/far-gap-code
"""

from __future__ import annotations

import torch
from sink_levels_probe import MEMORY, probe_parser, run_probe  # bench/, beside this script

import megacontext as mc
from megacontext.eval.peers import View, view_nll
from megacontext.focus import FocusLoop, position_gap
from megacontext.working_context import WorkingContext, entry_positions, with_sink


def recency_wc(base, gistnet, hist: torch.Tensor, cfg) -> tuple[WorkingContext, torch.Tensor]:
    """The recency WC of ``cfg`` over ``hist`` and its embeddings ``[N, d]``."""
    loop = FocusLoop(base, gistnet, None, cfg)
    loop.ingest(hist)
    wc = WorkingContext.from_tree(loop.tree, cfg.w_max, cfg.protected_tokens)
    return wc, wc.embeddings(base, loop.tree)


def gist_nll(base, wc, emb, targets, gap: int) -> float:
    pos, nxt = entry_positions(wc.levels, wc.nodes, wc.block_size, "nearby", max_gap=gap)
    e, p = with_sink(base, emb, pos, wc.levels, True)
    return float(view_nll(base, View("mc", e, p, nxt), targets).mean())


def tokens_only_nll(base, wc, emb, targets, first: int) -> float:
    """The sink, then the WC's LOD0 entries at ``first, first + 1, ...``."""
    tok = wc.levels == 0
    n = int(tok.sum())
    sink = base.embed(torch.tensor([base.sink_token_id])).to(emb.dtype)
    e = torch.cat([sink, emb[tok]])
    p = torch.cat([torch.zeros(1, dtype=torch.int64), torch.arange(n) + first])
    return float(view_nll(base, View("tokens", e, p, first + n), targets).mean())


def far_target(T: int) -> int:
    """Where the first target of length ``T`` ends in the split (see the docstring)."""
    return 23_333 + 11_111 * (T // 16384) + T


def main() -> None:
    ap = probe_parser(__doc__, [16384, 32768, 131072])
    ap.add_argument(
        "--gaps",
        type=int,
        nargs="*",
        default=[0, 512, 1024, 2048],
        help="far gaps besides the default (none: '--gaps' alone)",
    )
    ap.add_argument(
        "--gistnet",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="another GistNet to read at the default gap (repeatable): row 'NAME, far_gap "
        "default', e.g. a training run's checkpoint before it is exported",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    base = mc.load_base("smollm2-135m")
    shipped = mc.GistNet.load(MEMORY / "gistnet.safetensors")
    others = [(n, mc.GistNet.load(p)) for n, _, p in (g.partition("=") for g in args.gistnet)]
    cfg = mc.MegaContextConfig(model=base.name, w_max=args.w, levels=3)
    widest = position_gap(cfg, base)
    gaps = sorted({*args.gaps, widest})

    def method_rows(hist: torch.Tensor, targets: torch.Tensor) -> dict:
        wc, shipped_emb = recency_wc(base, shipped, hist, cfg)
        _, mean_emb = recency_wc(base, None, hist, cfg)
        row: dict = {}
        for g in gaps:
            label = "default" if g == widest else str(g)
            row[f"shipped, far_gap {label}"] = gist_nll(base, wc, shipped_emb, targets, g)
            row[f"mean pooling, far_gap {label}"] = gist_nll(base, wc, mean_emb, targets, g)
        for name, gistnet in others:
            other_wc, emb = recency_wc(base, gistnet, hist, cfg)
            row[f"{name}, far_gap default"] = gist_nll(base, other_wc, emb, targets, widest)
        n_g = int((wc.levels != 0).sum())
        row["nogist near"] = tokens_only_nll(base, wc, shipped_emb, targets, 1)
        row["nogist far"] = tokens_only_nll(base, wc, shipped_emb, targets, n_g + widest)
        row["per_level"] = torch.bincount(wc.levels.long(), minlength=4).tolist()
        return row

    title = (
        f"# Training-split far-gap probe ({args.tag}, W = {args.w:,}): next-64-token NLL "
        "minus truncation"
    )
    run_probe(
        args,
        base,
        far_target,
        method_rows,
        title,
        "far_gap_probe.py",
        lambda rows: [
            "",
            f"- far_gap default (what the bound allows at W = {args.w:,}): {widest:,}",
        ],
    )


if __name__ == "__main__":
    main()
