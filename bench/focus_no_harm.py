"""Focus must not hurt where nothing far is needed: NLL of the next 64 tokens of
ordinary held-out text, a scorer's session against the recency session.

The budget sweep's documents (:func:`megacontext.eval.suites.budget_sweep`:
validation-split code and prose, evaluation selection) at ``--size`` (medium: 4,096
history tokens, W = 512 / 1,024 / 2,048, 2 documents), every method reading the same
tokens. Issue 14's bar: ``ΔNLL@64`` of the scorer at most 0.01 nats worse than
recency-only. Run::

    OMP_NUM_THREADS=2 uv run python bench/focus_no_harm.py --lens lexical \\
        --gistnet megacontext/memories/smollm2-135m/gistnet.safetensors \\
        --out docs/results/<date>-cpu-heldout/no-harm
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
from megacontext.eval import methods as registry
from megacontext.eval import suites


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lens", required=True, help="the scorer's session peer: lexical | attention")
    ap.add_argument("--gistnet", type=Path, help="GistNet weights (default mean pooling)")
    ap.add_argument("--size", default="medium", choices=["tiny", "small", "medium"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    peer = f"mc_{args.lens}"
    if peer not in registry.peer_names():
        ap.error(f"no session peer {peer!r}; expected one of {registry.session_names()}")
    args.out.mkdir(parents=True, exist_ok=True)
    base = mc.load_base("smollm2-135m")
    gist = mc.GistNet.load(args.gistnet) if args.gistnet else None
    extra = {}
    for item in args.set:
        key, _, value = item.partition("=")
        extra[key] = json.loads(value)
    system = mc.MegaContext(base, gist, None, mc.MegaContextConfig(model=base.name, **extra))
    t0 = time.time()
    rows = suites.budget_sweep(
        base, system, args.size, methods=["truncation", "mc_recency", peer], log=print
    )
    for r in rows:
        r.pop("_session", None)
    keep = sorted({k for r in rows for k in r})
    pq.write_table(
        pa.Table.from_pylist([{k: r.get(k) for k in keep} for r in rows]), args.out / "rows.parquet"
    )
    nll = {(r["doc"], r["budget"], r["method"]): r["nll"] for r in rows}
    cells = sorted({(d, w) for d, w, _ in nll})
    lines = [
        f"# Focus must not hurt: {peer} against recency on ordinary held-out text",
        "",
        f"Command: `uv run python {' '.join(sys.argv)}`  ",
        f"CPU {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}; GistNet {args.gistnet or 'mean pooling'}; "
        f"size {args.size}; {time.time() - t0:.0f} s.",
        "",
        f"| document | W | truncation | mc_recency | {peer} | {peer} − recency | actions |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    diffs = []
    for d, w in cells:
        row = next(r for r in rows if r["doc"] == d and r["budget"] == w and r["method"] == peer)
        diff = nll[(d, w, peer)] - nll[(d, w, "mc_recency")]
        diffs.append(diff)
        lines.append(
            f"| {d} | {w:,} | {nll[(d, w, 'truncation')]:.3f} | {nll[(d, w, 'mc_recency')]:.3f} "
            f"| {nll[(d, w, peer)]:.3f} | {diff:+.3f} | {row.get('focus_actions')} |"
        )
    lines += ["", f"Mean {peer} − recency: {np.mean(diffs):+.4f} nats (bar: at most +0.01)."]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
