"""Runs on disk: Parquet -> Markdown + PNG round trip, derived columns."""

from __future__ import annotations

import math

import pytest

from megacontext.errors import StorageError
from megacontext.eval.report import build_report, load_run, write_run
from megacontext.eval.suites import add_derived

PNG = b"\x89PNG\r\n\x1a\n"


def _rows():
    rows = []
    for doc in ("a", "b"):
        for w in (128, 256):
            for m, nll in (("full", 2.0), ("truncation", 2.4), ("megacontext", 2.3)):
                extra = 0.1 if doc == "b" else 0.0
                rows.append(
                    {
                        "suite": "budget",
                        "doc": doc,
                        "budget": w,
                        "method": m,
                        "entries": w if m != "full" else 512,
                        "nll": nll + extra,
                        "token_nll": [nll + extra] * 4,
                    }
                )
    add_derived(rows, ("suite", "doc", "budget"))
    b = []
    for align, d in (("edge", 0.5), ("straddle", 0.8), ("mid", 0.45)):
        for m, nll in (("full", 1.0), ("truncation", 3.0), ("megacontext", 1.0 + d)):
            b.append(
                {
                    "suite": "boundary",
                    "doc": align,
                    "seed": 0,
                    "align": align,
                    "budget": 128,
                    "method": m,
                    "nll": nll,
                }
            )
    add_derived(b, ("suite", "doc", "budget"))
    run = [
        {
            "suite": "runtime",
            "doc": "x",
            "method": "baseline",
            "budget": 128,
            "latency_block_ms": 100.0,
        },
        {
            "suite": "runtime",
            "doc": "x",
            "method": "megacontext",
            "budget": 128,
            "latency_block_ms": 125.0,
            "swap_rate_decode": 0.5,
            "mean_residency": 3.0,
            "expand_mass": 62.0,
            "collapse_mass": 31.0,
            "residency_histogram": "{'3': 2}",
        },
    ]
    return rows + b + run


def test_add_derived_hand_values():
    rows = _rows()
    r = next(x for x in rows if x["doc"] == "a" and x["method"] == "megacontext")
    assert r["delta_nll"] == pytest.approx(0.3)
    assert r["delta_trunc"] == pytest.approx(0.4)
    assert r["recovered"] == pytest.approx(0.25)
    full = next(x for x in rows if x["doc"] == "a" and x["method"] == "full")
    assert full["delta_nll"] == 0.0 and full["recovered"] == pytest.approx(1.0)


def test_report_round_trip(tmp_path):
    tel = [
        {
            "suite": "runtime",
            "method": "megacontext",
            "iteration": i,
            "latency_ms": 10.0 + i,
            "swap_rate": 0.25 * (i % 2),
        }
        for i in range(5)
    ]
    out = write_run(tmp_path / "run", _rows(), tel, {"name": "t", "model": "tiny"})
    rows, tel2, meta = load_run(out)
    assert len(rows) == len(_rows()) and len(tel2) == 5 and meta["model"] == "tiny"
    # missing keys become nulls, list columns survive
    assert rows[0]["token_nll"] == [2.0] * 4 and rows[-1]["token_nll"] is None
    md = (out / "report.md").read_text()
    # budget table: megacontext at W=128, ΔNLL mean over docs a, b = 0.3, recovered 0.25
    line = next(x for x in md.splitlines() if x.startswith("| megacontext | 128 |"))
    assert "+0.300" in line and "0.250" in line
    # boundary: jump = max(|0.5-0.45|, |0.8-0.45|) = 0.35 > 0.2 -> FAIL
    bline = next(x for x in md.splitlines() if x.startswith("| megacontext | 0.500"))
    assert "0.350" in bline and "FAIL" in bline
    assert "**1.25×**" in md
    for png in ("budget_delta_nll.png", "boundary.png", "runtime.png"):
        assert (out / png).read_bytes()[:8] == PNG
        assert f"({png})" in md
    # rebuilding from Parquet alone gives the same report
    (out / "report.md").unlink()
    build_report(out)
    assert (out / "report.md").read_text() == md


def test_nan_recovered_is_reported_as_nan(tmp_path):
    rows = [
        {"suite": "budget", "doc": "a", "budget": 64, "method": m, "entries": 64, "nll": 2.0}
        for m in ("full", "truncation", "megacontext")
    ]
    add_derived(rows, ("suite", "doc", "budget"))
    assert all(math.isnan(r["recovered"]) for r in rows)
    out = write_run(tmp_path / "r", rows)
    line = next(
        x for x in (out / "report.md").read_text().splitlines() if x.startswith("| megacontext")
    )
    assert line.endswith("| NaN |")


def test_load_run_errors(tmp_path):
    with pytest.raises(StorageError, match="no results"):
        load_run(tmp_path)
    (tmp_path / "results.parquet").write_bytes(b"garbage")
    with pytest.raises(StorageError, match="unreadable"):
        load_run(tmp_path)
