"""Sessions: a frozen base model reads an unbounded history through ``W_max`` entries.

``mc.MegaContext(base, gistnet, lensnet, config).session()`` returns a
:class:`Session` that runs the design's loop::

    ingest -> gist completed blocks -> LensNet -> allocator -> update the KV cache
           -> decode K tokens -> append them to the tree -> repeat

with telemetry every refocus iteration. The base model is patched with the
drop-in hook (:func:`megacontext.patch`) and reads the working context (WC)
through ``inputs_embeds`` with the focus loop's positions as ``position_ids``
(``config.positions``, :func:`megacontext.working_context.entry_positions`) and an
explicit mask in WC order; keys live after RoPE in a preallocated
:class:`~megacontext.cache.MegaContextCache` of ``W_max + K`` slots.

KV refocus modes (``config.kv_mode``):

- ``exact``: keep the cache before the first changed entry (an entry or its
  position), recompute the rest; equals a fresh forward over the new WC.
- ``splice``: keep every unchanged entry's K/V (moved, not recomputed; a kept key
  whose position moved is re-rotated by the cache's splice), compute
  only the inserted entries (and the decode cursor's entry, so the next-token
  logits see the new context), each attending to the entries before it.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from . import profiling, session_store
from .allocator import Action, FocusAllocator
from .attention_scorer import AttentionScorer
from .base import DEFAULT_MODEL, Base, cache_kwarg, load_base
from .cache import MegaContextCache
from .checkpoint import read_checkpoint
from .config import MegaContextConfig
from .errors import ConfigError, InputError, InvariantError, StorageError
from .focus import FocusLoop, FocusStep, check_positions, fitting_budget, refocus_after_ingest
from .hook import patch, recording
from .kernels.kv_splice import rope_rotate
from .nll import nll_after
from .telemetry import swap_counts
from .tree import MegaContextTree
from .working_context import (
    WorkingContext,
    entry_positions,
    reads_sink,
    sink_position,
    with_sink,
)

__all__ = ["PHASES", "MegaContext", "Session", "SessionBatch", "sample_token"]

PHASES = ("gist", "lens", "allocator", "cache", "decode")
_KEEP: Any = object()  # with_config(): "carry this module over"


class _Phases:
    """Wall-clock milliseconds per phase since the last :meth:`take`."""

    def __init__(self) -> None:
        self.ms = dict.fromkeys(PHASES, 0.0)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with profiling.range(phase):
            try:
                yield
            finally:
                self.ms[phase] += (time.perf_counter() - t0) * 1e3

    def take(self) -> dict[str, float]:
        out, self.ms = self.ms, dict.fromkeys(PHASES, 0.0)
        return out


class MegaContext:
    """The system: a base model, a gist compressor, a focus scorer and a config.

    Args:
        base: the frozen base model (:func:`megacontext.load_base`).
        gistnet: ``[B, bs, d] -> [B, d]`` compressor (a :class:`megacontext.GistNet`
            or any callable); ``None`` = mean pooling (the untrained start).
        lensnet: a :class:`megacontext.LensNet`; ``None`` = recency-only focus (the
            allocator then only collapses what the budget forces, oldest first).
        config: :class:`megacontext.MegaContextConfig` (default: the design defaults).
        allocator_backend: ``auto``, ``python``, ``cpp`` or ``cuda``.
    """

    def __init__(
        self,
        base: Base,
        gistnet: Callable[[torch.Tensor], torch.Tensor] | None = None,
        lensnet: torch.nn.Module | None = None,
        config: MegaContextConfig | None = None,
        *,
        allocator_backend: str = "auto",
    ):
        self.base = base
        self.gistnet = gistnet
        self.lensnet = lensnet
        self.config = config if config is not None else MegaContextConfig(model=base.name)
        self.allocator_backend = allocator_backend
        gdim = getattr(getattr(gistnet, "config", None), "dim", None)
        if gdim is not None and gdim != base.dim:
            raise ConfigError(
                f"GistNet width {gdim} does not match the base model's {base.dim}",
                field="gistnet.dim",
                value=gdim,
            )
        ldim = getattr(getattr(lensnet, "config", None), "dim", None)
        if ldim is not None and ldim != base.dim:
            raise ConfigError(
                f"LensNet width {ldim} does not match the base model's {base.dim}",
                field="lensnet.dim",
                value=ldim,
            )
        patch(base.model)
        check_positions(self.config, base, budget=False)

    def with_config(
        self,
        *,
        base: Base | None = None,
        gistnet: Any = _KEEP,
        lensnet: Any = _KEEP,
        **changes: Any,
    ) -> MegaContext:
        """The same system with config fields ``changes`` applied
        (:meth:`MegaContextConfig.replace`, validated) and, when given, another base,
        GistNet or LensNet (``None`` is a value: mean pooling / recency-only). Every
        other field, ``allocator_backend`` included, is carried over."""
        return MegaContext(
            self.base if base is None else base,
            self.gistnet if gistnet is _KEEP else gistnet,
            self.lensnet if lensnet is _KEEP else lensnet,
            self.config.replace(**changes),
            allocator_backend=self.allocator_backend,
        )

    def session(self, telemetry: Any | None = None) -> Session:
        """A new, empty session (``telemetry``: an optional sink with ``log_iteration``
        and ``log_actions``, e.g. :class:`megacontext.telemetry.Telemetry`)."""
        return Session(self, telemetry=telemetry)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike[str], base: Base | None = None, device: str | None = None
    ) -> MegaContext:
        """The system saved in a trainer checkpoint directory (GistNet, LensNet and the
        base model's LoRA adapter); see :func:`megacontext.checkpoint.read_checkpoint`.
        ``base``: a loaded base model without adapters (default: loaded by name)."""
        parts = read_checkpoint(path, base=base, device=device)
        return cls(parts.base, parts.gistnet, parts.lensnet, parts.config)

    @classmethod
    def pretrained(
        cls,
        name: str | os.PathLike[str] = DEFAULT_MODEL,
        base: Base | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **config_changes: Any,
    ) -> MegaContext:
        """The system of a pretrained memory: a name from
        :func:`megacontext.pretrained.available_memories` (shipped in the package) or a
        memory directory; see :func:`megacontext.pretrained.read_memory` for the checks
        and errors. ``base``: the loaded base model (checked against the memory's
        manifest); default: ``load_base(<the manifest's base.name>, device, dtype)``.
        ``config_changes``: :class:`MegaContextConfig` fields over the memory's
        defaults (e.g. ``w_max=4096``)."""
        from .pretrained import MANIFEST, check_base, read_memory

        if base is not None and (device is not None or dtype is not None):
            raise ConfigError(
                "MegaContext.pretrained: device and dtype apply to the base it loads; "
                "move the given base instead",
                field="device" if device is not None else "dtype",
                value=device if device is not None else dtype,
            )
        memory = read_memory(name, base=base)
        if base is None:
            base = load_base(memory.manifest.base.name, device=device, dtype=dtype)
            check_base(memory.manifest, base, memory.path / MANIFEST)
        config = MegaContextConfig(model=base.name, **{**memory.config, **config_changes})
        if "w_max" not in config_changes and "w_max" not in memory.config:
            # the design's default budget may not fit the base model's context under a
            # bounded scheme (SmolLM2-135M: 8,192 positions); use the largest that does
            config = config.replace(w_max=fitting_budget(config, base))
        lensnet = memory.lensnet.to(base.device) if memory.lensnet is not None else None
        return cls(base, memory.gistnet.to(base.device), lensnet, config)

    def batch(self, sessions: Sequence[Session]) -> SessionBatch:
        """Decode ``sessions`` together (one forward per step); see :class:`SessionBatch`."""
        return SessionBatch(sessions)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        base: Base | None = None,
        gistnet: Any | None = None,
        lensnet: Any | None = None,
        telemetry: Any | None = None,
    ) -> Session:
        """Resume a session saved with :meth:`Session.save` (any process).

        Every file is checked first (``docs/reliability.md``: checksums, fields,
        shapes, token ids); a problem raises :class:`StorageError` naming the file
        and the field. ``base``: the base model; ``None`` loads the one session.json
        names only when it is a built-in model (``smollm2-135m``, ``tiny-llama``):
        a session file never makes ``open`` load an arbitrary folder or hub id. A
        given base must carry the saved name. GistNet and LensNet weights saved with
        the session are loaded unless given; one the session ran with but could not
        save (no ``save`` method) must be given.
        """
        stored = session_store.read_session(
            path, load_modules={"gistnet": gistnet is None, "lensnet": lensnet is None}
        )
        meta_path = stored.meta_path
        saved_base = stored.base_name
        if base is None:
            if saved_base not in (DEFAULT_MODEL, "tiny-llama"):
                raise StorageError(
                    f"{meta_path}: the session was saved with base model {saved_base!r}, "
                    "which is not built in; pass base=load_base(...) to open it (a session "
                    "file never chooses which model folder or hub id is loaded)",
                    path=str(meta_path),
                    field="base",
                )
            base = load_base(saved_base)
        elif base.name != saved_base:
            raise StorageError(
                f"{meta_path}: the session was saved with base model {saved_base!r}, "
                f"not {base.name!r} (its KV rows and gists belong to that model)",
                path=str(meta_path),
                field="base",
            )
        given = {"gistnet": gistnet, "lensnet": lensnet}
        for name, state in stored.module_record.items():
            if given[name] is None and state == "unsaved":
                raise StorageError(
                    f"{meta_path}: the session ran with a {name} that has no save(); "
                    f"pass {name}= to open it",
                    path=str(meta_path),
                    field=f"modules.{name}",
                )
        gistnet = gistnet if gistnet is not None else stored.modules.get("gistnet")
        lensnet = lensnet if lensnet is not None else stored.modules.get("lensnet")
        system = cls(
            base,
            gistnet,
            lensnet,
            stored.config,
            allocator_backend=stored.meta["allocator_backend"],
        )
        session = Session(system, telemetry=telemetry)
        session._restore(stored)
        return session


class Session:
    """One history read through the budget. Create with :meth:`MegaContext.session`.

    A session is a :class:`~megacontext.focus.FocusLoop` (``focus``: tree, WC,
    allocator, LensNet scores) plus the KV cache and telemetry.

    Attributes:
        focus: the :class:`~megacontext.focus.FocusLoop` that owns the focus state.
        tree: the :class:`~megacontext.tree.MegaContextTree` of the whole history.
        wc: the current :class:`~megacontext.working_context.WorkingContext`
            (``None`` before the first ingest).
        allocator: the :class:`~megacontext.allocator.FocusAllocator` (hysteresis state).
        cache: the :class:`~megacontext.cache.MegaContextCache` (``W_max + K`` slots).
        history: one telemetry dict per refocus iteration (also sent to ``telemetry``).
        actions: every allocator action taken, in order.
    """

    def __init__(self, system: MegaContext, telemetry: Any | None = None):
        self.system = system
        self.base = system.base
        self.config = system.config
        cfg = self.config
        self._phases = _Phases()
        self.capacity = cfg.w_max + cfg.block_size
        self.cache = MegaContextCache.for_model(
            self.base.model,
            batch_size=1,
            capacity=self.capacity,
            double_buffer=True,
            sink=1 if cfg.attention_sink else 0,
        )
        self._cache_kw = cache_kwarg(self.base.model)
        self._sink_position = 0  # where the cached sink's K/V were computed
        if cfg.attention_sink:
            self._init_sink()
        # lens: attention scores from this cache and the queries the hook records
        # during forwards of real tokens (ingest prefill, decode)
        self.attention_scorer: AttentionScorer | None = None
        if cfg.lens == "attention":
            self.attention_scorer = AttentionScorer(
                self.base.model,
                self.cache,
                cfg.block_size,
                cfg.attention_layers,
                cfg.attention_queries,
                cfg.attention_share,
            )
        self.focus = FocusLoop(
            self.base,
            system.gistnet,
            system.lensnet,
            cfg,
            allocator_backend=system.allocator_backend,
            phase=self._phases,
            scorer=self.attention_scorer,
        )
        self.telemetry = telemetry
        self.history: list[dict[str, Any]] = []
        self.actions: list[Action] = []
        self.residencies: list[int] = []
        self.iteration = 0
        self._blocks_since_refocus = 0
        self._next_logits: torch.Tensor | None = None
        # resolved path -> the commit id this session last read or wrote there
        self._commits: dict[str, str] = {}
        # bumped whenever cached rows may be rewritten (not when one is appended), so
        # a rollback knows whether the rows it kept are still intact
        self._cache_epoch = 0

    # ------------------------------------------------------------------ focus state

    @property
    def tree(self) -> MegaContextTree:
        return self.focus.tree

    @tree.setter
    def tree(self, tree: MegaContextTree) -> None:
        self.focus.tree = tree

    @property
    def wc(self) -> WorkingContext | None:
        return self.focus.wc

    @wc.setter
    def wc(self, wc: WorkingContext | None) -> None:
        self.focus.wc = wc

    @property
    def allocator(self) -> FocusAllocator:
        return self.focus.allocator

    @property
    def num_tokens(self) -> int:
        return self.tree.num_tokens

    # ------------------------------------------------------------------ helpers

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.focus.embed(ids)

    @torch.no_grad()
    def _init_sink(self) -> None:
        """The sink token's K/V at position 0, computed by the runtime's own forward
        path into a one-slot cache, kept (``_sink_kv``) and copied into this cache's
        sink slot."""
        one = MegaContextCache.for_model(
            self.base.model, batch_size=1, capacity=1, double_buffer=False
        )
        one.plan(torch.zeros(1, 1, dtype=torch.long), [1])
        self.base.model(
            inputs_embeds=self.base.embed(torch.tensor([[self.base.sink_token_id]])),
            position_ids=torch.zeros(1, 1, dtype=torch.long, device=self.base.device),
            attention_mask=None,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: one},
        )
        self._sink_kv = (one.kv[:, 0, 0, :, :1].clone(), one.kv[:, 1, 0, :, :1].clone())
        self.cache.set_sink(*self._sink_kv)
        self._sink_position = 0

    def _move_sink(self, position: int) -> None:
        """Put the cached sink at ``position``. The sink reads only itself, so at every
        layer its hidden state, hence its value, does not depend on its position and
        its key is the position-0 key rotated by ``position`` (``rope_rotate``, fp32
        math from the kept position-0 key, so moves never compound rounding)."""
        k0, v0 = self._sink_kv
        delta = torch.full((1,), position, dtype=torch.long, device=k0.device)
        self.cache.set_sink(rope_rotate(k0, delta, self.cache.inv_freq), v0)
        self._sink_position = position

    def _place_sink(self) -> bool:
        """Move the cached sink to the current WC's :func:`sink_position`; True when
        it moved. Under ``sink_at: window`` it follows the first token entry, so a
        refocus that adds or removes gists moves it."""
        assert self.wc is not None
        want = sink_position(self.focus.positions(), self.wc.levels, self.config.sink_at)
        if want == self._sink_position:
            return False
        self._move_sink(want)
        return True

    def _wants_sink(self) -> bool:
        """Whether the current WC is read behind the attention sink (:func:`reads_sink`)."""
        assert self.wc is not None
        return reads_sink(self.wc.levels, self.config.attention_sink)

    def _sync_sink(self) -> bool:
        """Set the cache's sink flag and place from the WC; True when either changed,
        so every cached row is stale (each one read the sink or not, or read it at
        another distance)."""
        want = self._wants_sink()
        changed = want != self.cache.sink_on[0]
        self.cache.sink_on[0] = want
        moved = want and self._place_sink()
        return changed or moved

    def _validate_ids(self, ids: Any, arg: str = "text_or_ids") -> torch.Tensor:
        """Text or token ids -> int64 ``[n]`` (n >= 1) on the CPU, or InputError naming
        ``arg``: only ``str`` (tokenized) or a 1-D sequence/tensor of integer ids
        inside the vocabulary."""
        if isinstance(ids, str):
            if not ids:
                raise InputError(f"{arg}: cannot ingest empty text")
            ids = self.base.encode(ids)
            if ids.numel() == 0:
                raise InputError(f"{arg}: the text encodes to no tokens")
        return _check_ids(ids, arg, self.base.vocab_size, self.base.name)

    def _forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        length: int,
        logits_to_keep: int = 1,
        record: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run ``embeds [q, d]`` at ``slots [q]`` of the cache (keys written there),
        each attending to cache slots ``<=`` its own; the cache then holds ``length``
        rows. Returns the logits of the last ``logits_to_keep`` rows, float32.
        ``record``: ``(positions, tokens)`` of the forward's last rows, real tokens
        whose queries the attention scorer keeps (``None``: nothing recorded)."""
        rec = self.attention_scorer.recorder if self.attention_scorer is not None else None
        if rec is None or record is None:
            return self._run(embeds, positions, slots, length, logits_to_keep)
        rec.arm(*record)
        with recording([rec]):
            return self._run(embeds, positions, slots, length, logits_to_keep)

    def _run(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        length: int,
        logits_to_keep: int,
    ) -> torch.Tensor:
        dev = self.base.device
        slots = slots.to(device=dev, dtype=torch.long)
        self.cache.plan(slots[None], [length])
        if slots.numel() == 1 and int(slots[0]) == length - 1 and not self.cache.needs_mask():
            # One new row at the end sees every slot: no mask (SDPA's fast path, or
            # flash-attn on CUDA).
            mask = None
        else:
            mask = self.cache.attention_mask(slots[None], [length])
        out = self.base.model(
            inputs_embeds=embeds[None].to(device=dev, dtype=self.base.dtype),
            position_ids=positions[None].to(device=dev),
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self._cache_kw: self.cache},
        )
        return out.logits[0].float()

    def _prefill(
        self, start: int, chunk: int = 256, record: bool = False, keep: int = 1
    ) -> torch.Tensor | None:
        """Recompute the cache for WC entries ``[start, N)`` (exact). ``record``: the
        attention scorer keeps the queries of the trailing LOD0 entries (an ingest's
        new tokens), not those of recomputed gists. Returns the logits ``[k, V]`` of
        the last ``k = min(keep, rows of the last chunk)`` entries (``None`` when
        nothing was recomputed)."""
        assert self.wc is not None
        self._cache_epoch += 1
        n = len(self.wc)
        if self._sync_sink():
            start = 0
        self.cache.truncate([start])
        if start >= n:
            return None
        embeds = self.wc.embeddings(self.base, self.tree)
        positions = self.focus.positions()
        starts = self.wc.starts.cpu().to(torch.int64)
        first_token = self.wc.tail_start  # the LOD0 tail
        for s in range(start, n, chunk):
            e = min(n, s + chunk)
            rows = None
            if record and e > first_token:
                t0 = max(s, first_token)
                rows = (positions[t0:e], starts[t0:e])
            k = min(keep, e - s) if e == n else 1
            logits = self._forward(
                embeds[s:e], positions[s:e], torch.arange(s, e), e, logits_to_keep=k, record=rows
            )
        self._next_logits = logits[-1]
        return logits

    def _kept_index(self, old_levels, old_nodes) -> torch.Tensor:
        """For each new WC entry, its slot in the old WC, or -1 when it is new."""
        assert self.wc is not None
        top = self.config.levels + 1

        def keys(levels: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
            starts = nodes.cpu() * torch.pow(
                torch.tensor(self.config.block_size), levels.cpu().to(torch.int64)
            )
            return starts * top + levels.cpu().to(torch.int64)

        old, new = keys(old_levels, old_nodes), keys(self.wc.levels, self.wc.nodes)
        idx = torch.searchsorted(old, new).clamp(max=max(len(old) - 1, 0))
        hit = old[idx] == new if len(old) else torch.zeros_like(new, dtype=torch.bool)
        return torch.where(hit, idx, torch.full_like(idx, -1))

    # ------------------------------------------------------------------ focus

    @torch.no_grad()
    def scores(self) -> torch.Tensor:
        """LensNet's scores ``[N]`` for the current WC (zeros with no LensNet)."""
        return self.focus.scores()

    @torch.no_grad()
    def refocus(self) -> list[Action]:
        """One refocus iteration: LensNet scores, allocator step, KV update, telemetry.
        On an error the session is restored as :meth:`generate` describes."""
        if self.wc is None:
            raise InputError("nothing to refocus: ingest some history first")
        snapshot = self._snapshot()
        try:
            return self._refocus()
        except BaseException:
            self._rollback(snapshot)
            raise

    def _refocus(self) -> list[Action]:
        res = self.focus.refocus()
        with self._phases("cache"):
            if res.changed:
                # under splice, the kept entries after an expanded span never read it
                # (their K/V predate it); kv_after_expand: exact recomputes them
                expanded = any(a.kind == "expand" for a in res.actions)
                exact = res.forced or (expanded and self.config.kv_after_expand == "exact")
                self._update_cache(res.old_levels, res.old_nodes, force_exact=exact)
        self.residencies.extend(res.residencies)
        self.actions.extend(res.actions)
        self._log(res)
        return res.actions

    def _verify(self, recency_logits: torch.Tensor | None = None, stage: str = "ingest") -> None:
        """:meth:`FocusLoop.verify` after an ingest's refocuses (given the recency WC's
        tail logits from the ingest's prefill) or on the tokens fed after it (``stage
        ="feed"``); when it puts the recency WC back, the cache is recomputed from the
        first changed entry."""
        assert self.wc is not None
        old_levels, old_nodes = self.wc.levels.clone(), self.wc.nodes.clone()
        with self._phases("lens"):  # a scoring cost: the next telemetry row carries it
            verdict = self.focus.verify(recency_logits, stage)
        if not verdict.kept:
            with self._phases("cache"):
                self._update_cache(old_levels, old_nodes, force_exact=True)

    def _update_cache(self, old_levels, old_nodes, force_exact: bool = False) -> None:
        assert self.wc is not None
        self._cache_epoch += 1
        n = len(self.wc)
        if self.config.kv_mode == "exact" or force_exact:
            first = self.focus.first_change(old_levels, old_nodes)
            # The cursor's entry is always recomputed so the next-token logits read
            # the new context.
            self._prefill(min(first, n - 1))
            return
        if self._wants_sink() != self.cache.sink_on[0]:
            # the sink comes or goes: no kept row read what it now reads
            self._prefill(0)
            return
        if self.cache.sink_on[0]:
            # a moved sink's key is rotated to its place; kept rows keep the K/V they
            # computed against its old place, as they keep those of moved neighbours
            self._place_sink()
        index = self._kept_index(old_levels, old_nodes)
        index[-1] = -1
        # kept entries whose position moved (bounded schemes) are re-rotated in the
        # splice's one launch, not recomputed
        delta = self.focus.position_delta(old_levels, old_nodes, index)
        self.cache.splice(index[None], [n], position_delta=delta[None])
        fresh = torch.nonzero(index < 0).squeeze(1)
        embeds = self.wc.embeddings(self.base, self.tree)
        positions = self.focus.positions()
        logits = self._forward(embeds[fresh], positions[fresh], fresh, n)
        self._next_logits = logits[-1]

    def _log(self, res: FocusStep) -> None:
        assert self.wc is not None
        actions, residency, forced, cost_before = (
            res.actions,
            res.residencies,
            res.forced,
            res.cost_before,
        )
        phases = self._phases.take()
        blocks = max(self._blocks_since_refocus, 1)
        n_exp = sum(a.kind == "expand" for a in actions)
        # The budget floor (telemetry.swap_counts): collapses no focus policy can
        # avoid; ``focus_swap_rate`` counts only the discretionary rest.
        swaps = swap_counts(
            actions,
            cost_before=cost_before,
            cost_after=self.wc.cost,
            w_max=self.config.w_max,
            block_size=self.config.block_size,
        )
        row: dict[str, Any] = {
            "iteration": self.iteration,
            "step": self.allocator.step_count - 1,
            "session": 0,
            "loss_at_h": None,
            "swap_rate": len(actions) / blocks,
            "mean_residency": (
                sum(self.residencies) / len(self.residencies) if self.residencies else None
            ),
            # everything since the previous iteration: the decode of the block, its
            # gisting, and this refocus
            "latency_ms": sum(phases.values()),
            **{f"latency_{k}_ms": v for k, v in phases.items()},
            "token_budget_utilization": self.wc.cost / self.config.w_max,
            "wc_cost": self.wc.cost,
            "w_max": self.config.w_max,
            "num_tokens": self.num_tokens,
            "n_expand": n_exp,
            "n_collapse": len(actions) - n_exp,
            "forced_rebuild": int(forced),
            "n_budget_collapses": swaps.forced,
            "n_discretionary": swaps.discretionary,
            "blocks": blocks,
            "focus_swap_rate": swaps.discretionary / blocks,
        }
        self.history.append(row)
        trace = [
            {
                "iteration": self.iteration,
                "session": 0,
                "step": a.step,
                "kind": a.kind,
                "level": a.level,
                "node": a.node,
                "score": a.score,
                "cost_delta": a.cost_delta,
                "residency": r,
            }
            for a, r in zip(actions, residency, strict=True)
        ]
        if self.telemetry is not None:
            self.telemetry.log_iteration(**row)
            if trace:
                self.telemetry.log_actions(trace)
        self.iteration += 1
        self._blocks_since_refocus = 0

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def ingest(
        self,
        text_or_ids: str | Sequence[int] | torch.Tensor,
        chunk_tokens: int = 8192,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Append a history of any length. Tokens stream into the tree in chunks
        (completed blocks gisted in batches), then the WC is rebuilt to fit the budget
        (recency-based), the cache is recomputed from the first changed entry and, with
        a scorer (a LensNet, or ``lens: attention``), up to ``refocus_iterations``
        refocuses run (:func:`~megacontext.focus.refocus_after_ingest`) so the new tail
        can pull detail in.

        Returns the number of tokens ingested. On an error the session is unchanged.
        """
        ids = self._validate_ids(text_or_ids)
        chunk_tokens = _check_int(chunk_tokens, "chunk_tokens", 1)
        if progress is not None and not callable(progress):
            raise InputError(f"progress must be callable(done, total) or None, got {progress!r}")
        ph = self._phases
        snapshot = self._snapshot()
        try:
            old = self.focus.ingest(ids, chunk_tokens, progress)
            assert self.wc is not None
            with ph("cache"):
                first = 0 if old is None else self.focus.first_change(old.levels, old.nodes)
                # the recency WC's tail logits: the focus check's recency row, for free
                keep = self.config.verify_tokens + 1
                tail = self._prefill(min(first, len(self.wc) - 1), record=True, keep=keep)
            self.wc.check(self.tree)
            self._blocks_since_refocus += ids.numel() // self.config.block_size
            lens = self.config.lens
            if lens in ("attention", "lexical") or (
                lens == "lensnet" and self.system.lensnet is not None
            ):
                # a far needle under an LOD2 gist needs two expands (LOD2 -> LOD1 ->
                # tokens): iterate, each step on the cache the previous one updated
                refocus_after_ingest(self.config, self.refocus, lambda: self._verify(tail))
                self.focus.hold()
                self.focus.arm_feed_check()
        except BaseException:
            self._rollback(snapshot)
            raise
        return int(ids.numel())

    def _snapshot(self) -> dict[str, Any]:
        """What :meth:`_rollback` needs to undo a call: O(WC + allocator state), no KV."""
        return {
            "num_tokens": self.tree.num_tokens,
            "wc": None if self.wc is None else self.wc.clone(),
            "logits": self._next_logits,
            "cache_lengths": list(self.cache.lengths),
            "cache_epoch": self._cache_epoch,
            "allocator": self.allocator.state_dict(),
            "counters": (self.iteration, self._blocks_since_refocus),
            "query_end": self.focus.query_end,
            "vetoed": self.focus.vetoed,
            "feed_check": self.focus.feed_check,
            "held": self.focus.held,
            "verdicts": len(self.focus.verdicts),
            "lists": (len(self.history), len(self.actions), len(self.residencies)),
            "queries": (
                None if self.attention_scorer is None else self.attention_scorer.recorder.state()
            ),
        }

    def _rollback(self, snap: dict[str, Any]) -> None:
        """Restore the session to ``snap``: tree, WC, allocator, counters and logits
        exactly; the KV rows too when no refocus rewrote them since, else they are
        recomputed from the WC (equal to a fresh forward, as in ``exact`` mode)."""
        if self.tree.num_tokens != snap["num_tokens"]:
            self.tree.truncate(snap["num_tokens"])
        self.wc = snap["wc"]
        self.allocator.load_state_dict(snap["allocator"])
        self.iteration, self._blocks_since_refocus = snap["counters"]
        self.focus.query_end = snap["query_end"]
        self.focus.vetoed = snap["vetoed"]
        self.focus.feed_check = snap["feed_check"]
        self.focus.held = snap["held"]
        del self.focus.verdicts[snap["verdicts"] :]
        n_history, n_actions, n_residencies = snap["lists"]
        del self.history[n_history:], self.actions[n_actions:]
        del self.residencies[n_residencies:]
        if self.wc is None:
            self.cache.truncate([0])
        else:
            if self._cache_epoch == snap["cache_epoch"]:
                # only rows past the old WC were written: the kept rows are intact
                self.cache.truncate(snap["cache_lengths"])
            else:
                self._prefill(0)
        self._next_logits = snap["logits"]
        if snap["queries"] is not None:
            assert self.attention_scorer is not None
            self.attention_scorer.recorder.load_state(snap["queries"])

    def _append_token(self, token: int, observed: bool = False) -> torch.Tensor:
        slot, position = self.begin_decode(token, observed)
        with self._phases("decode"):
            logits = self._forward(
                self._embed(torch.tensor([token])),
                torch.tensor([position]),
                torch.tensor([slot]),
                slot + 1,
                record=(torch.tensor([position]), torch.tensor([self.num_tokens - 1])),
            )
        self.finish_decode(logits[-1])
        assert self._next_logits is not None
        return self._next_logits

    # A decode step in two halves, for drivers that run the base model's forward
    # themselves (SessionBatch): begin_decode, the forward, finish_decode.

    def begin_decode(self, token: int, observed: bool = False) -> tuple[int, int]:
        """Decode step, first half: append ``token`` to the history (tree and WC).
        Returns ``(slot, position)``: the cache slot the token's K/V must be written
        to (its WC index, ``len(wc) - 1``) and its RoPE position (the next position
        after the WC under ``config.positions``; its global index under ``global``).
        ``observed``: a given token (:meth:`feed`), not one the model chose."""
        if self.wc is None:
            raise InputError("decoding needs a history: call ingest() first")
        position = self.focus.next_position()
        self.focus.append(torch.tensor([token]), observed=observed)
        return len(self.wc) - 1, position

    def finish_decode(
        self, logits: torch.Tensor, cache_length: int | None = None, decode_ms: float = 0.0
    ) -> int:
        """Decode step, second half: ``logits`` float32 ``[V]`` (the forward's output
        at the new token) become the next-token logits; at a block boundary the
        session refocuses. ``cache_length``: rows this session's cache holds after a
        forward that ran on another view of its buffers (``None``: the forward planned
        this cache itself); ``decode_ms``: forward time charged to the ``decode``
        phase. Returns the rows the cache holds afterwards."""
        if cache_length is not None:
            self.cache.set_lengths([cache_length])
        self._phases.ms["decode"] += decode_ms
        self._next_logits = logits
        if self.num_tokens % self.config.block_size == 0:
            self._blocks_since_refocus += 1
            self.refocus()
        return self.cache.lengths[0]

    @torch.no_grad()
    def generate(
        self,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        stop_at_eos: bool = True,
    ) -> str:
        """Decode up to ``max_new_tokens`` tokens after the history; every K tokens the
        block is gisted, scored, refocused. ``temperature=0`` is greedy; ``top_p``
        nucleus-samples; generation stops at the EOS token or any ``stop`` string
        (which is kept in the returned text). Returns the generated text.

        All or nothing: when the call fails (e.g. the budget cannot hold the longer
        history: ``ConfigError``) or is interrupted, every token it appended is
        dropped and the session is as before the call (tree, WC, allocator state,
        counters, next-token logits exactly; KV rows a refocus rewrote are recomputed
        from the WC). Telemetry rows already sent to a sink stay sent."""
        if self.wc is None or self._next_logits is None:
            raise InputError("generate() needs a history: call ingest() first")
        max_new_tokens = _check_int(max_new_tokens, "max_new_tokens", 0)
        temperature = _check_float(temperature, "temperature", 0.0, math.inf, low_open=False)
        top_p = _check_float(top_p, "top_p", 0.0, 1.0, low_open=True)
        if stop is None or isinstance(stop, str):
            stops = [] if stop is None else [stop]
        elif isinstance(stop, (list, tuple)) and all(isinstance(x, str) for x in stop):
            stops = list(stop)
        else:
            raise InputError(f"stop must be a string, a list of strings or None, got {stop!r}")
        if seed is not None:
            seed = _check_int(seed, "seed", -(2**63), 2**64 - 1)
        if not isinstance(stop_at_eos, bool):
            raise InputError(f"stop_at_eos must be True or False, got {stop_at_eos!r}")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        eos = self.base.tokenizer.eos_token_id
        out: list[int] = []
        snapshot = self._snapshot()
        try:
            for _ in range(max_new_tokens):
                token = sample_token(self._next_logits, temperature, top_p, gen)
                out.append(token)
                self._append_token(token)
                if stop_at_eos and eos is not None and token == eos:
                    break
                if stops:
                    text = self.base.decode(out)
                    if any(s in text for s in stops):
                        break
        except BaseException:
            self._rollback(snapshot)
            raise
        return self.base.decode(out)

    @torch.no_grad()
    def feed(self, ids: Sequence[int] | torch.Tensor, observed: bool = True) -> torch.Tensor:
        """Teacher-forced decode: append ``ids`` one token at a time exactly as
        :meth:`generate` would (refocus every K tokens) and return each token's NLL
        (float32 ``[n]``, nats) under the logits the session held before it. All or
        nothing, as :meth:`generate`. With ``config.verify_feed``, once ``verify_tokens``
        fed tokens follow an ingest and the WC differs from the recency one at a block
        boundary, the focus is judged on the newest of them (:meth:`FocusLoop.verify`,
        ``stage="feed"``; once per ingest). ``observed=False``: the tokens are the
        model's own choices (a driver that picks them from :meth:`next_token_logits`),
        which cancel that check as :meth:`generate`'s do."""
        if self.wc is None or self._next_logits is None:
            raise InputError("feed() needs a history: call ingest() first")
        ids = self._validate_ids(ids, "ids")
        nll = torch.empty(ids.numel(), dtype=torch.float32)
        snapshot = self._snapshot()
        try:
            for i, tok in enumerate(ids.tolist()):
                nll[i] = -torch.log_softmax(self._next_logits, -1)[tok]
                self._append_token(tok, observed=observed)
                if observed and self.focus.feed_check_due():
                    self._verify(stage="feed")
        except BaseException:
            self._rollback(snapshot)
            raise
        return nll

    def next_token_logits(self) -> torch.Tensor:
        """float32 ``[V]``: the base model's logits for the token after the history."""
        if self._next_logits is None:
            raise InputError("no history yet: call ingest() first")
        return self._next_logits.clone()

    @torch.no_grad()
    def loss_at_h(self, ids: Sequence[int] | torch.Tensor, horizon: int | None = None) -> float:
        """The seed's Loss@H: mean NLL (nats) of the next ``H`` tokens ``ids[:H]`` given
        the current WC (one fresh forward over the WC plus those tokens; the session
        is not changed)."""
        if self.wc is None:
            raise InputError("loss_at_h() needs a history: call ingest() first")
        targets = self._validate_ids(ids, "ids")
        h = self.config.horizon if horizon is None else _check_int(horizon, "horizon", 1)
        targets = targets[:h]
        nll = wc_nll(
            self.base,
            self.wc,
            self.tree,
            targets,
            self.num_tokens,
            positions=self.config.positions,
            max_gap=self.focus.max_gap,
            sink=self.config.attention_sink,
            sink_at=self.config.sink_at,
        )
        return float(nll.mean())

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Persist the session (tree, WC, allocator state, KV cache rows, modules'
        weights, config) into directory ``path`` as a new committed version.

        ``path`` must be new, an empty folder or a saved session; anything else
        raises :class:`StorageError` (``field="path"``) and is left untouched. A
        crash at any point leaves the previous or the new version readable. A save
        to a path someone else saved to since this session opened (or last saved)
        it is refused (``field="generation"``); see ``docs/reliability.md``.
        """
        if self.wc is None:
            raise InputError("nothing to save: the session has no history")
        assert self._next_logits is not None
        allocator = self.allocator.state_dict()
        cache = self.cache.state_dict()
        if cache["lengths"] != [len(self.wc)]:
            raise InvariantError(
                f"the cache holds {cache['lengths']} rows, the working context "
                f"{len(self.wc)} entries"
            )
        tensors = {
            "wc_levels": self.wc.levels,
            "wc_nodes": self.wc.nodes,
            "allocator_state": allocator["state"],
            "kv": cache["kv"],
            "next_logits": self._next_logits,
        }
        meta = {
            "base": self.base.name,
            "config": self.config.model_dump(),
            "allocator_backend": self.system.allocator_backend,
            "allocator_caps": allocator["caps"],
            "iteration": self.iteration,
            "blocks_since_refocus": self._blocks_since_refocus,
            "residencies": self.residencies,
            "num_tokens": self.num_tokens,
            "query_end": self.focus.query_end,
            # verify dropped the last ingest's focus: decoding stays on recency
            "focus_vetoed": self.focus.vetoed,
            # observed tokens since an ingest whose focus awaits the feed check
            "focus_feed_check": self.focus.feed_check,
            # decode_focus hold: the blocks the last ingest's focus opened
            "focus_held": None if self.focus.held is None else self.focus.held.tolist(),
            # whether the saved K/V rows read the attention sink, and at which position
            "kv_sink": self.cache.sink_on[0],
            "kv_sink_position": self._sink_position if self.cache.sink_on[0] else None,
        }
        key = session_store.session_key(path)
        commit = session_store.write_session(
            path,
            tree=self.tree,
            tensors=tensors,
            meta=meta,
            modules={"gistnet": self.system.gistnet, "lensnet": self.system.lensnet},
            expect_commit=self._commits.get(key),
        )
        self._commits[key] = commit.commit
        return commit.path

    def _restore(self, stored: session_store.StoredSession) -> None:
        st = stored.tensors
        stored.check_state(
            vocab_size=self.base.vocab_size,
            logits_size=int(self.base.model.config.vocab_size),
            kv_shape=tuple(self.cache.kv.shape),
            capacity=self.capacity,
        )
        if stored.tree.dim != self.base.dim:
            raise stored.error(
                "dim",
                f"the tree's width {stored.tree.dim} is not the base model's {self.base.dim}",
                file="tree/metadata.json",
            )
        self.tree = stored.tree
        cfg = self.config
        self.wc = WorkingContext(
            st["wc_levels"],
            st["wc_nodes"],
            block_size=cfg.block_size,
            max_level=cfg.levels,
            # Between refocuses a live WC holds up to K decoded entries past w_max
            # (the cache has those slots): every state a session can be in reopens.
            w_max=self.capacity,
            recent_tokens=cfg.protected_tokens,
            num_tokens=self.tree.num_tokens,
        )
        try:
            self.wc.check(self.tree)
        except InvariantError as e:
            raise stored.error("wc_levels", f"not a legal working context: {e}") from None
        self.wc.w_max = cfg.w_max
        meta = stored.meta
        self.allocator.load_state_dict(
            {"state": st["allocator_state"].to(torch.int64), "caps": meta["allocator_caps"]}
        )
        kv = st["kv"]
        # sessions saved before the sink existed hold rows computed without it
        kv_sink = bool(meta.get("kv_sink", False))
        self.cache.load_state_dict({"kv": kv, "lengths": [kv.shape[4]], "sink_on": [kv_sink]})
        self._next_logits = st["next_logits"].to(self.base.device, torch.float32)
        # sessions saved before the sink could move read it at position 0
        saved_at = meta.get("kv_sink_position")
        if kv_sink:
            self._move_sink(0 if saved_at is None else int(saved_at))
        if kv_sink != self._wants_sink() or (kv_sink and self._place_sink()):
            # the rows read another context than this configuration's: recompute them
            self._prefill(0)
        self.iteration = int(meta["iteration"])
        self._blocks_since_refocus = int(meta["blocks_since_refocus"])
        self.residencies = list(meta["residencies"])
        # sessions saved before the field existed: the newest tokens are the query
        self.focus.query_end = meta.get("query_end")
        self.focus.vetoed = bool(meta.get("focus_vetoed", False))
        check = meta.get("focus_feed_check")
        self.focus.feed_check = None if check is None else int(check)
        held = meta.get("focus_held")
        self.focus.held = None if held is None else torch.tensor(held, dtype=torch.int64)
        if stored.commit is not None:
            self._commits[session_store.session_key(stored.path)] = stored.commit.commit


def _check_ids(ids: Any, arg: str, vocab_size: int, model: str) -> torch.Tensor:
    """Token ids -> int64 ``[n]`` (n >= 1) on the CPU, or InputError naming ``arg``."""
    if ids is None or isinstance(ids, (bytes, bytearray, memoryview, dict, set)):
        hint = " (decode bytes to text first)" if isinstance(ids, (bytes, bytearray)) else ""
        raise InputError(
            f"{arg} must be text or a 1-D sequence of token ids, got {type(ids).__name__}{hint}"
        )
    if not torch.is_tensor(ids):
        if isinstance(ids, (list, tuple)) and len(ids) == 0:
            raise InputError(f"{arg}: cannot ingest an empty sequence of token ids")
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise InputError(
                f"{arg} must be a 1-D sequence of integer token ids "
                f"(0..{vocab_size - 1}); could not read it ({e})"
            ) from None
    if ids.dim() != 1:
        raise InputError(
            f"{arg} must be 1-D token ids [n], got shape {tuple(ids.shape)} "
            "(pass one sequence per call; a batch is not flattened)"
        )
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise InputError(f"{arg}: token ids must be integers, got dtype {ids.dtype}")
    if ids.numel() == 0:
        raise InputError(f"{arg}: cannot ingest an empty sequence of token ids")
    ids = ids.detach().cpu()
    if ids.dtype == torch.uint64:
        # uint64 ids >= 2**63 would wrap to negative in int64: report the real value
        top = int(ids.numpy().max())
        if top >= vocab_size:
            raise InputError(
                f"{arg}: token id {top} is outside the vocabulary of {model} "
                f"(0..{vocab_size - 1})"
            )
    ids = ids.to(torch.long)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise InputError(
            f"{arg}: token id {bad} is outside the vocabulary of {model} (0..{vocab_size - 1})"
        )
    return ids


def _check_int(value: Any, arg: str, low: int, high: int | None = None) -> int:
    """An integer (``int``, numpy or 0-d tensor integer; not bool, not float) in
    ``[low, high]``, or InputError naming ``arg``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise InputError(f"{arg} must be an integer, got {value!r}") from None
    if v < low or (high is not None and v > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InputError(f"{arg} must be an integer {bound}, got {v}")
    return v


def _check_float(value: Any, arg: str, low: float, high: float, low_open: bool) -> float:
    """A finite real in ``(low, high]`` / ``[low, high]``, or InputError naming ``arg``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy / 0-d tensor scalars
        except (TypeError, ValueError):
            raise InputError(f"{arg} must be a number, got {value!r}") from None
    v = float(value)
    inside = (v > low if low_open else v >= low) and v <= high
    if not math.isfinite(v) or not inside:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise InputError(f"{arg} must be a finite number in {interval}, got {value!r}")
    return v


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, gen=None) -> int:
    """One token id from ``logits [V]``: greedy at ``temperature == 0``; else a draw
    (with the ``torch.Generator`` ``gen``) from ``softmax(logits / T)`` restricted to
    the smallest top set of mass ``>= top_p``."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def wc_nll(
    base: Base,
    wc: WorkingContext,
    tree: MegaContextTree,
    targets: torch.Tensor,
    cursor: int,
    *,
    positions: str = "global",
    max_gap: int = 0,
    sink: bool = False,
    sink_at: str = "window",
) -> torch.Tensor:
    """NLL ``[H]`` of ``targets`` (the tokens right after the history, ``cursor`` =
    the first one's global index) given ``wc``: one forward over the WC's embeddings
    followed by the targets' embeddings, at the positions of scheme ``positions``
    (:func:`~megacontext.working_context.entry_positions`; under ``global`` each at
    its global position, gists at their span centres, targets from ``cursor``; under
    a bounded scheme the targets follow at the WC's next position), behind the
    attention sink (at ``sink_at``) when ``sink`` and the WC starts with a gist
    (:func:`~megacontext.working_context.with_sink`); see
    :func:`megacontext.nll.nll_after`."""
    pos, nxt = entry_positions(wc.levels, wc.nodes, wc.block_size, positions, max_gap=max_gap)
    start = cursor if positions == "global" else nxt
    context = with_sink(base, wc.embeddings(base, tree), pos.cpu(), wc.levels, sink, sink_at)
    return nll_after(base, [context], [targets], [start])[0]


class SessionBatch:
    """Sessions that decode together: one forward per step for all of them.

    Each session keeps its own tree, WC, allocator and telemetry; their caches become
    rows of one shared :class:`MegaContextCache` (different WC lengths, padded and
    masked per row). Refocus and ingest stay per session (they touch one row).
    Create with :meth:`MegaContext.batch`.
    """

    def __init__(self, sessions: Sequence[Session]):
        if not sessions:
            raise InputError("a batch needs at least one session")
        system = sessions[0].system
        if any(s.system.base is not system.base for s in sessions):
            raise InputError("sessions in a batch must share one base model")
        if any(s.wc is None for s in sessions):
            raise InputError("every session in a batch needs a history: ingest() first")
        if len({id(s) for s in sessions}) != len(sessions):
            raise InputError("a session appears twice in the batch")
        self.sessions = list(sessions)
        self.base = system.base
        self.cache = MegaContextCache.stack([s.cache for s in sessions])
        self._cache_kw = cache_kwarg(self.base.model)

    def _step(self, tokens: list[int]) -> None:
        """Append one token to every session with one batched forward."""
        dev = self.base.device
        rows = [s.begin_decode(tok) for s, tok in zip(self.sessions, tokens, strict=True)]
        slots = torch.tensor([[r[0]] for r in rows], device=dev)
        lengths = [r[0] + 1 for r in rows]
        embeds = self.base.embed(torch.tensor(tokens)[:, None])
        positions = torch.tensor([[r[1]] for r in rows], device=dev)
        self.cache.plan(slots, lengths)
        # each session's own flag: a refocus may have changed it on its row view
        self.cache.sink_on = [s.cache.sink_on[0] for s in self.sessions]
        mask = self.cache.attention_mask(slots, lengths)
        recorders = []
        for s, (_, position) in zip(self.sessions, rows, strict=True):
            rec = s.attention_scorer.recorder if s.attention_scorer is not None else None
            if rec is not None:
                rec.arm(torch.tensor([position]), torch.tensor([s.num_tokens - 1]))
            recorders.append(rec)
        t0 = time.perf_counter()
        with recording(recorders):
            out = self.base.model(
                inputs_embeds=embeds.to(dtype=self.base.dtype),
                position_ids=positions,
                attention_mask=mask,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kw: self.cache},
            )
        ms = (time.perf_counter() - t0) * 1e3
        logits = out.logits[:, -1].float()
        share = ms / len(self.sessions)
        # a refocus changes only its own row (a view of the shared buffers)
        held = [s.finish_decode(logits[b], lengths[b], share) for b, s in enumerate(self.sessions)]
        self.cache.set_lengths(held)

    @torch.no_grad()
    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Append ``tokens[b]`` to session ``b``, all with one batched forward (a
        session whose block completes refocuses). Returns float32 ``[B, V]``: each
        session's next-token logits afterwards (on the base model's device)."""
        tokens = [int(t) for t in tokens]
        if len(tokens) != len(self.sessions):
            raise InputError(f"step() needs {len(self.sessions)} tokens, got {len(tokens)}")
        self._step(tokens)
        return torch.stack([s.next_token_logits() for s in self.sessions])

    @torch.no_grad()
    def generate(
        self,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[str]:
        """Decode ``max_new_tokens`` tokens for every session (no early stop, so the
        rows stay in step); returns each session's generated text."""
        max_new_tokens = _check_int(max_new_tokens, "max_new_tokens", 0)
        temperature = _check_float(temperature, "temperature", 0.0, math.inf, low_open=False)
        top_p = _check_float(top_p, "top_p", 0.0, 1.0, low_open=True)
        if seed is not None:
            seed = _check_int(seed, "seed", -(2**63), 2**64 - 1)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        outs: list[list[int]] = [[] for _ in self.sessions]
        for _ in range(max_new_tokens):
            tokens = []
            for s in self.sessions:
                tokens.append(sample_token(s.next_token_logits(), temperature, top_p, gen))
            self._step(tokens)
            for o, tok in zip(outs, tokens, strict=True):
                o.append(tok)
        return [self.base.decode(o) for o in outs]
