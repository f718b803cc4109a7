"""What every report section shares: row selection, means, intervals, Markdown
tables, number formatting, figures and atomic writes.

A leaf of :mod:`megacontext.eval`: it imports only :mod:`~megacontext.eval.metrics`
(and nothing in ``eval`` imports back into it through another module), so every
section (:mod:`~megacontext.eval.report`, :mod:`~megacontext.eval.compression`,
:mod:`~megacontext.eval.ablations`) can use it without a cycle.

Rows are the evaluation's result dicts (one per suite, document, budget, method).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import atomic_write
from .metrics import bootstrap_ci, recovered_fraction

__all__ = [
    "by",
    "ci",
    "fmt",
    "mean",
    "pyplot",
    "recovered_of_means",
    "save_figure",
    "table",
    "vals",
]


def by(rows: list[dict], **eq: Any) -> list[dict]:
    """The rows whose fields equal ``eq`` (``by(rows, method="full", budget=256)``)."""
    return [r for r in rows if all(r.get(k) == v for k, v in eq.items())]


def vals(rows: list[dict], key: str) -> list[float]:
    """The finite numbers in column ``key`` (missing, ``None`` and NaN skipped)."""
    out = []
    for r in rows:
        v = r.get(key)
        if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
            out.append(float(v))
    return out


def mean(values: list[float]) -> float:
    """The mean, NaN for no values."""
    return float(np.mean(values)) if values else math.nan


def fmt(x: Any, nd: int = 3) -> str:
    """A cell: ``–`` for a missing value, ``NaN`` for a non-finite float, floats
    with ``nd`` decimals (``nd < 0``: signed, ``-nd`` decimals)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "NaN" if isinstance(x, float) else "–"
    if isinstance(x, float):
        return f"{x:+.{nd}f}" if nd < 0 else f"{x:.{nd}f}"
    return str(x)


def ci(values: list[float], seed: int = 0) -> str:
    """``mean [lo, hi]``: the mean with its 95% bootstrap interval
    (:func:`~megacontext.eval.metrics.bootstrap_ci`, seeded)."""
    p, lo, hi = bootstrap_ci(values, seed=seed)
    if not math.isfinite(p):
        return "NaN"
    if lo == hi:
        return f"{p:+.3f}"
    return f"{p:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def recovered_of_means(rows: list[dict]) -> float:
    """The recovered fraction of the group's mean NLLs (a ratio of means: stable where
    single documents' denominators are near 0), over rows with all three NLLs."""
    keep = [
        r
        for r in rows
        if all(
            isinstance(r.get(k), (int, float)) and math.isfinite(r[k])
            for k in ("nll", "nll_trunc", "nll_full")
        )
    ]
    if not keep:
        return math.nan
    return recovered_fraction(
        mean(vals(keep, "nll")), mean(vals(keep, "nll_trunc")), mean(vals(keep, "nll_full"))
    )


def table(header: list[str], body: list[list[str]]) -> list[str]:
    """A Markdown table, one line per row."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return out


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Write ``fig`` as a PNG atomically, then close it."""
    atomic_write(path, lambda p: fig.savefig(p, dpi=dpi, format="png"))
    pyplot().close(fig)
