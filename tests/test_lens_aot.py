"""The LensNet kernels compile for real GPUs, without one (ahead of time).

The interpreter tests check the kernels' arithmetic but not that Triton can lower
them for a GPU (layouts, tl.reshape, dot shapes) or that they fit in shared memory.
Triton compiles for a named target without a device, down to the cubin (it ships its
own ptxas), so this runs in CI: a subprocess without ``TRITON_INTERPRET`` compiles
every kernel with the tile sizes its launcher would use (``launch_meta``) at LensNet's
shapes and checks the shared memory against the per-block limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megacontext.kernels import lens_stage1 as s1, lens_stage2 as s2
from megacontext.kernels._dispatch import tl_dtype

archs, dtypes = json.loads(sys.argv[1]), json.loads(sys.argv[2])
SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

def build(fn, types, meta, arch):
    meta = dict(meta)
    warps = meta.pop("num_warps", 4)
    sig = {n: ("constexpr" if n in meta else types.get(n, "i32")) for n in fn.arg_names}
    consts = {(fn.arg_names.index(k),): v for k, v in meta.items()}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    return k.metadata.shared

out = []
for arch in archs:
    for name in dtypes:
        dt, p = tl_dtype(getattr(torch, name)), "*" + SHORT[name]
        for D in sorted({512, s1.MAX_D[getattr(torch, name)]}):
            meta = {**s1.launch_meta(D), "HAS_MASK": True, "IN_DTYPE": dt, "DOT_DTYPE": dt}
            t = {"Q": p, "X": p, "MASK": "*u8", "PART_M": "*fp32", "PART_L": "*fp32",
                 "PART_ACC": "*fp32"}
            out.append([arch, name, f"stage1 split D={D}", build(s1._lens_stage1_split_kernel, t, meta, arch)])
        t = {"PART_M": "*fp32", "PART_L": "*fp32", "PART_ACC": "*fp32", "OUT": p, "LSE": "*fp32"}
        meta = {"BLOCK_S": 16, "BLOCK_D": 512}
        out.append([arch, name, "stage1 combine", build(s1._lens_stage1_combine_kernel, t, meta, arch)])
        t = {n: p for n in ("X", "A", "A0", "C", "W1", "B1", "W2", "B2", "OUT")}
        t["eps"] = "fp32"
        for hh in (128, 0):
            meta = {**s2.launch_meta(512, 8, 6, hh, getattr(torch, name)), "HEAD": hh > 0,
                    "IN_DTYPE": dt, "DOT_DTYPE": dt}
            out.append([arch, name, f"stage2 head={hh}", build(s2._lens_stage2_kernel, t, meta, arch)])
print(json.dumps(out))
"""

# Largest dynamic shared memory per block (bytes): A100 (sm_80) and H100/H200 (sm_90).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _compile(archs, dtypes):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(archs), json.dumps(dtypes)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if res.returncode:
        if "No module named 'triton" in res.stderr:
            pytest.skip("triton is not installed")
        raise AssertionError(f"ahead-of-time compilation failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _check(rows):
    assert rows
    for arch, dtype, kernel, shared in rows:
        assert shared <= SMEM_LIMIT[arch], f"sm_{arch} {dtype} {kernel}: {shared} B shared"


def test_kernels_compile_for_sm90_bf16():
    _check(_compile([90], ["bfloat16"]))


@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90_every_dtype():
    _check(_compile([80, 90], ["float32", "float16", "bfloat16"]))


if __name__ == "__main__":
    # the table in docs/lensnet.md: python tests/test_lens_aot.py
    print("| target | dtype | kernel | shared memory per block |")
    print("|---|---|---|---:|")
    for arch, dtype, kernel, shared in _compile([80, 90], ["float32", "float16", "bfloat16"]):
        print(f"| sm_{arch} | {dtype} | {kernel} | {shared // 1024} KiB |")
