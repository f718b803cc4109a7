"""Compression stress: can a gist stand in for the tokens it summarises?

The guide's substitutability test at 32× (LOD1) and 1024× (LOD2): a history of
``T`` tokens is read by the base model with one aligned region ``R`` = one LOD2 node
(``bs²`` tokens, ``[j·bs², (j+1)·bs²)``) replaced, everything else as tokens at its own
positions, and the ``H`` tokens after the history are scored. Conditions (one
:class:`~megacontext.eval.peers.View` each, scored by
:func:`~megacontext.eval.peers.view_nll`):

============  ===========================================  ======  ==============
condition     ``R`` is read as                             ratio   entries
============  ===========================================  ======  ==============
``control``   its ``bs²`` tokens (= the full history)      1       ``T``
``lod1``      its ``bs`` LOD1 gists                        bs      ``T − bs² + bs``
``lod2``      its single LOD2 gist                         bs²     ``T − bs² + 1``
``dropped``   nothing (removed, nothing in its place)      inf     ``T − bs²``
============  ===========================================  ======  ==============

A gist sits at its span centre ``start + span // 2``: the views are built as
:class:`~megacontext.working_context.WorkingContext` entries and read through
``WorkingContext.embeddings`` / ``positions()``, the runtime's own code. The gists
come from a real :class:`~megacontext.tree.MegaContextTree` that the history is
appended to with the system's GistNet (``None``: mean pooling), levels gisted as
the tree gists them (``gistnet.at_level(l)``).

Placements: ``far`` (R = the oldest node, ``j = 0``) and ``near`` (the node ending
right before the targets, ``j = T/bs² − 1``). ``near`` is stricter than anything the
runtime reads: a session keeps its newest ``recent_tokens`` (two blocks) as tokens.

Per row: ``delta_control = NLL(cond) − NLL(control)`` (the guide's bar: ≤ 0.2 nats)
and ``kept_fraction = (NLL_dropped − NLL_cond) / (NLL_dropped − NLL_control)``: the
share of what removing R costs that the gists keep (NaN when ``|NLL_dropped −
NLL_control| < 0.001``: the targets do not need R, so a pass there is trivial).

Targets: ``narrative`` (pydoc topics prose) and ``code`` (the largest standard-library
modules), validation split only, as :func:`~megacontext.eval.suites.sweep_documents`
picks them: the next
``H`` tokens; and ``passkey`` (:func:`megacontext.synthetic.passkey`, validation-split
filler, evaluation seeds), whose whole
statement lies inside R: the history is the filler + statement (trimmed at its start
to ``T`` tokens), the question follows the history, and only the answer's tokens are
scored (the question itself is never compressed).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import synthetic
from ..config import MegaContextConfig
from ..errors import InputError, InvariantError
from ..focus import position_gap
from ..lora import has_lora
from ..tree import MegaContextTree
from ..working_context import WorkingContext, with_sink
from .common import SIZES, Log, log_default, sweep_documents
from .metrics import bootstrap_ci, recovered_fraction
from .peers import View, view_nll
from .tables import by, ci, fmt, mean, pyplot, save_figure, table, vals

__all__ = [
    "BAR",
    "CONDITIONS",
    "PLACEMENTS",
    "compression_documents",
    "compression_passkey",
    "compression_section",
    "compression_suite",
    "compression_views",
    "gist_history",
]

CONDITIONS = ("control", "lod1", "lod2", "dropped")
PLACEMENTS = ("far", "near")
BAR = 0.2  # the guide: ΔNLL@H within 0.2 nats of the uncompressed control
KEPT_EPS = 1e-3  # nats: below this, removing R costs nothing there is to keep

# ------------------------------------------------------------------ views


@torch.no_grad()
def gist_history(base: Any, history: Any, gistnet: Any = None, *, block_size: int = 32) -> Any:
    """A two-level :class:`~megacontext.tree.MegaContextTree` holding ``history``
    (``[T]`` ids) and its LOD1/LOD2 gists by ``gistnet`` (``None``: mean pooling),
    stored in the runtime's dtype (bf16 for a bf16 base, else fp16)."""
    ids = torch.as_tensor(history, dtype=torch.long).flatten().cpu()
    tree = MegaContextTree(
        base.dim,
        block_size=block_size,
        levels=2,
        dtype=torch.bfloat16 if base.dtype == torch.bfloat16 else torch.float16,
        model_name=base.name[:31],
    )
    tree.append(ids, lambda x: base.embed(x.cpu()), gistnet)
    return tree


def compression_views(
    base: Any,
    tree: Any,
    node: int,
    conditions: Sequence[str] = CONDITIONS,
    *,
    scheme: str = "global",
    max_gap: int = 0,
    sink: bool = False,
    sink_at: str = "window",
) -> dict[str, View]:
    """The views of the history held by ``tree`` (``T`` tokens, ``T`` a multiple of
    ``bs²``) with the LOD2 node ``node`` (tokens ``[node·bs², (node+1)·bs²)``) read as
    each of ``conditions``, every other token as itself, at the positions the runtime
    gives those entries under ``scheme`` (:func:`~megacontext.working_context.
    entry_positions`; ``global``: every token at its own index, a gist at its span
    centre, the targets from ``T``), behind the attention sink when ``sink`` and the
    view starts with a gist (:func:`~megacontext.working_context.with_sink`).
    ``View.meta`` holds ``levels``/``nodes``."""
    bs = int(tree.block_size)
    span = bs * bs
    T = int(tree.num_tokens)
    if T % span or span > T:
        raise InputError(f"the history has {T} tokens; need a positive multiple of {span}")
    if not 0 <= node < T // span:
        raise InputError(f"LOD2 node {node} is outside the history's {T // span} nodes")
    s, e = node * span, (node + 1) * span
    region = {
        "control": (torch.zeros(span, dtype=torch.long), torch.arange(s, e)),
        "lod1": (torch.ones(bs, dtype=torch.long), torch.arange(s // bs, e // bs)),
        "lod2": (torch.full((1,), 2, dtype=torch.long), torch.tensor([node])),
        "dropped": (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)),
    }
    views: dict[str, View] = {}
    for cond in conditions:
        if cond not in region:
            raise InputError(f"unknown condition {cond!r}; expected some of {list(CONDITIONS)}")
        lv, nd = region[cond]
        levels = torch.cat(
            [torch.zeros(s, dtype=torch.long), lv, torch.zeros(T - e, dtype=torch.long)]
        )
        nodes = torch.cat([torch.arange(s), nd, torch.arange(e, T)])
        # not a legal runtime WC (near gists the protected tail, dropped leaves a gap),
        # so no check(): only its embeddings() and positions() are used
        wc = WorkingContext(
            levels, nodes, block_size=bs, max_level=2, w_max=max(len(levels), 1), num_tokens=T
        )
        meta = {"levels": levels, "nodes": nodes, "region": (s, e), "node": node}
        pos, nxt = wc.positions(scheme, max_gap).cpu(), wc.next_position(scheme, max_gap)
        embeds, pos = with_sink(base, wc.embeddings(base, tree), pos, levels, sink, sink_at)
        views[cond] = View(cond, embeds, pos, nxt, meta)
    return views


# ------------------------------------------------------------------ documents


def compression_documents(
    base: Any, narrative: int, code: int, tokens: int
) -> list[tuple[str, str, torch.Tensor]]:
    """``(doc_id, kind, ids[:tokens])``: ``narrative`` slices of the pydoc topics prose
    and ``code`` of the largest standard-library modules (as ``sweep_documents``)."""
    n = 2 * max(narrative, code)
    docs = sweep_documents(base, n, tokens) if n else []
    kinds = {"prose": "narrative", "code": "code"}
    out, want = [], {"narrative": narrative, "code": code}
    for doc_id, kind, ids in docs:
        k = kinds[kind]
        if want[k] > 0:
            out.append((doc_id, k, ids))
            want[k] -= 1
    return out


def compression_passkey(
    base: Any, tokens: int, span: int, placement: str, seed: int, *, block_size: int = 32
) -> dict[str, Any]:
    """A pass key whose whole statement lies in the LOD2 node of ``placement``:
    ``history`` (``[tokens]`` ids: filler + statement, trimmed at its start),
    ``stream`` (question + answer ids, read after the history), ``answer`` (ids, the
    last tokens of ``stream``: the scored targets) and ``statement`` ``[start, end)``
    in history coordinates."""
    query = "\n\nWhat is the pass key? The pass key is"
    n_query = base.encode(query).numel()
    slack = 8
    length = tokens + n_query + slack
    node = 0 if placement == "far" else tokens // span - 1
    want = node * span + span // 2 + slack  # statement's start, before trimming
    depth = min(max(want / max(length - n_query - 24, 1), 0.0), 1.0)
    t = synthetic.passkey(
        base.tokenizer,
        length=length,
        depth=depth,
        seed=seed,
        block_size=block_size,
        haystack="validation",
    )
    if not t.context.endswith(query):
        raise InvariantError(f"passkey s{seed}: the context does not end with the question")
    hist = base.encode(t.context[: -len(query)])
    q = base.encode(query)
    ctx = base.encode(t.context)
    if not torch.equal(torch.cat([hist, q]), ctx):
        raise InvariantError(f"passkey s{seed}: the question does not tokenize apart")
    answer = base.encode(t.target)
    excess = hist.numel() - tokens
    if excess < 0:
        raise InvariantError(f"passkey s{seed}: {hist.numel()} history tokens, need {tokens}")
    s0, s1 = (int(x) - excess for x in t.meta["statement_span"])
    lo, hi = node * span, (node + 1) * span
    if not lo <= s0 < s1 <= hi:
        raise InvariantError(
            f"passkey s{seed}: statement at [{s0}, {s1}) is not inside R = [{lo}, {hi})"
        )
    return {
        "history": hist[excess:],
        "stream": torch.cat([q, answer]),
        "answer": answer,
        "statement": (s0, s1),
        "key": t.meta["answer"],
    }


# ------------------------------------------------------------------ suite


def _reader(base: Any, system: Any) -> tuple[Any, str]:
    """The model that reads every condition: the system's own base (a trained LoRA
    adapter is part of the system), the frozen base without a system."""
    reader = base if system is None else system.base
    return reader, "base + LoRA" if has_lora(reader.model) else "frozen base"


def _rows_for(
    reader: Any,
    tree: Any,
    node: int,
    stream: torch.Tensor,
    n_scored: int,
    tags: dict[str, Any],
    control: dict[str, Any] | None,
    scheme: str,
    max_gap: int,
    sink: bool,
    sink_at: str = "window",
) -> list[dict[str, Any]]:
    """One row per condition; ``control`` (a dict shared by a document's placements)
    caches the control NLL, which does not depend on the placement."""
    bs = int(tree.block_size)
    ratio = {"control": 1.0, "lod1": float(bs), "lod2": float(bs * bs), "dropped": math.inf}
    conds = [c for c in CONDITIONS if not (c == "control" and control and "nll" in control)]
    views = compression_views(
        reader, tree, node, conds, scheme=scheme, max_gap=max_gap, sink=sink, sink_at=sink_at
    )
    rows = []
    for cond in CONDITIONS:
        t0 = time.perf_counter()
        if cond == "control" and control and "nll" in control:
            tok, entries, secs = control["nll"], control["entries"], control["seconds"]
        else:
            tok = view_nll(reader, views[cond], stream)[-n_scored:]
            # the WC's cost; an attention sink read before it is not an entry
            entries = int(views[cond].meta["levels"].numel())
            secs = time.perf_counter() - t0
            if cond == "control" and control is not None:
                control.update(nll=tok, entries=entries, seconds=secs)
        rows.append(
            {
                **tags,
                "condition": cond,
                "ratio": ratio[cond],
                "node": node,
                "region_start": node * bs * bs,
                "region_end": (node + 1) * bs * bs,
                "entries": entries,
                "nll": float(tok.mean()),
                "token_nll": [float(x) for x in tok],
                "seconds": secs,
            }
        )
    by = {r["condition"]: r["nll"] for r in rows}
    for r in rows:
        r["delta_control"] = r["nll"] - by["control"]
        r["kept_fraction"] = recovered_fraction(r["nll"], by["dropped"], by["control"], KEPT_EPS)
        r["bar"] = BAR
        r["passed"] = bool(r["delta_control"] <= BAR)
    return rows


def compression_suite(
    base: Any,
    system: Any,
    size: str = "small",
    *,
    documents: Sequence[tuple[str, str, Any]] | None = None,
    telemetry: list[dict[str, Any]] | None = None,
    methods: Sequence[str] | None = None,
    seed: int = 0,
    log: Log = log_default,
) -> list[dict[str, Any]]:
    """Substitutability of LOD1 (``bs``×) and LOD2 (``bs²``×) gists (see the module
    docstring): rows per (document, placement, condition).

    ``documents``: ``(doc_id, kind, ids)`` to use instead of the size's narrative and
    code documents (each needs ``history + horizon`` tokens). ``telemetry`` and
    ``methods`` are the runner's calling convention: this suite runs no session and
    compares conditions, not peer methods.
    """
    if size not in SIZES or "compression" not in SIZES[size]:
        raise InputError(f"unknown size {size!r} for the compression suite")
    cfg = SIZES[size]["compression"]
    T, H = int(cfg["history"]), int(cfg["horizon"])
    bs = int(system.config.block_size) if system is not None else 32
    span = bs * bs
    if T % span or 2 * span > T:
        raise InputError(
            f"compression: history={T} tokens must be a multiple of bs² = {span} holding "
            f"at least two LOD2 nodes (far and near)"
        )
    if base.max_positions and base.max_positions < T + H:
        raise InputError(f"compression: history + horizon = {T + H} exceeds {base.name}'s context")
    reader, reader_name = _reader(base, system)
    gistnet = None if system is None else system.gistnet
    # the runtime's positions: the system's scheme (the default config's without one)
    mc_cfg = MegaContextConfig(block_size=bs) if system is None else system.config
    scheme, max_gap = mc_cfg.positions, position_gap(mc_cfg, reader)
    sink, sink_at = mc_cfg.attention_sink, mc_cfg.sink_at
    gist_name = "mean-pool" if gistnet is None else type(gistnet).__name__
    if documents is None:
        documents = compression_documents(reader, cfg["narrative"], cfg["code"], T + H)
    rows: list[dict[str, Any]] = []
    common = {
        "suite": "compression",
        "gistnet": gist_name,
        "reader": reader_name,
        "positions": scheme,
    }
    for doc_id, kind, ids in documents:
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if ids.numel() < T + H:
            raise InputError(
                f"compression: document {doc_id!r} has {ids.numel()} tokens, needs "
                f"history {T} + horizon {H} = {T + H}"
            )
        tree = gist_history(reader, ids[:T], gistnet, block_size=bs)
        control: dict[str, Any] = {}
        for placement in PLACEMENTS:
            node = 0 if placement == "far" else T // span - 1
            log(f"compression: {doc_id} {placement} (node {node})")
            tags = {**common, "kind": kind, "doc": doc_id, "placement": placement}
            tags |= {"history_tokens": T, "horizon": H}
            rows += _rows_for(
                reader, tree, node, ids[T : T + H], H, tags, control, scheme, max_gap, sink, sink_at
            )
    for placement in PLACEMENTS:
        for i in range(cfg["passkey"]):
            s = seed * 1000 + i
            task = compression_passkey(reader, T, span, placement, s, block_size=bs)
            doc = f"passkey/{placement}/s{s}"
            log(f"compression: {doc}")
            tree = gist_history(reader, task["history"], gistnet, block_size=bs)
            node = 0 if placement == "far" else T // span - 1
            n = task["answer"].numel()
            tags = {**common, "kind": "passkey", "doc": doc, "placement": placement}
            tags |= {"history_tokens": T, "horizon": n, "statement_start": task["statement"][0]}
            rows += _rows_for(
                reader, tree, node, task["stream"], n, tags, None, scheme, max_gap, sink, sink_at
            )
    return rows


# ------------------------------------------------------------------ report

KINDS = ("narrative", "code", "passkey")


def _kinds(rows: list[dict]) -> list[str]:
    present = {r["kind"] for r in rows}
    return [k for k in KINDS if k in present] + sorted(present - set(KINDS))


def _mean(rows: list[dict], key: str) -> float:
    return mean(vals(rows, key))


def _kept_of_means(g: list[dict], dropped: list[dict], control: list[dict]) -> float:
    return recovered_fraction(
        _mean(g, "nll"), _mean(dropped, "nll"), _mean(control, "nll"), KEPT_EPS
    )


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    kinds = _kinds(rows)
    conds = ("lod1", "lod2", "dropped")
    placements = [p for p in PLACEMENTS if by(rows, placement=p)]
    fig, axes = plt.subplots(
        1, len(placements), figsize=(5.2 * len(placements), 4.2), squeeze=False
    )
    width = 0.8 / len(conds)
    for ax, placement in zip(axes[0], placements, strict=True):
        top = 2 * BAR
        for i, cond in enumerate(conds):
            means, err = [], [[], []]
            for k in kinds:
                p, lo, hi = bootstrap_ci(
                    [
                        r["delta_control"]
                        for r in by(rows, kind=k, placement=placement, condition=cond)
                    ]
                )
                means.append(p)
                err[0].append(p - lo if math.isfinite(p) else 0.0)
                err[1].append(hi - p if math.isfinite(p) else 0.0)
                top = max(top, hi if math.isfinite(hi) else top)
            r0 = by(rows, condition=cond)[0]["ratio"] if by(rows, condition=cond) else 0
            ratio = f"{r0:.0f}×" if math.isfinite(r0) else "removed"
            ax.bar(
                np.arange(len(kinds)) + i * width,
                means,
                width,
                yerr=err,
                capsize=3,
                label=f"{cond} ({ratio})",
                color=f"C{i}",
            )
        ax.axhline(BAR, color="r", ls="--", lw=1, label=f"bar: {BAR} nats")
        ax.set_ylim(top=2 * top)  # headroom above the highest interval (symlog)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_xticks(np.arange(len(kinds)) + width * (len(conds) - 1) / 2)
        ax.set_xticklabels(kinds)
        ax.set_ylabel("ΔNLL vs uncompressed control (nats, symlog)")
        ax.set_title(f"region R = the {placement} LOD2 node")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def compression_section(rows: list[dict], out: Path, lines: list[str]) -> None:
    """Append the compression section (a table per kind, PASS/FAIL vs the 0.2-nat
    bar, kept fractions) to ``lines`` and write ``compression.png`` into ``out``."""
    cr = by(rows, suite="compression")
    if not cr:
        return
    first = cr[0]
    lines += ["## Compression stress (substitutability at 32× and 1024×)", ""]
    lines.append(
        f"A history of {first['history_tokens']} tokens; one aligned LOD2 region R "
        f"({first['region_end'] - first['region_start']} tokens) is read as its tokens "
        "(`control`), its LOD1 gists (`lod1`), its LOD2 gist (`lod2`), or not at all "
        "(`dropped`); "
        + (
            f"every entry at the runtime's positions under the `{first['positions']}` "
            "scheme (docs/positions.md). "
            if "positions" in first
            else "every other token at its own position, gists at their span centres. "
        )
        + "R is the oldest node (`far`) or the node right before the targets (`near`). "
        f"Gists: {first['gistnet']}; read by the {first['reader']}. ΔNLL = NLL(condition) − "
        "NLL(control) in nats on the same targets, mean over documents with a 95% "
        "bootstrap interval (2,000 resamples, seed 0); `kept` = (NLL_dropped − "
        "NLL_cond)/(NLL_dropped − NLL_control) of the mean NLLs, NaN where removing R "
        f"costs < {KEPT_EPS} nats. Verdict: the mean ΔNLL against the guide's bar "
        f"≤ {BAR}; a PASS where `dropped` passes too is trivial (the targets do not "
        "need R)."
    )
    lines.append("")
    for kind in _kinds(cr):
        kr = by(cr, kind=kind)
        n_docs = max(len({r["doc"] for r in by(kr, placement=p)}) for p in PLACEMENTS)
        h = _mean(kr, "horizon")
        what = "answer tokens" if kind == "passkey" else "next tokens"
        docs = f"{n_docs} document{'s' if n_docs != 1 else ''} per placement"
        lines += [f"### {kind} ({docs}, H = {h:.0f} {what})", ""]
        names = ", ".join(f"`{d}`" for d in dict.fromkeys(r["doc"] for r in kr))
        lines += [f"Documents: {names}.", ""]
        body = []
        for placement in PLACEMENTS:
            pr = by(kr, placement=placement)
            if not pr:
                continue
            dropped = by(pr, condition="dropped")
            control = by(pr, condition="control")
            trivial = _mean(dropped, "delta_control") <= BAR
            for cond in CONDITIONS:
                g = by(pr, condition=cond)
                if not g:
                    continue
                d = _mean(g, "delta_control")
                verdict = "PASS" if math.isfinite(d) and d <= BAR else "FAIL"
                if cond == "control":
                    verdict = "–"
                elif cond != "dropped" and verdict == "PASS" and trivial:
                    verdict = "PASS (trivial)"
                body.append(
                    [
                        placement,
                        cond,
                        "∞" if not math.isfinite(g[0]["ratio"]) else f"{g[0]['ratio']:.0f}×",
                        f"{_mean(g, 'entries'):.0f}",
                        f"{_mean(g, 'nll'):.3f}",
                        ci([r["delta_control"] for r in g]),
                        (
                            "–"
                            if cond in ("control", "dropped")
                            else fmt(_kept_of_means(g, dropped, control))
                        ),
                        verdict,
                    ]
                )
        lines += table(
            [
                "R",
                "condition",
                "ratio",
                "entries",
                "NLL",
                "ΔNLL vs control [95% CI]",
                "kept",
                f"bar ≤ {BAR}",
            ],
            body,
        )
        lines.append("")
    _plot(cr, out / "compression.png")
    lines += ["![ΔNLL vs control per condition and kind](compression.png)", ""]
