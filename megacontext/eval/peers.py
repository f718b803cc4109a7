"""Peers at equal budget: every method reads the same history through ``W`` entries.

A method turns a history (token ids ``[T]``) and a budget ``W`` into a
:class:`View`: the entries the frozen base model reads (embeddings ``[N, d]``) and
their RoPE positions ``[N]``, plus the position of the first token after the
history. The targets (``[H]`` token ids right after the history) are then scored
by one forward over ``view + targets`` (:func:`view_nll`), or answered by greedy
decoding from the view (:func:`view_generate`), identically for every method. A
token, a gist, a sink or a retrieved token each counts as one entry.

Methods (``W < T``; with ``T <= W`` every method reads the whole history):

- ``full``: the base model reading all ``T`` tokens, positions ``0..T-1``; only
  when ``T + H`` fits the model's context (else absent).
- ``truncation``: the last ``W`` tokens re-indexed ``0..W-1`` (RoPE is relative,
  so this equals their original positions, and stays in the trained context).
- ``streaming`` (StreamingLLM, Xiao et al. 2023): the first 4 tokens (attention
  sinks) plus the last ``W − 4``, **re-indexed contiguously** ``0..W-1`` (the
  paper assigns positions by place in the cache), targets from ``W``.
- ``infllm`` (InfLLM-style block retrieval, Xiao et al. 2024, simplified): the 4
  sinks, a recent window of the last ``W // 2`` tokens, and between them whole
  32-token blocks of the middle history retrieved by relevance, as many as fit,
  the remainder given to the recent window so exactly ``W`` entries are read.
  Positions are InfLLM's: the recent window at true distances (``1..L`` for a
  window of ``L``, targets from ``L + 1``), every far token (sinks and retrieved
  blocks) at one fixed position ``0``, so far memory sits at the window's distance
  from the history's end however far back it was read.
  Each block's representative key is the mean of its tokens' input embeddings
  (centred by the history's mean embedding); the query is the centred embeddings
  of the last 64 history tokens (the tail, e.g. the question); a block's score is
  the mean over query tokens of the cosine similarity; the top-k blocks are kept in
  history order.
  Unlike InfLLM this uses input embeddings rather than attention keys of every
  layer, and retrieves once per query instead of per decoding chunk.
- ``mc_recency``: MegaContext with the system's gists and no LensNet (the
  recency-based working context).
- ``mc_attention``: MegaContext with the system's gists and the training-free
  attention scorer (``lens: attention``).
- ``mc_lexical``: MegaContext with the system's gists and the training-free lexical
  scorer (``lens: lexical``, :mod:`megacontext.lexical_scorer`).
- ``mc_meanpool``: MegaContext with mean-pool gists and the system's LensNet
  (omitted when the system itself has no GistNet: it is then ``megacontext``).
- ``megacontext``: the system as given (any :class:`megacontext.MegaContext`, e.g.
  trained checkpoints). Its working context costs ``<= W`` (changes come in groups
  of ``bs − 1``, so it may read up to 31 entries fewer); ``entries`` records it.

The MegaContext methods run a real session (``ingest`` the history: gist, build the
recency WC, one LensNet refocus) at ``w_max = W``; the view is its WC.

This module holds the views and how they are read; each method is a small class in
:mod:`megacontext.eval.methods` (the registry the suites and the report read).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..base import cache_kwarg
from ..config import MegaContextConfig
from ..errors import InputError
from ..lensnet import LensNet
from ..nll import nll_after
from ..runtime import MegaContext
from ..working_context import with_sink

__all__ = [
    "View",
    "cut_at_stop",
    "full_view",
    "infllm_view",
    "is_untrained",
    "mc_view",
    "session_view",
    "streaming_view",
    "truncation_view",
    "untrained_system",
    "view_generate",
    "view_nll",
]

# the systems untrained_system made (a mark kept here, not an attribute on the system)
_UNTRAINED: weakref.WeakSet[Any] = weakref.WeakSet()
SINKS = 4
BLOCK = 32
QUERY_TOKENS = 64


@dataclass
class View:
    """What the base model reads: ``embeds [N, d]`` at ``positions [N]``; the first
    token after the history goes at ``next_position``."""

    method: str
    embeds: torch.Tensor
    positions: torch.Tensor
    next_position: int
    meta: dict[str, Any] = field(default_factory=dict)
    session: Any = None

    @property
    def entries(self) -> int:
        return int(self.embeds.shape[0])


def _ids(history: Any) -> torch.Tensor:
    ids = torch.as_tensor(history, dtype=torch.long).flatten().cpu()
    if ids.numel() == 0:
        raise InputError("the history is empty")
    return ids


def _check_budget(budget: int, minimum: int = 1) -> None:
    if budget < minimum:
        raise InputError(f"budget W={budget} is below the minimum of {minimum} entries")


def full_view(base: Any, history: Any) -> View:
    ids = _ids(history)
    return View("full", base.embed(ids), torch.arange(ids.numel()), ids.numel())


def truncation_view(base: Any, history: Any, budget: int) -> View:
    ids = _ids(history)
    _check_budget(budget)
    T = ids.numel()
    s = max(0, T - budget)
    # re-indexed from 0: equal in exact arithmetic (RoPE is relative), and it keeps
    # every position inside the trained context whatever T is
    return View("truncation", base.embed(ids[s:]), torch.arange(T - s), T - s)


def streaming_view(base: Any, history: Any, budget: int, sinks: int = SINKS) -> View:
    ids = _ids(history)
    _check_budget(budget, sinks + 1)
    T = ids.numel()
    if budget >= T:
        keep = ids
    else:
        keep = torch.cat([ids[:sinks], ids[T - (budget - sinks) :]])
    n = keep.numel()
    return View("streaming", base.embed(keep), torch.arange(n), n, {"sinks": sinks})


def infllm_view(
    base: Any,
    history: Any,
    budget: int,
    *,
    sinks: int = SINKS,
    block: int = BLOCK,
    window: int | None = None,
    query_tokens: int = QUERY_TOKENS,
) -> View:
    ids = _ids(history)
    window = budget // 2 if window is None else window
    _check_budget(budget, sinks + window)
    T = ids.numel()
    if budget >= T:
        return View("infllm", base.embed(ids), torch.arange(T), T, {"blocks": []})
    k = (budget - sinks - window) // block
    # candidate blocks: whole blocks of [sinks, T - window') where window' is the
    # final window (the remainder of the budget goes to it)
    final_window = budget - sinks - k * block
    lo, hi = sinks, T - final_window
    starts = list(range(lo, hi - block + 1, block))
    chosen: list[int] = []
    scores: list[float] = []
    if starts and k > 0:
        with torch.no_grad():
            emb = base.embed(ids).float()
            mu = emb.mean(0, keepdim=True)
            emb = emb - mu
            reps = torch.stack([emb[s : s + block].mean(0) for s in starts])
            query = emb[T - min(query_tokens, T) :]
            sim = (
                torch.nn.functional.normalize(reps, dim=-1)
                @ torch.nn.functional.normalize(query, dim=-1).T
            )
            block_scores = sim.mean(1)
        top = torch.topk(block_scores, min(k, len(starts))).indices.tolist()
        chosen = sorted(starts[i] for i in top)
        scores = [float(block_scores[starts.index(s)]) for s in chosen]
    # if fewer blocks exist than k, the window takes the rest of the budget
    final_window = budget - sinks - len(chosen) * block
    parts = [ids[:sinks], *[ids[s : s + block] for s in chosen], ids[T - final_window :]]
    keep = torch.cat(parts)
    n = keep.numel()
    far = n - final_window
    positions = torch.cat([torch.zeros(far, dtype=torch.int64), torch.arange(1, final_window + 1)])
    meta = {"blocks": chosen, "block_scores": scores, "window": final_window, "sinks": sinks}
    return View("infllm", base.embed(keep), positions, final_window + 1, meta)


def untrained_system(base: Any, config: Any = None, *, seed: int = 0, lens: bool = True) -> Any:
    """The untrained MegaContext: mean-pool gists and (``lens``) a LensNet with its
    seeded initial weights (no training)."""
    config = config if config is not None else MegaContextConfig(model=base.name)
    lensnet = None
    if lens:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lensnet = LensNet(base.dim).to(device=base.device).eval()
    system = MegaContext(base, None, lensnet, config)
    _UNTRAINED.add(system)
    return system


def is_untrained(system: Any) -> bool:
    """Whether ``system`` came from :func:`untrained_system` (the run's meta says so)."""
    try:
        return system in _UNTRAINED
    except TypeError:  # not weak-referenceable: not one of ours
        return False


def session_view(
    system: Any,
    history: Any,
    budget: int,
    gistnet: Any,
    lensnet: Any,
    name: str,
    **changes: Any,
) -> View:
    """Run a session of ``system`` with ``gistnet`` and ``lensnet`` in place of its own
    (the base, config and allocator backend carried over; config fields ``changes``
    applied, e.g. ``lens="attention"``) at ``w_max = budget`` over ``history``; the
    view (named ``name``) is its working context."""
    ids = _ids(history)
    variant = system.with_config(gistnet=gistnet, lensnet=lensnet, w_max=int(budget), **changes)
    session = variant.session()
    session.ingest(ids)
    wc = session.wc
    # what the session's own forward reads: its positions, behind the attention sink
    # when the WC starts with a gist
    embeds, positions = with_sink(
        session.base,
        wc.embeddings(session.base, session.tree),
        session.focus.positions().cpu(),
        wc.levels,
        session.config.attention_sink,
        session.config.sink_at,
    )
    levels = torch.bincount(wc.levels.cpu().long(), minlength=wc.max_level + 1).tolist()
    meta = {"per_level": levels, "actions": len(session.actions)}
    return View(name, embeds, positions, session.focus.next_position(), meta, session)


def mc_view(system: Any, history: Any, budget: int) -> View:
    """The system as given (``megacontext``) at ``w_max = budget`` over ``history``."""
    return session_view(system, history, budget, system.gistnet, system.lensnet, "megacontext")


@torch.no_grad()
def view_nll(base: Any, view: View, targets: Any) -> torch.Tensor:
    """NLL ``[H]`` (float32, nats) of ``targets`` read after ``view``: one forward
    over the view's entries then the targets' embeddings at positions
    ``next_position, next_position + 1, ...`` (:func:`megacontext.nll.nll_after`)."""
    targets = torch.as_tensor(targets, dtype=torch.long).flatten().cpu()
    if targets.numel() == 0:
        raise InputError("no target tokens to score")
    context = (view.embeds, view.positions)
    return nll_after(base, [context], [targets], [view.next_position])[0].cpu()


@torch.no_grad()
def view_generate(base: Any, view: View, max_new_tokens: int, stop: Sequence[str] = ("\n",)) -> str:
    """Greedy answer after ``view`` (KV cached), stopping at EOS or a ``stop`` string
    (not returned; stops count only after the first non-blank text). MegaContext
    views decode through their own session instead (refocus every block), see
    :func:`megacontext.eval.suites.compare_methods`."""
    from transformers import DynamicCache

    kw = cache_kwarg(base.model)
    cache = DynamicCache()
    out = base.model(
        inputs_embeds=view.embeds[None].to(device=base.device, dtype=base.dtype),
        position_ids=view.positions[None].to(base.device),
        **{kw: cache},
        use_cache=True,
        logits_to_keep=1,
    )
    eos = base.tokenizer.eos_token_id
    toks: list[int] = []
    pos = view.next_position
    for _ in range(max_new_tokens):
        tok = int(out.logits[0, -1].argmax())
        if tok == eos:
            break
        toks.append(tok)
        text = base.decode(toks).lstrip()
        if text and any(s in text for s in stop):
            break
        out = base.model(
            input_ids=torch.tensor([[tok]], device=base.device),
            position_ids=torch.tensor([[pos]], device=base.device),
            use_cache=True,
            **{kw: cache},
        )
        pos += 1
    return cut_at_stop(base.decode(toks), stop)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` without leading blanks, up to the first stop string, stripped."""
    text = text.lstrip()
    for s in stop:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text.strip()
