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
    ap.add_argument(
        "--variant",
        default="lexical",
        help="the variants compared with recency (comma-separated ablation variants)",
    )
    ap.add_argument(
        "--split",
        default="validation",
        choices=["validation", "train"],
        help="the documents' split: train only to choose a setting before a held-out run",
    )
    ap.add_argument("--out", type=Path, required=True, help="Markdown report")
    args = ap.parse_args(argv)
    system = mc.MegaContext.pretrained(args.memory)
    compared = args.variant.split(",")
    variants = ["recency", *compared]
    rows = ablation_suite(
        system.base,
        system,
        "small",
        variants=variants,
        docs=args.docs,
        split=args.split,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    by: dict[str, dict[str, float]] = {}
    for r in rows:
        by.setdefault(r["doc"], {})[r["method"]] = r["nll"]
    cols = ["full", "truncation", *variants]
    split = "" if args.split == "validation" else f" --split {args.split}"
    lines = [
        f"# Decode-regime cost of `{args.variant}` against recency ({args.memory})",
        "",
        f"Command: `python bench/decode_focus_cost.py --docs {args.docs} "
        f"--variant {args.variant} --memory {args.memory}{split} --out {args.out}`",
        "",
        f"2,048 tokens of {args.split}-split documents ingested at W = 512, the next 256 "
        "decoded teacher-forced; NLL over them (nats).",
        "",
        "| document | "
        + " | ".join(cols)
        + " | "
        + " | ".join(f"{v} − recency" for v in compared)
        + " |",
        "|---|" + "---:|" * (len(cols) + len(compared)),
    ]
    diffs: dict[str, list[float]] = {v: [] for v in compared}
    for doc, m in by.items():
        ds = [m[v] - m["recency"] for v in compared]
        for v, d in zip(compared, ds, strict=True):
            diffs[v].append(d)
        cells = " | ".join(f"{m[c]:.4f}" if c in m else "–" for c in cols)
        lines.append(f"| {doc} | {cells} | " + " | ".join(f"{d:+.4f}" for d in ds) + " |")
    lines.append("")
    for v, ds in diffs.items():
        n = len(ds)
        mean, med = statistics.fmean(ds), statistics.median(ds)
        se = statistics.stdev(ds) / math.sqrt(n) if n > 1 else float("nan")
        lines.append(
            f"`{v}` − recency, paired over {n} documents: mean {mean:+.4f} ± {se:.4f} "
            f"(s.e.), median {med:+.4f}.  "
        )
    lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
