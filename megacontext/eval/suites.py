"""Evaluation suites: each returns result rows (dicts) that the report turns into
tables and plots. All methods of one row group read the same history, the same
targets and the same budget ``W`` (see :mod:`megacontext.eval.peers`).

- :func:`budget_sweep`: ΔNLL@H vs budget on held-out long documents (standard
  library code files and pydoc topics prose) that the full model can still read.
- :func:`needle_suite`: passkey / key-value / code-identifier tasks
  (:mod:`megacontext.synthetic`) over depths × lengths × budgets: NLL of the answer
  and retrieval accuracy of the greedy answer.
- :func:`longbench_suite`: LongBench rows (gold answer's ΔNLL@H given context +
  question; generated-answer F1 / accuracy with LongBench's metric).
- :func:`boundary_suite`: the same needle at a block edge, straddling one, and
  mid-block (bar: no jump > 0.2 ΔNLL between placements), plus
  :func:`positional_consistency` (gists' RoPE positions are their span centres after
  a real sequence of swaps, checked on the cached layer-0 keys).
- :func:`runtime_suite`: decode through a session and the frozen baseline;
  latency per block, swap rate, residency, expand/collapse mass (telemetry rows).

Sizes: ``tiny`` (tests, seconds on ``tiny-llama``), ``small`` (the committed CPU
run), ``medium`` (the issue's W = 512 → 4k sweep over 6k-token histories).
"""

from __future__ import annotations

import math
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, InvariantError
from .ablations import ablation_suite
from .compression import compression_suite
from .external import record_task
from .metrics import (
    delta_nll,
    exact_match,
    max_over_answers,
    qa_f1,
    recovered_fraction,
    retrieval_score,
)
from .peers import MC_METHODS, METHODS, View, _cut, build_view, view_generate, view_nll

__all__ = [
    "SIZES",
    "SUITES",
    "add_derived",
    "boundary_suite",
    "budget_sweep",
    "compare_methods",
    "longbench_suite",
    "needle_suite",
    "positional_consistency",
    "runtime_suite",
    "sweep_documents",
]

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "budget": {"history": 384, "budgets": [128, 256], "docs": 2, "horizon": 16},
        "needle": {"lengths": [320], "depths": [0.2], "budgets": [128], "tasks": ["passkey"]},
        "longbench": {"rows": 1, "context": 320, "budgets": [128], "max_new": 4},
        "boundary": {"length": 320, "depth": 0.2, "budget": 128, "seeds": 1},
        "runtime": {"history": 320, "budget": 128, "decode": 64},
        "compression": {"history": 2048, "horizon": 16, "narrative": 1, "code": 1, "passkey": 1},
        "ablation": {"docs": 2, "history": 640, "budget": 192, "feed": 128},
    },
    "small": {
        "budget": {"history": 1024, "budgets": [256, 512], "docs": 2, "horizon": 64},
        "needle": {
            "lengths": [1024],
            "depths": [0.25, 0.75],
            "budgets": [256],
            "tasks": ["passkey"],
        },
        "longbench": {"rows": 1, "context": 1024, "budgets": [256], "max_new": 12},
        "boundary": {"length": 768, "depth": 0.3, "budget": 256, "seeds": 1},
        "runtime": {"history": 512, "budget": 256, "decode": 96},
        "compression": {"history": 2048, "horizon": 64, "narrative": 2, "code": 2, "passkey": 2},
        "ablation": {"docs": 2, "history": 2048, "budget": 512, "feed": 256},
    },
    "medium": {
        "budget": {"history": 4096, "budgets": [512, 1024, 2048], "docs": 2, "horizon": 64},
        "needle": {
            "lengths": [2048, 4096],
            "depths": [0.1, 0.5, 0.9],
            "budgets": [512, 1024],
            "tasks": ["passkey", "kv", "code"],
        },
        "longbench": {"rows": 3, "context": 4096, "budgets": [512, 1024], "max_new": 32},
        "boundary": {"length": 2048, "depth": 0.3, "budget": 512, "seeds": 4},
        "runtime": {"history": 4096, "budget": 2048, "decode": 256},
        "compression": {"history": 4096, "horizon": 64, "narrative": 4, "code": 4, "passkey": 4},
        "ablation": {"docs": 4, "history": 4096, "budget": 1024, "feed": 512},
    },
}

Log = Callable[[str], None]


def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _methods_for(system: Any, methods: Sequence[str] | None) -> list[str]:
    methods = list(METHODS if methods is None else methods)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise InputError(f"unknown methods {bad}; expected some of {list(METHODS)}")
    if system is None:
        methods = [m for m in methods if m not in MC_METHODS]
    elif system.gistnet is None and "megacontext" in methods:
        # mean-pool gists *are* the system's gists: identical to megacontext
        methods = [m for m in methods if m != "mc_meanpool"]
    if system is not None and system.lensnet is None and "megacontext" in methods:
        methods = [m for m in methods if m != "mc_recency"]
    return methods


def compare_methods(
    base: Any,
    history: torch.Tensor,
    targets: torch.Tensor,
    budget: int,
    *,
    system: Any = None,
    methods: Sequence[str] | None = None,
    answer: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    reuse: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per method: NLL@H of ``targets`` after ``history`` at budget ``W``.

    ``answer``: also decode greedily (``max_new``, ``stop``) and score the text
    against ``references`` (``metric``: ``"f1"``, ``"contains"`` or ``"em"``).
    ``full`` is skipped when ``history + targets`` does not fit the model.
    ``reuse``: a dict shared across the budgets of one history; the ``full`` row
    (which does not depend on ``W``) is computed once and copied.
    """
    history = torch.as_tensor(history, dtype=torch.long).flatten()
    targets = torch.as_tensor(targets, dtype=torch.long).flatten()
    T, H = history.numel(), targets.numel()
    record_task(history, targets, budget, tags, answer)  # for external peers (run_eval)
    rows = []
    for method in _methods_for(system, methods):
        if method == "full" and base.max_positions and base.max_positions < T + H:
            continue
        if method == "full" and reuse is not None and "full" in reuse:
            rows.append({**reuse["full"], **(tags or {}), "budget": int(budget)})
            continue
        t0 = time.perf_counter()
        view = build_view(base, history, budget, method, system)
        # MegaContext views are read by the system's own base (a trained LoRA adapter
        # is part of the system); every peer by the frozen base.
        nll = view_nll(view.session.base if view.session is not None else base, view, targets)
        row: dict[str, Any] = {
            **(tags or {}),
            "method": method,
            "budget": int(budget),
            "history_tokens": T,
            "horizon": H,
            "entries": view.entries,
            "nll": float(nll.mean()),
            "token_nll": [float(x) for x in nll],
        }
        if answer is not None:
            text = _answer(base, view, answer)
            row["generated"] = text
            row["score"] = _score(text, answer)
        row["seconds"] = time.perf_counter() - t0
        if method == "full" and reuse is not None:
            reuse["full"] = dict(row)
        if view.session is not None:
            row["wc_per_level"] = view.meta["per_level"]  # entries at LOD0, LOD1, ...
            row["focus_actions"] = view.meta["actions"]  # allocator actions at ingest
            row["_session"] = view.session
        rows.append(row)
    return rows


def _answer(base: Any, view: View, answer: dict[str, Any]) -> str:
    """Greedy answer; stop strings count only after the first non-blank text (the
    model often opens with a newline)."""
    stop = tuple(answer.get("stop", ("\n",)))
    if view.session is None:
        return view_generate(base, view, answer["max_new"], stop)
    # through the session: argmax of its next-token logits, then feed() the token
    # (the same per-token path as generate(), refocus every block)
    session, eos = view.session, base.tokenizer.eos_token_id
    toks: list[int] = []
    for _ in range(answer["max_new"]):
        tok = int(session.next_token_logits().argmax())
        if tok == eos:
            break
        toks.append(tok)
        text = base.decode(toks).lstrip()
        if text and any(s in text for s in stop):
            break
        session.feed([tok])
    return _cut(base.decode(toks), stop)


def _score(text: str, answer: dict[str, Any]) -> float:
    refs = answer["references"]
    metric = answer.get("metric", "f1")
    if metric == "f1":
        return max_over_answers(qa_f1, text, refs)
    if metric == "em":
        return max_over_answers(exact_match, text, refs)
    if metric == "retrieval":
        return max_over_answers(retrieval_score, text, refs)
    if metric == "contains":
        return float(any(r.strip() and r.strip() in text for r in refs))
    raise InputError(f"unknown answer metric {metric!r}")


def add_derived(rows: list[dict[str, Any]], group: Sequence[str]) -> list[dict[str, Any]]:
    """Add ``nll_full``, ``nll_trunc``, ``delta_nll`` (vs full), ``delta_trunc``
    (truncation's ΔNLL on the same targets) and ``recovered`` to every row, grouping
    rows that share the keys ``group`` (same history, targets and budget)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in group), []).append(r)
    for members in groups.values():
        by = {r["method"]: r["nll"] for r in members}
        full = by.get("full", math.nan)
        trunc = by.get("truncation", math.nan)
        for r in members:
            r["nll_full"] = full
            r["nll_trunc"] = trunc
            r["delta_nll"] = delta_nll(r["nll"], full)
            r["delta_trunc"] = delta_nll(trunc, full)
            r["recovered"] = recovered_fraction(r["nll"], trunc, full)
    return rows


# ------------------------------------------------------------------ documents


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def sweep_documents(base: Any, n: int, tokens: int) -> list[tuple[str, str, torch.Tensor]]:
    """``n`` held-out documents of at least ``tokens`` tokens, alternating code (the
    largest-first sorted standard-library modules) and prose (consecutive slices of
    ``pydoc_data/topics.py``'s topics). Returns ``(doc_id, kind, ids[:tokens])``."""
    import pydoc_data.topics as topics

    code: list[tuple[str, str, torch.Tensor]] = []
    files = sorted(_stdlib_dir().glob("*.py"), key=lambda p: (-p.stat().st_size, p.name))
    for p in files:
        if len(code) >= (n + 1) // 2:
            break
        # ~3.5 chars per token for code: read just enough text
        text = p.read_text(encoding="utf-8", errors="replace")[: tokens * 8]
        ids = base.encode(text)
        if ids.numel() >= tokens:
            code.append((f"code/{p.name}", "code", ids[:tokens]))
    prose_ids = base.encode("\n\n".join(topics.topics[k] for k in sorted(topics.topics)))
    prose = [
        (f"prose/topics@{i * tokens}", "prose", prose_ids[i * tokens : (i + 1) * tokens])
        for i in range(n // 2)
        if (i + 1) * tokens <= prose_ids.numel()
    ]
    docs = []
    for i in range(max(len(code), len(prose))):
        docs += code[i : i + 1] + prose[i : i + 1]
    if len(docs) < n:
        raise InputError(f"found only {len(docs)} documents of {tokens} tokens, need {n}")
    return docs[:n]


def _pop_sessions(rows: list[dict[str, Any]], sink: list[dict[str, Any]] | None) -> None:
    for r in rows:
        s = r.pop("_session", None)
        if s is not None and sink is not None:
            for h in s.history:
                sink.append({**{k: r.get(k) for k in ("suite", "doc", "method", "budget")}, **h})


# ------------------------------------------------------------------ suites


def budget_sweep(
    base: Any,
    system: Any,
    size: str = "small",
    *,
    methods: Sequence[str] | None = None,
    telemetry: list[dict[str, Any]] | None = None,
    log: Log = _log_default,
) -> list[dict[str, Any]]:
    """ΔNLL@H vs budget: each document's first ``history`` tokens are read through
    each budget; the targets are the next ``horizon`` tokens."""
    cfg = SIZES[size]["budget"]
    H = cfg["horizon"]
    docs = sweep_documents(base, cfg["docs"], cfg["history"] + H)
    rows: list[dict[str, Any]] = []
    for doc_id, kind, ids in docs:
        hist, tgt = ids[: cfg["history"]], ids[cfg["history"] :]
        reuse: dict[str, dict[str, Any]] = {}
        for w in cfg["budgets"]:
            log(f"budget: {doc_id} W={w}")
            tags = {"suite": "budget", "doc": doc_id, "kind": kind}
            out = compare_methods(
                base, hist, tgt, w, system=system, methods=methods, tags=tags, reuse=reuse
            )
            _pop_sessions(out, telemetry)
            rows += out
    return add_derived(rows, ("suite", "doc", "budget"))


def _synthetic():
    try:
        from .. import synthetic
    except ImportError as exc:  # the module is optional in a partial checkout
        raise InputError(f"the needle suites need megacontext.synthetic ({exc})") from None
    return synthetic


def needle_suite(
    base: Any,
    system: Any,
    size: str = "small",
    *,
    methods: Sequence[str] | None = None,
    telemetry: list[dict[str, Any]] | None = None,
    seed: int = 0,
    log: Log = _log_default,
) -> list[dict[str, Any]]:
    """Needle-in-a-haystack: tasks × lengths × depths × budgets. ``nll`` is the
    answer's NLL; ``score`` is 1 when the greedy answer contains the needle."""
    syn = _synthetic()
    cfg = SIZES[size]["needle"]
    rows: list[dict[str, Any]] = []
    i = 0
    for task in cfg["tasks"]:
        for length in cfg["lengths"]:
            for depth in cfg["depths"]:
                t = syn.GENERATORS[task](
                    base.tokenizer, length=length, depth=depth, seed=seed * 1000 + i
                )
                i += 1
                hist, tgt = base.encode(t.context), base.encode(t.target)
                doc = f"{task}/L{length}/d{depth}/s{t.meta['seed']}"
                reuse: dict[str, dict[str, Any]] = {}
                for w in cfg["budgets"]:
                    log(f"needle: {doc} W={w}")
                    tags = {
                        "suite": "needle",
                        "doc": doc,
                        "task": task,
                        "length": length,
                        "depth": depth,
                        "depth_actual": float(t.meta.get("depth_actual", depth)),
                    }
                    ans = {
                        "max_new": tgt.numel() + 2,
                        "references": [t.meta["answer"]],
                        "metric": "contains",
                    }
                    out = compare_methods(
                        base,
                        hist,
                        tgt,
                        w,
                        system=system,
                        methods=methods,
                        answer=ans,
                        tags=tags,
                        reuse=reuse,
                    )
                    _pop_sessions(out, telemetry)
                    rows += out
    return add_derived(rows, ("suite", "doc", "budget"))


def longbench_suite(
    base: Any,
    system: Any,
    size: str = "small",
    *,
    data_dir: str | Path | None = None,
    methods: Sequence[str] | None = None,
    telemetry: list[dict[str, Any]] | None = None,
    log: Log = _log_default,
) -> list[dict[str, Any]]:
    """LongBench rows: the context (middle-truncated to ``context`` tokens, as
    LongBench truncates to the model's length) + question; ΔNLL@H of the first gold
    answer and the greedy answer's LongBench metric. Returns ``[]`` when the data
    folder is absent."""
    from .longbench import build_prompt, load_longbench, longbench_dir, middle_truncate

    cfg = SIZES[size]["longbench"]
    folder = Path(data_dir) if data_dir is not None else longbench_dir()
    if folder is None or not folder.is_dir():
        log("longbench: data folder absent, suite skipped")
        return []
    rows: list[dict[str, Any]] = []
    for ex in load_longbench(folder, limit=cfg["rows"]):
        ctx_ids = middle_truncate(base.encode(ex.context), cfg["context"])
        prefix, suffix = build_prompt(ex)
        hist = torch.cat([base.encode(prefix), ctx_ids, base.encode(suffix)])
        tgt = base.encode(" " + ex.answers[0])[:64]
        metric = {"f1": "f1", "accuracy": "retrieval"}.get(ex.metric, "em")
        reuse: dict[str, dict[str, Any]] = {}
        for w in cfg["budgets"]:
            log(f"longbench: {ex.task}/{ex.id} W={w}")
            tags = {"suite": "longbench", "doc": f"{ex.task}/{ex.id}", "task": ex.task}
            ans = {"max_new": cfg["max_new"], "references": ex.answers, "metric": metric}
            out = compare_methods(
                base,
                hist,
                tgt,
                w,
                system=system,
                methods=methods,
                answer=ans,
                tags=tags,
                reuse=reuse,
            )
            _pop_sessions(out, telemetry)
            rows += out
    return add_derived(rows, ("suite", "doc", "budget"))


def boundary_suite(
    base: Any,
    system: Any,
    size: str = "small",
    *,
    methods: Sequence[str] | None = ("full", "truncation", "mc_recency", "megacontext"),
    telemetry: list[dict[str, Any]] | None = None,
    log: Log = _log_default,
) -> list[dict[str, Any]]:
    """The same passkey (same seed) with its digits at a block edge, straddling a
    block boundary, and mid-block; the report compares ΔNLL across placements."""
    syn = _synthetic()
    cfg = SIZES[size]["boundary"]
    bs = system.config.block_size if system is not None else 32
    rows: list[dict[str, Any]] = []
    for seed in range(cfg["seeds"]):
        for align in ("edge", "straddle", "mid"):
            t = syn.passkey(
                base.tokenizer,
                length=cfg["length"],
                depth=cfg["depth"],
                seed=seed,
                needle_align=align,
                block_size=bs,
            )
            hist, tgt = base.encode(t.context), base.encode(t.target)
            log(f"boundary: seed={seed} align={align}")
            tags = {
                "suite": "boundary",
                "doc": f"passkey/s{seed}/{align}",
                "seed": seed,
                "align": align,
                "needle_start": int(t.meta["needle_span"][0]),
            }
            out = compare_methods(
                base, hist, tgt, cfg["budget"], system=system, methods=methods, tags=tags
            )
            _pop_sessions(out, telemetry)
            rows += out
    return add_derived(rows, ("suite", "doc", "budget"))


class _RandomLens(torch.nn.Module):
    """A focus scorer with seeded uniform scores in [-1, 1]: drives many legal swaps
    (expands and collapses) so the positional check sees real refocus histories."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, entries, tail, levels, spans, distance):
        n = entries.shape[1]
        return torch.rand(1, n, generator=self.gen) * 2 - 1


@torch.no_grad()
def positional_consistency(
    base: Any,
    system: Any,
    history: torch.Tensor,
    decode: torch.Tensor,
    *,
    budget: int = 256,
    seed: int = 0,
    atol: float = 1e-3,
) -> dict[str, Any]:
    """Run a real session (``exact`` KV mode, a random scorer forcing swaps) over
    ``history`` then teacher-forced ``decode`` tokens; after every refocus check
    that each WC entry's position is ``start + span // 2`` and that its cached
    layer-0 key equals RoPE(k_proj(norm(embedding)), that position) (layer-0 keys
    depend only on the entry and its position). Raises InvariantError on the first
    mismatch; returns counts."""
    mcx = system.with_config(
        base=base, lensnet=_RandomLens(seed), w_max=int(budget), kv_mode="exact"
    )
    cfg = mcx.config
    session = mcx.session()
    session.ingest(history)
    layer = base.model.model.layers[0]
    attn = layer.self_attn
    checks = {"refocus_checked": 0, "actions": 0, "gists_checked": 0, "max_key_err": 0.0}

    def check() -> None:
        wc = session.wc
        spans = wc.spans.cpu()
        want = wc.starts.cpu() + spans // 2
        if not torch.equal(wc.positions().cpu(), want):
            bad = int(torch.nonzero(wc.positions().cpu() != want)[0, 0])
            raise InvariantError(f"entry {bad}: position != span centre", entry=bad)
        n = len(wc)
        x = layer.input_layernorm(wc.embeddings(base, session.tree)[None].to(base.dtype))
        hd = attn.head_dim
        k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
        cos, sin = base.model.model.rotary_emb(x, wc.positions()[None].to(base.device))
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        cached = session.cache.kv[0, 0, :1, :, :n].to(k.dtype)
        err = float((cached - k).abs().max())
        checks["max_key_err"] = max(checks["max_key_err"], err)
        if err > atol * max(1.0, float(k.abs().max())):
            raise InvariantError(f"cached layer-0 keys differ from RoPE at span centres by {err}")
        checks["refocus_checked"] += 1
        checks["gists_checked"] += int((wc.levels > 0).sum())

    check()
    for tok in torch.as_tensor(decode).tolist():
        session.feed([tok])
        if session.num_tokens % cfg.block_size == 0:
            check()
    checks["actions"] = len(session.actions)
    return checks


def runtime_suite(
    base: Any,
    system: Any,
    size: str = "small",
    *,
    telemetry: list[dict[str, Any]] | None = None,
    log: Log = _log_default,
) -> list[dict[str, Any]]:
    """Teacher-forced decode of ``decode`` tokens after a ``history``-token code
    document, through a MegaContext session at ``W = budget`` (telemetry every
    block) and through the frozen base model over its last ``W`` tokens with an
    ordinary KV cache (the baseline); one row per method with the per-block latency
    and the session's swap/residency statistics. Also runs the positional check."""
    from transformers import DynamicCache

    from ..base import cache_kwarg
    from ..telemetry import residency_histogram

    cfg = SIZES[size]["runtime"]
    bs = system.config.block_size
    doc_id, _, ids = sweep_documents(base, 1, cfg["history"] + cfg["decode"])[0]
    hist, dec = ids[: cfg["history"]], ids[cfg["history"] :]
    w = cfg["budget"]
    rows: list[dict[str, Any]] = []
    # frozen baseline: last W tokens, plain cache, token by token
    log(f"runtime: baseline {doc_id} W={w}")
    view = build_view(base, hist, w, "truncation")
    kw = cache_kwarg(base.model)
    cache = DynamicCache()  # filled in place by every forward
    t0 = time.perf_counter()
    with torch.no_grad():
        base.model(
            inputs_embeds=view.embeds[None].to(base.dtype),
            position_ids=view.positions[None].to(base.device),
            use_cache=True,
            logits_to_keep=1,
            **{kw: cache},
        )
        prefill = time.perf_counter() - t0
        t1 = time.perf_counter()
        for j, tok in enumerate(dec.tolist()):
            base.model(
                input_ids=torch.tensor([[tok]], device=base.device),
                position_ids=torch.tensor([[view.next_position + j]], device=base.device),
                use_cache=True,
                logits_to_keep=1,
                **{kw: cache},
            )
        decode_s = time.perf_counter() - t1
    blocks = dec.numel() / bs
    rows.append(
        {
            "suite": "runtime",
            "doc": doc_id,
            "method": "baseline",
            "budget": w,
            "latency_block_ms": decode_s * 1e3 / blocks,
            "prefill_s": prefill,
        }
    )
    log(f"runtime: megacontext {doc_id} W={w}")
    view = build_view(base, hist, w, "megacontext", system)
    s = view.session
    t0 = time.perf_counter()
    s.feed(dec)
    decode_s = time.perf_counter() - t0
    hist_rows = s.history
    if telemetry is not None:
        telemetry += [
            {"suite": "runtime", "doc": doc_id, "method": "megacontext", "budget": w, **h}
            for h in hist_rows
        ]
    expand_mass = sum(a.cost_delta for a in s.actions if a.kind == "expand")
    collapse_mass = -sum(a.cost_delta for a in s.actions if a.kind == "collapse")
    n_iter = max(len(hist_rows) - 1, 1)  # the first row is the ingest's refocus
    rows.append(
        {
            "suite": "runtime",
            "doc": doc_id,
            "method": "megacontext",
            "budget": w,
            "latency_block_ms": decode_s * 1e3 / blocks,
            "swap_rate": len([a for a in s.actions]) / max(s.num_tokens // bs, 1),
            "swap_rate_decode": sum(h["n_expand"] + h["n_collapse"] for h in hist_rows[1:])
            / n_iter,
            "mean_residency": (
                sum(s.residencies) / len(s.residencies) if s.residencies else math.nan
            ),
            "expand_mass": float(expand_mass),
            "collapse_mass": float(collapse_mass),
            "residency_histogram": str(residency_histogram(s.residencies)),
        }
    )
    log("runtime: positional consistency")
    pos = positional_consistency(base, system, hist[: cfg["history"]], dec[: 2 * bs], budget=w)
    rows.append({"suite": "runtime", "doc": doc_id, "method": "positional_check", **pos})
    return rows


SUITES: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "budget": budget_sweep,
    "needle": needle_suite,
    "longbench": longbench_suite,
    "boundary": boundary_suite,
    "runtime": runtime_suite,
    "compression": compression_suite,
    "ablation": ablation_suite,
}
