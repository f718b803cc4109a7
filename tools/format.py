"""``python -m tools.format``: ruff's import sort and autofixes, then black."""

from __future__ import annotations

import sys

from tools._run import run


def main() -> int:
    return run([["ruff", "check", "--fix", "--quiet"], ["black", "--quiet"]])


if __name__ == "__main__":
    sys.exit(main())
