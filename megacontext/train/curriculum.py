"""A long-range curriculum: training windows whose targets need a far-back needle.

Each window keeps the trainer's layout (``history`` tokens ingested, then ``blocks``
blocks of ``K`` decoded, snapshots scoring the next ``H`` tokens after each block)
and is built from a window of real *training-split* tokens (the haystack, drawn
from the trainer's own train source) by writing, at token level:

- a needle statement (:func:`needle`: a pass key, a ``key: value`` record or a
  code constant / function) inside the history, so that the needle's answer tokens
  sit at a block ``edge`` (first token at a multiple of ``K``), ``straddle`` a block
  boundary (halves differing by at most one token) or lie ``mid`` block (clear of
  both edges; a needle longer than ``K - 2`` tokens cannot, and goes to an edge
  instead); depth uniform in ``[0.05, 0.8]`` of the history;
- the question so that it ends exactly at the first snapshot's cursor
  ``history + K`` (it sits in the newest block, where LensNet's tail looks), and the
  answer right after it: the answer tokens are the first targets of that snapshot.

Writing over haystack tokens keeps every window exactly ``length`` tokens and every
position exact (no re-tokenization). Task seeds come from the training namespace
(:func:`megacontext.synthetic.train_seed`); evaluation tasks use the other
(:func:`megacontext.synthetic.check_seed`), so no evaluation task's key, value,
name or haystack is ever one the trainer saw.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import ConfigError, InvariantError
from ..synthetic import train_seed

__all__ = ["KINDS", "PLACEMENTS", "Needle", "curriculum_source", "needle", "place_needle"]

KINDS = ("passkey", "kv", "identifier")
PLACEMENTS = ("edge", "straddle", "mid")
WindowSource = Callable[[int, int], torch.Tensor]
_SYL = ("ba", "de", "ki", "lo", "mu", "na", "ro", "si", "tu", "ve", "za", "quor", "pex", "rin")


class Needle(NamedTuple):
    """Token ids of one task: ``statement`` (with the answer at
    ``statement[lead : lead + n_answer]``), ``question`` and ``answer``."""

    kind: str
    statement: list[int]
    lead: int
    question: list[int]
    answer: list[int]


def _name(rng: np.random.Generator, parts: int) -> str:
    return "_".join("".join(rng.choice(_SYL, size=int(rng.integers(2, 4)))) for _ in range(parts))


def needle(kind: str, seed: int, encode: Callable[[str], list[int]]) -> Needle:
    """The needle of a ``kind`` task (``passkey``, ``kv``, ``identifier``) drawn from
    ``seed``, as token ids of ``encode``. The answer is encoded alone and the
    statement around it in three pieces, so the answer's ids are the same in the
    statement and as the target."""
    if kind not in KINDS:
        raise ConfigError(f"unknown curriculum kind {kind!r}", field="data.curriculum.kinds")
    rng = np.random.default_rng([seed, 17])
    if kind == "passkey":
        key = str(int(rng.integers(10000, 100000)))
        before, after = "\n\nThe pass key is", f". Remember it: {key} is the pass key.\n\n"
        question, answer = "\n\nWhat is the pass key? The pass key is", f" {key}"
    elif kind == "kv":
        keys = [f"{_name(rng, 1)}-{_name(rng, 1)}" for _ in range(8)]
        values = [str(int(v)) for v in rng.integers(100000, 1000000, size=8)]
        pick = int(rng.integers(8))
        lines = [f"{k}: {v}\n" for k, v in zip(keys, values, strict=True)]
        before = "\n\nRecord of keys and values:\n" + "".join(lines[:pick]) + f"{keys[pick]}:"
        after = "\n" + "".join(lines[pick + 1 :]) + "\n"
        question = f"\n\nIn the record above, the value of {keys[pick]} is"
        answer = f" {values[pick]}"
    else:
        name = _name(rng, 3).upper()
        before, after = f"\n\n\n{name} =", "\n\n\n"
        question, answer = f"\n\n\nassert {name} ==", f" {int(rng.integers(1000, 1000000))}"
    pre, ans, post = encode(before), encode(answer), encode(after)
    return Needle(kind, pre + ans + post, len(pre), encode(question), ans)


def place_needle(
    n: int, history: int, block_size: int, placement: str, depth: float, lead: int, size: int
) -> int:
    """The answer's first token position for a needle of ``n`` answer tokens in a
    statement of ``size`` tokens (answer at offset ``lead``): nearest to ``depth *
    history`` such that the answer is at a block ``edge``, ``straddle`` s a boundary
    or sits ``mid`` block, and the whole statement lies in ``[0, history)``."""
    k = block_size
    if placement == "edge":
        offset = 0
    elif placement == "straddle":
        if n < 2:
            raise InvariantError("a straddling needle needs at least 2 tokens")
        offset = -(n // 2)
    elif placement == "mid":
        if n > k - 2:
            raise InvariantError(f"a mid-block needle needs at most {k - 2} tokens, got {n}")
        offset = (k - n) // 2
    else:
        raise ConfigError(f"unknown placement {placement!r}", field="data.curriculum.placements")
    m = round((depth * history - offset) / k) * k
    while m + offset - lead < 0:
        m += k
    while m + offset - lead + size > history:
        m -= k
    start = m + offset
    if start - lead < 0:
        raise InvariantError(f"a statement of {size} tokens does not fit a {history}-token history")
    return start


def curriculum_source(
    real: WindowSource,
    haystacks: Mapping[str, WindowSource],
    encode: Callable[[str], list[int]],
    *,
    history: int,
    block_size: int,
    fraction: float,
    kinds: Sequence[str] = KINDS,
    placements: Sequence[str] = PLACEMENTS,
    log: list[dict[str, Any]] | None = None,
) -> WindowSource:
    """A window source ``(n, seed) -> int64 [n, L]``: each window is, with
    probability ``fraction``, a long-range task (module doc) written over a window of
    ``haystacks["code"]`` (``identifier``) or ``haystacks["prose"]`` (the others),
    else ``real``'s window. Deterministic in ``seed``; ``log`` (optional) receives
    one dict per task window (``index``, ``kind``, ``placement``, ``seed``,
    ``answer_start``, ``answer_end``, ``question_end``)."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(
            f"fraction must be in [0, 1], got {fraction}", field="data.curriculum.fraction"
        )
    for k in kinds:
        if k not in KINDS:
            raise ConfigError(f"unknown curriculum kind {k!r}", field="data.curriculum.kinds")
    cursor = history + block_size

    def draw(n: int, seed: int) -> torch.Tensor:
        out = real(n, seed).clone()
        rng = np.random.default_rng([seed, 0x6375])
        task = rng.random(n) < fraction
        for i in np.flatnonzero(task).tolist():
            kind = kinds[int(rng.integers(len(kinds)))]
            placement = placements[int(rng.integers(len(placements)))]
            depth = float(rng.uniform(0.05, 0.8))
            s = train_seed(seed, i)
            nd = needle(kind, s, encode)
            hay = haystacks["code" if kind == "identifier" else "prose"](1, s % (1 << 62))[0]
            w = hay.to(torch.int64).clone()
            if w.numel() != out.shape[1]:
                raise InvariantError(f"haystack window of {w.numel()} tokens, need {out.shape[1]}")
            n_ans = len(nd.answer)
            if (placement == "mid" and n_ans > block_size - 2) or (
                placement == "straddle" and n_ans < 2
            ):
                placement = "edge"  # the needle cannot sit that way in this block size
            q0 = cursor - len(nd.question)
            size = len(nd.statement)
            start = place_needle(len(nd.answer), q0, block_size, placement, depth, nd.lead, size)
            s0 = start - nd.lead
            w[s0 : s0 + size] = torch.tensor(nd.statement)
            w[q0:cursor] = torch.tensor(nd.question)
            w[cursor : cursor + len(nd.answer)] = torch.tensor(nd.answer)
            out[i] = w
            if log is not None:
                log.append(
                    {
                        "index": i,
                        "kind": kind,
                        "placement": placement,
                        "seed": s,
                        "answer_start": start,
                        "answer_end": start + len(nd.answer),
                        "question_end": cursor,
                    }
                )
        return out

    return draw
