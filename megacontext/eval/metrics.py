"""Metrics of the evaluation harness.

All NLLs are in nats. For a method ``m`` reading a budget of ``W`` entries and the
frozen base model reading the full history (``full``), on the same target tokens:

- ``NLL@H(m)`` = mean over the ``H`` target tokens of ``-log p_m(target_t | ...)``;
- ``ΔNLL(m) = NLL@H(m) − NLL@H(full)`` (lower is better, 0 = as good as full);
- recovered fraction ``r(m) = (NLL_trunc − NLL_m) / (NLL_trunc − NLL_full)``: the
  share of what truncation to the last ``W`` tokens loses that ``m`` gets back
  (1 = all of it, 0 = no better than truncation, < 0 = worse than truncation). It is
  undefined (NaN) when ``|NLL_trunc − NLL_full| < eps`` (0.01 nats): truncation then loses
  nothing to recover;
- percentile bootstrap confidence intervals over documents (seeded, so reruns give
  the same interval);
- LongBench's answer metrics: ``retrieval_score`` for passage retrieval (share of
  the numbers in the answer equal to the gold paragraph's), token-level F1 after LongBench's ``normalize_answer``
  (lower-case, drop punctuation and the articles a/an/the, collapse whitespace),
  maximised over the reference answers, and exact match after the same
  normalisation.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import InputError

__all__ = [
    "bootstrap_ci",
    "delta_nll",
    "exact_match",
    "max_over_answers",
    "mean_nll",
    "normalize_answer",
    "qa_f1",
    "recovered_fraction",
    "retrieval_score",
]

RECOVERED_EPS = 0.01  # nats: below this truncation's loss is within NLL@64 noise


def mean_nll(nll: Sequence[float] | np.ndarray) -> float:
    """NLL@H: the mean of per-token NLLs ``[H]`` (NaN for an empty sequence)."""
    a = np.asarray(nll, dtype=np.float64).reshape(-1)
    return float(a.mean()) if a.size else math.nan


def delta_nll(nll_method: float, nll_full: float) -> float:
    """``ΔNLL = NLL(method) − NLL(full context)`` (NaN when either is NaN)."""
    return float(nll_method) - float(nll_full)


def recovered_fraction(
    nll_method: float, nll_trunc: float, nll_full: float, eps: float = RECOVERED_EPS
) -> float:
    """``(NLL_trunc − NLL_m) / (NLL_trunc − NLL_full)``; NaN when the denominator's
    magnitude is below ``eps`` (truncation loses nothing, so nothing can be
    recovered) or any input is NaN."""
    den = float(nll_trunc) - float(nll_full)
    if not math.isfinite(den) or abs(den) < eps or not math.isfinite(float(nll_method)):
        return math.nan
    return (float(nll_trunc) - float(nll_method)) / den


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    stat: Callable[[np.ndarray], float] = np.mean,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(point, lo, hi)``: ``stat`` of ``values`` (one value per document) and its
    percentile bootstrap ``1 − alpha`` interval from ``n_boot`` resamples of the
    documents with replacement, drawn from ``numpy.random.default_rng(seed)``.

    NaN values are dropped first; with no finite value all three are NaN, with one
    the interval is the point itself.
    """
    if n_boot < 1:
        raise InputError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise InputError(f"alpha must be in (0, 1), got {alpha}")
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return (math.nan, math.nan, math.nan)
    point = float(stat(a))
    if a.size == 1:
        return (point, point, point)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    boots = np.array([stat(a[i]) for i in idx], dtype=np.float64)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return (point, float(lo), float(hi))


# ------------------------------------------------------------------- answer metrics

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """LongBench's (SQuAD's) normalisation: lower-case, remove punctuation, remove
    the articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def qa_f1(prediction: str, reference: str) -> float:
    """LongBench's ``qa_f1_score``: token-level F1 of the normalised strings
    (whitespace tokens, multiset overlap); 0 when either side is empty."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred)
    recall = same / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def max_over_answers(
    metric: Callable[[str, str], float], prediction: str, references: Sequence[str]
) -> float:
    """LongBench scores a prediction against every reference and keeps the best."""
    if not references:
        raise InputError("no reference answers to score against")
    return max(metric(prediction, r) for r in references)


def retrieval_score(prediction: str, reference: str) -> float:
    """LongBench's ``retrieval_score`` (passage retrieval): the reference names
    ``Paragraph N``; the score is the share of the numbers in the prediction that
    equal ``N`` (0 when the prediction has no number)."""
    found = re.findall(r"Paragraph (\d+)", reference)
    if not found:
        raise InputError(f"reference {reference!r} names no 'Paragraph N'")
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == found[0] for n in numbers) / len(numbers)
