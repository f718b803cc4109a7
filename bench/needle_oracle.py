"""What a perfect focus policy would reach on the needle bar, per position scheme.

Splits the needle bar's loss in two: *finding* the needle (the scorer) and *reading*
it once found (the working context's layout and RoPE positions). Tasks are the
needle suite's at the ``6x`` setting (3,072-token held-out histories, ``W = 512``,
pass key and key-value, depths 10 %-90 %, evaluation seeds), rebuilt exactly as
:func:`megacontext.eval.suites.needle_suite` builds them.

Rows (answer NLL, nats):

- ``full``, ``truncation``: the references.
- ``oracle_tokens``: the needle's blocks as tokens, then the newest tokens up to
  ``W``, at positions ``0..W-1``: perfect retrieval with no gists.
- ``oracle_<scheme>``: a MegaContext session whose scorer is the oracle: +1 on every
  entry covering the needle (its line: the answer's tokens and the 12 before them),
  -1 on as many of the oldest token blocks as the expands need room for, 0
  elsewhere; the allocator, gists and cache are the real ones; positions under
  ``<scheme>``.

Run (one process)::

    OMP_NUM_THREADS=2 uv run python bench/needle_oracle.py \\
        --gistnet megacontext/memories/smollm2-135m/gistnet.safetensors \\
        --out docs/results/<date>-cpu-heldout/needle-oracle
"""

from __future__ import annotations

import argparse
import json
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
from megacontext.eval.peers import View, full_view, truncation_view, view_nll

LEAD = 12  # tokens before the answer that belong to its line (the key, "is")


def oracle_scorer(lo: int, hi: int, block_size: int):
    """``scorer(wc, positions) -> [N]``: see the module doc."""

    def score(wc, positions):
        lv = wc.levels.cpu()
        starts = wc.starts.cpu()
        ends = starts + wc.spans.cpu()
        hit = (starts < hi) & (ends > lo)
        out = torch.zeros(len(wc), dtype=torch.float32)
        out[hit] = 1.0
        need = int((hit & (lv > 0)).sum())
        heads = [
            i
            for i in range(len(wc))
            if lv[i] == 0 and int(starts[i]) % block_size == 0 and not bool(hit[i])
        ]
        for i in heads[:need]:
            out[i : i + block_size] = -1.0
        return out

    return score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gistnet", type=Path, help="GistNet weights (default mean pooling)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = mc.load_base("smollm2-135m")
    gist = mc.GistNet.load(args.gistnet) if args.gistnet else None
    W, length = 512, 3072
    bs = 32
    rows = []
    i = 0
    t_start = time.time()
    for task in ("passkey", "kv"):
        for depth in (0.1, 0.3, 0.5, 0.7, 0.9):
            t = synthetic.GENERATORS[task](
                base.tokenizer,
                length=length,
                depth=depth,
                seed=args.seed * 1000 + i,
                haystack="validation",
            )
            i += 1
            hist, tgt = base.encode(t.context), base.encode(t.target)
            n0, n1 = t.meta["needle_span"]
            lo, hi = max(n0 - LEAD, t.meta["statement_span"][0]), n1
            T = hist.numel()
            b0, b1 = lo // bs * bs, -(-hi // bs) * bs
            keep = torch.cat([hist[b0:b1], hist[T - (W - (b1 - b0)) :]])
            views = {
                "full": full_view(base, hist),
                "truncation": truncation_view(base, hist, W),
                "oracle_tokens": View(
                    "oracle_tokens", base.embed(keep), torch.arange(keep.numel()), keep.numel(), {}
                ),
            }
            for scheme in ("nearby", "hybrid", "compact"):
                cfg = mc.MegaContextConfig(
                    model=base.name, w_max=W, lens="lexical", refocus_iterations=8, positions=scheme
                )
                session = mc.MegaContext(base, gist, None, cfg).session()
                session.focus.scorer = oracle_scorer(lo, hi, bs)
                session.ingest(hist)
                wc = session.wc
                found = int(
                    (
                        (wc.levels.cpu() == 0) & (wc.starts.cpu() >= lo) & (wc.starts.cpu() < hi)
                    ).sum()
                )
                if found != hi - lo:
                    raise SystemExit(
                        f"oracle left {hi - lo - found} needle tokens out ({task} {depth})"
                    )
                views[f"oracle_{scheme}"] = View(
                    f"oracle_{scheme}",
                    wc.embeddings(session.base, session.tree),
                    session.focus.positions().cpu(),
                    session.focus.next_position(),
                    {},
                )
            for name, view in views.items():
                nll = float(view_nll(base, view, tgt).mean())
                rows.append(
                    {
                        "task": task,
                        "depth": depth,
                        "doc": f"{task}/d{depth}",
                        "method": name,
                        "nll": nll,
                    }
                )
            print(
                task,
                depth,
                {r["method"]: round(r["nll"], 3) for r in rows[-len(views) :]},
                flush=True,
            )
    full = {r["doc"]: r["nll"] for r in rows if r["method"] == "full"}
    trunc = {r["doc"]: r["nll"] for r in rows if r["method"] == "truncation"}
    lost = sum(trunc[d] - full[d] for d in full)
    lines = [
        "# Needle bar with a perfect scorer (answer NLL, nats; 6x: 3,072 tokens, W = 512)",
        "",
        f"Command: `uv run python {' '.join(sys.argv)}`  ",
        f"CPU {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}; GistNet {args.gistnet or 'mean pooling'}; "
        f"{len(full)} held-out tasks; {time.time() - t_start:.0f} s.",
        "",
        "| method | answer NLL | recovered fraction |",
        "|---|---:|---:|",
    ]
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = {r["doc"]: r["nll"] for r in rows if r["method"] == m}
        rec = sum(trunc[d] - mine[d] for d in full) / lost
        lines.append(f"| {m} | {np.mean(list(mine.values())):.3f} | {rec:.2f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), args.out / "rows.parquet")
    meta = {"command": " ".join(sys.argv), "gistnet": str(args.gistnet), "W": W, "length": length}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
