"""Shared runner for the format/lint wrappers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the project lints and formats (never the venv or build outputs).
TARGETS = ["megacontext", "tests", "bench", "tools"]


def run(commands: list[list[str]]) -> int:
    """Run each ``python -m <tool> ...`` command from the repo root; worst exit code wins."""
    status = 0
    targets = [t for t in TARGETS if (ROOT / t).exists()]
    for cmd in commands:
        full = [sys.executable, "-m", *cmd, *targets]
        print("+", " ".join(full[2:]), flush=True)
        rc = subprocess.call(full, cwd=ROOT)
        status = max(status, rc)
    return status
