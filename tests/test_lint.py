"""CI runs the project's lint (ruff + black) through the test suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_code_base_is_lint_clean():
    proc = subprocess.run(
        [sys.executable, "-m", "tools.lint"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
