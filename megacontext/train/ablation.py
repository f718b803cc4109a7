"""The training ablation: freeze one module, train one cycle, measure the drop.

    megacontext train-ablation CONFIG --text-shards DIR --synthetic-shards DIR \
        [--windows N] [--budget W] [--variants all,freeze-gistnet,...] [--out FILE.json] \
        [--set key=value ...] [--no-reuse]

Each variant trains one cycle (warm start, then B1 -> B2 -> B3) of ``CONFIG`` with
``cycles=1`` and its overrides (:data:`VARIANTS`); freezing a module sets the steps of
every phase that trains it to 0, so the module keeps its initialisation (GistNet:
``warm_gist`` and ``b1``; LensNet: ``warm_lens`` and ``b2``; LoRA: ``b3``, and the base
model then carries no adapter). ``causal-lensnet`` trains the causal LensNet
(``lensnet.causal=true``, the focus ablation's variant). The run of variant ``v`` is
``<run>-abl-<v>`` under ``<artifacts>/checkpoints/``; an interrupted command resumes
every run after its newest complete checkpoint, and variants already evaluated in
``--out`` (same checkpoint, sets and budget) are not evaluated again.

Only the final checkpoint of each variant is evaluated, on the held-out sets of the
CPU demonstration (:func:`megacontext.train.demo.held_out_sets`: ordinary text and
long-range targets, ``--windows`` each): mean target NLL after a MegaContext session
at ``w_max = W``, ΔNLL against the frozen base reading the full history and against
truncation to the last ``W`` tokens, and ``drop`` = NLL(variant) − NLL(``all``) with
the standard error of that paired difference over the held-out items.

Reuse: a variant whose training is, phase for phase, the prefix of another variant's
run (same config apart from the run name, ``cycles`` and output paths; every phase up
to the variant's last phase with steps identical; trained with the same number of
torch threads, since the thread count changes summation order and so the low bits of
every step) is not trained again; that checkpoint is evaluated and named in
``reused_from`` (e.g. ``freeze-lora`` is ``all`` before its B3). A checkpoint whose
LoRA was injected but not yet trained counts as a variant without LoRA: PEFT
initialises one factor of each adapter to zero, so the adapter adds exactly zero.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._atomic import atomic_write_text
from ..base import load_base
from ..errors import ConfigError
from .checkpoint import COMPLETE, latest_checkpoint, load_checkpoint, read_trainer_state
from .config import load_train_config
from .demo import baseline_nlls, held_out_sets, system_nlls
from .trainer import Trainer

__all__ = [
    "VARIANTS",
    "equivalent_checkpoint",
    "format_table",
    "run_ablation",
    "train_variant",
    "variant_config",
]

# Each variant: the config overrides on top of the run's config (always ``cycles=1``).
VARIANTS: dict[str, list[str]] = {
    "all": [],
    "freeze-gistnet": ["warm_gist.steps=0", "b1.steps=0"],
    "freeze-lensnet": ["warm_lens.steps=0", "b2.steps=0"],
    "freeze-lora": ["b3.steps=0"],
    "causal-lensnet": ["lensnet.causal=true"],
}

_PHASES = ("warm-gist", "warm-lens", "b1", "b2", "b3")
# fields that name outputs or the plan's length, not what a phase computes
_NEUTRAL = {"run", "cycles", "artifacts", "runs_dir", *(p.replace("-", "_") for p in _PHASES)}
SETS = ("ordinary", "long_range")


def _plan(cycles: int) -> list[tuple[str, int]]:
    # the trainer's plan (Trainer.plan)
    return [("warm-gist", 0), ("warm-lens", 0)] + [
        (p, c) for c in range(1, cycles + 1) for p in ("b1", "b2", "b3")
    ]


def variant_config(config: str, variant: str, overrides: list[str] | None = None) -> Any:
    """The :class:`~megacontext.train.config.TrainConfig` of ``variant``: ``config`` with
    ``overrides``, then ``cycles=1``, ``run=<run>-abl-<variant>`` and the variant's own."""
    if variant not in VARIANTS:
        raise ConfigError(
            f"unknown ablation variant {variant!r} (known: {', '.join(VARIANTS)})",
            field="variants",
            value=variant,
        )
    run = load_train_config(config, list(overrides or [])).run
    extra = ["cycles=1", f"run={run}-abl-{variant}", *VARIANTS[variant]]
    return load_train_config(config, [*(overrides or []), *extra])


def _optim(cfg: Any, phase: str) -> Any:
    return getattr(cfg, phase.replace("-", "_"))


def _steps(cfg: Any, phase: str) -> int:
    return int(_optim(cfg, phase).steps)


def _comparable(cfg: Any) -> dict[str, Any]:
    return {k: v for k, v in cfg.dump().items() if k not in ("artifacts", "runs_dir")}


def equivalent_checkpoint(cfg: Any, runs: list[str], threads: int | None = None) -> Path | None:
    """A complete checkpoint of one of ``runs`` (under ``cfg.artifacts``) that ends
    exactly the training ``cfg`` describes, or ``None``.

    ``cfg`` must have ``cycles=1``. Its training is its plan up to the last phase with
    steps (later phases do nothing). A run's checkpoint at that plan index matches when
    its saved config agrees with ``cfg`` on every field except the run name, ``cycles``
    and output paths, on every phase config of the prefix, and, when ``cfg`` trains no
    LoRA (``b3.steps=0``) while the run does, the checkpoint precedes the run's first
    B3 (its adapter is still the exact-zero initialisation). With ``threads``, only runs
    that :func:`train_variant` recorded as trained with that many torch threads count."""
    if cfg.cycles != 1:
        raise ConfigError(f"equivalent_checkpoint: cycles={cfg.cycles}, expected 1", "cycles")
    trained = [i for i, (p, _) in enumerate(_plan(1)) if _steps(cfg, p) > 0]
    if not trained:
        return None
    last = trained[-1]
    mine = cfg.dump()
    if cfg.b3.steps == 0:  # no adapter: its config is irrelevant
        mine.pop("lora")
    for run in runs:
        root = Path(cfg.artifacts) / "checkpoints" / run
        if run == cfg.run or not root.is_dir():
            continue
        if threads is not None and _timing(cfg, run).get("threads") != threads:
            continue
        for d in sorted(root.iterdir()):
            if not (d / COMPLETE).is_file():
                continue
            other = load_train_config(d / "config.yaml")
            plan = _plan(other.cycles)
            if len(plan) <= last or d.name != "cycle{1}-{0}".format(*plan[last]):
                continue
            theirs = other.dump()
            if cfg.b3.steps == 0:
                theirs.pop("lora")
            if any(mine[k] != theirs[k] for k in mine if k not in _NEUTRAL):
                continue
            if any(_optim(cfg, p) != _optim(other, p) for p, _ in plan[: last + 1]):
                continue
            return d
    return None


def train_variant(cfg: Any, base: Any = None) -> dict[str, Any]:
    """Train (or resume) the run ``cfg``; returns ``{"checkpoint", "train_seconds"}``.

    Wall seconds accumulate over resumed segments in
    ``<artifacts>/ablation/<run>.train.json``, with the torch thread count (a resumed
    segment under another count records ``threads: null``)."""
    old = _timing(cfg, cfg.run)
    n = torch.get_num_threads()
    threads = n if old.get("threads", n) == n else None
    t0 = time.perf_counter()
    result = Trainer(cfg, base=base).run(resume=True)
    spent = old.get("train_seconds", 0.0) + time.perf_counter() - t0
    path = Path(cfg.artifacts) / "ablation" / f"{cfg.run}.train.json"
    _write_json(path, {"run": cfg.run, "train_seconds": spent, "threads": threads})
    return {"checkpoint": Path(result["checkpoint"]), "train_seconds": spent}


def _timing(cfg: Any, run: str) -> dict[str, Any]:
    path = Path(cfg.artifacts) / "ablation" / f"{run}.train.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _finished(cfg: Any) -> Path | None:
    """The final checkpoint of the run ``cfg`` if it is complete (``None``: not yet);
    a checkpoint written under another config is an error, not a result."""
    last = latest_checkpoint(Path(cfg.artifacts) / "checkpoints" / cfg.run)
    if last is None:
        return None
    saved = load_train_config(last / "config.yaml")
    if _comparable(saved) != _comparable(cfg):
        diff = sorted(k for k, v in _comparable(cfg).items() if _comparable(saved).get(k) != v)
        raise ConfigError(
            f"{last}: checkpoint of run {cfg.run!r} was trained with another config "
            f"(fields {', '.join(diff)}); remove it or rename the run",
            field=diff[0],
        )
    if int(read_trainer_state(last)["done"]) == len(_plan(cfg.cycles)):
        return last
    return None


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1))


def _deltas(results: dict[str, Any]) -> None:
    """Fill ΔNLL vs full / truncation / ``all`` (paired, with standard error)."""
    base = results["baselines"]
    ref = results["variants"].get("all")
    for row in results["variants"].values():
        row["mean"] = {s: float(np.mean(row["nll"][s])) for s in SETS}
        row["delta_full"] = {s: row["mean"][s] - float(np.mean(base["full"][s])) for s in SETS}
        row["delta_truncation"] = {
            s: row["mean"][s] - float(np.mean(base["truncation"][s])) for s in SETS
        }
        if ref is None:
            continue
        row["drop"], row["drop_se"] = {}, {}
        for s in SETS:
            d = np.asarray(row["nll"][s]) - np.asarray(ref["nll"][s])
            row["drop"][s] = float(d.mean())
            row["drop_se"][s] = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else None


def run_ablation(
    config: str,
    text_shards: str,
    synthetic_shards: str,
    variants: list[str],
    windows: int = 5,
    budget: int = 512,
    overrides: list[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    reuse: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """Train (or reuse) and evaluate every variant; returns (and writes to ``out`` after
    each variant) ``{"baselines", "variants": {name: {"nll", "mean", "delta_full",
    "delta_truncation", "drop", "drop_se", "checkpoint", "reused_from",
    "train_seconds", "eval_seconds"}}, ...}``; NLLs are per held-out item, nats."""
    cfgs = {v: variant_config(config, v, overrides) for v in variants}  # names checked first
    cfg0 = load_train_config(config, list(overrides or []))
    base = load_base(cfg0.model, device=cfg0.device)
    sets = held_out_sets(cfg0, text_shards, synthetic_shards, windows, budget)
    setup = {
        "config": config,
        "overrides": list(overrides or []),
        "budget": budget,
        "history": cfg0.data.history,
        "windows": {k: len(v) for k, v in sets.items()},
        "text_shards": text_shards,
        "synthetic_shards": synthetic_shards,
    }
    prior: dict[str, Any] = {}
    if out is not None and Path(out).is_file():
        old = json.loads(Path(out).read_text())
        if all(old.get(k) == v for k, v in setup.items()):
            prior = old
    results: dict[str, Any] = {
        **setup,
        "threads": torch.get_num_threads(),
        "baselines": prior.get("baselines"),
        "variants": {},
    }
    if results["baselines"] is None:
        n = sum(len(v) for v in sets.values())
        log(f"baselines: full context and truncation to {budget} over {n} held-out items")
        results["baselines"] = baseline_nlls(base, sets, budget)

    def save() -> None:
        _deltas(results)
        if out is not None:
            _write_json(Path(out), results)

    save()
    names = [f"{cfg0.run}-abl-{v}" for v in VARIANTS]
    threads = torch.get_num_threads()
    for v, cfg in cfgs.items():
        row: dict[str, Any] = {"run": cfg.run, "overrides": VARIANTS[v], "reused_from": None}
        ckpt = _finished(cfg)
        if ckpt is not None:
            row["train_seconds"] = _timing(cfg, cfg.run).get("train_seconds")
            row["train_threads"] = _timing(cfg, cfg.run).get("threads")
        else:
            ckpt = equivalent_checkpoint(cfg, names, threads) if reuse else None
            if ckpt is not None:
                row["reused_from"] = str(ckpt)
                row["train_seconds"] = row["train_threads"] = None
                log(f"{v}: same training as {ckpt}, reused")
            else:
                log(f"{v}: training {cfg.run}")
                trained = train_variant(cfg, base=load_base(cfg.model, device=cfg.device))
                ckpt, row["train_seconds"] = trained["checkpoint"], trained["train_seconds"]
                row["train_threads"] = _timing(cfg, cfg.run).get("threads")
        row["checkpoint"] = str(ckpt)
        done = prior.get("variants", {}).get(v)
        if done is not None and done.get("checkpoint") == row["checkpoint"]:
            row["nll"], row["eval_seconds"] = done["nll"], done["eval_seconds"]
        else:
            t0 = time.perf_counter()
            log(f"{v}: evaluating {ckpt} at w_max = {budget}")
            # a fresh base per checkpoint: its LoRA adapter is injected in place
            system = load_checkpoint(ckpt, base=load_base(cfg.model, device=cfg.device))
            row["nll"] = system_nlls(system, sets, budget)
            row["eval_seconds"] = time.perf_counter() - t0
        results["variants"][v] = row
        save()
        log(f"{v}: " + ", ".join(f"{s} {np.mean(row['nll'][s]):.4f}" for s in SETS))
    return results


def format_table(results: dict[str, Any]) -> str:
    """The Markdown table of a :func:`run_ablation` result."""
    b = results["baselines"]

    def cell(x: float | None, sign: bool = True) -> str:
        if x is None:
            return "—"
        return f"{x:+.4f}" if sign else f"{x:.4f}"

    lines = [
        "| variant | ordinary NLL | Δ vs full | Δ vs trunc. | drop vs all (± s.e.) "
        "| long-range NLL | Δ vs full | Δ vs trunc. | drop vs all (± s.e.) | training s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("full", "truncation"):
        cells = []
        for s in SETS:
            m = float(np.mean(b[name][s]))
            cells += [
                cell(m, False),
                cell(m - float(np.mean(b["full"][s]))),
                cell(m - float(np.mean(b["truncation"][s]))),
                "",
            ]
        label = "full context" if name == "full" else f"truncation to {results['budget']}"
        lines.append(f"| {label} | " + " | ".join(cells) + " | |")
    for v, row in results["variants"].items():
        cells = []
        for s in SETS:
            drop = row.get("drop", {}).get(s)
            se = row.get("drop_se", {}).get(s)
            d = "—" if drop is None else cell(drop) + ("" if se is None else f" ± {se:.4f}")
            cells += [
                cell(row["mean"][s], False),
                cell(row["delta_full"][s]),
                cell(row["delta_truncation"][s]),
                d,
            ]
        t = row.get("train_seconds")
        t_cell = "reused" if row.get("reused_from") else ("—" if t is None else f"{t:.0f}")
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {t_cell} |")
    return "\n".join(lines)


if __name__ == "__main__":  # the older spelling of `megacontext train-ablation`
    from megacontext.cli import run_alias

    raise SystemExit(run_alias(["train-ablation"], "python -m megacontext.train.ablation"))
