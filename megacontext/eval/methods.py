"""Every method the evaluation compares, one small class each, in one registry.

A method is a class with a ``name`` (the ``method`` column of the result rows, the
label in tables and plots) and one job:

- a :class:`Peer` builds the :class:`~megacontext.eval.peers.View` its reader
  sees for a history at a budget ``W`` (:meth:`Peer.view`); every suite that compares
  methods (:func:`megacontext.eval.suites.compare_methods`) runs each registered
  peer that applies to the system;
- a :class:`Variant` (a focus ablation) builds the
  :class:`~megacontext.MegaContext` whose session is measured at ``W``
  (:meth:`Variant.build`; :mod:`megacontext.eval.ablations`);
- an :class:`External` peer names rows another program writes
  (``bench/peers/<program>/run.sh RUN``, folded by
  :func:`megacontext.eval.external.fold_peers`); it builds nothing here.

Defining a subclass with a ``name`` registers it (``__init_subclass__``), in
definition order: that order is the order of the report's tables and plots
(methods present in rows but not registered come after, alphabetically). Adding a
peer is one class::

    class FirstTokens(Peer):
        name = "first"

        def view(self, base, history, budget, system=None):
            ids = torch.as_tensor(history)[:budget]
            return View(self.name, base.embed(ids), torch.arange(ids.numel()), len(history))

The suites, their Parquet rows, the report's tables and its plots then include it.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from ..errors import InputError
from ..lensnet import LensNet, LensNetConfig
from ..runtime import MegaContext
from .peers import (
    View,
    full_view,
    infllm_view,
    session_view,
    streaming_view,
    truncation_view,
)

__all__ = [
    "REGISTRY",
    "External",
    "GroupRandomLens",
    "Method",
    "Peer",
    "Variant",
    "build_view",
    "causal_twin",
    "get",
    "order",
    "peer_names",
    "peers_for",
    "reference_names",
    "session_names",
    "variant_names",
]

REGISTRY: dict[str, type[Method]] = {}


class Method(abc.ABC):
    """A compared method; subclasses with a ``name`` register themselves."""

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:
            return  # an intermediate base class
        if name in REGISTRY and REGISTRY[name].__qualname__ != cls.__qualname__:
            raise InputError(f"method {name!r} is registered twice")
        REGISTRY[name] = cls


class Peer(Method):
    """Builds the entries a reader sees at budget ``W`` (one :class:`View`)."""

    needs_system: ClassVar[bool] = False  # a MegaContext session: needs a system
    budget_free: ClassVar[bool] = False  # same view at every W: computed once per history
    reference: ClassVar[bool] = False  # ΔNLL is measured against it (not plotted)

    @abc.abstractmethod
    def view(self, base: Any, history: Any, budget: int, system: Any = None) -> View:
        """The entries the reader sees for ``history`` at budget ``budget``."""

    def available(self, base: Any, history_tokens: int, horizon: int) -> bool:
        """Whether the reader can read ``history + targets`` at all."""
        return True

    def same_as(self, system: Any) -> str | None:
        """The method this one is identical to for ``system`` (it is then left out
        where that one runs), or ``None``."""
        return None


class Full(Peer):
    """The frozen base reading all ``T`` tokens at positions ``0..T-1`` (only when
    ``T + H`` fits its context)."""

    name = "full"
    budget_free = True
    reference = True

    def view(self, base: Any, history: Any, budget: int, system: Any = None) -> View:
        return full_view(base, history)

    def available(self, base: Any, history_tokens: int, horizon: int) -> bool:
        return not (base.max_positions and base.max_positions < history_tokens + horizon)


class Truncation(Peer):
    """The last ``W`` tokens, re-indexed from 0 (RoPE is relative)."""

    name = "truncation"

    def view(self, base: Any, history: Any, budget: int, system: Any = None) -> View:
        return truncation_view(base, history, budget)


class Streaming(Peer):
    """StreamingLLM: 4 sinks plus the last ``W − 4`` tokens, re-indexed."""

    name = "streaming"

    def view(self, base: Any, history: Any, budget: int, system: Any = None) -> View:
        return streaming_view(base, history, budget)


class InfLLM(Peer):
    """InfLLM-style block retrieval (sinks, retrieved blocks, a recent window); far
    tokens at one fixed position, the window at true distances (InfLLM's scheme)."""

    name = "infllm"

    def view(self, base: Any, history: Any, budget: int, system: Any = None) -> View:
        return infllm_view(base, history, budget)


class _Session(Peer):
    """A MegaContext session at ``w_max = W`` with the gist compressor and the focus
    scorer :meth:`modules` picks from the system (and ``config.lens = lens`` unless
    ``lens`` is ``None``: the system's own); the view is its working context."""

    needs_system = True
    lens: ClassVar[str | None] = None

    @abc.abstractmethod
    def modules(self, system: Any) -> tuple[Any, Any]:
        """``(gistnet, lensnet)`` taken from ``system`` (``None``: mean pool / recency)."""

    def view(self, base: Any, history: Any, budget: int, system: Any = None) -> View:
        if system is None:
            raise InputError(f"method {self.name!r} needs a MegaContext system")
        gistnet, lensnet = self.modules(system)
        changes = {} if self.lens is None else {"lens": self.lens}
        return session_view(system, history, budget, gistnet, lensnet, self.name, **changes)


class McRecency(_Session):
    """The system's gists, no LensNet (the recency working context)."""

    name = "mc_recency"
    lens = "recency"

    def modules(self, system: Any) -> tuple[Any, Any]:
        return system.gistnet, None

    def same_as(self, system: Any) -> str | None:
        recency = system.config.lens == "recency" or (
            system.config.lens == "lensnet" and system.lensnet is None
        )
        return "megacontext" if recency else None


class McAttention(_Session):
    """The system's gists, the training-free attention scorer (``lens: attention``:
    the base model's query-key affinity of the newest tokens over every entry)."""

    name = "mc_attention"
    lens = "attention"

    def modules(self, system: Any) -> tuple[Any, Any]:
        return system.gistnet, None

    def same_as(self, system: Any) -> str | None:
        return "megacontext" if system.config.lens == "attention" else None


class McLexical(_Session):
    """The system's gists, the training-free lexical scorer (``lens: lexical``: BM25
    of the newest tokens against each far block's tokens, room made by collapsing
    the least relevant token blocks)."""

    name = "mc_lexical"
    lens = "lexical"

    def modules(self, system: Any) -> tuple[Any, Any]:
        return system.gistnet, None

    def same_as(self, system: Any) -> str | None:
        return "megacontext" if system.config.lens == "lexical" else None


class McMeanPool(_Session):
    """Mean-pool gists with the system's LensNet."""

    name = "mc_meanpool"

    def modules(self, system: Any) -> tuple[Any, Any]:
        return None, system.lensnet

    def same_as(self, system: Any) -> str | None:
        # mean-pool gists *are* the system's gists then
        return "megacontext" if system.gistnet is None else None


class MegaContextPeer(_Session):
    """The system as given (e.g. a trained checkpoint)."""

    name = "megacontext"

    def modules(self, system: Any) -> tuple[Any, Any]:
        return system.gistnet, system.lensnet


class External(Method):
    """Rows written by a program outside this environment into
    ``RUN/peers/<program>.parquet`` (see :mod:`megacontext.eval.external`)."""

    program: ClassVar[str]


class _KVPress(External):
    """A kvpress press at equal KV budget (``bench/peers/kvpress``)."""

    program = "kvpress"


class KVPressExpectedAttention(_KVPress):
    name = "kvpress_expected_attention"


class KVPressKnorm(_KVPress):
    name = "kvpress_knorm"


class KVPressSnapKV(_KVPress):
    name = "kvpress_snapkv"


class KVPressStreamingLLM(_KVPress):
    name = "kvpress_streaming_llm"


# ------------------------------------------------------------------ ablation variants


class GroupRandomLens(torch.nn.Module):
    """A seeded random focus scorer that exercises the allocator: every step draws
    ``u ~ U[-1, 1]`` per *sibling group* (the ``bs`` children of one parent) and gives
    it to every entry of the group, so a collapse candidate's mean score is ``u``
    itself and an expand candidate's score is its group's ``u``. (Independent
    per-entry scores, as in the positional check, average to ≈ 0 ± 0.1 over 32
    children: thresholded collapses almost never happen, and near a full budget no
    expand fits without one, so the allocator would only see budget-forced
    collapses.) Groups are found from the entries' spans alone: the WC tiles the
    history, so ``start = cumsum(span) − span`` and the group of an entry of span
    ``s`` is ``(s, start // (s · bs))``."""

    def __init__(self, seed: int, block_size: int = 32) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.gen = torch.Generator().manual_seed(seed)
        self.block_size = block_size

    def forward(self, entries, tail, levels, spans, distance):
        span = spans[0].cpu().long()
        start = torch.cumsum(span, 0) - span
        key = torch.stack([span, start // (span * self.block_size)], 1)
        uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
        u = torch.rand(uniq.shape[0], generator=self.gen) * 2 - 1
        return u[inverse][None].to(self.anchor.dtype)


def causal_twin(lensnet: Any) -> Any:
    """The same LensNet weights run as the causal variant (``causal=True``)."""
    cfg = LensNetConfig(**{**lensnet.config.model_dump(), "causal": True})
    twin = LensNet(config=cfg)
    twin.load_state_dict(lensnet.state_dict())  # strict: the variants share parameters
    p = next(lensnet.parameters())
    return twin.to(device=p.device, dtype=p.dtype).eval()


class Variant(Method):
    """A focus ablation: the system's base, GistNet and config at ``w_max = W`` with
    this variant's scorer (:meth:`scorer`) and hysteresis."""

    needs_lens: ClassVar[bool] = False  # derived from the system's LensNet
    hysteresis: ClassVar[bool] = True  # False: cooldown_steps = min_residency = 0
    lens: ClassVar[str] = "lensnet"  # config.lens of the variant's system
    verify: ClassVar[bool] = True  # False: verify_tokens = 0 (the focus is not checked)
    verify_feed: ClassVar[bool | None] = None  # config.verify_feed; None: the system's
    decode_focus: ClassVar[str | None] = None  # config.decode_focus; None: the system's

    @abc.abstractmethod
    def scorer(self, system: Any, *, causal_lens: Any, seed: int) -> Any:
        """The focus scorer (``None``: recency only); a whole :class:`MegaContext`
        brings its own base and GistNet too."""

    def build(
        self, system: Any, budget: int, *, causal_lens: Any = None, seed: int = 0
    ) -> MegaContext:
        if self.needs_lens and system.lensnet is None:
            raise InputError(f"ablation variant {self.name!r} needs a system with a LensNet")
        changes: dict[str, Any] = {"w_max": int(budget), "lens": self.lens}
        if not self.hysteresis:
            changes |= {"cooldown_steps": 0, "min_residency": 0}
        if not self.verify:
            changes["verify_tokens"] = 0
        if self.verify_feed is not None:
            changes["verify_feed"] = self.verify_feed
        if self.decode_focus is not None:
            changes["decode_focus"] = self.decode_focus
        lens = self.scorer(system, causal_lens=causal_lens, seed=seed)
        base, gistnet = system.base, system.gistnet
        if isinstance(lens, MegaContext):  # a whole causal checkpoint
            base, gistnet, lens = lens.base, lens.gistnet, lens.lensnet
        return system.with_config(base=base, gistnet=gistnet, lensnet=lens, **changes)


class NonCausal(Variant):
    """The system's LensNet as given, the system's allocator settings."""

    name = "noncausal"
    needs_lens = True

    def scorer(self, system: Any, *, causal_lens: Any, seed: int) -> Any:
        return system.lensnet


class Causal(Variant):
    """A causal LensNet: ``causal_lens`` (a trained one, or a whole causal checkpoint),
    else the system's own weights run causally."""

    name = "causal"
    needs_lens = True

    def scorer(self, system: Any, *, causal_lens: Any, seed: int) -> Any:
        return causal_lens if causal_lens is not None else causal_twin(system.lensnet)


class NoHysteresis(NonCausal):
    """The system's LensNet with ``cooldown_steps = min_residency = 0``."""

    name = "no_hysteresis"
    hysteresis = False


class Recency(Variant):
    """No LensNet: the allocator only collapses what the budget forces."""

    name = "recency"

    def scorer(self, system: Any, *, causal_lens: Any, seed: int) -> Any:
        return None


class Attention(Variant):
    """The training-free attention scorer (``lens: attention``), no LensNet."""

    name = "attention"
    lens = "attention"

    def scorer(self, system: Any, *, causal_lens: Any, seed: int) -> Any:
        return None


class Lexical(Variant):
    """The training-free lexical scorer (``lens: lexical``), no LensNet: the shipped
    memory's focus for ``smollm2-135m``."""

    name = "lexical"
    lens = "lexical"

    def scorer(self, system: Any, *, causal_lens: Any, seed: int) -> Any:
        return None


class LexicalNoHysteresis(Lexical):
    """:class:`Lexical` with ``cooldown_steps = min_residency = 0``."""

    name = "lexical_no_hysteresis"
    hysteresis = False


class LexicalUnverified(Lexical):
    """:class:`Lexical` with ``verify_tokens = 0``: the scorer's focus as it is, not
    checked by the base model after the ingest."""

    name = "lexical_unverified"
    verify = False


class LexicalHold(Lexical):
    """:class:`Lexical` with ``decode_focus: hold``: decoding keeps the blocks the
    ingest opened and otherwise collapses the oldest, as recency does."""

    name = "lexical_hold"
    decode_focus = "hold"


class LexicalRescore(Lexical):
    """:class:`Lexical` with ``decode_focus: rescore``: every decoded block rescored."""

    name = "lexical_rescore"
    decode_focus = "rescore"


class LexicalFeedCheck(Lexical):
    """:class:`Lexical` with ``verify_feed`` on: a focus kept at the ingest is judged
    again on the first ``verify_tokens`` tokens fed after it."""

    name = "lexical_feed_check"
    verify_feed = True


class LexicalNoFeedCheck(Lexical):
    """:class:`Lexical` with ``verify_feed`` off: only the ingest's check."""

    name = "lexical_no_feed_check"
    verify_feed = False


class Random(Variant):
    """A seeded :class:`GroupRandomLens` (the allocator, independent of LensNet). A
    control: its focus is not checked by the base model (``verify_tokens = 0``), which
    would put most of it back to recency."""

    name = "random"
    verify = False

    def scorer(self, system: Any, *, causal_lens: Any, seed: int) -> Any:
        return GroupRandomLens(seed, system.config.block_size)


class RandomNoHysteresis(Random):
    """:class:`Random` (the same seed) without hysteresis."""

    name = "random_no_hysteresis"
    hysteresis = False


# ------------------------------------------------------------------ reading the registry


def get(name: str, kind: type[Method] = Method) -> Method:
    """An instance of the registered method ``name`` (of class ``kind``)."""
    cls = REGISTRY.get(name)
    if cls is None or not issubclass(cls, kind):
        known = [n for n, c in REGISTRY.items() if issubclass(c, kind)]
        raise InputError(f"unknown method {name!r}; expected one of {known}")
    return cls()


def _names(kind: type[Method]) -> list[str]:
    return [n for n, c in REGISTRY.items() if issubclass(c, kind)]


def peer_names() -> list[str]:
    """The registered peers (in-process), in registry order."""
    return _names(Peer)


def variant_names() -> list[str]:
    """The registered focus-ablation variants, in registry order."""
    return _names(Variant)


def session_names() -> list[str]:
    """The peers that read through a MegaContext session."""
    return [n for n in peer_names() if get(n, Peer).needs_system]  # type: ignore[attr-defined]


def reference_names() -> list[str]:
    """The peers ΔNLL is measured against (left out of ΔNLL plots)."""
    return [n for n in peer_names() if get(n, Peer).reference]  # type: ignore[attr-defined]


def peers_for(system: Any, names: Iterable[str] | None = None) -> list[Peer]:
    """The peers to run for ``system`` (default: every registered peer): unknown
    names raise :class:`InputError`; session peers are dropped without a system,
    and a peer identical to another selected one for this system is dropped."""
    known = peer_names()
    names = list(known if names is None else names)
    bad = [m for m in names if m not in known]
    if bad:
        raise InputError(f"unknown methods {bad}; expected some of {known}")
    out: list[Peer] = [get(m, Peer) for m in names]  # type: ignore[misc]
    if system is None:
        return [m for m in out if not m.needs_system]
    chosen = {m.name for m in out}
    return [m for m in out if m.same_as(system) not in chosen]


def build_view(base: Any, history: Any, budget: int, method: str, system: Any = None) -> View:
    """The view of the registered peer ``method`` at budget ``W = budget``."""
    peer: Peer = get(method, Peer)  # type: ignore[assignment]
    return peer.view(base, history, budget, system)


def order(present: Iterable[str]) -> list[str]:
    """``present`` method names in registry order, unregistered ones after, sorted."""
    present = set(present)
    return [m for m in REGISTRY if m in present] + sorted(present - set(REGISTRY))
