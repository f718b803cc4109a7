"""Loss curves of the GistNet pretraining runs recorded under a results folder.

Reads ``<dir>/<name>-iterations.parquet`` (per-step rows the trainer's telemetry
wrote: ``loss``, ``lr``, ``latency_ms``, ...; copied out of
``artifacts/telemetry/<run>/iterations/``), prints per run the step count, the mean
loss of the first and last 32 steps and the median seconds per step, and writes
``loss.png`` (loss per step and its 32-step running mean). ``--steps N`` cuts every
run to its first N steps: runs of one config and seed read the same windows step by
step, so their means over the same steps compare like for like::

    uv run python bench/gist_training_summary.py docs/results/2026-12-04-gist-training
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from megacontext.eval.tables import pyplot, save_figure


def main(folder: Path, steps: int | None = None) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for path in sorted(folder.glob("*-iterations.parquet")):
        name = path.name.removesuffix("-iterations.parquet")
        rows = pq.read_table(path).to_pylist()[:steps]
        loss = np.array([r["loss"] for r in rows])
        sec = np.array([r["latency_ms"] for r in rows]) / 1e3
        k = min(32, len(loss))
        print(
            f"{name}: {len(loss)} steps; mean loss first {k} {loss[:k].mean():.3f}, "
            f"last {k} {loss[-k:].mean():.3f}; median {np.median(sec):.2f} s/step"
        )
        line = ax.plot(loss, alpha=0.3)[0]
        run = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k - 1, len(loss)), run, color=line.get_color(), label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("KL(full || region as gists), nats")
    ax.legend()
    save_figure(fig, folder / ("loss.png" if steps is None else f"loss-{steps}.png"))


if __name__ == "__main__":
    args = sys.argv[1:]
    n = int(args[args.index("--steps") + 1]) if "--steps" in args else None
    main(Path(args[0]), n)
