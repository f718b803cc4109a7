"""The design probe behind ``attention_sink`` and the shipped memory's three levels.

On **training-split** text only (the ``train`` split of the shard directory that
``megacontext ingest`` made of the standard library: tag ``code`` or ``doc``), the
64 tokens ending at a target are scored after ``T`` tokens of history at ``W =
1,024``, truncation against the recency working context under the default positions
(``nearby``) with and without the attention sink
(:func:`megacontext.working_context.with_sink`), with two and three gist levels, with
mean pooling and with the shipped memory's GistNet (levels above the two it serves
are mean-pooled, :func:`megacontext.focus.gist_fn`). Held-out text is never read
here: this is where the defaults were chosen; ``bench/positions_long_history.py
--texts heldout`` measures them.

Targets: ``20,000 + 37,003·k + T`` tokens into the split's documents concatenated in
id order, ``k < --targets``. Rows go to ``OUT/rows.json`` as they finish and
``OUT/results.md`` is rewritten (means minus truncation). Run (one thread)::

    OMP_NUM_THREADS=1 uv run python bench/sink_levels_probe.py --tag code \\
        --out docs/results/2026-12-04-train-probe/code
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import megacontext as mc
from megacontext.data import ShardDataset
from megacontext.eval.peers import View, streaming_view, truncation_view, view_nll
from megacontext.focus import FocusLoop, position_gap
from megacontext.working_context import WorkingContext, entry_positions, with_sink

H = 64
MEMORY = Path(__file__).resolve().parents[1] / "megacontext/memories/smollm2-135m"


def train_ids(data: Path, tag: str) -> torch.Tensor:
    ds = ShardDataset(data, "train", [tag])
    order = sorted(range(len(ds)), key=lambda i: ds.info(i)["doc_id"])
    return torch.cat([torch.from_numpy(ds.tokens(i).astype("int64")) for i in order])


def recency_views(base, gistnet, hist: torch.Tensor, w: int, levels: int) -> dict[str, View]:
    """``{"sink": View, "nosink": View}``: the recency WC at ``w_max = w`` over ``hist``."""
    cfg = mc.MegaContextConfig(model=base.name, w_max=w, levels=levels)
    loop = FocusLoop(base, gistnet, None, cfg)
    loop.ingest(hist)
    wc = WorkingContext.from_tree(loop.tree, w, cfg.protected_tokens)
    emb = wc.embeddings(base, loop.tree)
    pos, nxt = entry_positions(
        wc.levels, wc.nodes, wc.block_size, cfg.positions, max_gap=position_gap(cfg, base)
    )
    per_level = torch.bincount(wc.levels.long(), minlength=levels + 1).tolist()
    out = {}
    for name, on in (("sink", True), ("nosink", False)):
        e, p = with_sink(base, emb, pos, wc.levels, on)
        out[name] = View(name, e, p, nxt, {"per_level": per_level})
    return out


def minus_truncation(rows: list[dict], title: str) -> str:
    """The Markdown table of ``rows``: each method's mean NLL minus truncation's per
    history length ``T`` (a method missing from a row is left out of its mean)."""
    lengths = sorted({r["T"] for r in rows})
    methods = [k for k in rows[0] if k not in ("T", "target", "truncation", "per_level")]
    lines = [
        title,
        "",
        "| method | "
        + " | ".join(f"T={T:,} (n={sum(r['T'] == T for r in rows)})" for T in lengths)
        + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    for m in methods:
        cells = []
        for T in lengths:
            g = [r for r in rows if r["T"] == T and m in r]
            cells.append(f"{sum(r[m] - r['truncation'] for r in g) / len(g):+.3f}" if g else "–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_probe(
    args: argparse.Namespace,
    base: mc.Base,
    first_target: Callable[[int], int],
    method_rows: Callable[[torch.Tensor, torch.Tensor], dict],
    title: str,
    script: str,
    notes: Callable[[list[dict]], list[str]] = lambda rows: [],
) -> None:
    """The training-split probe loop: for each ``T`` of ``args.lengths`` and
    ``k < args.targets``, the ``H`` targets ending ``first_target(T) + 37,003·k``
    tokens into the ``args.tag`` documents of ``args.data``'s train split, read after
    ``T`` tokens of history by truncation, StreamingLLM and ``method_rows(hist,
    targets)`` (``{method: NLL}``). Rows go to ``args.out/rows.json`` as they finish;
    ``results.md`` is the table (:func:`minus_truncation`), ``notes(rows)`` and the
    run's data, machine and command."""
    args.out.mkdir(parents=True, exist_ok=True)
    ids = train_ids(args.data, args.tag)
    rows: list[dict] = []
    t0 = time.time()
    for T in args.lengths:
        for k in range(args.targets):
            end = first_target(T) + 37_003 * k
            if end > ids.numel():
                break
            targets, hist = ids[end - H : end], ids[end - H - T : end - H]
            row: dict = {"T": T, "target": end}
            for name, view in (("truncation", truncation_view), ("streaming", streaming_view)):
                row[name] = float(view_nll(base, view(base, hist, args.w), targets).mean())
            row.update(method_rows(hist, targets))
            rows.append(row)
            print(json.dumps(row), flush=True)
            (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
            body = minus_truncation(rows, title) + "\n".join(notes(rows))
            body += (
                f"\n- data: {args.data} train split, tag {args.tag} ({ids.numel():,} tokens)\n"
                f"- machine: CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; "
                f"{time.time() - t0:.0f} s so far\n"
                f"- command: OMP_NUM_THREADS=1 uv run python bench/{script} "
                f"{' '.join(sys.argv[1:])}\n"
            )
            (args.out / "results.md").write_text(body)


def per_level_notes(rows: list[dict], which: str = "2 and 3 levels") -> list[str]:
    per = {T: next(r["per_level"] for r in rows if r["T"] == T) for T in {r["T"] for r in rows}}
    lines = ["", f"WC entries per level (LOD0, LOD1, ...), {which}:", ""]
    return lines + [f"- T={T:,}: {v}" for T, v in sorted(per.items())] + [""]


def probe_parser(doc: str, lengths: list[int]) -> argparse.ArgumentParser:
    """The training-split probes' shared arguments (``--tag --out --data --lengths
    --targets --w``), described by the first paragraph of ``doc``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--tag", choices=("code", "doc"), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path("artifacts/data/stdlib"))
    ap.add_argument("--lengths", type=int, nargs="+", default=lengths)
    ap.add_argument("--targets", type=int, default=4)
    ap.add_argument("--w", type=int, default=1024)
    return ap


def main() -> None:
    args = probe_parser(__doc__, [32768, 131072]).parse_args()
    torch.manual_seed(0)
    base = mc.load_base("smollm2-135m")
    shipped = mc.GistNet.load(MEMORY / "gistnet.safetensors")

    def method_rows(hist: torch.Tensor, targets: torch.Tensor) -> dict:
        row: dict = {}
        per_level = []
        for gname, g in (("meanpool", None), ("shipped", shipped)):
            for levels in (2, 3):
                views = recency_views(base, g, hist, args.w, levels)
                for sname, v in views.items():
                    row[f"{gname} L{levels} {sname}"] = float(view_nll(base, v, targets).mean())
                if gname == "meanpool":
                    per_level.append(views["sink"].meta["per_level"])
        row["per_level"] = per_level
        return row

    title = (
        f"# Training-split probe ({args.tag}, W = {args.w:,}): next-64-token NLL minus truncation"
    )
    run_probe(
        args,
        base,
        lambda T: 20_000 + T,
        method_rows,
        title,
        "sink_levels_probe.py",
        per_level_notes,
    )


if __name__ == "__main__":
    main()
