"""What a focus scorer costs on ordinary text in the decode regime, per document.

The focus ablation (:func:`megacontext.eval.ablations.ablation_suite`) of the shipped
memory over more held-out documents than ``--size small`` gives. Each document: 2,048
tokens ingested at ``W = 512``, the next 256 decoded teacher-forced, refocusing every
block. It reports the NLL of each variant over those 256 tokens (nats), and the
paired difference of ``--variant`` minus ``recency`` per document, with its mean and
standard error. The no-harm bar (issue 14) scores the 64 tokens right after an ingest.
This script scores a long decode instead, where what a scorer keeps decides which
groups the forced collapses take. Run (one thread)::

    OMP_NUM_THREADS=1 uv run python bench/decode_focus_cost.py --docs 7 \\
        --out docs/results/<date>-cpu-memory/decode-focus-cost.md
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import megacontext as mc
from megacontext._atomic import atomic_write_text
from megacontext.eval.ablations import ablation_suite


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", default="smollm2-135m", help="a pretrained memory name")
    ap.add_argument("--docs", type=int, default=7, help="held-out documents (code, prose)")
    ap.add_argument("--variant", default="lexical", help="the variant compared with recency")
    ap.add_argument("--out", type=Path, required=True, help="Markdown report")
    args = ap.parse_args(argv)
    system = mc.MegaContext.pretrained(args.memory)
    variants = ["recency", args.variant]
    rows = ablation_suite(
        system.base,
        system,
        "small",
        variants=variants,
        docs=args.docs,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    by: dict[str, dict[str, float]] = {}
    for r in rows:
        by.setdefault(r["doc"], {})[r["method"]] = r["nll"]
    cols = ["full", "truncation", *variants]
    lines = [
        f"# Decode-regime cost of `{args.variant}` against recency ({args.memory})",
        "",
        f"Command: `python bench/decode_focus_cost.py --docs {args.docs} "
        f"--variant {args.variant} --memory {args.memory} --out {args.out}`",
        "",
        "2,048 tokens ingested at W = 512, the next 256 decoded teacher-forced; NLL over "
        "them (nats).",
        "",
        "| document | " + " | ".join(cols) + f" | {args.variant} − recency |",
        "|---|" + "---:|" * (len(cols) + 1),
    ]
    diffs = []
    for doc, m in by.items():
        d = m[args.variant] - m["recency"]
        diffs.append(d)
        cells = " | ".join(f"{m[c]:.4f}" if c in m else "–" for c in cols)
        lines.append(f"| {doc} | {cells} | {d:+.4f} |")
    n = len(diffs)
    mean, med = statistics.fmean(diffs), statistics.median(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else float("nan")
    lines += [
        "",
        f"Paired difference over {n} documents: mean {mean:+.4f} ± {se:.4f} (s.e.), "
        f"median {med:+.4f}.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
