"""``python -m tools.label_dnll CONFIG ...``: the older spelling of ``megacontext label``
(counterfactual ΔNLL / ΔKL labels on on-policy snapshots, see ``docs/training.md``)."""

from __future__ import annotations

import sys

from megacontext.cli import run_alias


def main(argv: list[str] | None = None) -> int:
    return run_alias(["label"], argv)


if __name__ == "__main__":
    sys.exit(main())
