"""Focus stability while decoding: issue 14's swap-rate bar for a focus scorer.

Each held-out document (:func:`megacontext.eval.common.sweep_documents`: validation
code and prose) is ingested (``--history`` tokens) into a session of the shipped
memory at ``w_max = --w-max``, then ``--blocks`` blocks of its continuation are fed
token by token (``Session.feed``: a refocus every 32 tokens, as in decoding). From
the decode-phase telemetry, :func:`megacontext.eval.accept.swap_criteria` judges
discretionary actions per decoded block (bar ≤ 0.25), ping-pong (bar 0) and mean
residency (bar ≥ 3), with all actions per block beside them. Each ``--lens`` is a
row (``--lens lensnet --lensnet PATH``: a trained LensNet with the shipped gists). Run::

    OMP_NUM_THREADS=2 uv run python bench/decode_swaps.py --lens lexical recency \\
        --out docs/results/<date>-cpu-heldout/decode-swaps
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

import megacontext as mc
from megacontext.eval.accept import swap_criteria
from megacontext.eval.common import sweep_documents


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lens", nargs="+", default=["lexical", "recency"])
    ap.add_argument("--lensnet", type=Path, help="the LensNet of --lens lensnet")
    ap.add_argument("--docs", type=int, default=2)
    ap.add_argument("--history", type=int, default=4096)
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--w-max", type=int, default=1024)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = mc.load_base("smollm2-135m")
    bs = 32
    docs = sweep_documents(base, args.docs, args.history + args.blocks * bs)
    t0 = time.time()
    results = {}
    if "lensnet" in args.lens and args.lensnet is None:
        ap.error("--lens lensnet needs --lensnet PATH")
    for lens in args.lens:
        system = mc.MegaContext.pretrained(
            "smollm2-135m", base=base, w_max=args.w_max, lens=lens, refocus_iterations=8
        )
        if lens == "lensnet":
            lensnet = mc.LensNet.load(args.lensnet)
            system = mc.MegaContext(base, system.gistnet, lensnet, system.config)
        rows, traces, residencies = [], [], []
        for doc_id, _, ids in docs:
            s = system.session()
            s.ingest(ids[: args.history])
            n_rows, n_act = len(s.history), len(s.actions)
            n_res = len(s.residencies)
            s.feed(ids[args.history :])
            rows += s.history[n_rows:]
            traces.append(s.actions[n_act:])
            residencies += s.residencies[n_res:]
            print(f"{lens} {doc_id}: {len(s.actions) - n_act} decode actions", flush=True)
        crit = swap_criteria(
            rows,
            traces,
            residencies,
            cooldown_steps=system.config.cooldown_steps,
            min_residency=system.config.min_residency,
            blocks=args.blocks * len(docs),
        )
        results[lens] = {c.name: c for c in crit}
    lines = [
        "# Focus stability while decoding (discretionary swap rate, ping-pong, residency)",
        "",
        f"Command: `uv run python {' '.join(sys.argv)}`  ",
        f"CPU {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}; shipped memory smollm2-135m, W = {args.w_max:,}, "
        f"{len(docs)} held-out documents ({', '.join(d for d, _, _ in docs)}), "
        f"{args.history:,} tokens ingested, then {args.blocks} blocks fed; "
        f"{time.time() - t0:.0f} s.",
        "",
        "| lens | discretionary / block (≤ 0.25) | ping-pong (0) | mean residency (≥ 3) | "
        "all actions / block (info) |",
        "|---|---:|---:|---:|---:|",
    ]

    def num(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{x:.3f}"

    for lens, c in results.items():
        verdict = "pass" if all(v.passed for v in c.values() if not v.informational) else "FAIL"
        lines.append(
            f"| {lens} ({verdict}) | {num(c['focus_swap_rate'].value)} | "
            f"{num(c['pingpong'].value)} | {num(c['mean_residency'].value)} | "
            f"{num(c['swap_rate'].value)} |"
        )
    lines += [
        "",
        *(f"- {lens} {v.name}: {v.detail}" for lens, c in results.items() for v in c.values()),
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "meta.json").write_text(json.dumps({"command": " ".join(sys.argv)}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
