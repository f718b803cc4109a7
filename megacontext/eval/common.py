"""What the suites share: their sizes, the held-out documents, the derived columns
of a row group, the answer metrics and the progress log.

Below every suite module (:mod:`~megacontext.eval.suites`,
:mod:`~megacontext.eval.compression`, :mod:`~megacontext.eval.ablations`) and
:mod:`~megacontext.eval.external` (which scores external peers' answers with the
suites' own metric), so none of them imports another to reach these.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..data import stdlib_modules, stdlib_prose
from ..errors import InputError
from .metrics import (
    delta_nll,
    exact_match,
    max_over_answers,
    qa_f1,
    recovered_fraction,
    retrieval_score,
)

__all__ = [
    "SIZES",
    "Log",
    "add_derived",
    "log_default",
    "score_answer",
    "sweep_documents",
]

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "budget": {"history": 384, "budgets": [128, 256], "docs": 2, "horizon": 16},
        "needle": {"lengths": [320], "depths": [0.2], "budgets": [128], "tasks": ["passkey"]},
        "longbench": {"rows": 1, "context": 320, "budgets": [128], "max_new": 4},
        "boundary": {"length": 320, "depth": 0.2, "budget": 128, "seeds": 1},
        "runtime": {"history": 320, "budget": 128, "decode": 64},
        "compression": {"history": 2048, "horizon": 16, "narrative": 1, "code": 1, "passkey": 1},
        "ablation": {"docs": 2, "history": 640, "budget": 192, "feed": 128},
    },
    "small": {
        "budget": {"history": 1024, "budgets": [256, 512], "docs": 2, "horizon": 64},
        "needle": {
            "lengths": [1024],
            "depths": [0.25, 0.75],
            "budgets": [256],
            "tasks": ["passkey"],
        },
        "longbench": {"rows": 1, "context": 1024, "budgets": [256], "max_new": 12},
        "boundary": {"length": 768, "depth": 0.3, "budget": 256, "seeds": 1},
        "runtime": {"history": 512, "budget": 256, "decode": 96},
        "compression": {"history": 2048, "horizon": 64, "narrative": 2, "code": 2, "passkey": 2},
        "ablation": {"docs": 2, "history": 2048, "budget": 512, "feed": 256},
    },
    "medium": {
        "budget": {"history": 4096, "budgets": [512, 1024, 2048], "docs": 2, "horizon": 64},
        "needle": {
            "lengths": [2048, 4096],
            "depths": [0.1, 0.5, 0.9],
            "budgets": [512, 1024],
            "tasks": ["passkey", "kv", "code"],
        },
        "longbench": {"rows": 3, "context": 4096, "budgets": [512, 1024], "max_new": 32},
        "boundary": {"length": 2048, "depth": 0.3, "budget": 512, "seeds": 4},
        "runtime": {"history": 4096, "budget": 2048, "decode": 256},
        "compression": {"history": 4096, "horizon": 64, "narrative": 4, "code": 4, "passkey": 4},
        "ablation": {"docs": 4, "history": 4096, "budget": 1024, "feed": 512},
    },
}

Log = Callable[[str], None]


def log_default(msg: str) -> None:
    """Progress to stderr (the suites' default ``log``)."""
    print(msg, file=sys.stderr, flush=True)


def score_answer(text: str, answer: dict[str, Any]) -> float:
    """The answer metric ``answer["metric"]`` (``f1``, ``em``, ``retrieval`` or
    ``contains``) of ``text`` against ``answer["references"]``."""
    refs = answer["references"]
    metric = answer.get("metric", "f1")
    if metric == "f1":
        return max_over_answers(qa_f1, text, refs)
    if metric == "em":
        return max_over_answers(exact_match, text, refs)
    if metric == "retrieval":
        return max_over_answers(retrieval_score, text, refs)
    if metric == "contains":
        return float(any(r.strip() and r.strip() in text for r in refs))
    raise InputError(f"unknown answer metric {metric!r}")


def add_derived(rows: list[dict[str, Any]], group: Sequence[str]) -> list[dict[str, Any]]:
    """Add ``nll_full``, ``nll_trunc``, ``delta_nll`` (vs full), ``delta_trunc``
    (truncation's ΔNLL on the same targets) and ``recovered`` to every row, grouping
    rows that share the keys ``group`` (same history, targets and budget)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in group), []).append(r)
    for members in groups.values():
        by = {r["method"]: r["nll"] for r in members}
        full = by.get("full", math.nan)
        trunc = by.get("truncation", math.nan)
        for r in members:
            r["nll_full"] = full
            r["nll_trunc"] = trunc
            r["delta_nll"] = delta_nll(r["nll"], full)
            r["delta_trunc"] = delta_nll(trunc, full)
            r["recovered"] = recovered_fraction(r["nll"], trunc, full)
    return rows


def sweep_documents(
    base: Any, n: int, tokens: int, split: str = "validation"
) -> list[tuple[str, str, torch.Tensor]]:
    """``n`` held-out documents of at least ``tokens`` tokens, alternating code and
    prose, all from the validation split (``split="train"``: the training split's,
    for choosing a setting before it is measured held out) by the trainer's rule
    (:func:`megacontext.data.split_of` over the ids ``megacontext ingest`` gives):
    code = the validation split's top-level standard-library modules, largest first
    (:func:`~megacontext.data.stdlib_modules`); prose = consecutive slices of
    :func:`~megacontext.data.stdlib_prose` (the validation split's pydoc topics without the
    paragraphs a training topic also holds). Returns ``(doc_id, kind,
    ids[:tokens])``; a code ``doc_id`` is ``code/<module file>``."""
    if split not in ("train", "validation"):
        raise InputError(f"split must be 'train' or 'validation', got {split!r}")
    code: list[tuple[str, str, torch.Tensor]] = []
    files = sorted((p for _, p in stdlib_modules(split)), key=lambda p: (-p.stat().st_size, p.name))
    for p in files:
        if len(code) >= (n + 1) // 2:
            break
        # ~3.5 chars per token for code: read just enough text
        text = p.read_text(encoding="utf-8", errors="replace")[: tokens * 8]
        ids = base.encode(text)
        if ids.numel() >= tokens:
            code.append((f"code/{p.name}", "code", ids[:tokens]))
    prose_ids = base.encode(stdlib_prose(split))
    tag = "val" if split == "validation" else split
    prose = [
        (f"prose/topics-{tag}@{i * tokens}", "prose", prose_ids[i * tokens : (i + 1) * tokens])
        for i in range(n // 2)
        if (i + 1) * tokens <= prose_ids.numel()
    ]
    docs = []
    for i in range(max(len(code), len(prose))):
        docs += code[i : i + 1] + prose[i : i + 1]
    if len(docs) < n:
        raise InputError(
            f"found only {len(docs)} {split}-split documents of {tokens} tokens, need {n}"
        )
    return docs[:n]
