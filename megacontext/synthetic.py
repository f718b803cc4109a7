"""Synthetic long-range tasks: targets that only distant context can predict.

On ordinary text the next tokens depend mostly on what is near, so a focus policy
trained only on that learns little. Each generator here hides a *needle* (the
answer's tokens) at a chosen depth inside real filler text and ends the context
with a question whose continuation (the *target*) copies the needle:

- :func:`passkey`: "The pass key is 71432." in English prose (pydoc topics);
  asked for at the end.
- :func:`key_value`: a record of many ``key: value`` lines; one key is asked for.
- :func:`code_identifier`: a constant or a function with a random name, defined in
  real standard-library code thousands of tokens before a use that needs its value
  or body.

Every task is sized in tokens of the given (fast) tokenizer: the context has
``length`` tokens (within ``tolerance``), and the needle's token span is measured on
the tokenization of the whole context, so ``needle_align`` can put it exactly at a
block edge (``"edge"``: first needle token at a multiple of ``block_size``), across
one (``"straddle"``: a block boundary splits the needle in two near-equal halves) or
inside one block (``"mid"``: centred in a block, clear of both edges). By
construction ``encode(context + target) == encode(context) + encode(target)``.

``haystack``: the filler's documents — ``"validation"`` (evaluation) or ``"train"``
(training) keeps to that split of :func:`megacontext.data.split_of` (the pydoc topics
and top-level modules :func:`~megacontext.data.stdlib_topics` /
:func:`~megacontext.data.stdlib_modules` list), ``None`` the whole library. Task
seeds come from disjoint namespaces (:data:`TRAIN_SEED_BASE`, :func:`check_seed`).
"""

from __future__ import annotations

import functools
import hashlib
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .data import SPLITS, Document, build_shards, stdlib_modules, stdlib_prose
from .errors import InputError, InvariantError

__all__ = [
    "GENERATORS",
    "TRAIN_SEED_BASE",
    "SyntheticTask",
    "check_seed",
    "code_identifier",
    "generate_tasks",
    "key_value",
    "passkey",
    "task_documents",
    "train_seed",
    "write_synthetic_shards",
]

ALIGNS = ("edge", "straddle", "mid")
# Task seeds: evaluation tasks draw from [0, TRAIN_SEED_BASE), training tasks (the
# curriculum) from [TRAIN_SEED_BASE, 2 * TRAIN_SEED_BASE) (:func:`train_seed`), so no
# evaluation task ever shares a seed (key, value, name, filler start) with one the
# trainer saw. A generator with ``haystack="validation"`` refuses a training seed
# and one with ``haystack="train"`` an evaluation seed.
TRAIN_SEED_BASE = 1 << 40
_CODE_FILLER_CHARS = 1_200_000  # ~350k SmolLM2 tokens of standard-library source
_SYLLABLES = (
    "ba",
    "be",
    "bi",
    "bo",
    "bu",
    "da",
    "de",
    "di",
    "do",
    "du",
    "ka",
    "ke",
    "ki",
    "ko",
    "ku",
    "la",
    "le",
    "li",
    "lo",
    "lu",
    "ma",
    "me",
    "mi",
    "mo",
    "mu",
    "na",
    "ne",
    "ni",
    "no",
    "nu",
    "ra",
    "re",
    "ri",
    "ro",
    "ru",
    "sa",
    "se",
    "si",
    "so",
    "su",
    "ta",
    "te",
    "ti",
    "to",
    "tu",
    "va",
    "ve",
    "vi",
    "vo",
    "vu",
    "za",
    "ze",
    "zi",
    "zo",
    "zu",
    "bar",
    "ken",
    "lor",
    "mix",
    "nal",
    "pex",
    "quor",
    "rin",
    "sol",
    "tav",
    "vek",
    "wim",
    "xan",
    "yor",
    "zul",
)


@dataclass(frozen=True)
class SyntheticTask:
    """One generated task.

    ``meta``: ``task``, ``seed``, ``depth`` (requested, 0-1), ``depth_actual``
    (needle start / context tokens), ``context_tokens``, ``target_tokens``,
    ``needle_span`` ``[start, end)`` (token positions in the context of the answer's
    tokens the target copies), ``statement_span`` (the whole needle statement),
    ``needle_align``, ``block_size``, ``answer`` and task-specific fields.
    """

    context: str
    target: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_document(self, doc_id: str) -> Document:
        """A ``synthetic`` shard document: text = context + target; ``meta`` keeps the
        target and ``context_tokens`` (the target starts at that token)."""
        meta = {**self.meta, "target": self.target, "context_chars": len(self.context)}
        return Document(doc_id, self.context + self.target, "synthetic", "synthetic", meta)


# --------------------------------------------------------------------------- filler


def _prose_text(split: str | None = None) -> str:
    if split is None:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k].strip() for k in sorted(topics))
    return stdlib_prose(split)


def _code_text(split: str | None = None) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    size = 0
    # Top-level modules in name order: the same text on every install of a version.
    paths = sorted(stdlib.glob("*.py")) if split is None else [p for _, p in stdlib_modules(split)]
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text.strip())
        size += len(text)
        if size >= _CODE_FILLER_CHARS:
            break
    if not parts:
        raise InputError(f"no standard-library modules found under {stdlib} for code filler")
    return "\n\n\n".join(parts)


_FILLER_TEXT: dict[str, Callable[[str | None], str]] = {"prose": _prose_text, "code": _code_text}


@dataclass
class _Filler:
    text: str
    starts: np.ndarray  # char offset of every token, plus len(text)
    line_starts: np.ndarray  # token indices that begin a line

    @property
    def num_tokens(self) -> int:
        return len(self.starts) - 1

    def piece(self, t0: int, k: int) -> str:
        """The text of ``k`` tokens from token ``t0``."""
        return self.text[self.starts[t0] : self.starts[t0 + k]]


@functools.lru_cache(maxsize=8)
def _filler_cached(tokenizer: Any, kind: str, repeats: int, split: str | None) -> _Filler:
    base = _FILLER_TEXT[kind](split)
    text = "\n\n".join([base] * repeats)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    starts = np.append(offsets[:, 0], len(text))
    prev = np.asarray([text[s - 1] == "\n" if s > 0 else True for s in offsets[:, 0]])
    return _Filler(text, starts, np.flatnonzero(prev))


def _filler(tokenizer: Any, kind: str, need: int, split: str | None = None) -> _Filler:
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("synthetic tasks need a fast tokenizer (offset mappings)")
    repeats = 1
    while True:
        fill = _filler_cached(tokenizer, kind, repeats, split)
        if fill.num_tokens >= 2 * need + 16:
            return fill
        repeats *= 2


def train_seed(*parts: int) -> int:
    """A task seed of the training namespace ``[TRAIN_SEED_BASE, 2 * TRAIN_SEED_BASE)``:
    ``TRAIN_SEED_BASE + blake2b(parts) mod TRAIN_SEED_BASE``."""
    blob = ",".join(str(int(p)) for p in parts).encode()
    h = int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little")
    return TRAIN_SEED_BASE + h % TRAIN_SEED_BASE


def check_seed(seed: int, haystack: str | None) -> None:
    """The seed namespace of ``haystack``: evaluation (``"validation"``) seeds are in
    ``[0, TRAIN_SEED_BASE)``, training (``"train"``) seeds in ``[TRAIN_SEED_BASE,
    2 * TRAIN_SEED_BASE)``; ``None`` (the whole library, legacy) takes any ``seed >= 0``."""
    if haystack not in (None, *SPLITS):
        raise InputError(f"haystack must be one of {SPLITS} or None, got {haystack!r}")
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    if haystack == "validation" and seed >= TRAIN_SEED_BASE:
        raise InputError(
            f"seed {seed} is in the training namespace (>= {TRAIN_SEED_BASE}); evaluation "
            "tasks use seeds below it"
        )
    if haystack == "train" and not TRAIN_SEED_BASE <= seed < 2 * TRAIN_SEED_BASE:
        raise InputError(
            f"seed {seed} is not in the training namespace [{TRAIN_SEED_BASE}, "
            f"{2 * TRAIN_SEED_BASE}): use train_seed()"
        )


# --------------------------------------------------------------------------- assembly


def _encode(tokenizer: Any, text: str, offsets: bool = False) -> Any:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets, verbose=False)
    if offsets:
        return list(enc["input_ids"]), np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    return list(enc["input_ids"])


def _span(offsets: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """Token span ``[start, end)`` of the tokens overlapping chars ``[lo, hi)``."""
    hit = np.flatnonzero((offsets[:, 0] < hi) & (offsets[:, 1] > lo))
    if hit.size == 0:
        raise InvariantError(f"no token covers characters [{lo}, {hi})")
    return int(hit[0]), int(hit[-1]) + 1


def _aligned_start(want: int, n: int, align: str | None, block: int, lo: int) -> int:
    """The needle start closest to ``want`` (>= ``lo``) that satisfies ``align``."""
    if align is None:
        return max(want, lo)
    if align == "edge":
        offset = 0
    elif align == "straddle":
        if n < 2:
            raise InputError("needle_align='straddle' needs a needle of at least 2 tokens")
        offset = -(n // 2)
    else:
        if n > block - 2:
            raise InputError(
                f"needle_align='mid' needs a needle of at most {block - 2} tokens, got {n}"
            )
        offset = (block - n) // 2
    m = round((want - offset) / block) * block
    while m + offset < lo:
        m += block
    return m + offset


def _check_align(start: int, end: int, align: str | None, block: int) -> bool:
    if align is None:
        return True
    if align == "edge":
        return start % block == 0
    if align == "straddle":
        m = (start // block + 1) * block
        return start < m < end and abs((m - start) - (end - m)) <= 1
    return start % block > 0 and (end - 1) // block == start // block and end % block != 0


class _Built(NamedTuple):
    context: str
    ids: list[int]
    offsets: np.ndarray
    base: int  # char offset of the statement
    start: int  # needle token span
    end: int


def _assemble(
    tokenizer: Any,
    *,
    task: str,
    filler_kind: str,
    statement: str,
    needle: tuple[int, int],
    query: str,
    target: str,
    length: int,
    depth: float,
    seed: int,
    rng: np.random.Generator,
    needle_align: str | None,
    block_size: int,
    tolerance: int,
    extra: dict[str, Any],
    haystack: str | None = None,
) -> SyntheticTask:
    """Filler1 + statement + filler2 + query, sized and aligned by measurement."""
    check_seed(seed, haystack)
    if not 0.0 <= depth <= 1.0:
        raise InputError(f"depth must be in [0, 1], got {depth}")
    if needle_align not in (None, *ALIGNS):
        raise InputError(f"needle_align must be one of {ALIGNS} or None, got {needle_align!r}")
    if block_size < 2:
        raise InputError(f"block_size must be >= 2, got {block_size}")
    if tolerance < 0:
        raise InputError(f"tolerance must be >= 0, got {tolerance}")
    stmt_ids, stmt_off = _encode(tokenizer, statement, offsets=True)
    n_stmt = len(stmt_ids)
    n_query = len(_encode(tokenizer, query))
    ns, ne = _span(stmt_off, *needle)
    n_needle, lead = ne - ns, ns
    if length < n_stmt + n_query + 2 * block_size:
        raise InputError(
            f"length {length} is too short for a {task} task "
            f"(statement {n_stmt} + query {n_query} tokens + two blocks of filler)"
        )
    fill = _filler(tokenizer, filler_kind, length, haystack)
    budget = length - n_stmt - n_query
    want = _aligned_start(round(depth * budget) + lead, n_needle, needle_align, block_size, lead)
    if want - lead > budget:  # alignment pushed the needle past the end: step back a block
        want -= block_size
    usable = fill.line_starts[fill.line_starts < fill.num_tokens - length - 8]

    def build(t0: int, t1: int, k1: int, k2: int) -> _Built:
        # Trailing blanks would merge with the statement's / query's newlines.
        f1 = fill.piece(t0, max(k1, 0)).rstrip()
        f2 = fill.piece(t1, max(k2, 0)).rstrip()
        context = f1 + statement + f2 + query
        ids, off = _encode(tokenizer, context, offsets=True)
        start, end = _span(off, len(f1) + needle[0], len(f1) + needle[1])
        return _Built(context, ids, off, len(f1), start, end)

    def attempt(t0: int, t1: int) -> _Built | None:
        k1 = want - lead
        k2 = budget - k1
        cur = build(t0, t1, k1, k2)
        seen: set[tuple[int, int]] = set()
        # Token seams can merge or split by one: re-measure and correct.
        for _ in range(12):
            shift, grow = want - cur.start, length - len(cur.ids)
            if (shift == 0 and grow == 0) or (k1, k2) in seen:
                break
            seen.add((k1, k2))
            k1, k2 = k1 + shift, k2 + grow - shift
            if k1 < 0 or k2 < 0:
                return None
            cur = build(t0, t1, k1, k2)
        if needle_align is not None and cur.start != want:
            for d in (1, -1, 2, -2, 3, -3):
                if k1 + d >= 0 and k2 - d >= 0:
                    trial = build(t0, t1, k1 + d, k2 - d)
                    if trial.start == want:
                        cur, k1, k2 = trial, k1 + d, k2 - d
                        break
            else:
                return None
        for _ in range(4):  # the length, without moving the needle
            grow = length - len(cur.ids)
            if grow == 0 or k2 + grow < 0:
                break
            trial = build(t0, t1, k1, k2 + grow)
            if trial.start != cur.start:
                break
            cur, k2 = trial, k2 + grow
        if abs(len(cur.ids) - length) > tolerance:
            return None
        if not _check_align(cur.start, cur.end, needle_align, block_size):
            return None
        return cur

    built = None
    for _ in range(8):  # another filler start when a seam makes the position unreachable
        t0, t1 = (int(x) for x in rng.choice(usable, size=2))
        built = attempt(t0, t1)
        if built is not None:
            break
    if built is None:
        raise InvariantError(
            f"{task}: could not place the needle at token {want} (align={needle_align!r}) "
            f"in a context of {length} +- {tolerance} tokens"
        )
    context, ids, off, base, start, end = built
    target_ids = _encode(tokenizer, target)
    if _encode(tokenizer, context + target) != ids + target_ids:
        raise InvariantError(
            f"{task}: the target {target!r} does not tokenize apart from the context"
        )
    statement_span = _span(off, base, base + len(statement))
    return SyntheticTask(
        context,
        target,
        {
            "task": task,
            "seed": seed,
            "depth": depth,
            "depth_actual": start / len(ids),
            "context_tokens": len(ids),
            "target_tokens": len(target_ids),
            "needle_span": [start, end],
            "statement_span": list(statement_span),
            "needle_align": needle_align,
            "block_size": block_size,
            "haystack": haystack,
            **extra,
        },
    )


def _name(rng: np.random.Generator, parts: int) -> str:
    return "_".join(
        "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4)))) for _ in range(parts)
    )


# --------------------------------------------------------------------------- tasks


def passkey(
    tokenizer: Any,
    *,
    length: int,
    depth: float = 0.5,
    seed: int = 0,
    needle_align: str | None = None,
    block_size: int = 32,
    tolerance: int = 4,
    digits: int = 5,
    haystack: str | None = None,
) -> SyntheticTask:
    """A ``digits``-digit pass key stated once in prose at ``depth``, asked for at the end.

    Needle: the key's digit tokens in "The pass key is 71432.". Target: `` 71432``.
    """
    rng = np.random.default_rng([seed, 1])
    key = str(int(rng.integers(10 ** (digits - 1), 10**digits)))
    statement = f"\n\nThe pass key is {key}. Remember it: {key} is the pass key.\n\n"
    at = statement.index(key)
    return _assemble(
        tokenizer,
        task="passkey",
        filler_kind="prose",
        statement=statement,
        needle=(at, at + len(key)),
        query="\n\nWhat is the pass key? The pass key is",
        target=f" {key}",
        length=length,
        depth=depth,
        seed=seed,
        rng=rng,
        needle_align=needle_align,
        block_size=block_size,
        tolerance=tolerance,
        haystack=haystack,
        extra={"answer": key},
    )


def key_value(
    tokenizer: Any,
    *,
    length: int,
    depth: float = 0.1,
    seed: int = 0,
    needle_align: str | None = None,
    block_size: int = 32,
    tolerance: int = 4,
    num_pairs: int = 24,
    haystack: str | None = None,
) -> SyntheticTask:
    """``num_pairs`` lines ``key: value`` at ``depth``; one key is queried at the end.

    Needle: the queried value's tokens inside the record. Target: `` <value>``.
    """
    if num_pairs < 1:
        raise InputError(f"num_pairs must be >= 1, got {num_pairs}")
    rng = np.random.default_rng([seed, 2])
    keys: list[str] = []
    while len(keys) < num_pairs:
        key = f"{_name(rng, 1)}-{_name(rng, 1)}"
        if key not in keys:
            keys.append(key)
    values = [str(int(v)) for v in rng.integers(100000, 1000000, size=num_pairs)]
    pick = int(rng.integers(num_pairs))
    head = "\n\nRecord of keys and values:\n"
    lines = [f"{k}: {v}\n" for k, v in zip(keys, values, strict=True)]
    at = len(head) + sum(len(x) for x in lines[:pick]) + len(keys[pick]) + 2
    statement = head + "".join(lines) + "\n"
    return _assemble(
        tokenizer,
        task="kv",
        filler_kind="prose",
        statement=statement,
        needle=(at, at + len(values[pick])),
        query=f"\n\nIn the record above, the value of {keys[pick]} is",
        target=f" {values[pick]}",
        length=length,
        depth=depth,
        seed=seed,
        rng=rng,
        needle_align=needle_align,
        block_size=block_size,
        tolerance=tolerance,
        haystack=haystack,
        extra={"answer": values[pick], "key": keys[pick], "num_pairs": num_pairs},
    )


def code_identifier(
    tokenizer: Any,
    *,
    length: int,
    depth: float = 0.1,
    seed: int = 0,
    needle_align: str | None = None,
    block_size: int = 32,
    tolerance: int = 4,
    kind: str | None = None,
    haystack: str | None = None,
) -> SyntheticTask:
    """A constant or function with a random name, defined in stdlib code at ``depth``.

    ``kind="constant"``: ``NAME = 48213`` ... ``assert NAME ==`` -> `` 48213``.
    ``kind="function"``: ``def name(x):\\n    return x * 7 + 3`` ... the same ``def``
    line again, then ``return`` -> `` x * 7 + 3``. ``None`` picks one by the seed.
    Needle: the value / body expression tokens in the definition.
    """
    rng = np.random.default_rng([seed, 3])
    if kind is None:
        kind = ("constant", "function")[int(rng.integers(2))]
    if kind == "constant":
        name = _name(rng, 3).upper()
        value = str(int(rng.integers(1000, 1000000)))
        statement = f"\n\n\n{name} = {value}\n\n\n"
        at = statement.index(value)
        query = f"\n\n\nassert {name} =="
        target, answer = f" {value}", value
    elif kind == "function":
        name = _name(rng, 3)
        arg = str(rng.choice(["x", "n", "value", "count", "size"]))
        a, b = (int(v) for v in rng.integers(2, 100, size=2))
        answer = f"{arg} * {a} + {b}"
        signature = f"def {name}({arg}):\n    return"
        statement = f"\n\n\n{signature} {answer}\n\n\n"
        at = statement.index(answer)
        query = f"\n\n\n# {name}, as defined above:\n{signature}"
        target = f" {answer}"
    else:
        raise InputError(f"kind must be 'constant', 'function' or None, got {kind!r}")
    return _assemble(
        tokenizer,
        task="code",
        filler_kind="code",
        statement=statement,
        needle=(at, at + len(answer)),
        query=query,
        target=target,
        length=length,
        depth=depth,
        seed=seed,
        rng=rng,
        needle_align=needle_align,
        block_size=block_size,
        tolerance=tolerance,
        haystack=haystack,
        extra={"answer": answer, "name": name, "kind": kind},
    )


GENERATORS: dict[str, Callable[..., SyntheticTask]] = {
    "passkey": passkey,
    "kv": key_value,
    "code": code_identifier,
}


def generate_tasks(
    tokenizer: Any,
    n: int,
    *,
    length: int,
    tasks: Sequence[str] = ("passkey", "kv", "code"),
    seed: int = 0,
    depths: Sequence[float] | None = None,
    needle_align: str | None = None,
    block_size: int = 32,
    tolerance: int = 4,
    haystack: str | None = None,
) -> list[SyntheticTask]:
    """``n`` tasks cycling through ``tasks``; depths cycle through ``depths`` or are
    drawn uniformly in [0.05, 0.95] from ``seed``. Task ``i`` uses seed ``seed*1000003+i``."""
    unknown = [t for t in tasks if t not in GENERATORS]
    if unknown or not tasks:
        raise InputError(f"unknown synthetic tasks {unknown}; expected some of {list(GENERATORS)}")
    rng = np.random.default_rng([seed, 0])
    drawn = rng.uniform(0.05, 0.95, size=n)
    out = []
    for i in range(n):
        depth = float(depths[i % len(depths)]) if depths else float(drawn[i])
        out.append(
            GENERATORS[tasks[i % len(tasks)]](
                tokenizer,
                length=length,
                depth=depth,
                seed=seed * 1000003 + i,
                needle_align=needle_align,
                block_size=block_size,
                tolerance=tolerance,
                haystack=haystack,
            )
        )
    return out


def task_documents(tasks: Sequence[SyntheticTask]) -> list[Document]:
    """Shard documents of ``tasks``: ids ``synthetic/<task>/<task seed>/<i>``."""
    return [
        t.to_document(f"synthetic/{t.meta['task']}/{t.meta['seed']}/{i}")
        for i, t in enumerate(tasks)
    ]


def write_synthetic_shards(
    out: str | Path,
    tasks: Sequence[SyntheticTask],
    *,
    tokenizer: Any,
    model_name: str,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Write ``tasks`` as ``synthetic`` documents in the shard format (``build_shards``).

    Document ``i`` has id ``synthetic/<task>/<task seed>/<i>``; its ``meta`` holds
    the task's metadata, the ``target`` and ``context_tokens`` (where it starts).
    """
    docs = task_documents(tasks)
    return build_shards(
        [],
        out,
        tokenizer=tokenizer,
        model_name=model_name,
        documents=docs,
        val_fraction=val_fraction,
        seed=seed,
        progress=progress,
        **kwargs,
    )
