"""``python -m tools.lint``: ruff lint plus black's check; non-zero exit on any finding."""

from __future__ import annotations

import sys

from tools._run import run


def main() -> int:
    return run([["ruff", "check"], ["black", "--check", "--quiet"]])


if __name__ == "__main__":
    sys.exit(main())
