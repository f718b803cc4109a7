"""Counterfactual ΔNLL / ΔKL labels on on-policy snapshots, written as Parquet.

    python -m tools.label_dnll CONFIG [--checkpoint DIR] [--windows N] [--cycle C]
                               [--set key=value ...]

Builds the modules of the training config ``CONFIG`` (or loads them from a training
checkpoint directory), rolls the focus policy out over ``N`` training windows, labels
every legal expand / collapse candidate of every snapshot (batched) and writes
``<artifacts>/deltas/<run>/cycle<C>-label.parquet``. The schema is
``megacontext.train.labels.LABEL_COLUMNS`` (docs/training.md).
"""

from __future__ import annotations

import argparse
import sys

from megacontext.errors import MegaContextError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.label_dnll", description=__doc__.split("\n")[0]
    )
    parser.add_argument("config", help="training config YAML (configs/train-*.yaml)")
    parser.add_argument("--checkpoint", help="a checkpoint directory to label with")
    parser.add_argument("--windows", type=int, help="windows to roll out (default: label_windows)")
    parser.add_argument("--cycle", type=int, default=0, help="cycle number written in the table")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    from megacontext.train import Trainer, load_train_config

    try:
        overrides = list(args.overrides)
        if args.windows is not None:
            overrides.append(f"label_windows={args.windows}")
        cfg = load_train_config(args.config, overrides)
        trainer = Trainer(cfg)
        if args.checkpoint:
            trainer.load_state(args.checkpoint)
        items = trainer.make_labels(0, args.cycle, with_lens=True, tag="label")
    except MegaContextError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = [r for *_, rs in items for r in rs]
    out = trainer.deltas_dir / f"cycle{args.cycle}-label.parquet"
    if not rows:
        print(f"no legal candidates in {len(items)} snapshots; nothing written", file=sys.stderr)
        return 1
    pos = sum(r["utility"] > 0 for r in rows)
    print(f"{out}: {len(rows)} candidates from {len(items)} snapshots ({pos} with utility > 0)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
