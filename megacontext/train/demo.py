"""The CPU demonstration: train, and measure validation Loss@H at a fixed budget.

    megacontext demo train CONFIG --text-shards DIR --synthetic-shards DIR \
        [--windows N] [--budget W] [--out FILE.json] [--set key=value ...]

Held-out histories of ``data.history`` tokens: *ordinary* text (random windows of the
validation split of ``--text-shards``, the next ``H`` tokens as targets) and
*long-range* targets (validation documents of ``--synthetic-shards`` whose needle
lies inside the history but before its last ``W`` tokens; the history is the
``data.history`` context tokens before the target, the target tokens are scored).
For each: the full-context model and plain truncation to the last ``W`` tokens
(frozen base), and MegaContext at ``w_max = W`` (a real session: ingest, LensNet,
allocator; the NLL of the targets read after its working context) for the untrained
start (mean-pool gists, recency focus), after the warm start, and after each cycle.
Results (mean NLL in nats, ΔNLL against the full-context model) go to ``--out``
and a Markdown table to stdout; training wall time excludes the evaluations.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._atomic import atomic_write_text
from ..base import load_base
from ..data import ShardDataset
from ..eval.peers import full_view, mc_view, truncation_view, view_nll
from ..runtime import MegaContext
from .config import load_train_config
from .trainer import Trainer

__all__ = ["baseline_nlls", "format_demo", "held_out_sets", "run_demo", "system_nlls"]


def _histories(cfg: Any, text_dir: str, synth_dir: str, n: int, budget: int, horizon: int):
    T = cfg.data.history
    text = ShardDataset(text_dir, "validation").sample_windows(T + horizon, n, seed=12345)
    ordinary = [(w[:T], w[T:]) for w in text]
    synth = ShardDataset(synth_dir, "validation")
    long_range = []
    for i in range(len(synth)):
        ids, info = synth.doc(i)
        meta = info["meta"]
        c = int(meta["context_tokens"])
        start = c - T
        lo, hi = meta["needle_span"]
        if start >= 0 and start <= lo and hi <= c - budget:
            long_range.append((torch.as_tensor(ids[start:c]), torch.as_tensor(ids[c:])))
        if len(long_range) == n:
            break
    return {"ordinary": ordinary, "long_range": long_range}


def _nll(base: Any, view: Any, targets: torch.Tensor) -> float:
    return float(view_nll(base, view, targets).mean())


def held_out_sets(
    cfg: Any, text_dir: str, synth_dir: str, n: int, budget: int
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``{"ordinary": [(history, targets)], "long_range": [...]}``, ``n`` per set (see the
    module doc); histories of ``cfg.data.history`` tokens, targets of up to ``H``."""
    return _histories(cfg, text_dir, synth_dir, n, budget, cfg.mc_config().horizon)


def baseline_nlls(base: Any, sets: dict[str, Any], budget: int) -> dict[str, dict[str, list]]:
    """Per-item mean target NLL (nats) of the frozen ``base`` reading the full history
    and its last ``budget`` tokens: ``{"full": {set: [..]}, "truncation": {set: [..]}}``."""
    out: dict[str, dict[str, list]] = {"full": {}, "truncation": {}}
    for name, items in sets.items():
        out["full"][name] = [_nll(base, full_view(base, h), t) for h, t in items]
        out["truncation"][name] = [
            _nll(base, truncation_view(base, h, budget), t) for h, t in items
        ]
    return out


def system_nlls(system: Any, sets: dict[str, Any], budget: int) -> dict[str, list[float]]:
    """Per-item mean target NLL (nats) after a real MegaContext session of ``system`` at
    ``w_max = budget`` over each history: ``{set: [..]}``."""
    return {
        name: [_nll(system.base, mc_view(system, h, budget), tg) for h, tg in items]
        for name, items in sets.items()
    }


def run_demo(
    config: str | Path,
    text_shards: str,
    synthetic_shards: str,
    *,
    windows: int = 6,
    budget: int = 512,
    out: str | Path | None = None,
    overrides: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``config`` and measure the held-out NLLs (see the module doc) for the
    frozen references, the untrained start, the warm start and each cycle. Returns
    (and writes to ``out`` after every stage) ``{"config", "budget", "history",
    "windows", "threads", "stages": {stage: {set: mean NLL}}, "train_seconds",
    "eval_seconds"}``."""
    cfg = load_train_config(config, list(overrides or []))
    mc_cfg = cfg.mc_config().replace(w_max=budget)
    base = load_base(cfg.model, device=cfg.device)
    sets = held_out_sets(cfg, text_shards, synthetic_shards, windows, budget)
    results: dict[str, Any] = {
        "config": cfg.dump(),
        "budget": budget,
        "history": cfg.data.history,
        "windows": {k: len(v) for k, v in sets.items()},
        "threads": torch.get_num_threads(),
        "stages": {},
    }

    def save() -> None:
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out, json.dumps(results, indent=1))

    t0 = time.perf_counter()
    for stage, row in baseline_nlls(base, sets, budget).items():
        results["stages"][stage] = {name: float(np.mean(v)) for name, v in row.items()}
    eval_time = [time.perf_counter() - t0]

    def evaluate(stage: str, gistnet: Any, lensnet: Any) -> None:
        t = time.perf_counter()
        system = MegaContext(base, gistnet, lensnet, mc_cfg)
        row = {name: float(np.mean(v)) for name, v in system_nlls(system, sets, budget).items()}
        results["stages"][stage] = row
        eval_time[0] += time.perf_counter() - t
        log(f"{stage}: {row}")
        save()

    evaluate("untrained", None, None)

    def hook(trainer: Trainer, phase: str, cycle: int) -> None:
        if phase == "warm-lens":
            evaluate("warm start", trainer.gistnet, trainer.lensnet)
        elif phase == "b3":
            evaluate(f"cycle {cycle}", trainer.gistnet, trainer.lensnet)

    t1 = time.perf_counter()
    e0 = eval_time[0]
    Trainer(cfg, base=base, hooks=[hook]).run()
    results["train_seconds"] = time.perf_counter() - t1 - (eval_time[0] - e0)
    results["eval_seconds"] = eval_time[0]
    save()
    return results


def format_demo(results: dict[str, Any]) -> str:
    """The Markdown summary of a :func:`run_demo` result (NLL and ΔNLL vs full per set)."""
    full = results["stages"]["full"]
    lines = [
        f"W = {results['budget']}, history = {results['history']}, "
        f"windows = {results['windows']}",
        "| stage | ordinary NLL | ΔNLL vs full | long-range NLL | ΔNLL vs full |",
        "|---|---|---|---|---|",
    ]
    for stage, row in results["stages"].items():
        cells = []
        for name in ("ordinary", "long_range"):
            v = row.get(name, float("nan"))
            cells += [f"{v:.4f}", f"{v - full.get(name, float('nan')):+.4f}"]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append(
        f"training {results['train_seconds']:.0f} s, evaluation {results['eval_seconds']:.0f} s"
    )
    return "\n".join(lines)


if __name__ == "__main__":  # the older spelling of `megacontext demo train`
    from megacontext.cli import run_alias

    raise SystemExit(run_alias(["demo", "train"], "python -m megacontext.train.demo"))
