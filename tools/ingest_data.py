"""``python -m tools.ingest_data SOURCES... --out DIR``: the older spelling of
``megacontext ingest`` (text sources -> token shards, see ``docs/data.md``)."""

from __future__ import annotations

import sys

from megacontext.cli import run_alias


def main(argv: list[str] | None = None) -> int:
    return run_alias(["ingest"], argv)


if __name__ == "__main__":
    sys.exit(main())
