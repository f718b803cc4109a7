"""The fused gist pooling kernel against its PyTorch reference.

Without CUDA the Triton kernels run on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest.py before this module imports the kernel).
With CUDA they run on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_checks import assert_close

from megacontext.errors import BackendUnavailableError, ConfigError
from megacontext.kernels import _dispatch
from megacontext.kernels._dispatch import FLOAT_DTYPES
from megacontext.kernels.gist_pool import gist_pool, gist_pool_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tolerances. The reference computes in fp32 from the *same* (already rounded) inputs,
# so kernel and reference differ only by fp32 summation order (N <= 32 terms per
# softmax, dh <= 576 terms per score) and the final rounding to the output dtype.
# - fp32: summation-order noise, ~1e-6 relative -> 1e-5.
# - fp16: one rounding at 2^-11 relative (10-bit mantissa); a sum rounded differently
#   can land one ulp apart -> 2e-3 relative (2 ulps).
# - bf16: 7-bit mantissa, one ulp = 2^-8 relative; 2 ulps -> 1.6e-2.
# atol is taken relative to the largest reference magnitude (max|ref|), because a
# one-ulp difference in `pooled` is amplified by `@ w_o` into entries near zero.
TOL = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def _inputs(B, N, D, H, dtype, d_out=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g).to(DEVICE, dtype).requires_grad_()
    # scaled up so that the softmax is far from uniform and the key path matters
    q = (2.0 * torch.randn(H, D // H, generator=g)).to(DEVICE, dtype).requires_grad_()
    w = None
    if d_out is not None:
        w = (torch.randn(D, d_out, generator=g) / D**0.5).to(DEVICE, dtype).requires_grad_()
    return x, q, w


# (B, N, D, H, d_out): odd batch sizes, head widths that are not powers of two
# (dh = 8, 8, 24, 9, 72, 24, 5, 300), block sizes 32 (the default), 16 and 8.
SHAPES = [
    (1, 32, 24, 3, None),
    (3, 32, 40, 5, 24),
    (7, 32, 72, 3, None),
    (3, 32, 72, 8, 40),
    (1, 32, 576, 8, 72),
    (3, 16, 24, 1, None),
    (7, 8, 40, 8, 16),
    (3, 32, 600, 2, 40),  # dh = 300 > 128: the chunked (two-pass) path, ragged last chunk
]
DTYPES = list(FLOAT_DTYPES)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-D{}-H{}-o{}".format(*s))
def test_kernel_matches_reference(force_triton, shape, dtype):
    B, N, D, H, d_out = shape
    x, q, w = _inputs(B, N, D, H, dtype, d_out)
    params = (x, q) if w is None else (x, q, w)

    out = gist_pool(x, q, w)
    ref = gist_pool_reference(x, q, w)
    assert out.shape == (B, D if d_out is None else d_out)
    assert_close(out, ref, TOL[dtype], "forward")

    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, params, g)
    ref_grads = torch.autograd.grad(ref, params, g)
    for name, a, e in zip(("dx", "dq", "dw_o")[: len(grads)], grads, ref_grads, strict=True):
        assert_close(a, e, TOL[dtype], name)


@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    B=st.integers(1, 9),
    N=st.sampled_from([1, 2, 5, 31, 32, 33, 64]),
    H=st.integers(1, 7),
    dh=st.sampled_from([1, 2, 3, 16, 17, 64, 129, 200]),
    dtype=st.sampled_from(DTYPES),
)
def test_random_shapes(force_triton, B, N, H, dh, dtype):
    # shapes off the grid above: single rows, non-power-of-two rows and head widths
    x, q, _ = _inputs(B, N, H * dh, H, dtype)
    out, ref = gist_pool(x, q), gist_pool_reference(x, q)
    assert_close(out, ref, TOL[dtype], "forward")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, q), g)
    ref_grads = torch.autograd.grad(ref, (x, q), g)
    for name, a, e in zip(("dx", "dq"), grads, ref_grads, strict=True):
        assert_close(a, e, TOL[dtype], name)


def test_kernel_is_really_used(force_triton, monkeypatch):
    # guard against a dispatch bug silently comparing the reference with itself
    import megacontext.kernels.gist_pool as gp

    calls = []
    real = gp._gist_pool_fwd
    monkeypatch.setattr(gp, "_gist_pool_fwd", lambda *a: calls.append(1) or real(*a))
    x, q, _ = _inputs(2, 32, 24, 3, torch.float32)
    gist_pool(x, q)
    assert calls == [1]


def test_reference_is_attention_pooling():
    # independent formula: per head, softmax(K q / sqrt(dh)) weighted rows
    x, q, _ = _inputs(2, 32, 12, 3, torch.float32)
    ref = gist_pool_reference(x, q)
    for h in range(3):
        xh = x[:, :, 4 * h : 4 * h + 4]
        p = torch.softmax(xh @ q[h] / 2.0, dim=1)
        torch.testing.assert_close(ref[:, 4 * h : 4 * h + 4], (p[:, :, None] * xh).sum(1))


def test_uniform_scores_give_mean(force_triton):
    x, _, _ = _inputs(3, 32, 40, 5, torch.float32)
    q = torch.zeros(5, 8, device=DEVICE)
    torch.testing.assert_close(gist_pool(x, q), x.mean(1))


def test_large_scores_are_stable(force_triton):
    # scores of +-1e4 must not overflow: the softmax subtracts the max
    x, q, _ = _inputs(2, 32, 24, 3, torch.float32)
    out = gist_pool(x * 100, q * 100)
    assert torch.isfinite(out).all()
    assert_close(out, gist_pool_reference(x * 100, q * 100), TOL[torch.float32], "large")


def test_noncontiguous_input(force_triton):
    base, q, _ = _inputs(3, 32, 80, 5, torch.float32)
    x = base[:, :, 8:48]  # row stride 80, column stride 1
    q = q[:, :8].contiguous()
    assert not x.is_contiguous()
    assert_close(gist_pool(x, q), gist_pool_reference(x, q), TOL[torch.float32], "strided")
    xt = base.detach()[:, :, :40].transpose(0, 1).contiguous().transpose(0, 1)
    assert_close(gist_pool(xt, q), gist_pool_reference(xt, q), TOL[torch.float32], "batch-strided")


def test_empty_batch(force_triton):
    x, q, _ = _inputs(0, 32, 24, 3, torch.float32)
    out = gist_pool(x, q)
    assert out.shape == (0, 24)
    (dx,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
    assert dx is None or dx.shape == x.shape


def test_deterministic(force_triton):
    x, q, _ = _inputs(7, 32, 40, 5, torch.float32)
    a = torch.autograd.grad(gist_pool(x, q).sum(), (x, q))
    b = torch.autograd.grad(gist_pool(x, q).sum(), (x, q))
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


@pytest.mark.parametrize(
    "x_shape, q_shape, w_shape, field",
    [
        ((32, 24), (3, 8), None, "x"),
        ((2, 32, 24), (24,), None, "q"),
        ((2, 32, 24), (3, 7), None, "q"),
        ((2, 32, 24), (3, 8), (25, 4), "w_o"),
        ((2, 32, 24), (3, 8), (24,), "w_o"),
    ],
)
def test_bad_shapes(force_triton, x_shape, q_shape, w_shape, field):
    x, q = torch.randn(x_shape), torch.randn(q_shape)
    w = None if w_shape is None else torch.randn(w_shape)
    with pytest.raises(ConfigError, match=field) as info:
        gist_pool(x, q, w)
    assert info.value.field == field


def test_bad_dtypes_and_devices(force_triton):
    x, q = torch.randn(2, 32, 24), torch.randn(3, 8)
    with pytest.raises(ConfigError, match="float32, float16 or bfloat16"):
        gist_pool(x.double(), q.double())
    with pytest.raises(ConfigError, match="q must have x's dtype"):
        gist_pool(x, q.half())
    with pytest.raises(ConfigError, match="w_o must have x's dtype"):
        gist_pool(x, q, torch.randn(24, 4).half())
    with pytest.raises(ConfigError, match="q is on meta"):
        gist_pool(x, q.to("meta"))
    # meta tensors go through the op's fake implementation (shapes only) ...
    if _dispatch.interpreter_enabled():  # (forced Triton accepts non-CUDA tensors)
        assert gist_pool(x.to("meta"), q.to("meta")).shape == (2, 24)
    # ... but the launcher itself refuses devices Triton cannot run on
    import megacontext.kernels.gist_pool as gp

    with pytest.raises(BackendUnavailableError, match="meta"):
        gp._gist_pool_fwd(x.to("meta"), q.to("meta"))


def test_dispatch(monkeypatch):
    x = torch.randn(2, 32, 24)
    monkeypatch.setenv("MEGACONTEXT_KERNELS", "reference")
    assert not _dispatch.use_triton(x)
    monkeypatch.setenv("MEGACONTEXT_KERNELS", "")
    assert _dispatch.use_triton(x) == (x.is_cuda and _dispatch.triton_available())
    monkeypatch.setenv("MEGACONTEXT_KERNELS", "bogus")
    with pytest.raises(ConfigError, match="MEGACONTEXT_KERNELS='bogus'"):
        _dispatch.use_triton(x)
    monkeypatch.setenv("MEGACONTEXT_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        _dispatch.use_triton(x, op="gist_pool")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.use_triton(x)


def test_reference_on_cpu_by_default(monkeypatch):
    monkeypatch.delenv("MEGACONTEXT_KERNELS", raising=False)
    import megacontext.kernels.gist_pool as gp

    monkeypatch.setattr(gp, "_gist_pool_fwd", lambda *a: pytest.fail("kernel called on CPU"))
    x, q = torch.randn(2, 32, 24), torch.randn(3, 8)
    torch.testing.assert_close(gist_pool(x, q), gist_pool_reference(x, q))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(dtype):
    x, q, _ = _inputs(3, 32, 24, 3, dtype)
    torch.library.opcheck(torch.ops.megacontext.gist_pool.default, (x, q))


def test_torch_compile(force_triton):
    x, q, w = _inputs(3, 32, 24, 3, torch.float32, d_out=8)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(x, q, w):
        return torch.tanh(gist_pool(x, q, w))

    out = f(x, q, w)
    ref = torch.tanh(gist_pool_reference(x, q, w))
    assert_close(out, ref, TOL[torch.float32], "compiled")
    g = torch.autograd.grad(out.sum(), (x, q, w))
    r = torch.autograd.grad(ref.sum(), (x, q, w))
    for a, e in zip(g, r, strict=True):
        assert_close(a, e, TOL[torch.float32], "compiled grad")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("D", [576, 2048, 4096])
def test_kernel_matches_reference_at_bench_shapes(force_triton, D, dtype):
    # the benchmark's shapes (4,096 blocks × 32 rows, 8 heads), compiled kernel on CUDA
    x, q, w = _inputs(4096, 32, D, 8, dtype, d_out=512)
    out = gist_pool(x, q, w)
    ref = gist_pool_reference(x, q, w)
    assert_close(out, ref, TOL[dtype], "forward")
    g = torch.randn_like(out)
    for name, a, e in zip(
        ("dx", "dq", "dw_o"),
        torch.autograd.grad(out, (x, q, w), g),
        torch.autograd.grad(ref, (x, q, w), g),
        strict=True,
    ):
        assert_close(a, e, TOL[dtype], name)


# Ahead-of-time compilation for sm_90 runs in a subprocess: under TRITON_INTERPRET=1
# Triton's code generator is patched by the interpreter and fails, and a warm Triton
# cache would hide that, so the child gets no TRITON_INTERPRET and a fresh cache.
_AOT_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource
import megacontext.kernels.gist_pool as gp

PTRS = ("X", "Q", "POOLED", "DPOOLED", "DX")
results = {}
for kernel, dtype, dh in json.loads(sys.argv[1]):
    fn = getattr(gp, kernel)
    signature = {}
    for n in fn.arg_names:
        if n in ("BLOCK_N", "BLOCK_DH", "ONE_CHUNK"):
            signature[n] = "constexpr"
        elif n in ("LSE", "DQ_PARTIAL"):
            signature[n] = "*fp32"
        elif n in PTRS:
            signature[n] = "*" + dtype
        else:
            signature[n] = "fp32" if n == "scale" else "i32"
    block_n, block_dh, one_chunk, num_warps = gp._meta(32, dh, backward="bwd" in kernel)
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={"BLOCK_N": block_n, "BLOCK_DH": block_dh,
                                "ONE_CHUNK": one_chunk})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    # ptxas -v reports registers and spills (not visible in the PTX itself)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as fh:
            fh.write(k.asm["ptx"])
        log = subprocess.run(
            [get_ptxas(90).path, "-v", "--gpu-name=" + sm_arch_from_capability(90), ptx,
             "-o", ptx + ".o"], capture_output=True, text=True, check=True).stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    regs = [int(n) for n in re.findall(r"Used (\d+) registers", log)]
    results[f"{kernel}-{dtype}-{dh}"] = {
        "cubin": len(k.asm["cubin"]), "spill_bytes": sum(spills), "registers": regs,
    }
print(json.dumps(results))
"""


def _compile_for_sm90(cases, tmp_path):
    import json
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run(
        [sys.executable, "-c", _AOT_SCRIPT, json.dumps(cases)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(cases)
    for name, r in results.items():
        assert r["cubin"] > 0, name
        assert r["registers"], f"{name}: ptxas -v reported no register count"
        assert r["spill_bytes"] == 0, f"{name} spills registers: {r}"
    return results


def test_kernels_compile_for_sm90(tmp_path):
    # the interpreter does not type-check like the compiler does: compile the real
    # kernels (PTX and cubin through Triton's bundled ptxas; no GPU needed) for an
    # H100/H200 at d=576 with 8 heads, bf16
    kernels = ["_gist_pool_fwd_kernel", "_gist_pool_bwd_kernel"]
    _compile_for_sm90([[k, "bf16", 72] for k in kernels], tmp_path)


@pytest.mark.slow
def test_kernels_compile_for_sm90_all(tmp_path):
    # every dtype at the benchmark's head widths (d = 576, 2048, 4096 with 8 heads)
    kernels = ["_gist_pool_fwd_kernel", "_gist_pool_bwd_kernel"]
    cases = [[k, t, dh] for k in kernels for t in ("fp32", "fp16", "bf16") for dh in (72, 256, 512)]
    _compile_for_sm90(cases, tmp_path)
