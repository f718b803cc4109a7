"""Focus ablations: causal vs non-causal LensNet, the allocator with and without
hysteresis, in the dynamic regime where focus matters.

Each variant is a fresh :class:`~megacontext.runtime.Session` of a
:class:`~megacontext.runtime.MegaContext` sharing the system's base model and GistNet.
It ingests the same ``history`` (``T`` tokens) at the same budget ``W`` and then
decodes the same continuation ``c`` (``F`` tokens) teacher-forced through
:meth:`Session.feed`, refocusing every block of ``K`` tokens (``F / K`` refocus
iterations). Variants (the :class:`~megacontext.eval.methods.Variant` classes of
the method registry, :data:`VARIANTS` the built-in ones):

- ``noncausal``: the system's LensNet as given, the system's allocator settings;
- ``causal``: a causal LensNet (``causal=True``, see :mod:`megacontext.lensnet`):
  a trained causal LensNet file, or a causal trainer checkpoint directory (then
  that whole system: its GistNet, LensNet and LoRA'd base; :func:`load_causal`),
  else the system's own weights run causally (the row says
  ``causal_source="same weights"``: an architecture probe, not the guide's trained
  ablation);
- ``no_hysteresis``: the system's LensNet with ``cooldown_steps = min_residency = 0``;
- ``recency``: no LensNet (the allocator only collapses what the budget forces);
- ``attention``: the training-free attention scorer (``lens: attention``);
- ``lexical`` / ``lexical_no_hysteresis``: the training-free lexical scorer
  (``lens: lexical``, the shipped memory's focus) with and without hysteresis;
- ``lexical_unverified``: ``lexical`` with ``verify_tokens = 0`` (the base model does
  not check the focus after the ingest);
- ``lexical_hold`` / ``lexical_rescore``: ``lexical`` with ``decode_focus`` ``hold``
  (the default for the lexical scorer) or ``rescore``;
- ``lexical_feed_check`` / ``lexical_no_feed_check``: ``lexical`` with
  ``verify_feed`` on or off;
- ``random`` / ``random_no_hysteresis``: a seeded random scorer
  (:class:`GroupRandomLens`, one uniform score in ``[-1, 1]`` per sibling group and
  step) with and without hysteresis, exercising the allocator independently of
  LensNet's quality (the same seed for both); unchecked (``verify_tokens = 0``), a
  control.

Reference rows on the same continuation tokens: ``full`` (the frozen base model
reading history + continuation, when it fits the model) and ``truncation`` (the
frozen base over the last ``W`` tokens, refreshed every block:
:func:`truncation_nll`).

Per variant: NLL of the continuation (mean over its ``F`` tokens), ``ΔNLL = NLL −
NLL_full``, the recovered fraction vs truncation, and from the decode phase (the
ingest's own refocus excluded): swap rate (actions per decoded block), mean
residency (steps a changed node had spent at its previous LOD), flip-backs (an
action on a node whose previous action was the opposite one), ping-pongs
(flip-backs within ``window = cooldown_steps + min_residency`` steps of the
system's settings, the same window for every variant), expand / collapse mass
(entries added / removed), budget-floor collapses (the runtime's
``n_budget_collapses``: the fewest collapses that bring the WC back under ``W``
after a block; ``focus swaps`` are the actions beyond them), forced recency
rebuilds and the residency histogram; for LensNet variants also what their scores
allow after the ingest and after decoding (:func:`score_summary`).

The causal bar (the guide): ``rel = (ΔNLL_causal − ΔNLL_noncausal) / |ΔNLL_causal|
>= 0.03``, from the mean ΔNLL over documents.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..lensnet import LensNet
from ..runtime import MegaContext
from ..telemetry import pingpong_count, residency_histogram
from .common import SIZES, Log, add_derived, log_default, sweep_documents
from .methods import GroupRandomLens, Variant, causal_twin, get, variant_names
from .peers import full_view, truncation_view, view_nll
from .tables import by, ci, fmt, mean, pyplot, recovered_of_means, save_figure, table, vals

__all__ = [
    "CAUSAL_BAR",
    "GroupRandomLens",
    "VARIANTS",
    "ablation_suite",
    "causal_rel",
    "causal_twin",
    "load_causal",
    "pingpong_count",
    "report_section",
    "run_variant",
    "score_summary",
    "truncation_nll",
    "variant_system",
]

VARIANTS = tuple(variant_names())  # the built-in variants, in registry order
CAUSAL_BAR = 0.03  # the guide: the non-causal LensNet >= 3% lower ΔNLL@H than the causal one
SWAP_BAR = 0.25  # the guide: swap rate <= 0.25 actions per block
RESIDENCY_BAR = 3.0  # the guide: mean residency >= 3 iterations

# ------------------------------------------------------------------ metrics


def causal_rel(delta_causal: float, delta_noncausal: float) -> float:
    """``(ΔNLL_causal − ΔNLL_noncausal) / |ΔNLL_causal|``: how much lower the
    non-causal LensNet's ΔNLL is, relative to the causal one's (NaN when the causal
    ΔNLL is 0 or NaN)."""
    dc, dn = float(delta_causal), float(delta_noncausal)
    if not (math.isfinite(dc) and math.isfinite(dn)) or dc == 0.0:
        return math.nan
    return (dc - dn) / abs(dc)


@torch.no_grad()
def truncation_nll(
    base: Any, history: torch.Tensor, continuation: torch.Tensor, budget: int, block: int
) -> torch.Tensor:
    """NLL ``[F]`` of ``continuation`` decoded by the frozen base model with plain
    truncation, refreshed every ``block`` tokens like a session's refocus: the
    tokens of block ``b`` are read after the last ``budget`` tokens before the block
    (so ``budget`` to ``budget + block − 1`` tokens, as a session's WC plus the
    block's own tokens). One forward per block, every key recomputed from its window
    only (a banded mask in one forward would not be truncation: in later layers a
    key carries context from before the window)."""
    history = torch.as_tensor(history, dtype=torch.long).flatten().cpu()
    cont = torch.as_tensor(continuation, dtype=torch.long).flatten().cpu()
    if cont.numel() == 0:
        raise InputError("no continuation tokens to score")
    if budget < 1 or block < 1:
        raise InputError(f"need budget >= 1 and block >= 1, got W={budget}, block={block}")
    ids = torch.cat([history, cont])
    T = history.numel()
    out = []
    for b in range(0, cont.numel(), block):
        view = truncation_view(base, ids[: T + b], budget)
        out.append(view_nll(base, view, cont[b : b + block]))
    return torch.cat(out)


# ------------------------------------------------------------------ variants


def load_causal(path: str | Path, system: Any) -> tuple[Any, str]:
    """The causal variant's focus: ``(module, source)``. ``path`` is a LensNet
    ``.safetensors`` (swapped into ``system``: its GistNet and base stay) or a trainer
    checkpoint directory (that whole system: its GistNet, LensNet and LoRA adapter,
    on its own copy of the base model, see :func:`megacontext.train.load_checkpoint`).
    Raises InputError when the LensNet is not causal."""
    path = Path(path)
    if path.is_dir():
        out: Any = MegaContext.from_checkpoint(path)
        lens = out.lensnet
        source = f"{path} (whole checkpoint: its GistNet, LensNet and LoRA)"
    else:
        out = lens = LensNet.load(path)
        like = system.lensnet if system.lensnet is not None else None
        p = next(like.parameters()) if like is not None else None
        if p is not None:
            out = lens = lens.to(device=p.device, dtype=p.dtype).eval()
        source = f"{path} (LensNet only, with the system's GistNet and base)"
    if not lens.config.causal:
        raise InputError(
            f"{path}: lensnet.causal is false; the causal ablation needs a LensNet "
            "trained with lensnet.causal=true"
        )
    return out, source


def variant_system(
    system: Any, variant: str, budget: int, *, causal_lens: Any = None, seed: int = 0
) -> Any:
    """The :class:`MegaContext` of the registered variant ``variant`` at ``w_max =
    budget`` (:meth:`megacontext.eval.methods.Variant.build`): the system's base,
    GistNet and config, with the variant's scorer and hysteresis. ``causal_lens``
    (variant ``causal``): a causal LensNet, or a whole causal :class:`MegaContext`
    whose base and GistNet are then used too (:func:`load_causal`)."""
    if variant not in variant_names():
        raise InputError(
            f"unknown ablation variant {variant!r}; expected one of {tuple(variant_names())}"
        )
    v: Variant = get(variant, Variant)  # type: ignore[assignment]
    return v.build(system, budget, causal_lens=causal_lens, seed=seed)


@torch.no_grad()
def score_summary(session: Any, prefix: str) -> dict[str, float]:
    """What the allocator can act on in the session's current WC, from its scorer's
    scores ``u``: ``{prefix}_token_mean`` (mean ``u`` of LOD0 entries),
    ``{prefix}_gist_max`` (the best expand score: max ``u`` over gists) and
    ``{prefix}_group_min`` (the best collapse score: min over complete sibling groups,
    ``bs`` consecutive children of one parent, of their mean ``u``); NaN when absent.
    An expand needs ``gist_max > tau_expand`` (and room), a voluntary collapse
    ``group_min < −tau_collapse``."""
    u = session.scores().double()
    wc = session.wc
    levels, nodes = wc.levels.cpu().long(), wc.nodes.cpu().long()
    bs, top = session.config.block_size, session.config.levels
    groups = []
    i, n = 0, len(levels)
    while i + bs <= n:
        lv, b = int(levels[i]), int(nodes[i])
        seg = slice(i, i + bs)
        if (
            lv < top
            and b % bs == 0
            and bool((levels[seg] == lv).all())
            and torch.equal(nodes[seg], torch.arange(b, b + bs))
        ):
            groups.append(float(u[seg].mean()))
            i += bs
        else:
            i += 1
    tok, gist = u[levels == 0], u[levels > 0]
    return {
        f"{prefix}_token_mean": float(tok.mean()) if tok.numel() else math.nan,
        f"{prefix}_gist_max": float(gist.max()) if gist.numel() else math.nan,
        f"{prefix}_group_min": min(groups) if groups else math.nan,
    }


def run_variant(
    mcx: Any, history: torch.Tensor, continuation: torch.Tensor, *, window: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ingest ``history`` into a fresh session of ``mcx``, feed ``continuation``
    teacher-forced; returns the metrics row (decode phase only, see the module doc)
    and the session's per-iteration telemetry rows of the decode phase."""
    s = mcx.session()
    t0 = time.perf_counter()
    s.ingest(history)
    n_act, n_res, n_hist = len(s.actions), len(s.residencies), len(s.history)
    # LensNet's and the attention scorer's scores are deterministic, so reading them
    # changes nothing; a random scorer's would advance its generator
    scored = mcx.config.lens in ("attention", "lexical") or (
        mcx.config.lens == "lensnet"
        and mcx.lensnet is not None
        and not isinstance(mcx.lensnet, GroupRandomLens)
    )
    summary = score_summary(s, "ingest") if scored else {}
    t1 = time.perf_counter()
    nll = s.feed(continuation)
    feed_s = time.perf_counter() - t1
    if scored:
        summary |= score_summary(s, "end")
    acts = s.actions[n_act:]
    res = [int(r) for r in s.residencies[n_res:]]
    tel = s.history[n_hist:]
    blocks = int(continuation.numel()) // mcx.config.block_size
    n_exp = sum(a.kind == "expand" for a in acts)
    row: dict[str, Any] = {
        "nll": float(nll.mean()),
        "token_nll": [float(x) for x in nll],
        "entries": len(s.wc),
        "blocks": blocks,
        "refocus_iterations": len(tel),
        "ingest_actions": n_act,
        "actions": len(acts),
        "n_expand": n_exp,
        "n_collapse": len(acts) - n_exp,
        "swap_rate": len(acts) / max(blocks, 1),
        "mean_residency": float(np.mean(res)) if res else math.nan,
        "residencies": res,
        "residency_histogram": str(residency_histogram(res)),
        "expand_mass": float(sum(a.cost_delta for a in acts if a.kind == "expand")),
        "collapse_mass": float(-sum(a.cost_delta for a in acts if a.kind == "collapse")),
        "forced_rebuilds": int(sum(h["forced_rebuild"] for h in tel)),
        # the budget floor: collapses no policy can avoid (the block's tokens must fit)
        "budget_collapses": int(sum(h["n_budget_collapses"] for h in tel)),
        "pingpong_window": int(window),
        **pingpong_count(acts, window),
        "cooldown_steps": mcx.config.cooldown_steps,
        "min_residency": mcx.config.min_residency,
        "tau_expand": mcx.config.tau_expand,
        "tau_collapse": mcx.config.tau_collapse,
        "ingest_s": t1 - t0,
        "feed_s": feed_s,
        # every check of the focus: stage, verdict, NLL focus / recency per token
        "verdicts": "; ".join(
            f"{v.stage} {'kept' if v.kept else 'dropped'} {v.nll_focus:.4f}/{v.nll_recency:.4f}"
            for v in s.focus.verdicts
        ),
        **summary,
    }
    return row, tel


# ------------------------------------------------------------------ the suite


def ablation_suite(
    base: Any,
    system: Any,
    size: str = "small",
    *,
    telemetry: list[dict[str, Any]] | None = None,
    log: Log = log_default,
    causal_lensnet: str | Path | None = None,
    variants: Sequence[str] | None = None,
    seed: int = 0,
    docs: int | None = None,
    split: str = "validation",
) -> list[dict[str, Any]]:
    """The focus ablations on ``docs`` held-out documents (default: the size's;
    alternating code and prose, :func:`~megacontext.eval.suites.sweep_documents`;
    ``split="train"`` for a probe before a held-out run):
    ``history`` tokens ingested at ``W = budget``, the next ``feed`` tokens decoded
    teacher-forced. One row per (document, variant) plus the ``full`` and
    ``truncation`` reference rows; ``causal_lensnet``: a trained causal LensNet
    ``.safetensors`` or a causal trainer checkpoint directory (:func:`load_causal`)."""
    if size not in SIZES or "ablation" not in SIZES[size]:
        raise InputError(f"unknown ablation size {size!r}; expected one of {list(SIZES)}")
    if docs is not None and docs < 1:
        raise InputError(f"ablation docs must be >= 1, got {docs}")
    cfg = {**SIZES[size]["ablation"], **({"docs": docs} if docs is not None else {})}
    known = variant_names()
    names = list(known if variants is None else variants)
    bad = [v for v in names if v not in known]
    if bad:
        raise InputError(f"unknown ablation variants {bad}; expected some of {known}")
    if system.lensnet is None:
        dropped = [v for v in names if get(v, Variant).needs_lens]  # type: ignore[attr-defined]
        if dropped:
            log(f"ablation: the system has no LensNet; skipping {dropped}")
        names = [v for v in names if v not in dropped]
    elif getattr(system.lensnet, "config", None) is not None and system.lensnet.config.causal:
        raise InputError(
            "the system's LensNet is causal; the 'noncausal' variant needs one that is not"
        )
    causal_lens = None
    source = "same weights"
    if causal_lensnet is not None and "causal" in names:
        causal_lens, source = load_causal(causal_lensnet, system)
    w, T, F = cfg["budget"], cfg["history"], cfg["feed"]
    window = system.config.cooldown_steps + system.config.min_residency
    docs = sweep_documents(base, cfg["docs"], T + F, split)
    rows: list[dict[str, Any]] = []
    for d, (doc_id, kind, ids) in enumerate(docs):
        hist, cont = ids[:T], ids[T:]
        tags = {"suite": "ablation", "doc": doc_id, "kind": kind, "budget": w}
        common = {"history_tokens": T, "fed_tokens": F}
        if not base.max_positions or base.max_positions >= T + F:
            log(f"ablation: {doc_id} full context")
            nll = view_nll(base, full_view(base, hist), cont)
            rows.append(
                {**tags, **common, "method": "full", "entries": T, "nll": float(nll.mean())}
            )
        log(f"ablation: {doc_id} truncation W={w}, refreshed every block")
        nll = truncation_nll(base, hist, cont, w, system.config.block_size)
        rows.append(
            {**tags, **common, "method": "truncation", "entries": w, "nll": float(nll.mean())}
        )
        for v in names:
            log(f"ablation: {doc_id} {v} W={w}")
            mcx = variant_system(system, v, w, causal_lens=causal_lens, seed=seed * 1000 + d)
            row, tel = run_variant(mcx, hist, cont, window=window)
            lens = mcx.lensnet
            row |= {
                **tags,
                **common,
                "method": v,
                "scorer": (
                    "attention"
                    if mcx.config.lens == "attention"
                    else (
                        "none"
                        if lens is None
                        else (
                            "random/group"
                            if isinstance(lens, GroupRandomLens)
                            else type(lens).__name__
                        )
                    )
                ),
            }
            if v == "causal":
                row["causal_source"] = source
            rows.append(row)
            if telemetry is not None:
                telemetry += [{**tags, "method": v, **h} for h in tel]
    return add_derived(rows, ("suite", "doc", "budget"))


# ------------------------------------------------------------------ report


def _plot(rows: list[dict], names: list[str], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10.4, 7.2))
    x = np.arange(len(names))
    colors = [f"C{i}" for i in range(len(names))]
    panels = (
        (axes[0, 0], "delta_nll", "ΔNLL vs full context (nats)", None, "ΔNLL of the fed tokens"),
        (axes[0, 1], "swap_rate", "actions per decoded block", SWAP_BAR, "swap rate"),
        (
            axes[1, 0],
            "mean_residency",
            "steps at the previous LOD",
            RESIDENCY_BAR,
            "mean residency",
        ),
    )
    for ax, key, ylabel, bar, title in panels:
        ys = [mean(vals(by(rows, method=v), key)) for v in names]
        ax.bar(x, [y if math.isfinite(y) else 0.0 for y in ys], color=colors)
        if bar is not None:
            ax.axhline(bar, color="r", ls="--", lw=0.8, label=f"guide: {bar:g}")
            ax.legend(fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=20, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    ax = axes[1, 1]
    hists = {v: _pooled_hist(by(rows, method=v)) for v in names}
    bins = _bin_labels(max((len(h) for h in hists.values()), default=0))
    width = 0.8 / max(len(names), 1)
    for i, v in enumerate(names):
        h = hists[v] + [0] * (len(bins) - len(hists[v]))
        ax.bar(np.arange(len(bins)) + i * width, h, width, label=v, color=colors[i])
    ax.set_xticks(np.arange(len(bins)) + width * (len(names) - 1) / 2)
    ax.set_xticklabels(bins, fontsize=8)
    ax.set_xlabel("residency (steps)")
    ax.set_ylabel("actions")
    ax.set_title("residency histogram (decode phase, all documents)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def _bin_labels(n: int) -> list[str]:
    return (["0", "1"] + [f"{2 ** (b - 1)}-{2**b - 1}" for b in range(2, n)])[:n]


def _pooled_hist(rows: list[dict]) -> list[int]:
    """Power-of-two bin counts (as :func:`megacontext.telemetry.residency_histogram`)
    of every row's ``residencies``."""
    counts: list[int] = []
    for r in rows:
        for v in r.get("residencies") or []:
            b = int(v).bit_length()
            counts += [0] * (b + 1 - len(counts))
            counts[b] += 1
    return counts


def _budget_floor(rows: list[dict], tel: list[dict]) -> list[str]:
    """Total budget-floor collapses and the mean focus swap rate of a variant's rows
    (read from the rows, or summed from the run's telemetry for older rows)."""
    total, rates = 0, []
    for r in rows:
        n = r.get("budget_collapses")
        if n is None:
            its = [
                t
                for t in tel
                if t.get("suite") == "ablation"
                and t.get("doc") == r["doc"]
                and t.get("method") == r["method"]
                and t.get("n_budget_collapses") is not None
            ]
            if len(its) != r.get("refocus_iterations"):
                return ["–", "–"]
            n = sum(int(t["n_budget_collapses"]) for t in its)
        total += int(n)
        rates.append((r["actions"] - int(n)) / max(r["blocks"], 1))
    return [str(total), _fmt(float(np.mean(rates)))] if rates else ["–", "–"]


def _paired_token_diff(a: list[dict], b: list[dict]) -> tuple[float, float, int] | None:
    """Mean and standard error of ``token_nll(a) − token_nll(b)`` over all tokens of
    the documents both have (``None`` without token NLLs)."""
    by_b = {r["doc"]: r.get("token_nll") for r in b}
    d: list[float] = []
    for r in a:
        x, y = r.get("token_nll"), by_b.get(r["doc"])
        if x is not None and y is not None and len(x) == len(y):
            d += [float(u) - float(v) for u, v in zip(x, y, strict=True)]
    if len(d) < 2:
        return None
    arr = np.asarray(d)
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(len(arr))), len(arr)


def _scores_table(ar: list[dict], names: list[str], lines: list[str]) -> None:
    keys = [f"{p}_{k}" for p in ("ingest", "end") for k in ("token_mean", "gist_max", "group_min")]
    body = []
    for v in names:
        g = by(ar, method=v)
        if not any(vals(g, k) for k in keys):
            continue
        body.append([v] + [_fmt(mean(vals(g, k))) for k in keys])
    if not body:
        return
    r = next(x for x in ar if x.get("tau_expand") is not None)
    lines += [
        "What the LensNet variants' scores let the allocator do (mean over documents): "
        "after the ingest and after the last decoded block, the mean token score, the best "
        f"expand score (max over gists; an expand needs > {r['tau_expand']:g} and room) and "
        "the best collapse score (min over complete sibling groups of the group's mean; a "
        f"voluntary collapse needs < −{r['tau_collapse']:g}).",
        "",
    ]
    header = ["variant"] + [
        f"{p}: {k}"
        for p in ("ingest", "end")
        for k in ("token mean", "best expand", "best collapse")
    ]
    lines += [*table(header, body), ""]


def _fmt(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "NaN"


def report_section(rows: list[dict], tel: list[dict], out: Path, lines: list[str]) -> None:
    """The report's "Focus ablations" section (a table per variant, the causal
    verdict, per-document ΔNLL, residency histograms) and ``ablation.png``."""
    ar = by(rows, suite="ablation")
    if not ar:
        return
    names = [v for v in variant_names() if by(ar, method=v)]
    docs = sorted({r["doc"] for r in ar})
    r0 = ar[0]
    window = next((r["pingpong_window"] for r in ar if r.get("pingpong_window") is not None), None)
    lines += ["## Focus ablations", ""]
    lines.append(
        f"{len(docs)} documents; each variant is a fresh session that ingests the same "
        f"{r0.get('history_tokens')}-token history at W = {r0.get('budget')} and decodes the "
        f"next {r0.get('fed_tokens')} tokens teacher-forced, refocusing every block. NLL is "
        "the mean over those tokens; ΔNLL = NLL − NLL(full context) with a 95% bootstrap "
        "interval over documents; `recovered` is vs truncation to the last W tokens, refreshed every block. "
        "Decode phase only: swaps/block = allocator actions per decoded block; residency = "
        "steps a changed node had spent at its previous LOD; flip-backs = an action on a "
        f"node whose previous action was the opposite one; ping-pong = flip-backs within "
        f"{window} steps (cooldown + min residency of the system's settings)."
    )
    lines.append("")
    header = [
        "variant",
        "scorer",
        "cooldown/min res.",
        "NLL",
        "ΔNLL [95% CI]",
        "recovered",
        "actions",
        "swaps/block",
        "mean residency",
        "flip-backs",
        "ping-pong",
        "min flip gap",
        "budget-floor collapses",
        "focus swaps/block",
        "expand mass",
        "collapse mass",
        "forced rebuilds",
    ]
    body = []
    for m in ("full", "truncation"):
        g = by(ar, method=m)
        if g:
            body.append(
                [m, "–", "–", f"{mean(vals(g, 'nll')):.3f}", ci(vals(g, "delta_nll"))]
                + ["–"] * (len(header) - 5)
            )
    for v in names:
        g = by(ar, method=v)
        gaps = vals(g, "min_flip_gap")
        body.append(
            [
                v,
                str(g[0].get("scorer")),
                f"{g[0].get('cooldown_steps')}/{g[0].get('min_residency')}",
                f"{mean(vals(g, 'nll')):.3f}",
                ci(vals(g, "delta_nll")),
                fmt(recovered_of_means(g)),
                str(int(sum(vals(g, "actions")))),
                fmt(mean(vals(g, "swap_rate"))),
                fmt(mean(vals(g, "mean_residency")), 2),
                str(int(sum(vals(g, "flip_backs")))),
                str(int(sum(vals(g, "pingpong")))),
                str(int(min(gaps))) if gaps else "–",
                *_budget_floor(g, tel),
                fmt(sum(vals(g, "expand_mass")), 0),
                fmt(sum(vals(g, "collapse_mass")), 0),
                str(int(sum(vals(g, "forced_rebuilds")))),
            ]
        )
    lines += [*table(header, body), ""]
    lines.append(
        "Swaps/block and mean residency are means over documents; actions, flip-backs, "
        "ping-pongs, masses and rebuilds are totals. Budget-floor collapses: the fewest "
        "collapses that bring a WC grown by the decoded block back under W (telemetry "
        "`n_budget_collapses`; in the steady state one per block, since a block adds 32 "
        "entries and a collapse frees 31); focus swaps/block = the actions beyond that "
        "floor per block. The guide's stability bars: swap rate "
        f"≤ {SWAP_BAR} actions per block, mean residency ≥ {RESIDENCY_BAR:g} iterations."
    )
    lines.append("")
    nc, ca = by(ar, method="noncausal"), by(ar, method="causal")
    if nc and ca:
        dn, dc = mean(vals(nc, "delta_nll")), mean(vals(ca, "delta_nll"))
        rel = causal_rel(dc, dn)
        verdict = "PASS" if math.isfinite(rel) and rel >= CAUSAL_BAR else "FAIL"
        src = ca[0].get("causal_source")
        what = (
            "the system's own (non-causally trained) weights run causally — an architecture "
            "probe, not a trained causal LensNet"
            if src == "same weights"
            else f"trained with lensnet.causal=true: `{src}`"
        )
        lines.append(
            f"**Causal vs non-causal LensNet**: mean ΔNLL causal {dc:+.4f}, non-causal "
            f"{dn:+.4f}; rel = (ΔNLL_causal − ΔNLL_noncausal) / |ΔNLL_causal| = "
            f"**{rel:+.3f}** (bar ≥ {CAUSAL_BAR}): **{verdict}**. Causal LensNet: {what}."
        )
        diff = _paired_token_diff(ca, nc)
        if diff is not None:
            avg, se, n = diff
            lines.append(
                f"Paired per-token NLL difference causal − non-causal over the {n} fed "
                f"tokens: {avg:+.4f} ± {se:.4f} nats (mean ± standard error; tokens of "
                "one document are correlated, so this understates the uncertainty)."
            )
        lines.append("")
    _scores_table(ar, names, lines)
    body = []
    for doc in docs:
        g = {r["method"]: r for r in by(ar, doc=doc)}
        row = [doc] + [
            fmt(g[m].get("delta_nll"), 4) if m in g else "–" for m in ["truncation", *names]
        ]
        if "causal" in g and "noncausal" in g:
            row.append(fmt(causal_rel(g["causal"]["delta_nll"], g["noncausal"]["delta_nll"])))
        else:
            row.append("–")
        body.append(row)
    lines += ["ΔNLL per document:", ""]
    lines += [*table(["document", "truncation", *names, "causal rel"], body), ""]
    hists = {v: _pooled_hist(by(ar, method=v)) for v in names}
    bins = _bin_labels(max((len(h) for h in hists.values()), default=0))
    if bins:
        body = [[v] + [str(c) for c in hists[v] + [0] * (len(bins) - len(hists[v]))] for v in names]
        lines += ["Residency histogram (decode-phase actions per bin of steps, all documents):", ""]
        lines += [*table(["variant", *bins], body), ""]
    _plot(ar, names, out / "ablation.png")
    lines += ["![focus ablations: ΔNLL, swap rate, residency](ablation.png)", ""]
