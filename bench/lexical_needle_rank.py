"""Where the lexical scorer ranks a needle's block among a history's blocks.

For held-out pass-key tasks (:func:`megacontext.synthetic.passkey` on validation
filler, evaluation seeds ``seed * 1000 + i`` as the needle suites number them), the
BM25 scores of ``lens: lexical``'s query against every complete block before the
protected tail (:func:`megacontext.lexical_scorer.block_scores`), their robust
z-scores, and the rank of the block that holds the needle (the task's
``needle_span``). At most ``floor(retrieval_share · w_max / bs)`` blocks are opened
per refocus, best first, so a needle ranked below that is not retrieved. Also the
first characters of the best-ranked blocks and of the query, and the blocks the
scorer wants under the package defaults
(:func:`megacontext.lexical_scorer.retrieved_blocks`: far copies of the query skipped,
induction first) with whether the needle's block is among them. Run::

    OMP_NUM_THREADS=1 uv run python bench/lexical_needle_rank.py --length 32768 --w-max 1024 \\
        --depths 0.1 0.5 0.9 --seed 0
"""

from __future__ import annotations

import argparse

import megacontext as mc
from megacontext import lexical_scorer, synthetic
from megacontext.focus import FocusLoop
from megacontext.lexical_scorer import retrieval_limit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--w-max", type=int, default=1024)
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--seed", type=int, default=0, help="the needle suites' --seed")
    ap.add_argument("--top", type=int, default=5, help="best blocks to print")
    args = ap.parse_args()
    base = mc.load_base("smollm2-135m")
    cfg = mc.MegaContextConfig(model=base.name, w_max=args.w_max, levels=3, lens="lexical")
    bs = cfg.block_size
    opens = {share: retrieval_limit(cfg.replace(retrieval_share=share)) for share in (0.25, 0.125)}
    print(f"retrieval_share 0.25 opens at most {opens[0.25]} blocks, 0.125 at most {opens[0.125]}")
    for i, depth in enumerate(args.depths):
        t = synthetic.passkey(
            base.tokenizer,
            length=args.length,
            depth=depth,
            seed=args.seed * 1000 + i,
            haystack="validation",
        )
        hist = base.encode(t.context)
        loop = FocusLoop(base, None, None, cfg)
        loop.ingest(hist)
        # the same BM25 scores block_scores gives, and the blocks the defaults open
        s, want = lexical_scorer.retrieved_blocks(loop.tree, loop.wc, cfg)
        z = lexical_scorer.robust_z(s)
        order = z.argsort(descending=True, stable=True).tolist()
        start, end = t.meta["needle_span"]
        blocks = sorted({start // bs, (end - 1) // bs})
        ranks = [order.index(b) + 1 for b in blocks if b < z.numel()]
        print(
            f"depth {depth} (seed {t.meta['seed']}): needle block(s) {blocks}, "
            f"rank {ranks} of {z.numel()}, z {[round(float(z[b]), 1) for b in blocks]}; "
            f"best z {[round(float(z[b]), 1) for b in order[: args.top]]}"
        )
        got = [b for b in blocks if b in want.tolist()]
        print(
            f"    wanted under the defaults (share {cfg.retrieval_share}, overlap "
            f"{cfg.lexical_max_overlap}, induction {cfg.lexical_induction}): "
            f"{want.tolist()}; needle block(s) among them: {got or 'none'}"
        )
        for b in order[: args.top]:
            text = base.tokenizer.decode(hist[b * bs : (b + 1) * bs].tolist())
            print(f"    block {b}: {text[:70]!r}")
        print(f"    query: {base.tokenizer.decode(hist[-cfg.lexical_query :].tolist())!r}")


if __name__ == "__main__":
    main()
