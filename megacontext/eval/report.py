"""Evaluation runs on disk and their reports.

A run directory ``artifacts/reports/<name>/`` holds:

- ``results.parquet``: one row per (suite, document, budget, method) with ``nll``,
  ``delta_nll``, ``delta_trunc``, ``recovered``, ``score`` (answer metric) ...;
- ``telemetry.parquet``: the MegaContext sessions' per-iteration telemetry rows;
- ``meta.json``: the command, model, machine, date, sizes;
- ``report.md`` and ``*.png``: rebuilt from the above by :func:`build_report`
  (``megacontext report RUN``), so a report never holds a number its Parquet lacks.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import StorageError
from .ablations import report_section as ablation_section
from .compression import compression_section
from .external import fold_peers
from .metrics import bootstrap_ci, recovered_fraction

__all__ = ["BOUNDARY_BAR", "build_report", "load_run", "write_run"]

BOUNDARY_BAR = 0.2  # the guide: no jump above 0.2 ΔNLL between edge and mid-block
METHOD_ORDER = (
    "full",
    "truncation",
    "streaming",
    "infllm",
    "mc_recency",
    "mc_meanpool",
    "megacontext",
    "baseline",
    "positional_check",
)


def _atomic_bytes(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _clean(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    # pyarrow infers a schema from the first row's keys: give every row every key
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(k for k in r if not k.startswith("_")))
    return [{k: r.get(k) for k in keys} for r in rows]


def write_run(
    out_dir: str | os.PathLike[str],
    rows: Sequence[dict[str, Any]],
    telemetry: Sequence[dict[str, Any]] = (),
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``results.parquet`` (+ ``telemetry.parquet``, ``meta.json``) atomically
    into ``out_dir`` (created) and build the report. Returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(_clean(rows))
    _atomic_bytes(out / "results.parquet", lambda p: pq.write_table(table, p))
    if telemetry:
        tel = pa.Table.from_pylist(_clean(telemetry))
        _atomic_bytes(out / "telemetry.parquet", lambda p: pq.write_table(tel, p))
    text = json.dumps(meta or {}, indent=1, default=str)
    _atomic_bytes(out / "meta.json", lambda p: Path(p).write_text(text))
    build_report(out)
    return out


def load_run(run_dir: str | os.PathLike[str]) -> tuple[list[dict], list[dict], dict]:
    """``(results rows, telemetry rows, meta)`` of a run directory."""
    run = Path(run_dir)
    path = run / "results.parquet"
    if not path.is_file():
        raise StorageError(f"{path}: no results (not an evaluation run)", path=str(path))
    try:
        rows = pq.read_table(path).to_pylist()
        tpath = run / "telemetry.parquet"
        tel = pq.read_table(tpath).to_pylist() if tpath.is_file() else []
    except pa.ArrowInvalid as exc:
        raise StorageError(f"{run}: unreadable Parquet ({exc})", path=str(run)) from None
    mpath = run / "meta.json"
    meta = json.loads(mpath.read_text()) if mpath.is_file() else {}
    return rows, tel, meta


# ------------------------------------------------------------------ formatting


def _f(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "NaN" if isinstance(x, float) else "–"
    if isinstance(x, float):
        return f"{x:+.{nd}f}" if nd < 0 else f"{x:.{nd}f}"
    return str(x)


def _recovered_of_means(rows: list[dict]) -> float:
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
        _mean(_vals(keep, "nll")), _mean(_vals(keep, "nll_trunc")), _mean(_vals(keep, "nll_full"))
    )


def _ci(vals: list[float], seed: int = 0) -> str:
    p, lo, hi = bootstrap_ci(vals, seed=seed)
    if not math.isfinite(p):
        return "NaN"
    if lo == hi:
        return f"{p:+.3f}"
    return f"{p:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _methods(rows: list[dict]) -> list[str]:
    present = {r["method"] for r in rows}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return out


def _by(rows: list[dict], **eq: Any) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in eq.items())]


def _vals(rows: list[dict], key: str) -> list[float]:
    out = []
    for r in rows:
        v = r.get(key)
        if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
            out.append(float(v))
    return out


def _mean(vals: list[float]) -> float:
    return float(np.mean(vals)) if vals else math.nan


# ------------------------------------------------------------------ plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_vs_budget(
    rows: list[dict], key: str, ylabel: str, title: str, path: Path, skip=("full",)
) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    budgets = sorted({r["budget"] for r in rows})
    methods = [m for m in _methods(rows) if m not in skip]
    series = {
        m: [_mean(_vals(_by(rows, method=m, budget=b), key)) for b in budgets] for m in methods
    }
    series = {m: ys for m, ys in series.items() if any(math.isfinite(y) for y in ys)}
    if len(budgets) == 1:
        # one budget: bars per method (a line plot would be a column of dots)
        names = list(series)
        ax.bar(
            range(len(names)),
            [series[m][0] for m in names],
            color=[f"C{i}" for i in range(len(names))],
        )
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, fontsize=8)
        ax.set_xlabel(f"method at budget W = {budgets[0]} entries")
    else:
        styles = ["-", "--", ":", "-."]
        for i, (m, ys) in enumerate(series.items()):
            # distinct markers and dashes so identical series stay visible
            ax.plot(budgets, ys, marker="osD^vx*"[i % 7], ls=styles[i % 4], label=m, alpha=0.85)
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets)
        ax.set_xticklabels([str(b) for b in budgets])
        ax.set_xlabel("budget W (entries)")
        ax.legend(fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if key == "delta_nll":
        ax.axhline(0.0, color="k", lw=0.8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _atomic_bytes(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def _plot_boundary(rows: list[dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    aligns = ["edge", "straddle", "mid"]
    methods = [m for m in _methods(rows) if m != "full"]
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        ys = [_mean(_vals(_by(rows, method=m, align=a), "delta_nll")) for a in aligns]
        ax.bar(np.arange(3) + i * width, ys, width, label=m)
    ax.set_xticks(np.arange(3) + width * (len(methods) - 1) / 2)
    ax.set_xticklabels(aligns)
    ax.set_ylabel("ΔNLL of the pass key vs full context (nats)")
    ax.set_title("needle placement relative to 32-token blocks")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _atomic_bytes(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def _plot_runtime(tel: list[dict], path: Path) -> None:
    plt = _plt()
    rows = [t for t in tel if t.get("suite") == "runtime"]
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8))
    it = [t["iteration"] for t in rows]
    axes[0].plot(it, [t["latency_ms"] for t in rows], marker=".")
    axes[0].set_xlabel("iteration (block)")
    axes[0].set_ylabel("latency per iteration (ms)")
    axes[0].set_title("latency per block")
    axes[1].plot(it, [t["swap_rate"] for t in rows], marker=".", label="swap rate")
    axes[1].axhline(0.25, color="r", ls="--", lw=0.8, label="guide: ≤ 0.25")
    axes[1].set_xlabel("iteration (block)")
    axes[1].set_ylabel("actions per block")
    axes[1].set_title("swap rate")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    _atomic_bytes(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


# ------------------------------------------------------------------ sections


def _nll_section(rows: list[dict], suite: str, title: str, out: Path, lines: list[str]) -> None:
    sr = _by(rows, suite=suite)
    if not sr:
        return
    budgets = sorted({r["budget"] for r in sr})
    has_score = any(r.get("score") is not None for r in sr)
    n_docs = len({r["doc"] for r in sr})
    lines += [f"## {title}", ""]
    lines.append(
        f"{n_docs} documents; ΔNLL@H = NLL(method) − NLL(full context) in nats, mean over "
        "documents with a 95% bootstrap interval (2,000 resamples, seed 0); `recovered` = "
        "(NLL_trunc − NLL_m)/(NLL_trunc − NLL_full) of the mean NLLs over documents, NaN "
        "where truncation loses < 0.01 nats."
    )
    lines.append("")
    header = ["method", "W", "entries", "NLL@H", "ΔNLL@H [95% CI]", "recovered"]
    if has_score:
        header.append("score")
    body = []
    for b in budgets:
        for m in _methods(sr):
            g = _by(sr, method=m, budget=b)
            if not g:
                continue
            row = [
                m,
                str(b),
                f"{_mean(_vals(g, 'entries')):.0f}",
                f"{_mean(_vals(g, 'nll')):.3f}",
                _ci(_vals(g, "delta_nll")),
                _f(_recovered_of_means(g)),
            ]
            if has_score:
                row.append(_f(_mean(_vals(g, "score"))))
            body.append(row)
    lines += [*_table(header, body), ""]
    for m in ("mc_recency", "mc_meanpool", "megacontext"):
        acts = _vals(_by(sr, method=m), "focus_actions")
        if acts:
            lines.append(
                f"- `{m}`: {int(sum(acts))} focus actions (expand/collapse) at ingest over "
                f"{len(acts)} rows."
            )
    if any(r.get("focus_actions") is not None for r in sr):
        lines.append("")
    png = f"{suite}_delta_nll.png"
    _plot_vs_budget(sr, "delta_nll", "ΔNLL@H vs full context (nats)", title, out / png)
    lines += [f"![ΔNLL vs budget, {suite}]({png})", ""]
    if has_score:
        png = f"{suite}_score.png"
        _plot_vs_budget(sr, "score", "answer score", f"{title}: answers", out / png, skip=())
        lines += [f"![answer score vs budget, {suite}]({png})", ""]


def _boundary_section(rows: list[dict], out: Path, lines: list[str]) -> None:
    br = _by(rows, suite="boundary")
    if not br:
        return
    lines += ["## Boundary diagnostics", ""]
    lines.append(
        "The same pass key (same seed, same filler) with its digits starting at a block "
        "edge, straddling a block boundary, or centred in a block. `jump` = the largest "
        "|ΔNLL(placement) − ΔNLL(mid)| over seeds; the guide's bar is ≤ "
        f"{BOUNDARY_BAR} nats."
    )
    lines.append("")
    body = []
    for m in _methods(br):
        if m == "full":
            continue
        per = {
            a: _mean(_vals(_by(br, method=m, align=a), "delta_nll"))
            for a in ("edge", "straddle", "mid")
        }
        jumps = []
        for seed in sorted({r["seed"] for r in br}):
            mid = _vals(_by(br, method=m, align="mid", seed=seed), "delta_nll")
            for a in ("edge", "straddle"):
                v = _vals(_by(br, method=m, align=a, seed=seed), "delta_nll")
                if mid and v:
                    jumps.append(abs(v[0] - mid[0]))
        jump = max(jumps) if jumps else math.nan
        verdict = "PASS" if math.isfinite(jump) and jump <= BOUNDARY_BAR else "FAIL"
        body.append([m, _f(per["edge"]), _f(per["straddle"]), _f(per["mid"]), _f(jump), verdict])
    lines += _table(["method", "ΔNLL edge", "ΔNLL straddle", "ΔNLL mid", "jump", "bar ≤ 0.2"], body)
    lines += ["", "![boundary](boundary.png)", ""]
    _plot_boundary(br, out / "boundary.png")


def _runtime_section(rows: list[dict], tel: list[dict], out: Path, lines: list[str]) -> None:
    rr = _by(rows, suite="runtime")
    if not rr:
        return
    lines += ["## Runtime and stability", ""]
    base = _by(rr, method="baseline")
    mcr = _by(rr, method="megacontext")
    body = []
    for r in base + mcr:
        body.append(
            [
                r["method"],
                str(r.get("budget")),
                f"{r['latency_block_ms']:.1f}",
                _f(r.get("swap_rate_decode")),
                _f(r.get("mean_residency"), 2),
                _f(r.get("expand_mass"), 0),
                _f(r.get("collapse_mass"), 0),
            ]
        )
    lines += _table(
        [
            "method",
            "W",
            "latency/block (ms)",
            "swaps/block",
            "mean residency",
            "expand mass",
            "collapse mass",
        ],
        body,
    )
    if base and mcr:
        ratio = mcr[0]["latency_block_ms"] / base[0]["latency_block_ms"]
        lines += [
            "",
            f"Latency per block, MegaContext / frozen baseline (last W tokens, plain KV "
            f"cache): **{ratio:.2f}×** (the guide's bar: ≤ 1.10× at 8k active tokens; this "
            f"run uses W = {mcr[0]['budget']} on the CPU).",
        ]
        if mcr[0].get("residency_histogram"):
            lines += ["", f"Residency histogram (steps: actions): {mcr[0]['residency_histogram']}"]
    pc = _by(rr, method="positional_check")
    if pc:
        p = pc[0]
        lines += [
            "",
            f"Positional consistency (exact KV mode, a random scorer forcing swaps): "
            f"{p.get('refocus_checked')} refocus states checked after {p.get('actions')} "
            f"actions, {p.get('gists_checked')} gist entries; every position equals its span "
            f"centre and the cached layer-0 keys match RoPE at it (max |Δk| = "
            f"{p.get('max_key_err', math.nan):.2e}).",
        ]
    lines.append("")
    if tel and _by(tel, suite="runtime"):
        _plot_runtime(tel, out / "runtime.png")
        lines += ["![runtime](runtime.png)", ""]


def build_report(run_dir: str | os.PathLike[str]) -> Path:
    """(Re)build ``report.md`` and its PNGs from the run's Parquet files."""
    run = Path(run_dir)
    rows, tel, meta = load_run(run)
    rows, peer_lines = fold_peers(run, rows, meta)  # RUN/peers/*.parquet (external peers)
    lines = [f"# Evaluation report: {meta.get('name', run.name)}", ""]
    for key in (
        "command",
        "model",
        "system",
        "size",
        "machine",
        "date",
        "torch",
        "memory",
        "notes",
    ):
        if key in meta:
            lines.append(f"- **{key}**: {meta[key]}")
    lines.append("")
    lines += peer_lines
    _nll_section(rows, "budget", "ΔNLL vs budget (held-out code and prose)", run, lines)
    _nll_section(rows, "needle", "Needle in a haystack (answer NLL, retrieval)", run, lines)
    _nll_section(rows, "longbench", "LongBench (gold answer NLL, answer metric)", run, lines)
    _boundary_section(rows, run, lines)
    _runtime_section(rows, tel, run, lines)
    compression_section(rows, run, lines)
    ablation_section(rows, tel, run, lines)
    path = run / "report.md"
    text = "\n".join(lines)
    _atomic_bytes(path, lambda p: Path(p).write_text(text))
    return path
