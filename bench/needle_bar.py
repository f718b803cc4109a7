"""Issue 14's retrieval bar: pass key / key-value needles, every method on the same tokens.

The needle suite (:func:`megacontext.eval.suites.needle_suite`: held-out filler,
evaluation seeds) at two settings of the issue's bar:

- ``6x``: 3,072-token histories at ``W = 512``, depths 10 %–90 %, pass key and
  key–value lookup; full context fits, so its exact match is the reference;
- ``32x``: 32,768-token histories at ``W = 1,024``, depths 10 %, 50 %, 90 %, pass key
  (full context does not fit the base model's 8,192 positions);
- ``medium``: the tasks of ``megacontext eval needle --size medium`` (pass key,
  key-value and code identifiers, 2k and 4k tokens, ``W`` 512 and 1,024) with the
  methods chosen here.

Per method: the answer's NLL, the greedy answer's exact match (``contains``), and the
recovered fraction ``(NLL_trunc - NLL_m) / (NLL_trunc - NLL_full)`` where full context
fits. The MegaContext rows use the system given (``--gistnet``, ``--lensnet``, ``--lens``); the peers
are the registry's. Run (one process, two threads)::

    OMP_NUM_THREADS=2 uv run python bench/needle_bar.py --setting 6x \\
        --gistnet artifacts/.../gistnet.safetensors --out docs/results/<date>-cpu-needle

``rows.parquet`` and ``results.md`` are rewritten after every setting.
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
from megacontext.eval import common, suites
from megacontext.eval.external import (
    base_model_source,
    fold_peers,
    recording_tasks,
    write_tasks,
)
from megacontext.train.config import apply_overrides

SETTINGS = {
    "6x": {
        "lengths": [3072],
        "depths": [0.1, 0.3, 0.5, 0.7, 0.9],
        "budgets": [512],
        "tasks": ["passkey", "kv"],
    },
    "32x": {"lengths": [32768], "depths": [0.1, 0.5, 0.9], "budgets": [1024], "tasks": ["passkey"]},
    # `megacontext eval needle --size medium`'s tasks (code identifiers too), any methods
    "medium": common.SIZES["medium"]["needle"],
}


def render(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Retrieval bar: pass key / key-value needles (answer NLL, exact match)",
        "",
        f"Command: `{meta['command']}`  ",
        f"{meta['machine']}; {meta['date']}; system: {meta['system']}.",
        "",
    ]
    for setting, budget in dict.fromkeys((r["setting"], r["budget"]) for r in rows):
        sub = [r for r in rows if r["setting"] == setting and r["budget"] == budget]
        docs = sorted({r["doc"] for r in sub})
        lengths = ", ".join(f"{n:,}" for n in sorted({r["length"] for r in sub}))
        methods = list(dict.fromkeys(r["method"] for r in sub))
        full = {r["doc"]: r["nll"] for r in sub if r["method"] == "full"}
        trunc = {r["doc"]: r["nll"] for r in sub if r["method"] == "truncation"}
        lines += [
            f"## {setting}: {lengths}-token histories, W = {budget:,} ({len(docs)} tasks)",
            "",
            "| method | answer NLL | exact match | recovered fraction |",
            "|---|---:|---:|---:|",
        ]
        for m in methods:
            mr = [r for r in sub if r["method"] == m]
            nll = float(np.mean([r["nll"] for r in mr]))
            em = float(np.mean([r.get("score", math.nan) for r in mr]))
            rec = math.nan
            if full and trunc:
                d = [r["doc"] for r in mr if r["doc"] in full and r["doc"] in trunc]
                lost = sum(trunc[x] - full[x] for x in d)
                got = sum(trunc[x] - r["nll"] for x in d for r in mr if r["doc"] == x)
                rec = got / lost if lost > 1e-6 else math.nan
            lines.append(f"| {m} | {nll:.3f} | {em:.2f} | {rec:.2f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def merge(specs: list[str], out: Path) -> None:
    """Render ``out/results.md`` from several runs' rows (the first run's methods keep
    their names; a later run's method already present under that name is renamed
    ``method (NAME)``), for a recovered fraction against another run's full context."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: list[dict] = []
    metas = []
    for spec in specs:
        name, _, folder = spec.partition("=")
        got = pq.read_table(Path(folder) / "rows.parquet").to_pylist()
        have = {(r["setting"], r["method"]) for r in rows}
        for r in got:
            if (r["setting"], r["method"]) in have:
                if r["method"] in ("full", "truncation"):
                    continue  # budget-free or identical peers: the first run's rows
                r["method"] = f"{r['method']} ({name})"
            rows.append(r)
        metas.append(json.loads((Path(folder) / "meta.json").read_text()))
    meta = {
        "command": "; ".join(m["command"] for m in metas)
        + f"; uv run python bench/needle_bar.py --merge {' '.join(specs)} --out {out}",
        "machine": metas[0]["machine"],
        "date": metas[0]["date"],
        "system": " / ".join(
            f"{s.partition('=')[0]}: {m['system']}" for s, m in zip(specs, metas, strict=True)
        ),
    }
    keep = sorted({k for r in rows for k in r})
    pq.write_table(
        pa.Table.from_pylist([{k: r.get(k) for k in keep} for r in rows]), out / "rows.parquet"
    )
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    (out / "results.md").write_text(render(rows, meta))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", action="append", choices=sorted(SETTINGS))
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="NAME=DIR",
        help="only render OUT from earlier runs' rows: NAME=DIR takes DIR/rows.parquet, "
        "methods already present keep their rows, new ones are named 'method (NAME)'",
    )
    ap.add_argument("--gistnet", type=Path, help="GistNet weights (default mean pooling)")
    ap.add_argument(
        "--lensnet", type=Path, help="LensNet weights for the system (use with --lens lensnet)"
    )
    ap.add_argument("--lens", default=None, help="MegaContextConfig.lens for the system")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other MegaContextConfig field of the system (value parsed as YAML)",
    )
    ap.add_argument("--methods", nargs="+", help="registry names (default: all that apply)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--fold",
        action="store_true",
        help="only re-render OUT with the external peers' rows (OUT/peers/*.parquet, e.g. "
        "from bash bench/peers/kvpress/run.sh OUT --presses snapkv) folded in",
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        merge(args.merge, args.out)
        return
    if args.fold:
        fold(args.out)
        return
    if not args.setting:
        ap.error("--setting is required (or --merge)")
    import platform
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    base = mc.load_base("smollm2-135m")
    gist = mc.GistNet.load(args.gistnet) if args.gistnet else None
    lensnet = mc.LensNet.load(args.lensnet) if args.lensnet else None
    rows: list[dict] = []
    meta = {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} uv run python "
        + " ".join(sys.argv),
        "machine": f"CPU {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    meta["base_model"] = base_model_source(base)
    with recording_tasks() as tasks:  # every compared task, for the external peers
        for setting in args.setting:
            cfg = SETTINGS[setting]
            extra = {"lens": args.lens} if args.lens else {}
            extra.update(apply_overrides({}, args.set))  # KEY=VALUE, values parsed as YAML
            config = mc.MegaContextConfig(model=base.name, w_max=max(cfg["budgets"]), **extra)
            system = mc.MegaContext(base, gist, lensnet, config)
            meta["system"] = (
                f"GistNet {args.gistnet or 'mean pooling'}, LensNet {args.lensnet or 'none'}, "
                f"config changes {extra}"
            )
            common.SIZES[f"bar-{setting}"] = {"needle": cfg}
            t0 = time.time()
            got = suites.needle_suite(
                base, system, f"bar-{setting}", methods=args.methods, seed=args.seed
            )
            for r in got:
                r.pop("_session", None)
                r["setting"] = setting
                r.setdefault("length", cfg["lengths"][0])
            rows += got
            print(f"{setting}: {len(got)} rows in {time.time() - t0:.0f} s", flush=True)
            keep = sorted({k for r in rows for k in r})
            pq.write_table(
                pa.Table.from_pylist([{k: r.get(k) for k in keep} for r in rows]),
                args.out / "rows.parquet",
            )
            meta["tasks"] = write_tasks(args.out, tasks)
            (args.out / "meta.json").write_text(json.dumps(meta, indent=1))
            (args.out / "results.md").write_text(render(rows, meta))


def fold(out: Path) -> None:
    """Rewrite ``out/results.md`` with the external peers' rows folded in (their
    derived columns against the same task's ``full`` and ``truncation`` rows);
    ``rows.parquet`` keeps this program's rows only."""
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "rows.parquet").to_pylist()
    meta = json.loads((out / "meta.json").read_text())
    folded, lines = fold_peers(out, rows, meta)
    where = {r["doc"]: (r["setting"], r["length"]) for r in rows}
    for r in folded[len(rows) :]:
        r["setting"], r["length"] = where[r["doc"]]
    text = render(folded, meta) + ("\n" + "\n".join(lines) + "\n" if lines else "")
    (out / "results.md").write_text(text)


if __name__ == "__main__":
    main()
