"""The focus loop: the one refocus loop under the runtime and the trainer.

:class:`FocusLoop` owns the focus state of one history (the gist tree, the working
context (WC), the allocator's hysteresis, GistNet, LensNet, the config, the base
model's embedding) and runs the loop's steps::

    append tokens (tree append, WC extend)  |  ingest (tree append, recency rebuild)
    -> LensNet inputs (entries, tail, levels, spans, distances) -> scores
    -> allocator step -> recency rebuild when hysteresis held back every needed collapse

:class:`~megacontext.runtime.Session` is this loop plus the KV cache and telemetry;
the trainer's :func:`~megacontext.train.rollout.rollout` is this loop plus snapshots.
Nothing here touches a KV cache: :meth:`FocusLoop.refocus` returns a
:class:`FocusStep` saying what changed, so the caller can update its cache.

LensNet's tail (:func:`lens_tail`) is ``[T, d]`` with ``T = LensNetConfig.tail_size``:
row 0 the newest gist of the highest level that has one, row ``T-1`` the mean of the
newest ``min(bs, cursor)`` token embeddings (the question usually sits after the last
complete block), rows ``T-1-k .. T-2`` the ``k = min(T - 2, n_1)`` newest LOD1 gists
(oldest first), zeros elsewhere.

The scorer is ``config.lens``: ``lensnet`` (the given LensNet, zeros without one),
``recency`` (zeros), ``lexical`` (:func:`megacontext.lexical_scorer.lexical_scores`,
from the tree's token ids) or ``attention`` (a callable ``scorer(wc, positions) -> [N]``
the owner of the KV cache hands in: :class:`megacontext.attention_scorer.AttentionScorer`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from .allocator import Action, FocusAllocator
from .config import MegaContextConfig
from .errors import ConfigError
from .lensnet import LensNetConfig
from .lexical_scorer import (
    block_means,
    block_scores,
    entry_relevance,
    lexical_scores,
    retrieval_scores,
    robust_z,
)
from .nll import nll_after
from .tree import MegaContextTree, mean_pool
from .working_context import WorkingContext, entry_positions, with_sink

__all__ = [
    "FocusLoop",
    "FocusStep",
    "Verdict",
    "gist_fn",
    "lens_inputs",
    "lens_scores",
    "needs_relevance",
    "lens_tail",
    "newest_tokens_view",
    "refocus_after_ingest",
    "check_positions",
    "decode_hold",
    "position_bound",
    "position_gap",
    "tail_size",
]

Phase = Callable[[str], AbstractContextManager[Any]]


def _no_phase(name: str) -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


def tail_size(lensnet: Any) -> int:
    """Rows of LensNet's tail: ``lensnet.config.tail_size`` (the
    :class:`~megacontext.lensnet.LensNetConfig` default for a scorer without one)."""
    size = getattr(getattr(lensnet, "config", None), "tail_size", None)
    return int(size if size is not None else LensNetConfig.model_fields["tail_size"].default)


def position_bound(config: MegaContextConfig, base: Any = None) -> int | None:
    """The bound on RoPE positions: ``config.max_position``, else the base model's
    ``max_position_embeddings`` (``base.max_positions``), else ``None`` (unknown)."""
    if config.max_position is not None:
        return int(config.max_position)
    known = int(getattr(base, "max_positions", 0) or 0)
    return known or None


def check_positions(config: MegaContextConfig, base: Any, *, budget: bool = True) -> None:
    """Check the position fields against the base model (the config alone does not
    know it). Raises :class:`~megacontext.errors.ConfigError` when ``max_position``
    exceeds the model's ``max_position_embeddings``, or (``budget``) when a bounded
    scheme (``nearby``, ``hybrid``, ``compact``) cannot keep a WC of ``w_max + block_size``
    entries (the budget plus one decoded block, the cache's capacity) below the bound.
    A :class:`~megacontext.runtime.MegaContext` checks the bound when it is built and
    the budget when a session (a :class:`FocusLoop`) is: a system is also a template
    whose budget callers set per session (``with_config(w_max=...)``)."""
    known = int(getattr(base, "max_positions", 0) or 0)
    name = getattr(base, "name", "the base model")
    if config.max_position is not None and known and config.max_position > known:
        raise ConfigError(
            f"invalid value for field 'max_position': {config.max_position} (above the "
            f"{known} positions {name} supports)",
            field="max_position",
            value=config.max_position,
        )
    bound = position_bound(config, base)
    if budget and config.positions != "global" and bound is not None:
        need = config.w_max + config.block_size
        if need > bound:
            raise ConfigError(
                f"invalid value for field 'w_max': {config.w_max} (positions={config.positions!r} "
                f"keeps positions below {bound}, but w_max plus a decoded block of "
                f"{config.block_size} needs {need}; lower w_max to <= "
                f"{bound - config.block_size} or use positions='global')",
                field="w_max",
                value=config.w_max,
            )


def fitting_budget(config: MegaContextConfig, base: Any = None) -> int:
    """``config.w_max``, lowered when a bounded scheme cannot hold it: the largest
    multiple of the block size with ``w_max + block_size + horizon <= bound`` (one
    decoded block and ``horizon`` targets after the budget; SmolLM2-135M: 8,096 for
    the default 8,192). Unchanged under ``global`` or with no known bound. Callers use
    it for a *default* budget only: one the user chose is never changed
    (:func:`check_positions` rejects an impossible one)."""
    bound = position_bound(config, base)
    if config.positions == "global" or bound is None:
        return int(config.w_max)
    room = bound - config.block_size - config.horizon
    if config.w_max <= room:
        return int(config.w_max)
    return room // config.block_size * config.block_size


def position_gap(config: MegaContextConfig, base: Any = None) -> int:
    """``max_gap`` of the ``hybrid`` and ``nearby`` schemes: how far the far memory may be pushed back,
    ``min(bound - w_max - block_size - horizon, far_gap)``, so a WC of up to
    ``w_max + block_size`` entries (a decoded block past the budget) and ``horizon``
    tokens after it stay below the bound (``far_gap``: ``config.far_gap``, no cap when
    ``None``). 0 for the other schemes; with no known bound, as if it were
    ``w_max + block_size + horizon`` (``hybrid`` then equals ``compact``)."""
    if config.positions not in ("hybrid", "nearby"):
        return 0
    bound = position_bound(config, base)
    if bound is None:
        return 0
    room = max(bound - config.w_max - config.block_size - config.horizon, 0)
    return room if config.far_gap is None else min(room, config.far_gap)


def tree_dtype(base: Any) -> torch.dtype:
    """The dtype gists are stored in: bf16 for a bf16 base, fp16 otherwise."""
    return torch.bfloat16 if base.dtype == torch.bfloat16 else torch.float16


def gist_fn(gistnet: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``[B, bs, d] -> [B, d]``: ``gistnet`` with its inputs cast to its parameters'
    device and dtype (``None``: mean pooling). A GistNet's level-aware path
    (``at_level(l)``) is kept, so the tree gists level ``l`` with ``at_level(l)``; a
    level above those it serves (``gistnet.config.levels``) is mean-pooled from the
    gists below it, the untrained gist of every level (so a two-level GistNet works
    under ``levels: 3``)."""
    if gistnet is None:
        return mean_pool
    params = getattr(gistnet, "parameters", None)
    first = next(params(), None) if params is not None else None
    at_level = getattr(gistnet, "at_level", None)

    def cast(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        def run(x: torch.Tensor) -> torch.Tensor:
            if first is not None:
                x = x.to(device=first.device, dtype=first.dtype)
            return fn(x)

        return run

    run = cast(gistnet)
    if callable(at_level):
        served = getattr(getattr(gistnet, "config", None), "levels", None)

        def level_fn(level: int) -> Callable[[torch.Tensor], torch.Tensor]:
            if isinstance(served, int) and isinstance(level, int) and level > served:
                return mean_pool
            return cast(at_level(level))

        # a bare wrapper would gist every level with level 1's weights
        run.at_level = level_fn  # type: ignore[attr-defined]
    return run


def newest_tokens_view(base: Any, tree: MegaContextTree, cursor: int) -> torch.Tensor:
    """``[d]`` float32: the mean of the base model's embeddings of the newest
    ``min(block_size, cursor)`` tokens before ``cursor`` (zeros when ``cursor == 0``).
    It covers the partial block at every refocus, where no gist exists yet."""
    m = min(tree.block_size, cursor)
    if m == 0:
        return torch.zeros(base.dim, dtype=torch.float32)
    ids = torch.as_tensor(tree.tokens(cursor - m, cursor), dtype=torch.int64)
    return base.embed(ids.cpu()).float().mean(dim=0)


def lens_tail(base: Any, tree: MegaContextTree, cursor: int, size: int) -> torch.Tensor:
    """LensNet's tail ``[size, d]`` (base dtype and device) of the first ``cursor``
    tokens of ``tree``: row 0 the newest gist of the highest level that has one; with
    ``size >= 2``, row ``size - 1`` the newest tokens' view
    (:func:`newest_tokens_view`: the mean embedding of the newest ``min(bs, cursor)``
    tokens, so the tokens after the last complete block are seen) and the
    ``min(size - 2, n_1)`` rows before it the newest LOD1 gists (oldest first); zeros
    elsewhere. ``cursor`` may lag the tree (the trainer scores past snapshots)."""
    bs = tree.block_size
    dev = base.device
    tail = torch.zeros(size, base.dim, dtype=base.dtype, device=dev)
    for level in range(tree.levels, 0, -1):
        n = cursor // bs**level
        if n:
            tail[0] = tree.gists(level)[n - 1].to(device=dev, dtype=tail.dtype)
            break
    if size < 2:
        return tail
    tail[size - 1] = newest_tokens_view(base, tree, cursor).to(device=dev, dtype=tail.dtype)
    n1 = cursor // bs
    k = min(size - 2, n1)
    if k:
        tail[size - 1 - k : size - 1] = tree.gists(1)[n1 - k : n1].to(device=dev, dtype=tail.dtype)
    return tail


def lens_inputs(
    base: Any, tree: MegaContextTree, wc: WorkingContext, size: int
) -> tuple[torch.Tensor, ...]:
    """LensNet's inputs for ``wc`` (a batch of one): ``entries [1, N, d]``,
    ``tail [1, size, d]`` (:func:`lens_tail` at ``wc.num_tokens``), ``levels``,
    ``span`` and ``distance = T - (start + span)`` (clamped at 0), int64 ``[1, N]``."""
    entries = wc.embeddings(base, tree)
    spans = wc.spans.cpu()
    ends = wc.starts.cpu() + spans
    distance = (wc.num_tokens - ends).clamp(min=0)
    tail = lens_tail(base, tree, wc.num_tokens, size)
    return (
        entries[None],
        tail[None],
        wc.levels.cpu().to(torch.long)[None],
        spans[None],
        distance[None],
    )


def needs_relevance(lensnet: Any) -> bool:
    """Whether ``lensnet`` reads the relevance input (a *retrieval* LensNet,
    ``relevance_buckets > 0``): its scores then go through
    :func:`~megacontext.lexical_scorer.retrieval_scores`."""
    return bool(getattr(getattr(lensnet, "config", None), "relevance_buckets", 0))


def lens_scores(
    lensnet: Any,
    base: Any,
    tree: MegaContextTree,
    wc: WorkingContext,
    config: MegaContextConfig,
    query_end: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LensNet's scores ``u [N]`` (float32, on its device, differentiable in its
    parameters) for ``wc``, and for a retrieval LensNet the blocks' BM25 ``s [n_b]``
    (:func:`~megacontext.lexical_scorer.block_scores` for the query before
    ``query_end``) whose robust z-scores it read as ``relevance``; ``None`` otherwise.
    The one LensNet call of the focus loop and of the trainer."""
    p = next(lensnet.parameters())
    entries, tail, levels, spans, distance = lens_inputs(base, tree, wc, tail_size(lensnet))
    extra: dict[str, torch.Tensor] = {}
    s = None
    if needs_relevance(lensnet):
        s = block_scores(tree, wc, config, query_end)
        rel = entry_relevance(wc, robust_z(s), config.block_size)
        extra["relevance"] = rel[None].to(device=p.device, dtype=p.dtype)
    out = lensnet(
        entries.detach().to(device=p.device, dtype=p.dtype),
        tail.detach().to(device=p.device, dtype=p.dtype),
        levels.to(p.device),
        spans.to(p.device),
        distance.to(p.device),
        **extra,
    )
    return out[0].float(), s


def refocus_after_ingest(
    config: MegaContextConfig,
    refocus: Callable[[], list],
    verify: Callable[[], Any] | None = None,
) -> int:
    """Run ``refocus()`` (one iteration, returning its actions) up to
    ``config.refocus_iterations`` times after an ingest, then, when
    ``config.verify_tokens`` and some iteration acted, ``verify()`` once (the caller's
    :meth:`FocusLoop.verify`, which may put the recency WC back); returns the
    iterations run.

    A far needle under an LOD2 gist needs an expand to LOD1, then another to tokens,
    and a node the allocator just created waits ``cooldown_steps`` steps before it
    may change. So an idle iteration does not end the loop at once: the WC and the
    scores stay the same, only the step counter moves, and ``cooldown_steps`` more
    idle iterations are what it takes for a created node to become eligible. The
    loop stops after ``cooldown_steps + 1`` idle iterations in a row (nothing pays
    and nothing waits) or at the bound. Shared by the runtime and the trainer's
    rollout, so both refocus alike."""
    idle = ran = 0
    acted = False
    for _ in range(config.refocus_iterations):
        ran += 1
        if refocus():
            idle = 0
            acted = True
            continue
        idle += 1
        if idle > config.cooldown_steps:
            break
    if acted and verify is not None and config.verify_tokens:
        verify()
    return ran


def _opened(focus: WorkingContext, recency: WorkingContext) -> torch.Tensor:
    """int64 ``[n]``: the history indices ``focus`` reads as tokens and ``recency``
    does not (the spans a scorer opened), in WC order."""
    idx = [wc.nodes[wc.levels == 0].cpu().long() for wc in (focus, recency)]
    return idx[0][~torch.isin(idx[0], idx[1])]


def decode_hold(config: MegaContextConfig) -> bool:
    """Whether ``config.decode_focus`` holds the ingest's focus while decoding
    (``auto``: for ``lens: lexical``, whose query stays the ingest's)."""
    mode = config.decode_focus
    return mode == "hold" or (mode == "auto" and config.lens == "lexical")


def _same(a: WorkingContext, b: WorkingContext) -> bool:
    """Whether two WCs hold the same entries."""
    return len(a) == len(b) and bool(
        torch.equal(a.levels.cpu(), b.levels.cpu()) and torch.equal(a.nodes.cpu(), b.nodes.cpu())
    )


@dataclass
class FocusStep:
    """What one :meth:`FocusLoop.refocus` changed.

    ``actions``: the allocator's actions, in order; ``residencies[i]``: allocator
    steps node ``actions[i]`` spent at its previous LOD (since the start if it never
    changed); ``forced``: hysteresis held back every collapse an over-budget WC
    needed, so the WC was rebuilt by recency; ``cost_before``: the WC's cost before
    the step; ``old_levels``/``old_nodes``: the WC before the step (to update a KV
    cache); ``step``: the allocator's step index.
    """

    actions: list[Action]
    residencies: list[int]
    forced: bool
    cost_before: int
    old_levels: torch.Tensor
    old_nodes: torch.Tensor
    step: int
    scores: torch.Tensor = field(repr=False)

    @property
    def changed(self) -> bool:
        """Whether the WC may differ from ``old_levels``/``old_nodes``."""
        return bool(self.actions) or self.forced


@dataclass
class Verdict:
    """What :meth:`FocusLoop.verify` found.

    ``kept``: the focused WC stays (``False``: the recency WC replaced it);
    ``nll_focus`` / ``nll_recency``: the mean NLL (nats per token) of the last
    ``tokens`` tokens of the history read under each (``nan`` when nothing was read:
    the two WCs are the same, or the WC holds too few trailing tokens);
    ``unmatched``: the mean of ``NLL_focus − NLL_recency`` over those of the tokens
    whose ids occur nowhere in the spans the focus opened (``nan`` when there are none
    or nothing was read), what ``config.verify_unmatched`` bounds; ``peak``: the
    largest ``NLL_recency − NLL_focus`` over those tokens (``nan`` when nothing was
    read), what ``config.verify_peak`` bounds from below; ``stage``: ``"ingest"`` or
    ``"feed"`` (:meth:`FocusLoop.verify`).
    """

    kept: bool
    nll_focus: float
    nll_recency: float
    tokens: int
    unmatched: float = float("nan")
    stage: str = "ingest"
    peak: float = float("nan")


class FocusLoop:
    """The focus state of one history and the loop's steps (no KV cache).

    Args:
        base: the base model (``dim``, ``dtype``, ``device``, ``embed``).
        gistnet: ``[B, bs, d] -> [B, d]`` compressor, ``None`` = mean pooling.
        lensnet: the scorer, ``None`` = recency-only (scores are zeros).
        config: the :class:`~megacontext.config.MegaContextConfig`; ``config.lens``
            picks the scorer (``lensnet``, ``attention`` or ``recency``).
        scorer: ``scorer(wc, positions [N]) -> float32 [N]`` in ``[-1, 1]``, the
            scorer of ``lens: attention`` (it reads the KV cache, which the loop does
            not own: the runtime builds it); required exactly then.
        allocator_backend: ``auto``, ``python``, ``cpp`` or ``cuda``.
        phase: ``phase(name)`` -> a context manager timing the steps (``gist``,
            ``lens``, ``allocator``); the runtime's telemetry passes its timer.

    Attributes:
        tree: the :class:`~megacontext.tree.MegaContextTree` of the history.
        wc: the :class:`~megacontext.working_context.WorkingContext` (``None``
            before the first :meth:`ingest`).
        allocator: the :class:`~megacontext.allocator.FocusAllocator`.
    """

    def __init__(
        self,
        base: Any,
        gistnet: Any,
        lensnet: Any,
        config: MegaContextConfig,
        *,
        allocator_backend: str = "auto",
        phase: Phase | None = None,
        scorer: Callable[[WorkingContext, torch.Tensor], torch.Tensor] | None = None,
    ):
        if config.lens == "attention" and scorer is None:
            raise ConfigError(
                "invalid value for field 'lens': 'attention' (the attention scorer reads "
                "the base model's queries and KV cache, which only a runtime Session has; "
                "this focus loop was given none)",
                field="lens",
                value=config.lens,
            )
        self.scorer = scorer if config.lens == "attention" else None
        self.base = base
        self.gistnet = gistnet
        self.lensnet = lensnet
        self.config = config
        self.phase: Phase = phase if phase is not None else _no_phase
        self.tree = MegaContextTree(
            base.dim,
            block_size=config.block_size,
            levels=config.levels,
            dtype=tree_dtype(base),
            model_name=getattr(base, "name", ""),
        )
        self.wc: WorkingContext | None = None
        # the end of the last ingest: the lexical scorer's query ends there, so what a
        # session decodes after a question keeps the question's retrieval (None: the
        # newest tokens, e.g. a session reopened from disk before its next ingest)
        self.query_end: int | None = None
        self.allocator = FocusAllocator(config, backend=allocator_backend)
        self.gist = gist_fn(gistnet)
        self.tail_size = tail_size(lensnet)
        # every verify() of this history, oldest first (telemetry and benches read it)
        self.verdicts: list[Verdict] = []
        # verify() dropped this ingest's focus: the scorer stays off (recency) until
        # the next ingest, so decoding does not bring back what the check rejected
        self.vetoed = False
        # config.verify_feed: observed tokens appended since the ingest whose kept
        # focus awaits its check on them (None: no check pending)
        self.feed_check: int | None = None
        # config.decode_focus "hold": the blocks the last ingest's focus opened (int64
        # block ids), kept while decoding (None: nothing held, the scorer rescores)
        self.held: torch.Tensor | None = None
        check_positions(config, base)
        self.max_gap = position_gap(config, base)

    @property
    def num_tokens(self) -> int:
        return self.tree.num_tokens

    @property
    def scoring(self) -> bool:
        """Whether a scorer runs (``False``: recency, the scores are zeros)."""
        lens = self.config.lens
        return lens in ("attention", "lexical") or (lens == "lensnet" and self.lensnet is not None)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``[n] -> [n, d]``: the base model's token embeddings."""
        return self.base.embed(ids.cpu())

    # ------------------------------------------------------------------ history

    def ingest(
        self,
        ids: torch.Tensor,
        chunk_tokens: int = 8192,
        progress: Callable[[int, int], None] | None = None,
    ) -> WorkingContext | None:
        """Append ``ids`` (int64 ``[n]``) to the tree in chunks (completed blocks
        gisted in batches), then rebuild the WC by recency. Returns the WC before."""
        with self.phase("gist"):
            for s in range(0, ids.numel(), chunk_tokens):
                self.tree.append(ids[s : s + chunk_tokens], self.embed, self.gist)
                if progress is not None:
                    progress(min(ids.numel(), s + chunk_tokens), ids.numel())
        old = self.wc
        self.rebuild()
        self.query_end = self.tree.num_tokens
        self.vetoed = False
        self.feed_check = None
        self.held = None
        return old

    def append(self, ids: torch.Tensor, observed: bool = False) -> None:
        """Append decoded tokens ``ids`` (int64 ``[n]``): the tree gists every block
        they complete and the WC grows by their LOD0 entries. ``observed``: the tokens
        are given text (teacher-forced), not the model's own; they count towards a
        pending feed check (:meth:`feed_check_due`), which generated tokens cancel."""
        assert self.wc is not None
        with self.phase("gist"):
            self.tree.append(ids, self.embed, self.gist)
        self.wc.extend(self.tree.num_tokens)
        if self.feed_check is not None:
            self.feed_check = self.feed_check + int(ids.numel()) if observed else None

    def opened_blocks(self, wc: WorkingContext | None = None) -> torch.Tensor:
        """int64 ``[k]``: the blocks ``wc`` (default: the current WC) reads as tokens
        where the recency WC does not, in order: what the focus opened."""
        wc = self.wc if wc is None else wc
        assert wc is not None
        return torch.unique(_opened(wc, self.recency()) // self.config.block_size)

    def hold(self) -> None:
        """After an ingest's refocuses and check: when ``config.decode_focus`` holds
        (:func:`decode_hold`; and a scorer runs), record the blocks the focus opened
        (:meth:`opened_blocks`; none when the check put recency back), which decoding
        keeps (:meth:`scores`)."""
        hold = decode_hold(self.config) and self.scoring and self.wc is not None
        self.held = self.opened_blocks() if hold else None

    def decoding_held(self) -> bool:
        """Whether :meth:`scores` holds the ingest's focus: ``decode_focus: hold``,
        something recorded by :meth:`hold`, and tokens decoded since the ingest."""
        return (
            self.held is not None
            and self.query_end is not None
            and self.num_tokens > self.query_end
        )

    def arm_feed_check(self) -> None:
        """After an ingest's refocuses and check: with ``config.verify_feed`` (and
        ``verify_tokens``, a scorer, no veto) the tokens fed from now on count towards
        the feed check (:meth:`feed_check_due`)."""
        cfg = self.config
        armed = cfg.verify_feed and cfg.verify_tokens > 0 and self.scoring and not self.vetoed
        self.feed_check = 0 if armed else None

    def feed_check_due(self) -> bool:
        """Whether the armed feed check should judge the focus now: at least
        ``config.verify_tokens`` observed tokens since the ingest, a block boundary
        (the WC changes only at a refocus) and a WC that differs from the recency one
        (the ingest's retrieval, or blocks the scorer kept while the fed blocks forced
        collapses). Then :meth:`verify` with ``stage="feed"`` judges it on the newest
        fed tokens; until then it stays armed."""
        if self.feed_check is None or self.feed_check < self.config.verify_tokens:
            return False
        if self.wc is None or self.num_tokens % self.config.block_size:
            return False
        return not _same(self.wc, self.recency())

    def recency(self) -> WorkingContext:
        """The recency WC of the whole tree within ``W_max`` (a new one)."""
        cfg = self.config
        return WorkingContext.from_tree(self.tree, cfg.w_max, cfg.protected_tokens)

    def rebuild(self) -> WorkingContext:
        """Replace the WC by the recency WC (:meth:`recency`)."""
        self.wc = self.recency()
        return self.wc

    # ------------------------------------------------------------------ positions

    def positions(self, wc: WorkingContext | None = None) -> torch.Tensor:
        """int64 ``[N]``: the RoPE positions of ``wc``'s entries (default: the current
        WC) under ``config.positions`` (:func:`~megacontext.working_context.entry_positions`)."""
        wc = self.wc if wc is None else wc
        assert wc is not None
        return wc.positions(self.config.positions, self.max_gap)

    def next_position(self) -> int:
        """The RoPE position of the next token after the current WC."""
        assert self.wc is not None
        return self.wc.next_position(self.config.positions, self.max_gap)

    def positions_of(self, levels: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """int64 ``[N]`` (CPU): the positions of entries ``(levels, nodes)`` (e.g. the
        WC before a refocus) under this loop's scheme."""
        cfg = self.config
        return entry_positions(
            levels.cpu(), nodes.cpu(), cfg.block_size, cfg.positions, max_gap=self.max_gap
        )[0]

    def first_change(self, old_levels: torch.Tensor, old_nodes: torch.Tensor) -> int:
        """The first index at which the current WC differs from ``(old_levels,
        old_nodes)`` in an entry *or its position*: the cache rows before it are
        exactly what a fresh forward computes (same entries at the same positions,
        attending to the same rows). Under ``hybrid``/``nearby`` a refocus can move entries that
        precede every structural change (tail tokens that a new gist after them turns
        into far memory), so the structural difference alone is not enough."""
        assert self.wc is not None
        new_l, new_n = self.wc.levels.cpu(), self.wc.nodes.cpu()
        old_l, old_n = old_levels.cpu(), old_nodes.cpu()
        m = min(len(old_l), len(new_l))
        same = (old_l[:m] == new_l[:m]) & (old_n[:m] == new_n[:m])
        same &= self.positions_of(old_l, old_n)[:m] == self.positions().cpu()[:m]
        diff = torch.nonzero(~same)
        return int(diff[0, 0]) if diff.numel() else m

    def position_delta(
        self, old_levels: torch.Tensor, old_nodes: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """int64 ``[N]``: for each entry of the current WC, its position minus the
        position it had in the previous WC ``(old_levels, old_nodes)``, where it sat
        at slot ``index[j]`` (``-1``: a new entry, delta 0). A cached key rotated for
        the old position, rotated again by this delta, is the key for the new one."""
        assert self.wc is not None
        old = self.positions_of(old_levels, old_nodes)
        new = self.positions().cpu()
        index = index.cpu().to(torch.int64)
        kept = index >= 0
        delta = torch.zeros_like(new)
        delta[kept] = new[kept] - old[index[kept]]
        return delta

    # ------------------------------------------------------------------ focus

    def lens_inputs(self, wc: WorkingContext | None = None) -> tuple[torch.Tensor, ...]:
        """LensNet's inputs for ``wc`` (default: the current WC), see :func:`lens_inputs`."""
        wc = self.wc if wc is None else wc
        assert wc is not None
        return lens_inputs(self.base, self.tree, wc, self.tail_size)

    @torch.no_grad()
    def scores(self) -> torch.Tensor:
        """The scorer's float32 scores ``[N]`` for the current WC: LensNet's, the
        attention scorer's (``config.lens``) or zeros (recency); while decoding under
        ``decode_focus: hold`` (:meth:`decoding_held`), ``+0.5`` on the tokens of the
        blocks the ingest opened and 0 elsewhere, so nothing but the budget moves."""
        assert self.wc is not None
        if self.vetoed:
            return torch.zeros(len(self.wc), dtype=torch.float32)
        if self.decoding_held():
            # +0.5 on the held blocks' tokens: the budget's collapses (lowest block
            # mean first, then the oldest) skip them and take the oldest other block
            assert self.held is not None
            u = torch.zeros(len(self.wc), dtype=torch.float32)
            tok = self.wc.levels.cpu() == 0
            blk = self.wc.starts.cpu().long() // self.config.block_size
            u[tok & torch.isin(blk, self.held)] = 0.5
            return u
        if self.scorer is not None:
            u = self.scorer(self.wc, self.positions())
            if self.config.lens_plan == "scores":
                return u
            # the attention scorer picks what to open; room comes from the token
            # blocks it reads least, and nothing else moves (its uncalibrated scores
            # sent straight to the allocator collapse entries no budget asks for:
            # 97-144 entries left at W = 512, docs/runtime.md)
            u = u.float().cpu()
            s = block_means(self.wc, u, self.config.block_size)
            return retrieval_scores(self.wc, self.config, s, u)
        if self.config.lens == "lexical":
            return lexical_scores(self.tree, self.wc, self.config, self.query_end)
        if not self.scoring:
            return torch.zeros(len(self.wc), dtype=torch.float32)
        u, s = lens_scores(self.lensnet, self.base, self.tree, self.wc, self.config, self.query_end)
        u = u.cpu()
        plan = self.config.lens_plan
        if plan == "retrieval" or (plan == "auto" and s is not None):
            # LensNet picks what to open, the lexical plan makes the room
            if s is None:
                s = block_scores(self.tree, self.wc, self.config, self.query_end)
            return retrieval_scores(self.wc, self.config, s, u)
        return u

    @torch.no_grad()
    def verify(self, recency_logits: torch.Tensor | None = None, stage: str = "ingest") -> Verdict:
        """Keep the focused WC only if it reads the end of the history better than
        the recency WC does, else put the recency WC back.

        With ``v = config.verify_tokens`` and the last ``v`` WC entries the history's
        last ``v`` tokens (the protected tail), both WCs are read in one base forward
        (two rows, :func:`~megacontext.nll.nll_after`): row ``r`` is ``wc_r[:N_r - v]``
        at its positions (behind the sink when ``config.attention_sink`` and it reads
        one) predicting ``ids[T - v : T]``. The focus stays when
        ``mean NLL_focus <= mean NLL_recency - config.verify_margin``. The query the
        scorer read overlaps these tokens, so a retrieved block that shares their
        words is favoured; with ``config.verify_unmatched = u`` the focus must also not
        read the judged tokens whose ids occur nowhere in the opened spans more than
        ``u`` nats per token worse (mean over those tokens; skipped when there are
        none), and with ``config.verify_peak = c`` at least one judged token must read
        ``c`` nats better under the focus (``max(NLL_recency − NLL_focus) >= c``).
        ``config.verify_query: before`` (``lens: lexical``) judges instead the focus
        the scorer reaches with its query ending ``v`` tokens earlier
        (:meth:`_focus_before`, tokens it did not read); when that is the recency WC
        there is nothing to judge and the focus stays. Cost: one base
        forward of two rows of about ``w_max`` entries, only after an ingest whose
        refocuses acted (one row when ``recency_logits``, float ``[k, V]``, the logits
        of the recency WC's last ``k >= v + 1`` entries, are given: a session keeps
        them from its prefill). Records the verdict in ``self.verdicts``; a dropped focus
        sets ``self.vetoed``, and :meth:`scores` is then zeros (recency) until the
        next :meth:`ingest`, so the refocuses of decoding do not bring it back.

        ``stage``: ``"ingest"`` (after an ingest's refocuses) or ``"feed"``. With
        ``config.verify_feed`` the focus is judged once more, on the newest ``v``
        tokens *fed* after the ingest (:meth:`arm_feed_check`, :meth:`feed_check_due`):
        tokens the scorer's query (it ends at the ingest) never held, so nothing it
        opened or kept was chosen for sharing their words. One feed check per ingest."""
        if stage not in ("ingest", "feed"):
            raise ValueError(f"stage must be 'ingest' or 'feed', got {stage!r}")
        self.feed_check = None
        assert self.wc is not None
        cfg = self.config
        recency = self.recency()
        nan = float("nan")
        same = _same(self.wc, recency)
        tails = [len(wc) - wc.tail_start for wc in (self.wc, recency)]
        v = min(cfg.verify_tokens, *tails, self.num_tokens - 1)
        T = self.num_tokens
        judged = self.wc
        # a feed check's tokens are already ones the query did not hold
        before = cfg.verify_query == "before" and cfg.lens == "lexical" and stage == "ingest"
        if not same and v >= 1 and before:
            judged = self._focus_before(T - v)
            same = _same(judged, recency)
        if same or v < 1:
            verdict = Verdict(True, nan, nan, 0, stage=stage)
            self.verdicts.append(verdict)
            return verdict
        targets = torch.as_tensor(self.tree.tokens(T - v, T), dtype=torch.int64).cpu()
        known = recency_logits is not None and len(recency_logits) > v
        contexts, starts = [], []
        for wc in (judged,) if known else (judged, recency):
            pos = self.positions(wc).cpu()
            emb, p = with_sink(
                self.base,
                wc.embeddings(self.base, self.tree),
                pos,
                wc.levels,
                cfg.attention_sink,
                cfg.sink_at,
            )
            contexts.append((emb[: len(emb) - v], p[: len(p) - v]))
            starts.append(int(pos[len(pos) - v]))
        tok = nll_after(self.base, contexts, [targets] * len(contexts), starts).cpu()
        if known:
            assert recency_logits is not None
            lp = recency_logits[-(v + 1) : -1].float().log_softmax(-1)
            rec_tok = -lp.gather(1, targets[:, None].to(lp.device)).squeeze(1).cpu()
        else:
            rec_tok = tok[1]
        focus, rec = float(tok[0].mean()), float(rec_tok.mean())
        kept = focus <= rec - cfg.verify_margin
        free = ~torch.isin(targets, self._opened_tokens(judged, recency))
        harm = float((tok[0] - rec_tok)[free].mean()) if bool(free.any()) else nan
        if kept and cfg.verify_unmatched is not None and not math.isnan(harm):
            kept = harm <= cfg.verify_unmatched
        peak = float((rec_tok - tok[0]).max())
        if kept and cfg.verify_peak is not None:
            kept = peak >= cfg.verify_peak
        if not kept:
            self.wc = recency
            self.vetoed = True
        verdict = Verdict(kept, focus, rec, v, harm, stage, peak)
        self.verdicts.append(verdict)
        return verdict

    def _opened_tokens(self, focus: WorkingContext, recency: WorkingContext) -> torch.Tensor:
        """The distinct token ids of the history indices ``focus`` reads as tokens and
        ``recency`` does not (the spans the scorer opened), int64 ``[n]``."""
        opened = _opened(focus, recency)
        if opened.numel() == 0:
            return opened
        lo, hi = int(opened.min()), int(opened.max()) + 1
        return torch.unique(self.tree.tokens(lo, hi)[opened - lo])

    def _focus_before(self, end: int) -> WorkingContext:
        """The WC the scorer's ingest refocuses reach from the recency WC with the
        query ending at token ``end`` (``verify_query: before``): a scratch loop over
        the same tree, so this loop's allocator state is untouched."""
        scratch = FocusLoop(self.base, self.gistnet, self.lensnet, self.config, scorer=self.scorer)
        scratch.tree = self.tree
        scratch.rebuild()
        scratch.query_end = end
        refocus_after_ingest(self.config, lambda: scratch.refocus().actions)
        assert scratch.wc is not None
        return scratch.wc

    def refocus(self) -> FocusStep:
        """One iteration: score, allocator step and, when hysteresis held back every
        collapse an over-budget WC needs, a recency rebuild (``forced``) so the WC
        never exceeds ``W_max``."""
        assert self.wc is not None
        cfg = self.config
        with self.phase("lens"):
            scores = self.scores()
        old_levels, old_nodes = self.wc.levels.clone(), self.wc.nodes.clone()
        before = {lv: self.allocator.last_changed(lv).clone() for lv in range(1, cfg.levels + 1)}
        step = self.allocator.step_count
        cost_before = self.wc.cost
        with self.phase("allocator"):
            actions = self.allocator.step(self.wc, scores)
        residencies = []
        for a in actions:
            states = before.get(a.level)
            last = int(states[a.node]) if states is not None and a.node < len(states) else -1
            residencies.append(step - max(last, 0))
        forced = self.wc.cost > cfg.w_max
        if forced:
            self.rebuild()
        self.wc.check(self.tree)
        return FocusStep(
            actions=actions,
            residencies=residencies,
            forced=forced,
            cost_before=cost_before,
            old_levels=old_levels,
            old_nodes=old_nodes,
            step=step,
            scores=scores,
        )
