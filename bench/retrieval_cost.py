"""What a lexical retrieval costs long plain text: the holes it cuts, or what it opens.

On training-split text (``bench/lexical_share_probe.py``'s parts: ``code``, ``prose``,
``paper``), ``W = 1,024``, the shipped memory (its GistNet, three levels, the sink),
this reads the next 64 tokens after a ``T``-token history under working contexts
built from the recency WC ``R`` and the lexical scorer's WC ``L`` (its ingest
refocuses, the check off: what the scorer itself does):

- ``L``: the lexical WC; ``R``: the recency WC;
- ``holes``: ``R`` with the token blocks ``L`` collapsed to make room (its victims)
  collapsed to their LOD1 gists, nothing opened;
- ``holes+gists``: ``L`` with the far blocks it opened folded back to their LOD1 gists
  (the holes, and the sibling gists the expansions left);
- ``opened``: ``L`` with its victims reopened: the retrieval without its holes (over
  the budget, a diagnostic only);
- ``L@hybrid``, ``L@gapG``: ``L`` read under ``hybrid`` positions (the opened spans in
  WC order, far back) or under ``nearby`` with the opened spans ``G`` positions further
  from the recent window.

Rows go to ``OUT/rows.parquet``; ``OUT/results.md`` gives the mean minus ``R`` per
variant. Run (one thread)::

    OMP_NUM_THREADS=1 uv run python bench/retrieval_cost.py --part paper --length 32768 \\
        --targets 6 --out docs/results/<date>/retrieval-cost-paper32k
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import megacontext as mc
from megacontext.eval.peers import View, truncation_view, view_nll
from megacontext.focus import FocusLoop, refocus_after_ingest
from megacontext.working_context import WorkingContext, entry_positions, with_sink

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lexical_share_probe as lsp
import positions_long_history as plh

W, H = 1024, 64
GAPS = (32, 128, 512)


def _entries(wc: WorkingContext) -> list[tuple[int, int]]:
    return list(zip(wc.levels.tolist(), wc.nodes.tolist(), strict=True))


def _wc(ref: WorkingContext, entries: list[tuple[int, int]]) -> WorkingContext:
    """A WC of ``entries`` over ``ref``'s history, with no budget (a diagnostic may
    exceed ``w_max``)."""
    return WorkingContext(
        torch.tensor([e[0] for e in entries]),
        torch.tensor([e[1] for e in entries]),
        block_size=ref.block_size,
        max_level=ref.max_level,
        w_max=10**9,
        recent_tokens=ref.recent_tokens,
        num_tokens=ref.num_tokens,
    )


def token_blocks(wc: WorkingContext) -> set[int]:
    """The complete blocks ``wc`` reads as tokens."""
    bs, full = wc.block_size, (wc.num_tokens // wc.block_size) * wc.block_size
    return {n // bs for lv, n in _entries(wc) if lv == 0 and n < full}


def fold(entries: list[tuple[int, int]], blocks: set[int], bs: int) -> list[tuple[int, int]]:
    """``entries`` with the tokens of ``blocks`` replaced by their LOD1 gists."""
    out = []
    for lv, n in entries:
        if lv == 0 and n // bs in blocks:
            if n % bs == 0:
                out.append((1, n // bs))
        else:
            out.append((lv, n))
    return out


def unfold(entries: list[tuple[int, int]], blocks: set[int], bs: int) -> list[tuple[int, int]]:
    """``entries`` with the LOD1 gists of ``blocks`` replaced by their tokens."""
    out = []
    for lv, n in entries:
        if lv == 1 and n in blocks:
            out.extend((0, n * bs + j) for j in range(bs))
        else:
            out.append((lv, n))
    return out


def read(base, loop: FocusLoop, wc: WorkingContext, pos, nxt: int, targets) -> float:
    emb, p = with_sink(base, wc.embeddings(base, loop.tree), pos, wc.levels, plh.SINK)
    return float(view_nll(base, View("diag", emb, p, nxt, {}), targets).mean())


def one(base, gist, ids: torch.Tensor, e: int, T: int) -> dict:
    targets = ids[e - H : e]
    cfg = mc.MegaContextConfig(model=base.name, w_max=W, levels=3)
    ingest = FocusLoop(base, gist, None, cfg)
    ingest.ingest(ids[e - H - T : e - H])
    # the check off: the scorer's own choice
    update = {"lens": "lexical", "refocus_iterations": 8, "positions": "nearby", "verify_tokens": 0}
    lcfg = cfg.model_copy(update=update)
    lex = FocusLoop(base, gist, None, lcfg)
    lex.tree = ingest.tree
    lex.rebuild()
    R = lex.wc.clone()
    refocus_after_ingest(lcfg, lambda: lex.refocus().actions)
    L = lex.wc
    bs = L.block_size
    victims, opened = token_blocks(R) - token_blocks(L), token_blocks(L) - token_blocks(R)
    row = {"item": f"end{e}", "T": T, "victims": len(victims), "n_opened": len(opened)}
    trunc = truncation_view(base, ids[e - H - W : e - H], W)
    row["truncation"] = float(view_nll(base, trunc, targets).mean())
    gap = lex.max_gap
    wcs = {
        "R": R,
        "L": L,
        "holes": _wc(R, fold(_entries(R), victims, bs)),
        "holes+gists": _wc(R, fold(_entries(L), opened, bs)),
        "opened": _wc(R, unfold(_entries(L), victims, bs)),
    }
    for name, wc in wcs.items():
        pos, nxt = entry_positions(wc.levels, wc.nodes, bs, "nearby", max_gap=gap)
        row[name] = read(base, lex, wc, pos, nxt, targets)
    row["L@hybrid"] = read(
        base, lex, L, *entry_positions(L.levels, L.nodes, bs, "hybrid", max_gap=gap), targets
    )
    pos, nxt = entry_positions(L.levels, L.nodes, bs, "nearby", max_gap=gap)
    gist_rows = L.levels != 0
    if bool(gist_rows.any()):
        n_far = int(torch.nonzero(gist_rows)[-1, 0]) + 1
        far_tokens = ~gist_rows & (torch.arange(len(L)) < n_far)
        for g in GAPS:
            shifted = pos.clone()
            shifted[far_tokens] -= g
            row[f"L@gap{g}"] = read(base, lex, L, shifted, nxt, targets)
    return row


VARIANTS = ["L", "holes", "holes+gists", "opened", "L@hybrid"] + [f"L@gap{g}" for g in GAPS]


def render(rows: list[dict], command: str, part: str) -> str:
    out = [f"# What a lexical retrieval costs ({part}, training split)", "", f"`{command}`", ""]
    out += [
        "NLL of the next 64 tokens minus the recency WC's (`R`), W = 1,024; "
        "`n` targets where the scorer opened something.",
        "",
    ]
    for T in sorted({r["T"] for r in rows}):
        got = [r for r in rows if r["T"] == T and r["n_opened"]]
        out += [f"## T = {T:,} (n = {len(got)} of {sum(r['T'] == T for r in rows)})", ""]
        out += ["| variant | mean − R | per target |", "|---|---:|---|"]
        rr = [r["R"] - r["truncation"] for r in rows if r["T"] == T]
        out.append(f"| R − truncation (all targets) | {statistics.mean(rr):+.4f} | |")
        for v in VARIANTS:
            d = [r[v] - r["R"] for r in got if v in r]
            if d:
                each = " ".join(f"{x:+.3f}" for x in d)
                out.append(f"| {v} | {statistics.mean(d):+.4f} | {each} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=tuple(lsp.TEXTS), required=True)
    ap.add_argument("--length", type=int, nargs="+", default=[32768])
    ap.add_argument("--targets", type=int, default=6)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    command = "OMP_NUM_THREADS=1 uv run python bench/retrieval_cost.py " + " ".join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    base, gist = lsp.load_memory()
    top = max(max(args.length), max(lsp.LENGTHS))
    ids = lsp.TEXTS[args.part](base, top + H + 4096 * (args.targets - 1))
    rows: list[dict] = []
    for i in range(args.targets):
        e = top + H + 4096 * i  # the probe's targets
        for T in args.length:
            rows.append(one(base, gist, ids, e, T))
            print(rows[-1], flush=True)
            plh.write_rows(rows, args.out / "rows.parquet")
            (args.out / "results.md").write_text(
                render(rows, command, args.part)
                + f"\n{time.strftime('%Y-%m-%d')}; CPU, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads; the shipped memory's GistNet\n"
            )


if __name__ == "__main__":
    main()
