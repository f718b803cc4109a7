"""Would gists in the base model's own key/value space keep more? A training-free probe.

Issue 15's bar asks 32 LOD1 gists read in place of a 1,024-token region ``R`` to keep
at least half of what removing ``R`` costs the next tokens (a quarter for one LOD2
gist, 1024×). Embedding-space gists keep 0.00–0.13 when trained and at most 0.40–0.45
when optimised per region (``bench/gist_oracle.py``). Session 15 named the other
format: per-layer key/value gists made from the base model's own activations. This
bench measures that format's simplest, training-free member beside the embedding-space
gists, on the same held-out documents and the same target tokens:

- the history's keys and values per layer come from one forward over its ``T`` tokens
  (a causal model: ``R``'s rows saw ``R`` in full, as a cache written at ingest does);
- ``kv-mean``: each group of ``g`` rows of ``R`` (``g = 32``: 32×; ``g = 1,024``:
  1024×) becomes one row per layer and head, ``v̄ = mean v`` and ``k̄ = RoPE_p(mean
  RoPE_{-p_j}(k_j))`` (every key turned back to position 0 before the mean, the mean
  rotated to the gist's position ``p``, :func:`megacontext.kernels.kv_splice.rope_rotate`
  with the model's own frequencies);
- ``kv-mean+log g``: the same row with ``log g`` added to its attention logit, so that
  it draws the attention mass its ``g`` rows would if their keys were equal:
  ``exp(q·k̄ + log g) = g·exp(q·k̄)``. It is computed exactly as ``g`` copies of the
  row (a softmax over ``g`` equal logits), a cost a real cache would not pay;
- ``emb:<name>``: the compression stress's embedding-space gists (the LOD1 or LOD2
  view of :func:`megacontext.eval.compression.compression_views`, mean pooling or a
  GistNet), read with the same targets;
- ``tokens`` (ratio 1, ``runtime`` positions only): ``R`` as its own tokens, read
  where the runtime puts its gists (before the prefix): what any gist read there could
  keep at most, were it lossless.

Positions: ``own`` gives a gist its span centre (the stress's ``global`` scheme);
``runtime`` is the runtime's ``nearby`` scheme for this working context: the ``n``
gists at positions ``0 .. n-1``, the prefix tokens after them at ``n .. n+s-1``, the
targets from ``n + s`` (the embedding views under ``nearby``; the KV rows re-rotated
there, the prefix's keys moved ``n`` on). The control reads ``R`` as its tokens, every
token at its own index. ``dropped`` reads the prefix alone, as the stress's view under
each setting does: the targets still at ``T`` (``own``) or right after the prefix
(``runtime``).

Targets: the 63 tokens after the first one of the 64 after the history (each
predicted from the previous target's row: no condition predicts from a row of ``R``,
which the KV conditions do not have). ``R`` is the newest LOD2 node (the stress's
``near``, where removing it costs the most). ``kept = (NLL_dropped − NLL) /
(NLL_dropped − NLL_control)`` of the means over documents.

Run (one process; ~2 min per document on the 2-core CPU)::

    OMP_NUM_THREADS=2 uv run python bench/gist_kv_mean.py --per-kind 3 \\
        --gistnet shipped=megacontext/memories/smollm2-135m/gistnet.safetensors \\
        --out docs/results/2026-12-05-gist-oracle/kv-mean

``rows.parquet`` (a row per document, condition, ratio and positions), ``results.md``;
``--render`` rebuilds the report.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import megacontext as mc
from megacontext.cache import rope_inv_freq
from megacontext.eval.compression import compression_views, gist_history
from megacontext.focus import position_gap
from megacontext.kernels.kv_splice import rope_rotate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gist_quality import H, T, bench_parser, documents, rendered, run_meta
from positions_long_history import write_rows

SPAN = 1024  # R: the newest LOD2 node
RATIOS = (32, 1024)
POSITIONS = ("own", "runtime")


def _history_kv(base, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` ``[1, h_kv, T, D]`` of ``ids`` at positions 0..T-1."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        base.model(
            input_ids=ids[None].to(base.device),
            position_ids=torch.arange(len(ids), device=base.device)[None],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    return [(layer.keys, layer.values) for layer in cache.layers]


def merged(
    past: list,
    s: int,
    e: int,
    g: int,
    at: torch.Tensor,
    inv_freq: torch.Tensor,
    bias: bool,
    shift: int = 0,
) -> list:
    """``past`` with rows ``[s, e)`` replaced per group of ``g`` by their key/value mean,
    the key re-rotated to position ``at [(e - s) / g]``; with ``bias``, each merged row
    repeated ``g`` times (its logit + log g); the prefix's keys (rows ``[0, s)``) moved
    ``shift`` positions on. Rows after ``e`` are not supported (``R`` is the newest)."""
    n = (e - s) // g
    src = torch.arange(s, e)
    delta = (at.repeat_interleave(g) - src).view(1, 1, -1)
    out = []
    for k, v in past:
        if k.shape[2] != e:
            raise ValueError(f"the cache has {k.shape[2]} rows; R must end it at {e}")
        kr = rope_rotate(k[:, :, s:e].float(), delta, inv_freq)
        km = kr.view(*kr.shape[:2], n, g, -1).mean(3).to(k.dtype)
        vm = v[:, :, s:e].view(*v.shape[:2], n, g, -1).mean(3)
        if bias:
            km, vm = km.repeat_interleave(g, dim=2), vm.repeat_interleave(g, dim=2)
        kp = k[:, :, :s]
        if shift:
            kp = rope_rotate(kp, torch.full((1, 1, s), shift), inv_freq)
        out.append((torch.cat([kp, km], 2), torch.cat([v[:, :, :s], vm], 2)))
    return out


def _score_past(base, past: list, targets: torch.Tensor, start: int) -> float:
    """Mean NLL of ``targets[1:]``, the targets read after the cache ``past`` from
    position ``start``."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(past):
        cache.update(k, v, i)
    n = len(targets) - 1
    with torch.no_grad():
        out = base.model(
            input_ids=targets[None, :-1].to(base.device),
            position_ids=(start + torch.arange(n, device=base.device))[None],
            past_key_values=cache,
            use_cache=True,
        )
    logp = F.log_softmax(out.logits[0].float(), -1)
    return float(-logp.gather(1, targets[1:, None].to(logp.device)).mean())


def _score_view(base, view, targets: torch.Tensor) -> float:
    """Mean NLL of ``targets[1:]`` after a compression-stress view (its rows, then the
    targets from its ``next_position``)."""
    n = len(targets) - 1
    embeds = torch.cat([view.embeds.float(), base.embed(targets[:-1]).float()])
    pos = torch.cat([view.positions, view.next_position + torch.arange(n)])
    with torch.no_grad():
        out = base.model(
            inputs_embeds=embeds[None].to(base.dtype),
            position_ids=pos[None].to(base.device),
            logits_to_keep=n,
        )
    logp = F.log_softmax(out.logits[0].float(), -1)
    return float(-logp.gather(1, targets[1:, None].to(logp.device)).mean())


def document_rows(base, ids: torch.Tensor, gistnets: dict) -> list[dict]:
    """Every condition's NLL for one document (module doc)."""
    inv_freq = rope_inv_freq(base.model)
    past = _history_kv(base, ids[:T])
    targets = ids[T : T + H]
    s, e = T - SPAN, T
    control = _score_past(base, past, targets, T)
    prefix = [(k[:, :, :s], v[:, :, :s]) for k, v in past]
    # "dropped" as the stress's views read it under each positions setting: `own`
    # (global) leaves R's positions empty, `runtime` (nearby) reads the targets right
    # after the prefix
    dropped = {
        "own": _score_past(base, prefix, targets, T),
        "runtime": _score_past(base, prefix, targets, s),
    }
    rows = []

    def add(cond: str, ratio: int, positions: str, nll: float) -> None:
        rows.append(
            {
                "condition": cond,
                "ratio": ratio,
                "positions": positions,
                "nll": nll,
                "control": control,
                "dropped": dropped[positions],
            }
        )

    for g in RATIOS:
        n = SPAN // g
        for positions in POSITIONS:
            if positions == "own":  # the span centre, the targets at T
                at, shift, start = s + g * torch.arange(n) + g // 2, 0, T
            else:  # nearby: the gists at 0..n-1, then the prefix, then the targets
                at, shift, start = torch.arange(n), n, s + n
            for bias in (False, True):
                cond = "kv-mean+log g" if bias else "kv-mean"
                got = merged(past, s, e, g, at, inv_freq, bias, shift)
                add(cond, g, positions, _score_past(base, got, targets, start))
    # the ceiling at the runtime's positions: R as its own 1,024 tokens, read where
    # the runtime puts the gists (before the prefix), the targets right after the prefix
    moved = torch.cat([ids[s:e], ids[:s]])
    add("tokens", 1, "runtime", _score_past(base, _history_kv(base, moved), targets, T))
    cfg = mc.MegaContextConfig(model=base.name, w_max=1024)
    for name, net in gistnets.items():
        tree = gist_history(base, ids[:T], net)
        for positions, scheme in (("own", "global"), ("runtime", "nearby")):
            gap = position_gap(cfg.model_copy(update={"positions": scheme}), base)
            views = compression_views(
                base,
                tree,
                T // SPAN - 1,
                ("lod1", "lod2"),
                scheme=scheme,
                max_gap=gap,
                sink=cfg.attention_sink,
            )
            for cond, g in (("lod1", 32), ("lod2", 1024)):
                add(f"emb:{name}", g, positions, _score_view(base, views[cond], targets))
    return rows


def _kept(sel: list[dict]) -> float:
    drop, ctrl = np.mean([r["dropped"] for r in sel]), np.mean([r["control"] for r in sel])
    got = np.mean([r["nll"] for r in sel])
    return float((drop - got) / (drop - ctrl)) if drop - ctrl > 1e-3 else math.nan


def render(out: Path) -> None:
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "rows.parquet").to_pylist()
    meta = json.loads((out / "meta.json").read_text())
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    conds = list(dict.fromkeys(r["condition"] for r in rows))
    lines = [
        "# Key/value-space gists, training-free, beside embedding-space gists (issue 15)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; {meta['date']}; torch {meta['torch']}, "
        f"transformers {meta['transformers']}; base {meta['base']} ({meta['dtype']}).",
        "",
        f"History T = {T}, region R = the newest {SPAN} tokens, the {H - 1} targets after "
        "the first of the next 64 (`bench/gist_kv_mean.py`'s docstring). kept = "
        "(NLL_dropped − NLL) / (NLL_dropped − NLL_control) of the means over documents; "
        "issue 15's bar: ≥ 0.5 at 32×, ≥ 0.25 at 1024×. Positions: `own` = each gist at "
        "its span centre, the targets right after R; `runtime` = the `nearby` scheme's: "
        "the gists at 0 .. n−1, then the prefix, the targets right after the prefix, "
        "so R's gists are read about 1,000 positions back. `tokens` (1×, `runtime` "
        "only): R as its own tokens read where the gists are, before the prefix.",
        "",
        "| kind | docs | ΔNLL dropped (own / runtime) | R's tokens before the prefix "
        "(runtime, 1×) | condition | 32× own | 32× runtime | 1024× own | 1024× runtime |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]

    def kept(kind: str, cond: str, g: int, positions: str) -> str:
        sel = [
            r
            for r in rows
            if (r["kind"], r["condition"], r["ratio"], r["positions"]) == (kind, cond, g, positions)
        ]
        return f"{_kept(sel):+.2f}" if sel else "–"

    for kind in kinds:
        docs = sorted({r["doc"] for r in rows if r["kind"] == kind})
        gaps = []
        for positions in POSITIONS:
            ref = {
                r["doc"]: r["dropped"] - r["control"]
                for r in rows
                if (r["kind"], r["positions"]) == (kind, positions)
            }
            gaps.append(f"{np.mean(list(ref.values())):+.3f}")
        gap = " / ".join(gaps)
        ceiling = kept(kind, "tokens", 1, "runtime")
        for i, cond in enumerate(c for c in conds if c != "tokens"):
            cells = [kept(kind, cond, g, p) for g in RATIOS for p in POSITIONS]
            lead = f"| {kind} | {len(docs)} | {gap} | {ceiling}" if i == 0 else "| | | |"
            lines.append(f"{lead} | `{cond}` | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument(
        "--gistnet",
        action="append",
        default=[],
        help="NAME=PATH: also read this GistNet's gists (mean pooling is always read)",
    )
    args = ap.parse_args()
    if rendered(args, render):
        return
    torch.manual_seed(0)
    base = mc.load_base("smollm2-135m")
    gistnets: dict = {"mean-pool": None}
    for spec in args.gistnet:
        name, _, path = spec.partition("=")
        gistnets[name] = mc.GistNet.load(path)
    (args.out / "meta.json").write_text(json.dumps(run_meta(base), indent=1))
    rows: list[dict] = []
    for doc_id, kind, ids in documents(base, args.data, args.per_kind):
        got = document_rows(base, ids, gistnets)
        rows += [{"doc": doc_id, "kind": kind, **r} for r in got]
        print(f"{doc_id} ({kind}): control {got[0]['control']:.3f}", flush=True)
        write_rows(rows, args.out / "rows.parquet")
    render(args.out)


if __name__ == "__main__":
    main()
