"""What a run's read labels say (``labels.kind: reads``, issue 14 item 3): how often
reading a block as tokens pays, by the block's place in the candidate list (the
first ``top_blocks`` are the lexical signal's best, best first; the rest are drawn
uniformly), so the cheap signal's agreement with the ΔNLL labels on the training
snapshots can be read off. Run::

    uv run python bench/read_label_summary.py \\
        artifacts/deltas/lens-retrieval-cpu/cycle0-warm-lens.parquet --top 4 \\
        --out docs/results/<date>-lens-retrieval/training-labels.md
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from megacontext.train.labels import read_labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("labels", type=Path, help="a label Parquet file or directory")
    ap.add_argument("--top", type=int, required=True, help="the run's labels.top_blocks")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = [r for r in read_labels(args.labels) if r["kind"] == "read"]
    if not rows:
        ap.error(f"{args.labels}: no read labels")
    by: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for r in rows:  # rows of one snapshot are in candidate order
        by[(r["doc"], r["snapshot_step"])].append(r)
    d = np.array([r["dnll"] for r in rows])
    lines = [
        "# Read labels: how often reading a block as tokens pays",
        "",
        f"Command: `uv run python {' '.join(sys.argv)}`  ",
        f"{len(rows)} read labels on {len(by)} snapshots. ΔNLL@H quantiles (0, 5, 25, 50, 75, "
        f"95, 100 %): {', '.join(f'{q:+.3f}' for q in np.quantile(d, [0, .05, .25, .5, .75, .95, 1]))}.",
        "",
        "| candidate | labels | mean ΔNLL | pays ≤ −0.2 | pays ≤ −1 |",
        "|---|---:|---:|---:|---:|",
    ]
    n = max(len(v) for v in by.values())
    for i in range(n):
        a = np.array([v[i]["dnll"] for v in by.values() if len(v) > i])
        name = f"lexical rank {i + 1}" if i < args.top else f"random {i - args.top + 1}"
        lines.append(
            f"| {name} | {a.size} | {a.mean():+.3f} | {(a <= -0.2).mean():.3f} | "
            f"{(a <= -1).mean():.3f} |"
        )
    big = [v for v in by.values() if min(r["dnll"] for r in v) < -0.5]
    at = np.bincount([int(np.argmin([r["dnll"] for r in v])) for v in big], minlength=n)
    lines += [
        "",
        f"Snapshots where some read lowers ΔNLL@H by more than 0.5 nats: {len(big)}; the best "
        f"read is candidate {', '.join(f'{i + 1}: {int(c)}' for i, c in enumerate(at))}.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
