"""The lexical focus scorer (``lens: lexical``): training-free retrieval of the
history's blocks that share rare tokens with the newest ones (BM25), and a swap plan
that makes room for them by collapsing the least relevant token blocks.

Relevance. The query is the set of distinct token ids ``q`` among the
``m = lexical_query`` tokens that end the last ingest (a session's focus loop passes
``query_end``: while it decodes, the question that came in keeps its retrieval
instead of every generated block re-deciding it; 170–219 actions in 64 decoded blocks
before, ``bench/decode_swaps.py``), each weighted by how recent it is,
``w_j = max 2^(-age / lexical_half_life)`` over its occurrences (age 0: the newest
token), so the question outweighs the text before it. The candidates are the history's complete blocks ``b``
before the protected tail (tokens ``[b·bs, (b+1)·bs) ⊂ [0, p0)``, ``n_b`` of them)::

    tf[b, j] = #{t in block b : t = q_j}                         [n_b, |q|]
    df[j]    = #{b : tf[b, j] > 0}
    idf[j]   = log(1 + (n_b - df[j] + 0.5) / (df[j] + 0.5))
    s[b]     = sum_j w_j · idf[j] · tf[b, j] · (k1 + 1) / (tf[b, j] + k1),   k1 = 1.2

(BM25 over equal-length blocks, so without its length term.) The defaults
(``m = 64``, half-life 8, ``lexical_z = 4``) were chosen on *training-split* pass-key
and key-value needles (training seeds): with an unweighted 32-token query the
filler before a short question outvoted it (the needle's block retrieved in 22 of
40 tasks; 37 of 40 with the weights). With robust z-scores
``z[b] = (s[b] - median s) / (1.4826 · MAD(s))`` (the standard deviation when the
MAD is 0), a block is *wanted* when ``z[b] >= lexical_z``, best first, at most
``floor(retrieval_share · w_max / bs)`` of them.

Far copies of the query (``lexical_max_overlap`` < 1). A haystack built from a short
text repeats the text that precedes a question, and those copies outscore what the
question asks for. A block more than ``lexical_max_overlap`` of whose ``bs - 1``
token bigrams occur among the query's (:func:`block_overlap`) adds nothing the recent
window lacks, so it is no candidate (the z-scores are against the other blocks);
instead, each copy that stands out brings the first block after it that is no copy,
ranked after every other wanted block: what followed the repeated text last time,
which is what continuing repeated text needs (an induction step).

Induction (``lexical_induction = k`` > 0). The blocks holding the token that followed
each earlier occurrence of the query's last ``k`` tokens (:func:`induction_blocks`,
the newest first, at most half the slots) are wanted before every other block: where
the text the question ends with was seen before, what came next is what the answer,
or the continuation, needs.

What follows the match (``lexical_follow = r``, default 8; 0: off). A block wanted
for its BM25 score whose last *key term* (:func:`key_terms`: the query ids whose
weight times idf is at least half the largest) lies in its last ``r`` tokens brings
the block after it, ranked right after it (:func:`followed_blocks`): a record's value
after its key, a definition's body after its name, a statement cut by the block edge.

Two variants, off by default because neither helped both code and prose on
training-split continuation (``docs/results/2026-12-05-train-probe/README.md``):
``lexical_seen_weight < 1`` discounts the query ids already in the
``w_max - lexical_query`` tokens before the query, and ``room_from: oldest`` makes
room from the oldest token blocks instead of the least relevant ones.

Scores ``u`` per WC entry, on the allocator's scale (it expands above
``tau_expand`` and collapses below ``-tau_collapse`` only to make room or when told):

- a gist covering a wanted block: ``+1`` (expand it; an LOD2 gist first opens to
  its LOD1 children, the next refocus opens the wanted child);
- a token of a wanted block: ``+0.5`` (keep);
- the token blocks to collapse: ``-1``, as many as the wanted expansions need room
  for (``bs - 1`` entries each, less the budget's free room): complete LOD0 blocks
  outside the protected tail holding no wanted block, the lowest ``s`` first and the
  oldest on ties;
- every other entry ``0``: neither threshold is crossed, so nothing else moves. With
  nothing wanted every score is 0 and the working context is the recency one.

It reads only the tree's token ids: no forward of the base model, no cache. Cost per
refocus: ``isin`` over the history's ``T`` token ids and over its bigrams
(O(T log |q|)), one comparison pass for induction, plus the matches
(``bench/bench_lexical_scorer.py``: ~1.4 ms at 8k tokens, ~10 ms at 128k on a 2-core
CPU; 0.08× / 0.67× one LensNet call).

Why lexical: the base model's own attention over the working context
(``lens: attention``) sees a far block only through its gist, whose key does not
carry the block's rare tokens, so it never singles out a needle
(``docs/results/2026-12-04-cpu-heldout/needle``); an exact-token match over the
stored ids does, at a cost that does not grow with the model.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .errors import InvariantError

__all__ = [
    "K1",
    "block_means",
    "block_overlap",
    "block_relevance",
    "block_scores",
    "entry_relevance",
    "followed_blocks",
    "induction_blocks",
    "key_terms",
    "lexical_scores",
    "query_weights",
    "retrieval_scores",
    "retrieved_blocks",
    "robust_z",
    "swap_plan",
    "wanted_blocks",
]

K1 = 1.2
_PAIR = 1 << 32


def query_weights(
    query: torch.Tensor,
    half_life: float,
    seen: torch.Tensor | None = None,
    seen_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct ids ``q [k]`` of ``query`` (int64 ``[m]``, oldest first) and their
    weights ``w [k]``: ``w_j = max over q_j's occurrences of 2^(-age / half_life)``,
    ``age`` = 0 for the newest token (``half_life = inf``: all 1), times
    ``seen_weight`` for an id found in ``seen`` (int64, the recent text before the
    query: what the recent window already holds needs no far block)."""
    q, inverse = torch.unique(query.to(torch.int64), return_inverse=True)
    age = torch.arange(query.numel() - 1, -1, -1, dtype=torch.float32)
    per = torch.pow(2.0, -age / float(half_life))
    w = torch.zeros(q.numel(), dtype=torch.float32).scatter_reduce(
        0, inverse, per, reduce="amax", include_self=False
    )
    if seen is not None and seen_weight != 1.0 and seen.numel():
        w = torch.where(torch.isin(q, seen.to(torch.int64)), w * float(seen_weight), w)
    return q, w


def block_relevance(
    blocks: torch.Tensor,
    query: torch.Tensor,
    half_life: float = math.inf,
    seen: torch.Tensor | None = None,
    seen_weight: float = 1.0,
) -> torch.Tensor:
    """BM25 score ``s [n_b]`` (float32) of each block of ``blocks`` (int64
    ``[n_b, bs]`` token ids) for the distinct ids of ``query`` (int64 ``[m]``, oldest
    first), each weighted by :func:`query_weights` (``seen``, ``seen_weight``)."""
    if blocks.dim() != 2:
        raise InvariantError(f"blocks must be [n_b, bs], got {tuple(blocks.shape)}")
    n_b = int(blocks.shape[0])
    if n_b == 0 or query.numel() == 0:
        return torch.zeros(n_b, dtype=torch.float32)
    q, w = query_weights(query, half_life, seen, seen_weight)  # q sorted
    tf, idf = _term_stats(blocks, q)
    return _bm25(w, tf, idf)


def _bm25(w: torch.Tensor, tf: torch.Tensor, idf: torch.Tensor) -> torch.Tensor:
    return (w * idf * tf * (K1 + 1.0) / (tf + K1)).sum(1)


def _term_stats(blocks: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``tf [n_b, m]`` (float32: how often each sorted id of ``q [m]`` occurs in each
    block of ``blocks [n_b, bs]``) and BM25's ``idf [m]``."""
    n_b, bs, m = int(blocks.shape[0]), int(blocks.shape[1]), int(q.numel())
    # only the history's tokens that are query tokens are counted: isin + bincount
    # instead of an [n_b, bs, m] comparison (O(T log m) + O(matches))
    flat = blocks.reshape(-1).to(torch.int64)
    pos = torch.nonzero(torch.isin(flat, q)).squeeze(1)
    j = torch.searchsorted(q, flat[pos])
    tf = torch.bincount((pos // bs) * m + j, minlength=n_b * m).view(n_b, m).to(torch.float32)
    df = (tf > 0).sum(0).to(torch.float32)
    return tf, torch.log1p((n_b - df + 0.5) / (df + 0.5))


def robust_z(s: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor | None:
    """Robust z-scores ``(s - median r) / (1.4826 · MAD(r))`` of ``s [n_b]`` against
    the values ``r`` = ``ref`` (default ``s``; the standard deviation when the MAD is
    0); ``None`` when ``r`` has fewer than 2 values or no spread."""
    r = s if ref is None else ref
    if r.numel() < 2:
        return None
    med = r.median()
    scale = 1.4826 * (r - med).abs().median()
    if float(scale) <= 0.0:
        scale = r.std()
    if not math.isfinite(float(scale)) or float(scale) <= 0.0:
        return None
    return (s - med) / scale


def block_overlap(blocks: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """float32 ``[n_b]``: the share of each block's ``bs - 1`` token bigrams
    ``(x_i, x_{i+1})`` of ``blocks`` (int64 ``[n_b, bs]``) that occur among the
    bigrams of ``query`` (int64 ``[m]``); 1 for a block copied from the query."""
    if blocks.dim() != 2:
        raise InvariantError(f"blocks must be [n_b, bs], got {tuple(blocks.shape)}")
    n_b, bs = int(blocks.shape[0]), int(blocks.shape[1])
    if n_b == 0 or bs < 2 or query.numel() < 2:
        return torch.zeros(n_b, dtype=torch.float32)
    # a bigram as one int64: token ids are far below 2^31
    q = query.to(torch.int64)
    qb = torch.unique(q[:-1] * _PAIR + q[1:])
    b = blocks.to(torch.int64)
    hit = torch.isin(b[:, :-1] * _PAIR + b[:, 1:], qb)
    return hit.sum(1).to(torch.float32) / float(bs - 1)


def induction_blocks(
    history: torch.Tensor, query: torch.Tensor, k: int, bs: int, stop: int | None = None
) -> torch.Tensor:
    """Blocks (int64, the newest occurrence first, distinct) holding the token that
    followed each earlier occurrence of the query's last ``k`` tokens in ``history``
    (int64 ``[n_b · bs]``, the complete blocks before the protected tail): where that
    text was seen before, what came next is what the text after the query is likely
    to need (an induction step). An occurrence must end before ``stop - 1`` (default
    and at most ``n - k``: never the query itself, wherever it ends) and have a next
    token in ``history``."""
    n = int(history.numel())
    if k < 1 or query.numel() < k or n <= k:
        return torch.zeros(0, dtype=torch.int64)
    tail = query[-k:].to(torch.int64)
    h = history.to(torch.int64)
    # candidate ends: the query's last token, with room for k - 1 before it and a
    # next token after it
    ends = torch.nonzero(h[k - 1 : n - 1] == tail[-1]).flatten() + (k - 1)
    for j in range(1, k):
        if ends.numel() == 0:
            break
        ends = ends[h[ends - j] == tail[-1 - j]]
    ends = ends[ends < (n - k if stop is None else min(n - k, stop - k))]
    blocks = torch.flip((ends + 1) // bs, dims=[0]).tolist()
    return torch.tensor(list(dict.fromkeys(blocks)), dtype=torch.int64)


def key_terms(q: torch.Tensor, w: torch.Tensor, idf: torch.Tensor) -> torch.Tensor:
    """The query's *key terms*: the ids of ``q [m]`` whose weight ``w [m]``
    (:func:`query_weights`) times BM25's ``idf [m]`` is at least half the largest."""
    c = w * idf
    return q[c >= 0.5 * c.max()] if c.numel() else q


def followed_blocks(
    blocks: torch.Tensor, want: torch.Tensor, key: torch.Tensor, r: int
) -> torch.Tensor:
    """``want`` (int64 block indices, best first) with the block after each wanted
    block ``b`` of ``blocks`` (int64 ``[n_b, bs]``) inserted right after it when
    ``b``'s last key term (an id of ``key``, :func:`key_terms`) lies in its last ``r``
    tokens: what follows the match (a record's value after its key, a statement cut
    by the block edge) is in ``b + 1``."""
    n_b, bs = int(blocks.shape[0]), int(blocks.shape[1])
    if r < 1 or want.numel() == 0 or key.numel() == 0:
        return want
    out: list[int] = []
    for b in want.tolist():
        out.append(b)
        hit = torch.nonzero(torch.isin(blocks[b].to(torch.int64), key)).flatten()
        if hit.numel() and int(hit.max()) >= bs - r and b + 1 < n_b:
            out.append(b + 1)
    return torch.tensor(list(dict.fromkeys(out)), dtype=torch.int64)


def wanted_blocks(
    s: torch.Tensor, z_min: float, limit: int, copies: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices (int64, best first) of the blocks whose robust z-score of ``s [n_b]``
    is at least ``z_min``, at most ``limit`` of them.

    Blocks marked in ``copies`` (bool ``[n_b]``: far copies of the query) are no
    candidates, and the z-scores are against the others. A copy that stands out
    brings instead the first block after it that is no copy (what followed the text
    the query repeats: an induction step), ranked after every other wanted block."""
    if limit <= 0:
        return torch.zeros(0, dtype=torch.int64)
    z = robust_z(s, None if copies is None else s[~copies])
    if z is None:
        return torch.zeros(0, dtype=torch.int64)
    order = torch.argsort(z, descending=True, stable=True)
    hot = order[z[order] >= z_min]
    if copies is None:
        return hot[:limit]
    is_copy = copies[hot]
    out = hot[~is_copy].tolist()
    seen, n_b, flags = set(out), int(s.numel()), copies.tolist()
    for b in hot[is_copy].tolist():
        nxt = b + 1
        while nxt < n_b and flags[nxt]:
            nxt += 1
        if nxt < n_b and nxt not in seen:
            out.append(nxt)
            seen.add(nxt)
    return torch.tensor(out[:limit], dtype=torch.int64)


def _history_query(
    tree: Any, wc: Any, config: Any, query_end: int | None
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """The complete blocks before ``wc``'s protected tail (int64 ``[n_b, bs]``), the
    ``lexical_query`` tokens before ``query_end`` (default: the newest), where they
    end, and the ``w_max - lexical_query`` tokens before the query (the recent text
    ``lexical_seen_weight`` discounts)."""
    bs = int(config.block_size)
    T = int(tree.num_tokens)
    n_b = int(wc.protected_start) // bs
    end = T if query_end is None else min(int(query_end), T)
    none = torch.zeros(0, dtype=torch.int64)
    if n_b < 1:
        return torch.zeros(0, bs, dtype=torch.int64), none, end, none
    ids = tree.tokens(0, T)
    q0 = max(end - int(config.lexical_query), 0)
    seen = ids[max(q0 - max(int(config.w_max) - int(config.lexical_query), 0), 0) : q0]
    return ids[: n_b * bs].view(n_b, bs), ids[q0:end], end, seen


def block_scores(tree: Any, wc: Any, config: Any, query_end: int | None = None) -> torch.Tensor:
    """BM25 ``s [n_b]`` (float32) of the history's complete blocks before ``wc``'s
    protected tail, for the ``lexical_query`` tokens before ``query_end`` (default: the
    newest), weighted by ``lexical_half_life`` and ``lexical_seen_weight`` (module
    doc)."""
    blocks, query, _, seen = _history_query(tree, wc, config, query_end)
    if blocks.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float32)
    return block_relevance(
        blocks, query, float(config.lexical_half_life), seen, float(config.lexical_seen_weight)
    )


def _coverage(wc: Any, bs: int, n_b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per entry of ``wc``: the first LOD1 block it covers and one past its last, both
    clamped to ``n_b`` (int64 ``[N]``)."""
    starts = wc.starts.cpu()
    spans = wc.spans.cpu()
    lo = (starts // bs).clamp(max=n_b)
    hi = ((starts + spans - 1) // bs + 1).clamp(max=n_b)
    return lo, hi


def _covers(lo: torch.Tensor, hi: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """bool ``[N]``: whether entry ``i`` covers a block marked in ``blocks [n_b]`` (one
    in ``[lo[i], hi[i])``), by a prefix sum."""
    prefix = torch.cat([torch.zeros(1, dtype=torch.int64), blocks.to(torch.int64).cumsum(0)])
    return (prefix[hi] - prefix[lo]) > 0


def entry_relevance(wc: Any, z: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """float32 ``[N]``: for each entry of ``wc`` the largest robust z-score ``z [n_b]``
    (:func:`robust_z` of :func:`block_scores`) over the complete blocks before the
    protected tail that it covers; 0 for entries covering none (the tail) or when
    ``z`` is ``None``. LensNet's ``relevance`` input."""
    n = len(wc)
    out = torch.zeros(n, dtype=torch.float32)
    if z is None or z.numel() == 0 or n == 0:
        return out
    n_b = int(z.numel())
    lo, hi = _coverage(wc, block_size, n_b)
    # entries tile the history, so the (entry, block) pairs number at most N + n_b
    real = hi > lo
    if bool(real.any()):
        width = (hi - lo)[real]
        seg = torch.repeat_interleave(torch.arange(n)[real], width)
        first = torch.repeat_interleave(lo[real], width)
        offset = torch.repeat_interleave(width.cumsum(0) - width, width)
        blocks = first + torch.arange(int(width.sum())) - offset
        out.scatter_reduce_(0, seg, z[blocks].float(), reduce="amax", include_self=False)
    return out


def swap_plan(
    wc: Any,
    config: Any,
    s: torch.Tensor,
    expand: torch.Tensor,
    keep: torch.Tensor,
) -> torch.Tensor:
    """float32 ``[N]`` allocator scores that open the gists ``expand`` (bool ``[N]``)
    and make exactly the room they need (module doc): ``+1`` on them, ``+0.5`` on the
    tokens of the blocks ``keep`` (bool ``[n_b]``), ``-1`` on as many complete LOD0
    blocks outside ``keep`` and the protected tail as the expands need (``bs - 1``
    entries each, less the budget's free room), the lowest ``s [n_b]`` first and the
    oldest on ties (``room_from = "least_relevant"``) or the oldest first
    (``"oldest"``); 0 elsewhere. Shared by ``lens: lexical`` and a retrieval LensNet."""
    n = len(wc)
    out = torch.zeros(n, dtype=torch.float32)
    bs = int(config.block_size)
    n_b = int(s.numel())
    levels = wc.levels.cpu().to(torch.int64)
    lo, hi = _coverage(wc, bs, n_b)
    out[expand] = 1.0
    out[_covers(lo, hi, keep) & (levels == 0)] = 0.5
    need = int(expand.sum()) * (bs - 1) - (int(config.w_max) - n)
    if need <= 0 or n_b == 0:
        return out
    k = -(-need // (bs - 1))
    tok = levels == 0
    blk = wc.starts.cpu() // bs
    first = blk[tok]
    counts = torch.bincount(first[first < n_b], minlength=n_b)[:n_b]
    full = torch.nonzero((counts == bs) & ~keep).flatten()
    if full.numel() == 0:
        return out
    if config.room_from == "oldest":
        victims = full[:k]
    else:
        # lowest relevance first, the oldest on ties (a stable sort of ascending ids)
        victims = full[torch.argsort(s[full], stable=True)][:k]
    drop = torch.zeros(n_b, dtype=torch.bool)
    drop[victims] = True
    in_drop = tok & (blk < n_b) & drop[blk.clamp(max=n_b - 1)]
    out[in_drop] = -1.0
    return out


def block_means(wc: Any, u: torch.Tensor, block_size: int) -> torch.Tensor:
    """float32 ``[n_b]``: the mean of ``u [N]`` over each complete block's LOD0 entries,
    for the ``n_b = protected_start // bs`` blocks before ``wc``'s protected tail (0 for
    a block with no LOD0 entry). A scorer's own per-block verdict, for
    :func:`swap_plan`'s choice of which token blocks make room."""
    bs = int(block_size)
    n_b = int(wc.protected_start) // bs
    levels = wc.levels.cpu()
    blk = wc.starts.cpu() // bs
    tok = (levels == 0) & (blk < n_b)
    sums = torch.zeros(n_b, dtype=torch.float32).index_add_(0, blk[tok], u.float().cpu()[tok])
    counts = torch.bincount(blk[tok], minlength=n_b)[:n_b].clamp(min=1)
    return sums / counts


def retrieval_limit(config: Any) -> int:
    """The most blocks one refocus may open: ``floor(retrieval_share · w_max / bs)``."""
    return int(config.retrieval_share * config.w_max) // int(config.block_size)


@torch.no_grad()
def retrieved_blocks(
    tree: Any, wc: Any, config: Any, query_end: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """BM25 ``s [n_b]`` (float32) of the blocks before ``wc``'s protected tail and the
    blocks the lexical scorer wants (int64, first wanted first, at most
    :func:`retrieval_limit`): induction blocks (``lexical_induction``), then the
    blocks that stand out (``lexical_z``), far copies of the query replaced by what
    follows them (``lexical_max_overlap``), each followed by the block after it when
    its last key term ends it (``lexical_follow``); see the module doc."""
    bs = int(config.block_size)
    blocks, query, end, seen = _history_query(tree, wc, config, query_end)
    n_b = int(blocks.shape[0])
    if n_b < 2:
        return torch.zeros(n_b, dtype=torch.float32), torch.zeros(0, dtype=torch.int64)
    q, w = query_weights(
        query, float(config.lexical_half_life), seen, float(config.lexical_seen_weight)
    )
    tf, idf = _term_stats(blocks, q)
    s = _bm25(w, tf, idf)
    copies = None
    if float(config.lexical_max_overlap) < 1.0:
        copies = block_overlap(blocks, query) > float(config.lexical_max_overlap)
    limit = retrieval_limit(config)
    want = wanted_blocks(s, float(config.lexical_z), limit, copies)
    if int(config.lexical_follow) > 0:
        key = key_terms(q, w, idf)
        want = followed_blocks(blocks, want, key, int(config.lexical_follow))[:limit]
    k = int(config.lexical_induction)
    if k > 0 and limit > 0:
        # at most half the slots, so that a common phrase cannot crowd out the rest
        found = induction_blocks(blocks.reshape(-1), query, k, bs, stop=end)
        first = found[: -(-limit // 2)].tolist()
        want = torch.tensor(list(dict.fromkeys(first + want.tolist()))[:limit], dtype=torch.int64)
    return s, want


@torch.no_grad()
def lexical_scores(tree: Any, wc: Any, config: Any, query_end: int | None = None) -> torch.Tensor:
    """float32 ``[N]`` scores of ``wc``'s entries (see the module doc) from ``tree``'s
    token ids and ``config``'s ``lexical_*`` fields, ``retrieval_share``, ``w_max``
    and ``block_size``: :func:`retrieved_blocks`, then :func:`swap_plan`. The query is
    the ``lexical_query`` tokens before ``query_end`` (default: the newest tokens)."""
    n = len(wc)
    s, want = retrieved_blocks(tree, wc, config, query_end)
    n_b = int(s.numel())
    if want.numel() == 0:
        return torch.zeros(n, dtype=torch.float32)
    wanted = torch.zeros(n_b, dtype=torch.bool)
    wanted[want] = True
    lo, hi = _coverage(wc, int(config.block_size), n_b)
    expand = _covers(lo, hi, wanted) & (wc.levels.cpu() > 0)
    return swap_plan(wc, config, s, expand, wanted)


@torch.no_grad()
def retrieval_scores(wc: Any, config: Any, s: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """float32 ``[N]`` allocator scores from a retrieval LensNet's scores ``u [N]``: the
    gists with ``u > tau_expand`` are opened, best first, at most
    :func:`retrieval_limit` of them; the tokens of a block whose tokens all score above
    ``tau_expand`` are kept; :func:`swap_plan` makes the room (collapsing the
    lowest-``s`` token blocks). Nothing else moves: LensNet decides *what* to read, the
    plan decides what makes room, so no collapse happens that no expand needs."""
    n = len(wc)
    bs = int(config.block_size)
    n_b = int(s.numel())
    u = u.detach().float().cpu()
    levels = wc.levels.cpu().to(torch.int64)
    cand = torch.nonzero((levels > 0) & (u > float(config.tau_expand))).flatten()
    if cand.numel() == 0 or n_b == 0:
        return torch.zeros(n, dtype=torch.float32)
    cand = cand[torch.argsort(u[cand], descending=True, stable=True)][: retrieval_limit(config)]
    expand = torch.zeros(n, dtype=torch.bool)
    expand[cand] = True
    keep = torch.zeros(n_b, dtype=torch.bool)
    tok = levels == 0
    blk = wc.starts.cpu() // bs
    hot = tok & (blk < n_b) & (u > float(config.tau_expand))
    if bool(hot.any()):
        hits = torch.bincount(blk[hot], minlength=n_b)[:n_b]
        keep = hits == bs
    return swap_plan(wc, config, s, expand, keep)
