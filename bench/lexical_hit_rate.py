"""How often the lexical scorer opens a needle's block, over many fresh tasks.

Answering a needle at ``w_max`` far below the history's length needs the block that
holds it read back as tokens; the lexical scorer (``lens: lexical``) opens the blocks
:func:`megacontext.lexical_scorer.retrieved_blocks` wants. That choice reads only the
tree's token ids and the working context's protected tail, never the gists, so it is
counted here over many tasks without a forward of the base model: a session built
with mean-pool gists has the same working context, block for block, as one with the
shipped GistNet.

Per task (``megacontext.synthetic``: pass key, key-value, code identifier; with
``--kinds passkey-rep`` also pass keys in a repeated training filler,
``bench/lexical_share_probe.py``'s ``repeated_passkey``; depths 10 %–90 %), the
needle's blocks (its ``needle_span``, one or two blocks) are

- ``window``: already tokens in the recency working context (nothing to retrieve);
- ``hit``: all wanted by the scorer under the setting;
- ``partial``: some of them wanted;
- ``miss``: none wanted.

``--haystack train`` draws training seeds (:func:`megacontext.synthetic.train_seed`)
and training-split filler, to choose rules on; ``validation`` draws evaluation seeds
``7000 + i`` (a namespace no needle suite uses) and held-out filler, to confirm them.
Settings are ``NAME=KEY:VALUE,...`` of :class:`megacontext.MegaContextConfig` fields,
as in ``bench/lexical_share_probe.py``; ``default`` is the package's. Run::

    OMP_NUM_THREADS=1 uv run python bench/lexical_hit_rate.py --haystack train \\
        --length 32768 --w-max 1024 --reps 8 --setting default= \\
        --out docs/results/<date>-train-probe/hit-rate-32k
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

import megacontext as mc
from megacontext import synthetic
from megacontext.focus import FocusLoop
from megacontext.lexical_scorer import retrieved_blocks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lexical_share_probe import parse_setting, repeated_passkey

KINDS = ("passkey", "kv", "code", "passkey-rep")
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
OUTCOMES = ("window", "hit", "partial", "miss")


def task_seed(haystack: str, i: int) -> int:
    return synthetic.train_seed(13, i) if haystack == "train" else 7000 + i


def outcome(needle: list[int], first_token_block: int, want: set[int]) -> str:
    """``window`` / ``hit`` / ``partial`` / ``miss`` for the needle's blocks."""
    if all(b >= first_token_block for b in needle):
        return "window"
    far = [b for b in needle if b < first_token_block]
    got = sum(b in want for b in far)
    return "hit" if got == len(far) else ("partial" if got else "miss")


def render(rows: list[dict], command: str) -> str:
    out = ["# Needle blocks the lexical scorer opens", "", f"`{command}`", ""]
    names = list(dict.fromkeys(r["setting"] for r in rows))
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    out.append("| setting | " + " | ".join(f"{k}: hit / far" for k in kinds) + " | all |")
    out.append("|---|" + "---:|" * (len(kinds) + 1))
    for s in names:
        cells = []
        for k in [*kinds, None]:
            c = Counter(r["outcome"] for r in rows if r["setting"] == s and k in (None, r["kind"]))
            far = c["hit"] + c["partial"] + c["miss"]
            cells.append(
                f"{c['hit']} / {far}" + (f" ({c['partial']} partial)" if c["partial"] else "")
            )
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    out += ["", "Misses (setting, task, needle blocks, wanted):", ""]
    for r in rows:
        if r["outcome"] in ("miss", "partial"):
            out.append(f"- {r['setting']}: {r['task']}: {r['needle']} not in {r['want']}")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--haystack", choices=("train", "validation"), required=True)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--w-max", type=int, default=1024)
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS[:3]))
    ap.add_argument("--reps", type=int, default=4, help="tasks per kind and depth")
    ap.add_argument("--setting", action="append", default=[], metavar="NAME=KEY:VALUE,...")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    settings = [parse_setting(s) for s in args.setting] or [("default", {})]
    import pyarrow as pa
    import pyarrow.parquet as pq

    args.out.mkdir(parents=True, exist_ok=True)
    command = "OMP_NUM_THREADS=1 uv run python bench/lexical_hit_rate.py " + " ".join(sys.argv[1:])
    base = mc.load_base("smollm2-135m")
    cfg = mc.MegaContextConfig(model=base.name, w_max=args.w_max, levels=3, lens="lexical")
    rows: list[dict] = []
    i = 0
    for kind in args.kinds:
        for depth in DEPTHS:
            for _ in range(args.reps):
                seed = task_seed(args.haystack, i)
                i += 1
                if kind == "passkey-rep":
                    if args.haystack != "train":
                        ap.error("passkey-rep is built from training filler only")
                    hist, _, _, (lo, hi) = repeated_passkey(base, args.length, depth, seed)
                else:
                    t = synthetic.GENERATORS[kind](
                        base.tokenizer, length=args.length, depth=depth, seed=seed,
                        haystack=args.haystack,
                    )  # fmt: skip
                    hist = base.encode(t.context)
                    lo, hi = t.meta["needle_span"]
                loop = FocusLoop(base, None, None, cfg)
                loop.ingest(hist)
                wc, bs = loop.wc, cfg.block_size
                lv, st = wc.levels.cpu(), wc.starts.cpu()
                first_tok = int(st[lv == 0].min()) // bs
                needle = sorted({lo // bs, (hi - 1) // bs})
                for name, upd in settings:
                    _, want = retrieved_blocks(loop.tree, wc, cfg.model_copy(update=upd))
                    w = set(want.tolist())
                    rows.append(
                        {
                            "setting": name,
                            "kind": kind,
                            "depth": depth,
                            "seed": seed,
                            "task": f"{kind}/d{depth}/s{seed}",
                            "needle": needle,
                            "want": sorted(w),
                            "outcome": outcome(needle, first_tok, w),
                        }
                    )
                print(
                    i, rows[-1]["task"], [r["outcome"] for r in rows[-len(settings) :]], flush=True
                )
        pq.write_table(pa.Table.from_pylist(rows), args.out / "rows.parquet")
        (args.out / "results.md").write_text(
            render(rows, command)
            + f"\n{time.strftime('%Y-%m-%d')}; CPU, torch {torch.__version__}; "
            f"{args.length:,}-token histories, W = {args.w_max:,}\n"
        )


if __name__ == "__main__":
    main()
