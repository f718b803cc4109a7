"""The CPU demonstration: train, and measure validation Loss@H at a fixed budget.

    python -m megacontext.train.demo CONFIG --text-shards DIR --synthetic-shards DIR \
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

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..base import load_base
from ..data import ShardDataset
from ..eval.peers import full_view, mc_view, truncation_view, view_nll
from ..runtime import MegaContext
from .config import load_train_config
from .trainer import Trainer

__all__ = ["baseline_nlls", "held_out_sets", "main", "system_nlls"]


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megacontext.train.demo")
    p.add_argument("config")
    p.add_argument("--text-shards", required=True)
    p.add_argument("--synthetic-shards", required=True)
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--out", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)

    cfg = load_train_config(args.config, args.overrides)
    mc_cfg = cfg.mc_config().replace(w_max=args.budget)
    base = load_base(cfg.model, device=cfg.device)
    sets = held_out_sets(cfg, args.text_shards, args.synthetic_shards, args.windows, args.budget)
    results: dict[str, Any] = {
        "config": cfg.dump(),
        "budget": args.budget,
        "history": cfg.data.history,
        "windows": {k: len(v) for k, v in sets.items()},
        "threads": torch.get_num_threads(),
        "stages": {},
    }
    t0 = time.perf_counter()
    for stage, row in baseline_nlls(base, sets, args.budget).items():
        results["stages"][stage] = {name: float(np.mean(v)) for name, v in row.items()}
    eval_time = [time.perf_counter() - t0]

    def evaluate(stage: str, gistnet: Any, lensnet: Any) -> None:
        t = time.perf_counter()
        system = MegaContext(base, gistnet, lensnet, mc_cfg)
        row = {
            name: float(np.mean(v)) for name, v in system_nlls(system, sets, args.budget).items()
        }
        results["stages"][stage] = row
        eval_time[0] += time.perf_counter() - t
        print(f"{stage}: {row}", flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))

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
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    full = results["stages"]["full"]
    print(f"\nW = {args.budget}, history = {cfg.data.history}, windows = {results['windows']}")
    print("| stage | ordinary NLL | ΔNLL vs full | long-range NLL | ΔNLL vs full |")
    print("|---|---|---|---|---|")
    for stage, row in results["stages"].items():
        cells = []
        for name in ("ordinary", "long_range"):
            v = row.get(name, float("nan"))
            cells += [f"{v:.4f}", f"{v - full.get(name, float('nan')):+.4f}"]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    print(f"training {results['train_seconds']:.0f} s, evaluation {results['eval_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
