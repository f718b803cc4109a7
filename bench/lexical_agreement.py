"""How well the lexical scorer's cheap signal agrees with counterfactual ΔNLL labels
(issue 14 items 3-4), on the 6x needle bar's held-out tasks.

Per task (3,072 tokens, W = 512, the shipped memory's gists, the recency working
context after the ingest) and per complete LOD1 block ``b`` before the protected tail:

- the **label** ``ΔNLL_b`` = answer NLL with ``b`` read as its 32 tokens (its covering
  gist replaced: an LOD1 gist by the tokens; an LOD2 gist by its other 31 LOD1 children
  and the tokens), positions under ``nearby``, minus the answer NLL of the recency WC.
  Negative: having ``b``'s tokens pays. No budget is enforced (the label values the
  block, not a swap);
- the **signal** ``s_b``: the lexical scorer's BM25 score
  (:func:`megacontext.lexical_scorer.block_relevance`, the config's query and weights),
  and whether the scorer wants ``b`` (robust z ≥ ``lexical_z``).

Reported: Spearman rank correlation of ``s`` with ``-ΔNLL`` per task, top-1 agreement
(the best-scored block is the best-labelled one), and precision / recall of "wanted"
against "pays" (``ΔNLL_b <= -0.1`` nats).

With ``--lensnet`` (a retrieval LensNet, ``relevance_buckets > 0``) the same is
reported for its scores ``u`` (a block takes its covering gist's score: what the
first refocus decides), and, per gist entry of the recency WC, the precision and
recall of "opening it pays" (its best block's ΔNLL at most ``-0.1`` / ``-0.2``
nats) for the LensNet (``u > tau_expand``) beside the lexical rule (a wanted block
under it): issue 14 item 4's calibration. ``--labels DIR`` reuses an earlier run's
``rows.parquet`` labels (the same GistNet) instead of recomputing them. Run::

    OMP_NUM_THREADS=2 uv run python bench/lexical_agreement.py \\
        --gistnet megacontext/memories/smollm2-135m/gistnet.safetensors \\
        --out docs/results/<date>-cpu-heldout/lexical-agreement
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import megacontext as mc
from megacontext import synthetic
from megacontext.focus import lens_scores, needs_relevance, position_gap
from megacontext.lexical_scorer import block_relevance, wanted_blocks
from megacontext.nll import nll_after
from megacontext.train.labels import read_block
from megacontext.working_context import WorkingContext, entry_positions

PAYS = -0.1  # nats: a block whose tokens lower the answer NLL by this much "pays"
BATCH = 4


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(float)
    rb = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(float)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def context(base, tree, wc, gap: int, levels: list[int], nodes: list[int]):
    """``((embeds [N, d], positions [N]), next_position)`` of the WC ``(levels, nodes)``
    over ``wc``'s history, under ``nearby`` positions (no budget check)."""
    bs = wc.block_size
    w = WorkingContext(
        torch.tensor(levels),
        torch.tensor(nodes),
        block_size=bs,
        max_level=wc.max_level,
        w_max=10**6,
        num_tokens=wc.num_tokens,
    )
    pos, nxt = entry_positions(w.levels, w.nodes, bs, "nearby", max_gap=gap)
    return (w.embeddings(base, tree), pos), nxt


def read_as_tokens(lv: list[int], nd: list[int], b: int, bs: int):
    """``(levels, nodes)`` lists with LOD1 block ``b`` read as tokens
    (:func:`megacontext.train.labels.read_block`), ``None`` when it is tokens already."""
    got = read_block(torch.tensor(lv), torch.tensor(nd), b, bs)
    return None if got is None else (got[0].tolist(), got[1].tolist())


def covering(lv: list[int], nd: list[int], b: int, bs: int) -> int:
    """The index of the gist entry covering LOD1 block ``b``."""
    got = read_block(torch.tensor(lv), torch.tensor(nd), b, bs)
    assert got is not None
    return got[2]


def pr(pred: np.ndarray, truth: np.ndarray) -> str:
    hit = int((pred & truth).sum())
    return f"{hit}/{int(pred.sum())} precision, {hit}/{int(truth.sum())} recall"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gistnet", type=Path, help="GistNet weights (default mean pooling)")
    ap.add_argument("--tasks", type=int, default=10, help="the first N of the bar's 10 tasks")
    ap.add_argument("--lensnet", type=Path, help="a retrieval LensNet to score beside BM25")
    ap.add_argument("--labels", type=Path, help="reuse DIR/rows.parquet's labels")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = mc.load_base("smollm2-135m")
    gist = mc.GistNet.load(args.gistnet) if args.gistnet else None
    lens = mc.LensNet.load(args.lensnet) if args.lensnet else None
    if lens is not None and not needs_relevance(lens):
        ap.error(f"--lensnet {args.lensnet}: not a retrieval LensNet (relevance_buckets = 0)")
    cached: dict[str, dict[int, float]] = {}
    if args.labels is not None:
        for r in pq.read_table(args.labels / "rows.parquet").to_pylist():
            cached.setdefault(r["task"], {})[int(r["block"])] = float(r["label"])
    W, length, bs = 512, 3072, 32
    cfg = mc.MegaContextConfig(model=base.name, w_max=W, lens="recency")
    gap = position_gap(cfg, base)
    specs = [(t, d) for t in ("passkey", "kv") for d in (0.1, 0.3, 0.5, 0.7, 0.9)]
    rows, summary, entries = [], [], []
    t_start = time.time()
    for i, (task, depth) in enumerate(specs[: args.tasks]):
        t = synthetic.GENERATORS[task](
            base.tokenizer, length=length, depth=depth, seed=i, haystack="validation"
        )
        hist, tgt = base.encode(t.context), base.encode(t.target)
        session = mc.MegaContext(base, gist, None, cfg).session()
        session.ingest(hist)
        tree, wc = session.tree, session.wc
        lv, nd = wc.levels.tolist(), wc.nodes.tolist()
        n_b = wc.protected_start // bs

        blocks = [b for b in range(n_b) if read_as_tokens(lv, nd, b, bs) is not None]
        name = f"{task}/d{depth}"
        if name in cached:
            labels = cached[name]
        else:
            ctx0, nxt0 = context(base, tree, wc, gap, lv, nd)
            ref = float(nll_after(base, [ctx0], [tgt], [nxt0]).mean())
            labels = {}
            for s in range(0, len(blocks), BATCH):
                part = blocks[s : s + BATCH]
                ctxs, nxts = zip(
                    *(context(base, tree, wc, gap, *read_as_tokens(lv, nd, b, bs)) for b in part),
                    strict=True,
                )
                nll = nll_after(base, list(ctxs), [tgt] * len(part), list(nxts)).mean(1)
                for b, v in zip(part, nll.tolist(), strict=True):
                    labels[b] = v - ref
        ids = tree.tokens(0, tree.num_tokens)
        lex_cfg = mc.MegaContextConfig(model=base.name, w_max=W)
        query = ids[max(ids.numel() - lex_cfg.lexical_query, 0) :]
        s_all = block_relevance(ids[: n_b * bs].view(n_b, bs), query, lex_cfg.lexical_half_life)
        limit = int(lex_cfg.retrieval_share * W) // bs
        want = set(wanted_blocks(s_all, lex_cfg.lexical_z, limit).tolist())
        sig = np.array([float(s_all[b]) for b in blocks])
        lab = np.array([labels[b] for b in blocks])
        pays = lab <= PAYS
        wanted = np.array([b in want for b in blocks])
        n0 = t.meta["needle_span"][0]
        # per gist entry: its best block's label; lexical opens it when it wants a block
        # under it, the LensNet when u > tau_expand (what the first refocus decides)
        cover = np.array([covering(lv, nd, b, bs) for b in blocks])
        gists = sorted(set(cover.tolist()))
        best = np.array([lab[cover == k].min() for k in gists])
        lex_open = np.array([bool(wanted[cover == k].any()) for k in gists])
        u_blk = np.full(len(blocks), np.nan)
        lens_open = np.zeros(len(gists), dtype=bool)
        if lens is not None:
            with torch.no_grad():
                u = lens_scores(lens, base, tree, wc, lex_cfg)[0].cpu().numpy()
            u_blk = u[cover]
            lens_open = np.array([u[k] > lex_cfg.tau_expand for k in gists])
        entries.append(
            {"best": best, "lexical": lex_open, "lensnet": lens_open, "task": f"{task}/d{depth}"}
        )
        summary.append(
            {
                "task": f"{task}/d{depth}",
                "candidates": len(blocks),
                "spearman": spearman(sig, -lab),
                "top1": bool(np.argmax(sig) == np.argmin(lab)),
                "best_label": float(lab.min()),
                "best_block": int(blocks[int(np.argmin(lab))]),
                "needle_block": int(n0 // bs),
                "wanted": int(wanted.sum()),
                "pays": int(pays.sum()),
                "wanted_and_pays": int((wanted & pays).sum()),
                "lens_spearman": spearman(u_blk, -lab) if lens is not None else math.nan,
                "lens_top1": (
                    bool(np.argmax(u_blk) == np.argmin(lab)) if lens is not None else False
                ),
            }
        )
        for b, sv, lb, wv in zip(blocks, sig, lab, wanted, strict=True):
            rows.append(
                {"task": f"{task}/d{depth}", "block": b, "lexical": sv, "label": lb, "wanted": wv}
            )
        if lens is not None:
            for r, ub in zip(rows[-len(blocks) :], u_blk, strict=True):
                r["lensnet"] = float(ub)
        print(summary[-1], flush=True)
    got = sum(r["wanted_and_pays"] for r in summary)
    n_want = sum(r["wanted"] for r in summary)
    n_pays = sum(r["pays"] for r in summary)
    lines = [
        "# The lexical signal against counterfactual ΔNLL labels (6x needles, held out)",
        "",
        f"Command: `uv run python {' '.join(sys.argv)}`  ",
        f"CPU {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}; GistNet {args.gistnet or 'mean pooling'}; "
        f"{len(summary)} tasks; {time.time() - t_start:.0f} s. Label: answer ΔNLL with the "
        f"block as tokens (nearby positions) vs the recency WC; pays: ΔNLL ≤ {PAYS}.",
        "",
        "| task | candidates | Spearman(s, −ΔNLL) | top-1 agrees | best ΔNLL (block; needle's) "
        "| wanted | pays | both |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in summary:
        lines.append(
            f"| {r['task']} | {r['candidates']} | {r['spearman']:.2f} | "
            f"{'yes' if r['top1'] else 'no'} | {r['best_label']:+.2f} ({r['best_block']}; "
            f"{r['needle_block']}) | {r['wanted']} | {r['pays']} | {r['wanted_and_pays']} |"
        )
    lines += [
        "",
        f"Mean Spearman {np.nanmean([r['spearman'] for r in summary]):.2f}; top-1 agreement "
        f"{sum(r['top1'] for r in summary)}/{len(summary)}; precision of 'wanted' for 'pays' "
        f"{got}/{n_want}, recall {got}/{n_pays}.",
    ]
    if lens is not None:
        lines += [
            "",
            f"## The retrieval LensNet `{args.lensnet}`",
            "",
            "A block takes its covering gist's score (the first refocus's decision). Mean "
            f"Spearman(u, −ΔNLL) {np.nanmean([r['lens_spearman'] for r in summary]):.2f}; top-1 "
            f"agreement {sum(r['lens_top1'] for r in summary)}/{len(summary)} (ties: the first "
            "block under the best gist).",
        ]
    best = np.concatenate([e["best"] for e in entries])
    lines += [
        "",
        f"Per gist entry of the recency WC ({best.size} entries in {len(entries)} tasks): does "
        "opening it pay (its best block's ΔNLL ≤ −0.1 / −0.2 nats)?",
        "",
        "| policy | opens | pays ≤ −0.1 | pays ≤ −0.2 |",
        "|---|---:|---:|---:|",
    ]
    for name in ("lexical", "lensnet") if lens is not None else ("lexical",):
        pred = np.concatenate([e[name] for e in entries])
        label = (
            "lexical (wants a block under it)" if name == "lexical" else "LensNet (u > tau_expand)"
        )
        lines.append(
            f"| {label} | {int(pred.sum())} | {pr(pred, best <= -0.1)} | {pr(pred, best <= -0.2)} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), args.out / "rows.parquet")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
