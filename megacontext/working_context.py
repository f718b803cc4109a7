"""The working context (WC): what the base model reads.

A WC is a sequence of ``N`` entries that tiles the history ``[0, T)`` in order.
Entry ``i`` is node ``nodes[i]`` of level ``levels[i]``: a token (level 0, one id)
or a gist (level ``l >= 1``) covering the aligned span

    start = node * bs**l,   span = bs**l,   tokens [start, start + span).

Every entry costs 1, so ``cost == N``. Entries are tensors (``levels`` int32 [N],
``nodes`` int64 [N]), never Python objects per entry, so the allocator backends
(python, C++ and CUDA) read them through one pointer each.

The invariants :meth:`WorkingContext.check` enforces are defined precisely in
``docs/allocator.md`` ("The working context").
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .errors import ConfigError, InvariantError

__all__ = [
    "POSITION_SCHEMES",
    "WorkingContext",
    "entry_positions",
    "protected_start",
    "SINK_PLACES",
    "reads_sink",
    "sink_position",
    "with_sink",
]

LEVEL_DTYPE = torch.int32
NODE_DTYPE = torch.int64


class _TreeLike(Protocol):
    dim: int
    block_size: int
    levels: int
    num_tokens: int

    def num_nodes(self, level: int) -> int: ...
    def tokens(self, start: int, end: int) -> torch.Tensor: ...
    def gists(self, level: int) -> torch.Tensor: ...


def protected_start(num_tokens: int, recent_tokens: int, block_size: int) -> int:
    """First token of the protected tail: ``floor(max(T - recent, 0) / bs) * bs``.

    Tokens ``[p0, T)`` must stay LOD0: the newest ``recent_tokens`` tokens, rounded
    out to whole blocks, which always include the partial block ``[T//bs*bs, T)``.
    """
    return max(num_tokens - recent_tokens, 0) // block_size * block_size


POSITION_SCHEMES = ("nearby", "hybrid", "compact", "global")


SINK_PLACES = ("window", "start")


def reads_sink(levels: torch.Tensor, enabled: bool = True) -> bool:
    """Whether the base model reads the attention sink before a WC whose entry levels
    are ``levels [N]``: ``enabled`` and the first entry is a gist.

    A language model turns the first token it reads into an attention sink (it takes
    the attention mass no other key should); it was trained with a real token there.
    When the WC starts with a gist, one sink token (``base.sink_token_id``) goes
    first (at :func:`sink_position`), so the gists are read as content rather than
    as the sink. When the WC starts with token 0 of the history it is read as it is."""
    return bool(enabled) and levels.numel() > 0 and int(levels[0]) > 0


def sink_position(positions: torch.Tensor, levels: torch.Tensor, at: str = "window") -> int:
    """The RoPE position of the attention sink read before a WC whose entries sit at
    ``positions [N]`` with levels ``levels [N]``.

    - ``window`` (the default): ``max(min(positions[levels == 0]) - 1, 0)``, right
      before the first token entry. The recent window (and under ``nearby`` a
      retrieved span before it) then starts right after its sink, as every text the
      model was trained on does, however far back the gists sit. Chosen on
      training-split text; it helps long histories at small budgets and costs where
      the gists sit near the window (docs/positions.md, "Where the sink sits").
    - ``start``: position 0 (sessions 6-17; the ablation).

    Gists read a ``window`` sink at a negative distance; only they do."""
    if at not in SINK_PLACES:
        raise ConfigError(
            f"unknown sink place {at!r}; expected one of {SINK_PLACES}", field="sink_at", value=at
        )
    tokens = levels.to(positions.device) == 0
    if at == "start" or not bool(tokens.any()):
        return 0
    return max(int(positions[tokens].min()) - 1, 0)


def with_sink(
    base: Any,
    embeds: torch.Tensor,
    positions: torch.Tensor,
    levels: torch.Tensor,
    enabled: bool,
    at: str = "window",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeds [S + N, d], positions [S + N])``: the WC's rows ``embeds [N, d]`` at
    ``positions [N]``, behind the sink token at :func:`sink_position` (``at``) when
    :func:`reads_sink` (``S = 1``), else unchanged (``S = 0``). The entries keep their
    positions: the sink changes what they attend to, not where they are. The runtime
    keeps the same row in its cache (``MegaContextCache(sink=1)``), so a forward over
    this equals the session's."""
    if not reads_sink(levels, enabled):
        return embeds, positions
    tok = torch.tensor([base.sink_token_id], dtype=torch.long)
    sink = base.embed(tok).to(device=embeds.device, dtype=embeds.dtype)
    where = torch.full(
        (1,), sink_position(positions, levels, at), dtype=positions.dtype, device=positions.device
    )
    return torch.cat([sink, embeds]), torch.cat([where, positions])


def entry_positions(
    levels: torch.Tensor,
    nodes: torch.Tensor,
    block_size: int,
    scheme: str = "global",
    *,
    max_gap: int = 0,
) -> tuple[torch.Tensor, int]:
    """The RoPE positions of WC entries ``(levels [N], nodes [N])`` and of the next
    token after them: ``(positions int64 [N], next_position)``. The one definition
    every reader of a WC uses (runtime, trainer, eval views).

    - ``global``: a token its index ``t``, a gist the centre of its span
      ``node * bs**l + bs**l // 2``; the next token ``T`` (the end of the last entry).
      Unbounded: a history past the base model's trained context feeds it rotations
      it has never seen.
    - ``compact``: entry ``i`` at ``i``, the next token at ``N``. Bounded by the WC
      length; consecutive tokens keep their true distance, a gist counts as one step
      however many tokens it covers.
    - ``hybrid``: the recent window (the trailing run of LOD0 entries, first token
      ``t0``, ``n_far`` entries before it) at true distances, everything before it
      compacted in order and pushed back by a gap: entry ``i < n_far`` at ``i``,
      tail entry ``i >= n_far`` at ``i + gap`` with
      ``gap = min(t0 - n_far, max_gap)``, the next token at ``N + gap``. While the
      history is short (``gap < max_gap``) every tail token sits at its own index
      (as under ``global``) and far entries keep their order; past that the far
      memory stays ``max_gap`` further back than under ``compact``, so the bound is
      ``N + max_gap``.
    - ``nearby``: as ``hybrid``, but the far memory's *tokens* (spans the allocator
      expanded) join the recent window: the ``n_g`` gists are numbered in order at
      ``0 .. n_g - 1``, and every LOD0 entry, wherever it sits in the WC, at
      ``n_g + rank + gap`` (rank: its index among the LOD0 entries, ``gap`` as under
      ``hybrid``), the next token at ``N + gap``. The recent window keeps ``hybrid``'s
      positions, so with no expanded far span the two schemes are equal; an expanded
      span sits at contiguous positions just before the recent window (as Landmark
      attention places retrieved blocks), while the gists stay far back. Positions are
      then not monotone in the WC's order (a gist after an expanded span is numbered
      below it); only a gist reads such a span at a negative distance.
      Why (``bench/needle_oracle.py``): an oracle that expands exactly the needle's
      span reads it at ``hybrid`` positions about as far from the question as the
      history is long, where the base model barely attends; ``nearby`` puts it a
      recent window away.
    """
    if scheme not in POSITION_SCHEMES:
        raise ConfigError(
            f"unknown position scheme {scheme!r}; expected one of {POSITION_SCHEMES}",
            field="positions",
            value=scheme,
        )
    n = int(levels.shape[0])
    dev = nodes.device
    if scheme == "compact":
        return torch.arange(n, dtype=torch.int64, device=dev), n
    if scheme == "nearby":
        gist = levels != 0
        far = torch.nonzero(gist)
        n_g = int(far.shape[0])
        pos = torch.arange(n, dtype=torch.int64, device=dev)
        if n_g == 0 or n_g == n:
            return pos, n
        n_far = int(far[-1, 0]) + 1
        gap = 0 if n_far == n else max(min(int(nodes[n_far]) - n_far, int(max_gap)), 0)
        pos[gist] = torch.arange(n_g, dtype=torch.int64, device=dev)
        pos[~gist] = torch.arange(n_g, n, dtype=torch.int64, device=dev) + gap
        return pos, n + gap
    if scheme == "hybrid":
        pos = torch.arange(n, dtype=torch.int64, device=dev)
        far = torch.nonzero(levels != 0)
        n_far = int(far[-1, 0]) + 1 if far.numel() else 0
        if n_far == n:
            return pos, n
        t0 = int(nodes[n_far])
        gap = max(min(t0 - n_far, int(max_gap)), 0)
        pos[n_far:] += gap
        return pos, n + gap
    spans = torch.pow(
        torch.tensor(block_size, dtype=torch.int64, device=dev),
        levels.to(torch.int64),
    )
    starts = nodes.to(torch.int64) * spans
    end = int(starts[-1] + spans[-1]) if n else 0
    return starts + spans // 2, end


def _default_recent(recent_tokens: int | None, block_size: int) -> int:
    return 2 * block_size if recent_tokens is None else int(recent_tokens)


class WorkingContext:
    """Entries ``(levels[i], nodes[i])`` tiling ``[0, num_tokens)``.

    Args:
        levels: int [N], the LOD of each entry (0 = token).
        nodes: int [N], the node index of each entry at its level.
        block_size: children per node (``bs``, 32 in the design).
        max_level: the tree's top level (``tree.levels``).
        w_max: the budget: at most ``w_max`` entries.
        recent_tokens: the protected tail (``None``: two blocks). Tokens
            ``[protected_start(T), T)`` must be LOD0.
        num_tokens: ``T``, the history length the entries tile.

    The constructor does not validate the tiling (an over-budget WC after an ingest
    is a legal *input* to the allocator); call :meth:`check` for that.

    Example::

        tree = mc.MegaContextTree(64, block_size=32, levels=2)
        ...
        wc = mc.WorkingContext.from_tree(tree, w_max=512)
        wc.check(tree)
        x = wc.embeddings(base, tree)    # [N, d]
        pos = wc.positions()             # [N] RoPE positions
    """

    def __init__(
        self,
        levels: torch.Tensor,
        nodes: torch.Tensor,
        *,
        block_size: int,
        max_level: int,
        w_max: int,
        recent_tokens: int | None = None,
        num_tokens: int,
    ):
        levels = torch.as_tensor(levels)
        nodes = torch.as_tensor(nodes)
        if levels.dim() != 1 or nodes.shape != levels.shape:
            raise ConfigError(
                f"levels and nodes must be 1-D tensors of one length, got "
                f"{tuple(levels.shape)} and {tuple(nodes.shape)}",
                field="levels",
            )
        if block_size < 2:
            raise ConfigError(f"block_size must be >= 2, got {block_size}", field="block_size")
        if max_level < 1:
            raise ConfigError(f"max_level must be >= 1, got {max_level}", field="max_level")
        if w_max <= 0:
            raise ConfigError(f"w_max must be > 0, got {w_max}", field="w_max", value=w_max)
        if num_tokens < 0:
            raise ConfigError(f"num_tokens must be >= 0, got {num_tokens}", field="num_tokens")
        self.levels = levels.to(LEVEL_DTYPE).contiguous()
        self.nodes = nodes.to(device=self.levels.device, dtype=NODE_DTYPE).contiguous()
        self.block_size = int(block_size)
        self.max_level = int(max_level)
        self.w_max = int(w_max)
        self.recent_tokens = _default_recent(recent_tokens, self.block_size)
        if self.recent_tokens < 0:
            raise ConfigError("recent_tokens must be >= 0", field="recent_tokens")
        self.num_tokens = int(num_tokens)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_tree(
        cls,
        tree: _TreeLike,
        w_max: int,
        recent_tokens: int | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> WorkingContext:
        """The recency-based starting WC: newest blocks LOD0, then LOD1, then LOD2...

        Start from the coarsest legal tiling (the protected tail ``[p0, T)`` as
        tokens; ``[0, p0)`` covered left to right by the largest aligned complete
        node that fits), then repeatedly expand the newest gist while the cost stays
        ``<= w_max``. The result is as fine as the budget allows: every expand costs
        ``bs - 1``, so once the newest gist does not fit, none does.

        Raises ConfigError when ``w_max`` cannot hold the protected tail
        (``recent_tokens + block_size > w_max``, the same rule as
        :class:`MegaContextConfig`), or when even the coarsest tiling of this
        history exceeds ``w_max`` (add a level or raise the budget).
        """
        bs, top = int(tree.block_size), int(tree.levels)
        recent = _default_recent(recent_tokens, bs)
        if recent < 0:
            raise ConfigError(f"recent_tokens must be >= 0, got {recent}", field="recent_tokens")
        if recent + bs > w_max:
            raise ConfigError(
                f"w_max={w_max} is smaller than the protected tail (recent_tokens={recent} "
                f"plus a partial block of {bs} tokens)",
                field="w_max",
                value=w_max,
            )
        T = int(tree.num_tokens)
        p0 = protected_start(T, recent, bs)
        spans = [bs**level for level in range(top + 1)]
        have = [T] + [int(tree.num_nodes(level)) for level in range(1, top + 1)]

        # Coarsest tiling of [0, p0) by complete aligned nodes.
        gists: list[tuple[int, int]] = []
        cursor = 0
        while cursor < p0:
            for level in range(top, 0, -1):
                span = spans[level]
                node = cursor // span
                if cursor % span == 0 and cursor + span <= p0 and node < have[level]:
                    gists.append((level, node))
                    cursor += span
                    break
            else:
                # p0 is block-aligned, so an LOD1 node always fits unless the tree
                # lacks its gist.
                raise ConfigError(
                    f"tree has no LOD1 gist for block {cursor // bs} (num_nodes(1)="
                    f"{have[1]}, num_tokens={T})",
                    field="tree",
                )
        lod0_start = p0
        cost = len(gists) + (T - lod0_start)
        if cost > w_max:
            raise ConfigError(
                f"w_max={w_max} cannot hold this history: its coarsest working context "
                f"(levels={top}, num_tokens={T}) has {cost} entries",
                field="w_max",
                value=w_max,
            )
        # Refine newest first: the newest gist is always the last one.
        while gists and cost + bs - 1 <= w_max:
            level, node = gists.pop()
            if level == 1:
                lod0_start = node * bs
            else:
                gists.extend((level - 1, node * bs + j) for j in range(bs))
            cost += bs - 1

        lv = torch.tensor([g[0] for g in gists], dtype=LEVEL_DTYPE)
        nd = torch.tensor([g[1] for g in gists], dtype=NODE_DTYPE)
        levels = torch.cat([lv, torch.zeros(T - lod0_start, dtype=LEVEL_DTYPE)])
        nodes = torch.cat([nd, torch.arange(lod0_start, T, dtype=NODE_DTYPE)])
        if device is not None:
            levels, nodes = levels.to(device), nodes.to(device)
        return cls(
            levels,
            nodes,
            block_size=bs,
            max_level=top,
            w_max=w_max,
            recent_tokens=recent,
            num_tokens=T,
        )

    def clone(self) -> WorkingContext:
        """An independent copy (the allocator updates a WC in place)."""
        return WorkingContext(
            self.levels.clone(),
            self.nodes.clone(),
            block_size=self.block_size,
            max_level=self.max_level,
            w_max=self.w_max,
            recent_tokens=self.recent_tokens,
            num_tokens=self.num_tokens,
        )

    def to(self, device: torch.device | str) -> WorkingContext:
        """A copy on ``device`` (or ``self`` when already there)."""
        if self.levels.device == torch.device(device):
            return self
        wc = self.clone()
        wc.levels, wc.nodes = wc.levels.to(device), wc.nodes.to(device)
        return wc

    def extend(self, num_tokens: int) -> None:
        """Append LOD0 entries for tokens ``[self.num_tokens, num_tokens)`` (after an
        ingest). The WC may then be over budget until the allocator collapses."""
        if num_tokens < self.num_tokens:
            raise ConfigError(
                f"extend({num_tokens}): the WC already covers {self.num_tokens} tokens",
                field="num_tokens",
                value=num_tokens,
            )
        new = torch.arange(self.num_tokens, num_tokens, dtype=NODE_DTYPE, device=self.device)
        self.levels = torch.cat([self.levels, torch.zeros_like(new, dtype=LEVEL_DTYPE)])
        self.nodes = torch.cat([self.nodes, new])
        self.num_tokens = int(num_tokens)

    # --------------------------------------------------------------------- properties

    @property
    def device(self) -> torch.device:
        return self.levels.device

    def __len__(self) -> int:
        return int(self.levels.shape[0])

    @property
    def cost(self) -> int:
        """Total cost: every entry (token or gist) costs 1."""
        return len(self)

    @property
    def spans(self) -> torch.Tensor:
        """int64 [N]: tokens covered by each entry, ``bs**level``."""
        return torch.pow(
            torch.tensor(self.block_size, dtype=torch.int64, device=self.device),
            self.levels.to(torch.int64),
        )

    @property
    def starts(self) -> torch.Tensor:
        """int64 [N]: first token of each entry, ``node * span``."""
        return self.nodes * self.spans

    def positions(self, scheme: str = "global", max_gap: int = 0) -> torch.Tensor:
        """int64 [N] RoPE positions under ``scheme`` (:func:`entry_positions`);
        ``global``: a token its index, a gist ``start + span // 2``."""
        return entry_positions(self.levels, self.nodes, self.block_size, scheme, max_gap=max_gap)[0]

    def next_position(self, scheme: str = "global", max_gap: int = 0) -> int:
        """The RoPE position of the next token after the WC under ``scheme``
        (``num_tokens`` under ``global``; see :func:`entry_positions`)."""
        if scheme == "global":
            return self.num_tokens
        return entry_positions(self.levels, self.nodes, self.block_size, scheme, max_gap=max_gap)[1]

    @property
    def tail_start(self) -> int:
        """Index of the first entry of the trailing run of LOD0 tokens (``len(self)``
        when the last entry is a gist; 0 when every entry is a token)."""
        gist = torch.nonzero(self.levels.cpu() != 0)
        return int(gist[-1, 0]) + 1 if gist.numel() else 0

    @property
    def protected_start(self) -> int:
        """First token of the protected LOD0 tail (see :func:`protected_start`)."""
        return protected_start(self.num_tokens, self.recent_tokens, self.block_size)

    def __repr__(self) -> str:
        counts = torch.bincount(self.levels.cpu().to(torch.int64), minlength=self.max_level + 1)
        return (
            f"WorkingContext(N={len(self)}, w_max={self.w_max}, num_tokens={self.num_tokens}, "
            f"per_level={counts.tolist()}, block_size={self.block_size})"
        )

    # ------------------------------------------------------------------- embeddings

    def embeddings(self, base: Any, tree: _TreeLike) -> torch.Tensor:
        """``[N, d]``: token entries through ``base.embed(ids)``, gist entries gathered
        from ``tree.gists(level)``, scattered into one output.

        The output has the dtype and device of ``base.embed``'s result (gists are cast
        to it). Token ids are read from the tree run by run (LOD0 entries come in
        whole blocks plus the tail), never the whole history.
        """
        levels = self.levels.cpu()
        nodes = self.nodes.cpu()
        tok_idx = torch.nonzero(levels == 0).squeeze(1)
        ids = self._token_ids(tree, nodes[tok_idx])
        tok = base.embed(ids)
        out = torch.empty((len(self), tok.shape[-1]), dtype=tok.dtype, device=tok.device)
        out[tok_idx.to(tok.device)] = tok
        for level in range(1, self.max_level + 1):
            idx = torch.nonzero(levels == level).squeeze(1)
            if idx.numel():
                rows = tree.gists(level).index_select(0, nodes[idx])
                out[idx.to(out.device)] = rows.to(device=out.device, dtype=out.dtype)
        return out

    @staticmethod
    def _token_ids(tree: _TreeLike, tok_nodes: torch.Tensor) -> torch.Tensor:
        if tok_nodes.numel() == 0:
            return torch.empty(0, dtype=torch.int64)
        # Split the (increasing) token indices into runs of consecutive tokens.
        breaks = torch.nonzero(tok_nodes[1:] != tok_nodes[:-1] + 1).squeeze(1) + 1
        bounds = [0, *breaks.tolist(), tok_nodes.numel()]
        firsts = tok_nodes[bounds[:-1]].tolist()
        parts = [
            tree.tokens(first, first + (b - a))
            for first, a, b in zip(firsts, bounds[:-1], bounds[1:], strict=True)
        ]
        return torch.cat(parts).to(torch.int64)

    # ------------------------------------------------------------------------ check

    def check(self, tree: _TreeLike | None = None) -> None:
        """Raise :class:`InvariantError` (``entry`` = the offending index) unless this
        is a legal WC. The rules, in the order they are checked:

        1. every level is in ``[0, max_level]`` and every node ``>= 0``;
        2. every node exists: a token ``< T``, a gist a *complete* node
           (``(node+1) * span <= T``; with ``tree``, also ``< tree.num_nodes(level)``);
        3. the tiling, walking entries with a cursor ``c`` (end of the previous entry):
           an entry with ``start < c < end`` is a *mixed sibling group* (a coarser node
           listed after some of its own descendants: two LODs of one group at once);
           ``end <= c`` is an *overlap*; ``start > c`` with ``c`` not a multiple of the
           entry's span is a *misalignment* (a partially represented block/group);
           ``start > c`` otherwise a *gap*; after the last entry ``c`` must equal T;
        4. the protected tail: no gist ends after ``protected_start``;
        5. the budget: ``N <= w_max`` (``entry`` = ``w_max``, the first one too many).
        """
        n = len(self)
        bs, T = self.block_size, self.num_tokens
        levels = self.levels.cpu().to(torch.int64)
        nodes = self.nodes.cpu()
        if n and (int(levels.min()) < 0 or int(levels.max()) > self.max_level):
            i = int(torch.nonzero((levels < 0) | (levels > self.max_level))[0])
            raise InvariantError(
                f"entry {i}: level {int(levels[i])} outside [0, {self.max_level}]", entry=i
            )
        if n and int(nodes.min()) < 0:
            i = int(torch.nonzero(nodes < 0)[0])
            raise InvariantError(f"entry {i}: negative node {int(nodes[i])}", entry=i)
        spans = torch.pow(torch.tensor(bs, dtype=torch.int64), levels)
        starts = nodes * spans
        ends = starts + spans

        # 2. existence.
        bad = ends > T
        if tree is not None:
            have = torch.tensor(
                [T] + [int(tree.num_nodes(lv)) for lv in range(1, self.max_level + 1)],
                dtype=torch.int64,
            )
            bad |= nodes >= have[levels]
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            kind = "token" if int(levels[i]) == 0 else f"LOD{int(levels[i])} gist"
            raise InvariantError(
                f"entry {i}: {kind} node {int(nodes[i])} (tokens [{int(starts[i])}, "
                f"{int(ends[i])})) does not exist in a history of {T} tokens",
                entry=i,
            )

        # 3. tiling: cursor of entry i is the end of entry i-1.
        cursor = torch.cat([torch.zeros(1, dtype=torch.int64), ends[:-1]])
        bad = starts != cursor
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            c, s, e, sp = int(cursor[i]), int(starts[i]), int(ends[i]), int(spans[i])
            what = f"entry {i} (LOD{int(levels[i])} node {int(nodes[i])}, tokens [{s}, {e}))"
            if s < c < e:
                msg = (
                    f"mixed sibling group: {what} is a coarser node listed after entries "
                    f"that already cover [{s}, {c}) inside its span"
                )
            elif e <= c:
                msg = f"overlap: {what} lies inside tokens already covered up to {c}"
            elif c % sp != 0:
                msg = (
                    f"misalignment: {what} follows token {c}, which is not a multiple of "
                    f"its span {sp}: the block/group holding token {c} is only partly present"
                )
            else:
                msg = f"gap: tokens [{c}, {s}) are missing before {what}"
            raise InvariantError(msg, entry=i)
        end = int(ends[-1]) if n else 0
        if end != T:
            raise InvariantError(
                f"gap: the entries end at token {end} but the history has {T} tokens "
                f"(entry {n} onwards missing)",
                entry=n,
            )

        # 4. protected tail.
        p0 = self.protected_start
        bad = (levels > 0) & (ends > p0)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise InvariantError(
                f"unprotected tail: entry {i} is a LOD{int(levels[i])} gist (tokens "
                f"[{int(starts[i])}, {int(ends[i])})) but tokens [{p0}, {T}) must be LOD0 "
                f"(recent_tokens={self.recent_tokens})",
                entry=i,
            )

        # 5. budget.
        if n > self.w_max:
            raise InvariantError(f"over budget: {n} entries > w_max={self.w_max}", entry=self.w_max)
