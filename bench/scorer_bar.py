"""A focus scorer's session against the recency session and the peers, on one of
the evaluation's suites, every method reading the same tokens.

- ``--suite budget`` (focus must not hurt where nothing far is needed): the budget
  sweep's ordinary held-out documents (:func:`megacontext.eval.suites.budget_sweep`:
  validation-split code and prose) at ``--size`` (medium: 4,096 history tokens,
  W = 512 / 1,024 / 2,048, 2 documents); NLL of the next 64 tokens. Issue 14's bar:
  the scorer at most 0.01 nats worse than recency-only.
- ``--suite longbench``: LongBench's validation-split rows
  (:func:`megacontext.eval.suites.longbench_suite`), the answer's NLL and the greedy
  answer's LongBench metric.

Run::

    OMP_NUM_THREADS=2 uv run python bench/scorer_bar.py --suite budget --lens lexical \\
        --gistnet megacontext/memories/smollm2-135m/gistnet.safetensors \\
        --set refocus_iterations=8 --out docs/results/<date>-cpu-heldout/no-harm
"""

from __future__ import annotations

import argparse
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
from megacontext.train.config import apply_overrides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--lens",
        required=True,
        help="the scorer's session peer: lexical | attention | lensnet (with --lensnet)",
    )
    ap.add_argument("--lensnet", type=Path, help="LensNet weights for --lens lensnet")
    ap.add_argument("--gistnet", type=Path, help="GistNet weights (default mean pooling)")
    ap.add_argument("--suite", default="budget", choices=["budget", "longbench"])
    ap.add_argument("--size", default="medium", choices=["tiny", "small", "medium"])
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["truncation", "mc_recency"],
        help="the other methods (mc_recency is always run)",
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    peer = "megacontext" if args.lens == "lensnet" else f"mc_{args.lens}"
    if args.lens == "lensnet" and args.lensnet is None:
        ap.error("--lens lensnet needs --lensnet PATH")
    if peer not in registry.peer_names():
        ap.error(f"no session peer {peer!r}; expected one of {registry.session_names()}")
    args.out.mkdir(parents=True, exist_ok=True)
    base = mc.load_base("smollm2-135m")
    gist = mc.GistNet.load(args.gistnet) if args.gistnet else None
    extra = apply_overrides({}, args.set)  # KEY=VALUE, values parsed as YAML
    lensnet = mc.LensNet.load(args.lensnet) if args.lensnet else None
    if lensnet is not None:
        extra.setdefault("lens", "lensnet")
    system = mc.MegaContext(base, gist, lensnet, mc.MegaContextConfig(model=base.name, **extra))
    t0 = time.time()
    others = list(dict.fromkeys([*args.methods, "mc_recency"]))
    run = suites.budget_sweep if args.suite == "budget" else suites.longbench_suite
    rows = run(base, system, args.size, methods=[*others, peer], log=print)
    for r in rows:
        r.pop("_session", None)
    keep = sorted({k for r in rows for k in r})
    pq.write_table(
        pa.Table.from_pylist([{k: r.get(k) for k in keep} for r in rows]), args.out / "rows.parquet"
    )
    nll = {(r["doc"], r["budget"], r["method"]): r["nll"] for r in rows}
    score = {(r["doc"], r["budget"], r["method"]): r.get("score") for r in rows}
    cells = sorted({(d, w) for d, w, _ in nll})
    cols = [m for m in dict.fromkeys(r["method"] for r in rows) if m != peer] + [peer]
    what = "answer NLL / metric" if args.suite == "longbench" else "NLL of the next 64 tokens"
    lines = [
        f"# {peer} against recency and the peers: {args.suite} suite ({what})",
        "",
        f"Command: `uv run python {' '.join(sys.argv)}`  ",
        f"CPU {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}; GistNet {args.gistnet or 'mean pooling'}; "
        f"LensNet {args.lensnet or 'none'}; "
        f"config changes {extra}; size {args.size}; {time.time() - t0:.0f} s.",
        "",
        f"| document | W | {' | '.join(cols)} | {peer} − recency |",
        "|---|---:|" + "---:|" * (len(cols) + 1),
    ]

    def cell(d, w, m):
        v = nll.get((d, w, m))
        sc = score.get((d, w, m))
        text = "" if v is None else f"{v:.3f}"
        return text + (f" / {sc:.2f}" if sc is not None and args.suite == "longbench" else "")

    diffs = []
    for d, w in cells:
        if (d, w, peer) not in nll or (d, w, "mc_recency") not in nll:
            continue
        diff = nll[(d, w, peer)] - nll[(d, w, "mc_recency")]
        diffs.append(diff)
        lines.append(f"| {d} | {w:,} | {' | '.join(cell(d, w, m) for m in cols)} | {diff:+.3f} |")
    lines += ["", f"Mean {peer} − recency: {np.mean(diffs):+.4f} nats over {len(diffs)} cells."]
    for m in cols:
        vals = [v for (d, w, mm), v in nll.items() if mm == m]
        scs = [v for (d, w, mm), v in score.items() if mm == m and v is not None]
        extra_sc = f", mean metric {np.mean(scs):.3f}" if scs else ""
        lines.append(f"- {m}: mean NLL {np.mean(vals):.3f} over {len(vals)} cells{extra_sc}")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
