"""Are the gists worth reading? Compression stress on held-out text, per GistNet.

The compression-stress suite (:mod:`megacontext.eval.compression`) on documents the
trainer never saw, for each GistNet given (``mean-pool`` = no GistNet, the untrained
default, always included): a history of ``T = 2,048`` tokens, one aligned LOD2 region
``R`` (1,024 tokens: the oldest, ``far``, or the one right before the targets,
``near``) read as its tokens (``control``), as 32 LOD1 gists (32×), as one LOD2 gist
(1024×) or not at all (``dropped``), every entry at the runtime's positions; the next
64 tokens scored. ``kept = (NLL_dropped - NLL_cond) / (NLL_dropped - NLL_control)``:
the share of what removing R costs that the gists keep (issue 15's bar: ≥ 0.5 at 32×,
≥ 0.25 at 1024×; the guide's: ΔNLL vs control ≤ 0.2 nats).

Documents (none of them in the GistNet's training data):

- ``code``: validation-split code documents of the shard directory ``--data`` (the
  standard library as ``megacontext ingest`` split it), the longest first;
- ``prose``: the validation-split ``doc`` documents (pydoc topics) concatenated in
  id order, cut into consecutive windows;
- ``narrative``: LongBench NarrativeQA contexts (``../shared/data/longbench``; never
  used for training), the first ones long enough.

Run (one process, two threads; ~10 min per GistNet on a 2-core CPU)::

    OMP_NUM_THREADS=2 uv run python bench/gist_quality.py \\
        --gistnet pretrain=artifacts/checkpoints/pretrain-smollm2-cpu/cycle0-warm-gist/gistnet.safetensors \\
        --out docs/results/2026-12-04-cpu-gists

``rows.parquet`` holds every row (appended as measured, so ``--render`` rebuilds the
report of an interrupted run), ``results.md`` the tables, ``kept.png`` the plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

import megacontext as mc
from megacontext.data import ShardDataset
from megacontext.eval.compression import compression_suite
from megacontext.eval.metrics import bootstrap_ci
from megacontext.eval.tables import pyplot, save_figure

T, H = 2048, 64
LONGBENCH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "longbench"


def documents(
    base, data: Path, per_kind: int, horizon: int = H
) -> list[tuple[str, str, torch.Tensor]]:
    """``(doc_id, kind, ids[T + horizon])`` held-out documents, deterministic."""
    need = T + horizon
    out: list[tuple[str, str, torch.Tensor]] = []
    code = ShardDataset(data, "validation", ["code"])
    long = sorted(
        (i for i in range(len(code)) if int(code.lengths[i]) >= need),
        key=lambda i: (-int(code.lengths[i]), code.info(i)["doc_id"]),
    )
    for i in long[:per_kind]:
        ids = torch.from_numpy(code.tokens(i, 0, need).astype(np.int64))
        out.append((code.info(i)["doc_id"], "code", ids))
    prose = ShardDataset(data, "validation", ["doc"])
    order = sorted(range(len(prose)), key=lambda i: prose.info(i)["doc_id"])
    stream = np.concatenate([prose.tokens(i) for i in order]).astype(np.int64)
    for k in range(min(per_kind, len(stream) // need)):
        ids = torch.from_numpy(stream[k * need : (k + 1) * need].copy())
        out.append((f"pydoc-validation@{k * need}", "prose", ids))
    path = LONGBENCH / "narrativeqa.jsonl"
    if path.is_file():
        n = 0
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            ids = base.encode(row["context"])
            if ids.numel() >= need and n < per_kind:
                out.append((f"narrativeqa#{row.get('_id', n)}", "narrative", ids[:need]))
                n += 1
    return out


def bench_parser(doc: str, per_kind: int = 3) -> argparse.ArgumentParser:
    """The options the gist benches share: ``--data``, ``--per-kind``, ``--out``,
    ``--render``; the description is the first paragraph of ``doc``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("artifacts/data/stdlib"))
    ap.add_argument("--per-kind", type=int, default=per_kind)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--render", action="store_true", help="only rebuild the report")
    return ap


def rendered(args: argparse.Namespace, render) -> bool:
    """Make ``args.out``; with ``--render`` rebuild its report (``render(out)``) and
    return True: the bench has nothing more to do."""
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        render(args.out)
    return bool(args.render)


def run_meta(base, **extra) -> dict:
    """The command, machine and versions a bench folder's ``meta.json`` records."""
    import platform
    import sys

    import transformers

    return {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} uv run python "
        + " ".join(sys.argv),
        "machine": f"{platform.machine()} {platform.processor() or ''} "
        f"{torch.get_num_threads()} threads".strip(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "base": base.name,
        "dtype": str(base.dtype),
        **extra,
    }


def _mean(rows, **kw) -> float:
    v = [r["nll"] for r in rows if all(r[k] == x for k, x in kw.items())]
    return float(np.mean(v)) if v else math.nan


def render(out: Path) -> None:
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "rows.parquet").to_pylist()
    gists = list(dict.fromkeys(r["gist_name"] for r in rows))
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    meta = json.loads((out / "meta.json").read_text())
    lines = [
        "# Gist quality on held-out text (compression stress)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; {meta['date']}; torch {meta['torch']}, "
        f"transformers {meta['transformers']}; base {meta['base']} ({meta['dtype']}).",
        "",
        f"History T = {T} tokens, H = {H} targets, region R = 1,024 tokens (one LOD2 node), "
        "every entry at the runtime's positions (`hybrid`). ΔNLL = NLL(cond) − "
        "NLL(control), nats, mean over documents [95% bootstrap CI]; kept = (NLL_dropped "
        "− NLL_cond) / (NLL_dropped − NLL_control) of the means. Bars (issue 15): kept ≥ "
        "0.5 at 32× (lod1), ≥ 0.25 at 1024× (lod2); the guide's ΔNLL ≤ 0.2.",
        "",
        "| kind | placement | gists | docs | ΔNLL dropped | ΔNLL lod1 (32×) | kept lod1 | "
        "ΔNLL lod2 (1024×) | kept lod2 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    plot = {}
    for kind in kinds:
        for placement in ("far", "near"):
            for g in gists:
                sel = [
                    r
                    for r in rows
                    if r["kind"] == kind and r["placement"] == placement and r["gist_name"] == g
                ]
                if not sel:
                    continue
                docs = sorted({r["doc"] for r in sel})
                ctrl = _mean(sel, condition="control")
                drop = _mean(sel, condition="dropped")
                cells = []
                for cond in ("dropped", "lod1", "lod2"):
                    d = [
                        next(r["nll"] for r in sel if r["doc"] == doc and r["condition"] == cond)
                        - next(
                            r["nll"] for r in sel if r["doc"] == doc and r["condition"] == "control"
                        )
                        for doc in docs
                    ]
                    _, lo, hi = bootstrap_ci(d)
                    cells.append(f"{np.mean(d):+.3f} [{lo:+.3f}, {hi:+.3f}]")
                    if cond != "dropped":
                        gap = drop - ctrl
                        kept = (drop - _mean(sel, condition=cond)) / gap if gap > 1e-3 else math.nan
                        cells.append(f"{kept:.2f}")
                        plot[(kind, placement, cond, g)] = kept
                lines.append(
                    f"| {kind} | {placement} | {g} | {len(docs)} | " + " | ".join(cells) + " |"
                )
    lines += ["", "![kept fraction](kept.png)", ""]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    groups = [(k, p) for k in kinds for p in ("far", "near")]
    for ax, cond, bar in zip(axes, ("lod1", "lod2"), (0.5, 0.25), strict=True):
        width = 0.8 / max(len(gists), 1)
        for j, g in enumerate(gists):
            ys = [plot.get((k, p, cond, g), math.nan) for k, p in groups]
            ax.bar(np.arange(len(groups)) + j * width, ys, width, label=g)
        ax.axhline(bar, color="k", ls="--", lw=1, label=f"bar {bar}")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xticks(np.arange(len(groups)) + width * (len(gists) - 1) / 2)
        ax.set_xticklabels([f"{k}\n{p}" for k, p in groups], fontsize=8)
        ax.set_title(f"{cond} ({'32×' if cond == 'lod1' else '1024×'}): kept fraction")
    axes[0].set_ylabel("kept = (dropped − cond) / (dropped − control)")
    axes[1].legend(fontsize=8)
    save_figure(fig, out / "kept.png")


def main() -> None:
    ap = bench_parser(__doc__, per_kind=4)
    ap.add_argument("--gistnet", action="append", default=[], help="NAME=PATH (repeatable)")
    args = ap.parse_args()
    if rendered(args, render):
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = mc.load_base("smollm2-135m")
    (args.out / "meta.json").write_text(json.dumps(run_meta(base), indent=1))
    docs = documents(base, args.data, args.per_kind)
    print(f"{len(docs)} documents: " + ", ".join(f"{d} ({k})" for d, k, _ in docs), flush=True)
    systems = [("mean-pool", None)]
    for spec in args.gistnet:
        name, _, path = spec.partition("=")
        systems.append((name, mc.GistNet.load(path)))
    rows = []
    for name, gist in systems:
        cfg = mc.MegaContextConfig(model=base.name, w_max=1024)
        system = mc.MegaContext(base, gist, None, cfg)
        t0 = time.time()
        got = compression_suite(base, system, "small", documents=docs, seed=0)
        for r in got:
            r["gist_name"] = name
        rows += got
        print(f"{name}: {len(got)} rows in {time.time() - t0:.0f} s", flush=True)
        keep = sorted({k for r in rows for k in r})
        table = pa.Table.from_pylist([{k: r.get(k) for k in keep} for r in rows])
        pq.write_table(table, args.out / "rows.parquet")
        render(args.out)


if __name__ == "__main__":
    main()
