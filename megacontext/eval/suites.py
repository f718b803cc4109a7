"""Evaluation suites: each returns result rows (dicts) that the report turns into
tables and plots. All methods of one row group read the same history, the same
targets and the same budget ``W`` (see :mod:`megacontext.eval.peers`).

- :func:`budget_sweep`: ΔNLL@H vs budget on held-out long documents (standard
  library code files and pydoc topics prose of the validation split,
  :func:`~megacontext.eval.common.sweep_documents`) that the full model can still read.

Every evaluation document is in the validation split of the trainer's rule
(:func:`megacontext.data.split_of`), and every synthetic task uses held-out filler
(``haystack="validation"``) and a seed of the evaluation namespace
(:func:`megacontext.synthetic.check_seed`).
- :func:`needle_suite`: passkey / key-value / code-identifier tasks
  (:mod:`megacontext.synthetic`) over depths × lengths × budgets: NLL of the answer
  and retrieval accuracy of the greedy answer.
- :func:`longbench_suite`: LongBench rows (gold answer's ΔNLL@H given context +
  question; generated-answer F1 / accuracy with LongBench's metric).
- :func:`boundary_suite`: the same needle at a block edge, straddling one, and
  mid-block (bar: no jump > 0.2 ΔNLL between placements), plus
  :func:`positional_consistency` (every entry's RoPE position is the config's scheme's
  after a real sequence of swaps, checked on the cached layer-0 keys).
- :func:`runtime_suite`: decode through a session and the frozen baseline;
  latency per block, swap rate, residency, expand/collapse mass (telemetry rows).

Sizes: ``tiny`` (tests, seconds on ``tiny-llama``), ``small`` (the committed CPU
run), ``medium`` (the issue's W = 512 → 4k sweep over 6k-token histories).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import synthetic
from ..base import cache_kwarg
from ..errors import InvariantError
from ..telemetry import residency_histogram
from .ablations import ablation_suite
from .common import SIZES, Log, add_derived, log_default, score_answer, sweep_documents
from .compression import compression_suite
from .external import record_task
from .longbench import build_prompt, load_longbench, longbench_dir, middle_truncate
from .methods import build_view, peers_for
from .peers import View, cut_at_stop, view_generate, view_nll

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
    ``methods``: names of registered peers (:mod:`megacontext.eval.methods`; default
    all that apply to ``system``). A peer is skipped where the model cannot read
    ``history + targets`` (``full`` past its context). ``reuse``: a dict shared across
    the budgets of one history; a budget-free row (``full``) is computed once and
    copied.
    """
    history = torch.as_tensor(history, dtype=torch.long).flatten()
    targets = torch.as_tensor(targets, dtype=torch.long).flatten()
    T, H = history.numel(), targets.numel()
    record_task(history, targets, budget, tags, answer)  # for external peers (run_eval)
    rows = []
    for peer in peers_for(system, methods):
        method = peer.name
        if not peer.available(base, T, H):
            continue
        if peer.budget_free and reuse is not None and method in reuse:
            rows.append({**reuse[method], **(tags or {}), "budget": int(budget)})
            continue
        t0 = time.perf_counter()
        view = peer.view(base, history, budget, system)
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
            row["score"] = score_answer(text, answer)
        row["seconds"] = time.perf_counter() - t0
        if peer.budget_free and reuse is not None:
            reuse[method] = dict(row)
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
        session.feed([tok], observed=False)  # the model's own choice
    return cut_at_stop(base.decode(toks), stop)


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
    log: Log = log_default,
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


def needle_suite(
    base: Any,
    system: Any,
    size: str = "small",
    *,
    methods: Sequence[str] | None = None,
    telemetry: list[dict[str, Any]] | None = None,
    seed: int = 0,
    log: Log = log_default,
) -> list[dict[str, Any]]:
    """Needle-in-a-haystack: tasks × lengths × depths × budgets. ``nll`` is the
    answer's NLL; ``score`` is 1 when the greedy answer contains the needle."""
    syn = synthetic
    cfg = SIZES[size]["needle"]
    rows: list[dict[str, Any]] = []
    i = 0
    for task in cfg["tasks"]:
        for length in cfg["lengths"]:
            for depth in cfg["depths"]:
                # held-out filler, evaluation seed namespace (synthetic.check_seed)
                t = syn.GENERATORS[task](
                    base.tokenizer,
                    length=length,
                    depth=depth,
                    seed=seed * 1000 + i,
                    haystack="validation",
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
    log: Log = log_default,
) -> list[dict[str, Any]]:
    """LongBench rows: the context (middle-truncated to ``context`` tokens, as
    LongBench truncates to the model's length) + question; ΔNLL@H of the first gold
    answer and the greedy answer's LongBench metric, over the rows in the validation
    split (:func:`~megacontext.eval.longbench.load_longbench` ``split=``; tasks with
    none are left out). Returns ``[]`` when the data folder is absent."""
    cfg = SIZES[size]["longbench"]
    folder = Path(data_dir) if data_dir is not None else longbench_dir()
    if folder is None or not folder.is_dir():
        log("longbench: data folder absent, suite skipped")
        return []
    rows: list[dict[str, Any]] = []
    # held-out rows only: the trainer's shards may hold the others (split_of)
    for ex in load_longbench(folder, limit=cfg["rows"], split="validation"):
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
    log: Log = log_default,
) -> list[dict[str, Any]]:
    """The same passkey (same seed) with its digits at a block edge, straddling a
    block boundary, and mid-block; the report compares ΔNLL across placements."""
    syn = synthetic
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
                haystack="validation",
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
    that each WC entry's position is the one ``config.positions`` defines
    (:func:`~megacontext.working_context.entry_positions`; ``start + span // 2``
    under ``global``), below the bound under a bounded scheme, and that its cached
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

    from ..focus import position_bound, position_gap
    from ..working_context import entry_positions

    bound = position_bound(cfg, base) if cfg.positions != "global" else None

    def check() -> None:
        wc = session.wc
        want, _ = entry_positions(
            wc.levels.cpu(),
            wc.nodes.cpu(),
            wc.block_size,
            cfg.positions,
            max_gap=position_gap(cfg, base),
        )
        got = session.focus.positions().cpu()
        if not torch.equal(got, want):
            bad = int(torch.nonzero(got != want)[0, 0])
            raise InvariantError(
                f"entry {bad}: position {int(got[bad])} != {int(want[bad])} "
                f"(positions={cfg.positions!r})",
                entry=bad,
            )
        if bound is not None and int(got.max()) >= bound:
            raise InvariantError(f"position {int(got.max())} is not below the bound {bound}")
        n = len(wc)
        x = layer.input_layernorm(wc.embeddings(base, session.tree)[None].to(base.dtype))
        hd = attn.head_dim
        k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
        cos, sin = base.model.model.rotary_emb(x, got[None].to(base.device))
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        cached = session.cache.kv[0, 0, :1, :, :n].to(k.dtype)
        err = float((cached - k).abs().max())
        checks["max_key_err"] = max(checks["max_key_err"], err)
        if err > atol * max(1.0, float(k.abs().max())):
            raise InvariantError(
                f"cached layer-0 keys differ from RoPE at their positions by {err}"
            )
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
    log: Log = log_default,
) -> list[dict[str, Any]]:
    """Teacher-forced decode of ``decode`` tokens after a ``history``-token code
    document, through a MegaContext session at ``W = budget`` (telemetry every
    block) and through the frozen base model over its last ``W`` tokens with an
    ordinary KV cache (the baseline); one row per method with the per-block latency
    and the session's swap/residency statistics. Also runs the positional check."""
    from transformers import DynamicCache

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
