"""The evaluation harness: metrics, peers at equal budget, suites and reports.

``megacontext eval SUITE`` runs a suite (see :mod:`megacontext.eval.suites`) for any
:class:`megacontext.MegaContext` against the peers of :mod:`megacontext.eval.peers`
and writes Parquet plus a Markdown report (:mod:`megacontext.eval.report`).
"""

from __future__ import annotations

from .metrics import bootstrap_ci, delta_nll, qa_f1, recovered_fraction
from .runner import run_eval

__all__ = ["bootstrap_ci", "delta_nll", "qa_f1", "recovered_fraction", "run_eval"]
