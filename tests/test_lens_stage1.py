"""LensNet stage 1 (split-N few-query attention) against its PyTorch reference.

Without CUDA the Triton kernels run on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest.py before this module imports the kernel).
With CUDA they run on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_close

from megacontext.errors import ConfigError
from megacontext.kernels import lens_stage1 as mod
from megacontext.kernels._dispatch import FLOAT_DTYPES
from megacontext.kernels.lens_stage1 import lens_stage1, lens_stage1_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tolerances (relative, and absolute relative to max|reference|). Kernel and reference
# see the same rounded inputs and both accumulate in fp32; they differ by
# - fp32: summation order only (~1e-6 relative) -> 1e-5. On a GPU tl.dot rounds fp32
#   operands to tf32 (10-bit mantissa, ~5e-4 relative) -> 2e-3 there.
# - fp16: the kernel rounds the probabilities to fp16 before the p @ x product (as
#   FlashAttention does) and the output once: ~1-2 ulps of 2^-11 -> 2e-3.
# - bf16: the same with bf16's 2^-8 ulp -> 1.6e-2.
# The log-sum-exp is fp32 in both from the same fp32 scores: 1e-5 (tf32: 2e-3).
TOL = {
    torch.float32: 2e-3 if DEVICE == "cuda" else 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
LSE_TOL = 2e-3 if DEVICE == "cuda" else 1e-5
DTYPES = list(FLOAT_DTYPES)


def _inputs(B, M, N, D, dtype, mask_kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q scaled so that the softmax is peaked (the max-subtraction matters)
    q = (1.5 * torch.randn(B, M, D, generator=g) / D**0.25).to(DEVICE, dtype).requires_grad_()
    x = torch.randn(B, N, D, generator=g).to(DEVICE, dtype).requires_grad_()
    mask = None
    if mask_kind == "random":
        mask = (torch.rand(B, N, generator=g) > 0.35).to(DEVICE)
        mask[:, 0] = True
    elif mask_kind == "one_row_empty":
        mask = (torch.rand(B, N, generator=g) > 0.35).to(DEVICE)
        mask[0] = False
    return q, x, mask


# (B, M, N, D, split) and mask: N = 1; N not a multiple of the split or of BLOCK_N =
# 32; odd M and D (padded to the 16-row / power-of-two tiles); M = 48 (LensNet's 8
# heads x 6); no mask, a random mask, and a batch row with every entry masked.
CASES = [
    ((1, 1, 1, 1, 0), "none"),
    ((2, 12, 37, 24, 32), "none"),
    ((2, 12, 37, 24, 32), "random"),
    ((2, 12, 37, 24, 32), "one_row_empty"),
    ((1, 48, 100, 40, 64), "random"),
    ((3, 5, 65, 17, 32), "random"),
    ((3, 5, 65, 17, 32), "one_row_empty"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "mask_kind"), CASES, ids=str)
def test_kernel_matches_reference(force_triton, shape, mask_kind, dtype):
    B, M, N, D, split = shape
    q, x, mask = _inputs(B, M, N, D, dtype, mask_kind)
    out, lse = lens_stage1(q, x, mask, split_size=split)
    ref_out, ref_lse = lens_stage1_reference(q, x, mask)
    tol = TOL[dtype]
    assert_close(out, ref_out, tol, "out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], rtol=LSE_TOL, atol=LSE_TOL)

    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    dq, dx = torch.autograd.grad(out, (q, x), dout)
    rdq, rdx = torch.autograd.grad(ref_out, (q, x), dout)
    assert torch.isfinite(dq.float()).all() and torch.isfinite(dx.float()).all()
    assert_close(dq, rdq, tol, "dq")
    assert_close(dx, rdx, tol, "dx")
    if mask_kind == "one_row_empty":
        assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()


@pytest.mark.parametrize("split", [32, 64, 96, 1024])
def test_split_size_does_not_change_the_result(force_triton, split):
    q, x, mask = _inputs(2, 7, 150, 20, torch.float32, "random", seed=3)
    out, lse = lens_stage1(q, x, mask, split_size=split)
    ref_out, ref_lse = lens_stage1_reference(q, x, mask)
    assert_close(out, ref_out, TOL[torch.float32], f"split={split}")
    torch.testing.assert_close(lse, ref_lse, rtol=LSE_TOL, atol=LSE_TOL)


def test_large_scores_are_stable(force_triton):
    # scores ~ +-1e3 across splits: a merge without the max subtraction would overflow
    q, x, _ = _inputs(1, 6, 90, 16, torch.float32, "none", seed=5)
    q = (q.detach() * 200).requires_grad_()
    out, lse = lens_stage1(q, x, split_size=32)
    ref_out, ref_lse = lens_stage1_reference(q, x)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_close(out, ref_out, 1e-4, "out")
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-3)


def test_deterministic(force_triton):
    q, x, mask = _inputs(2, 12, 77, 24, torch.float16, "random", seed=7)
    a = lens_stage1(q, x, mask, split_size=32)
    b = lens_stage1(q, x, mask, split_size=32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_cpu_default_is_the_reference(monkeypatch):
    monkeypatch.delenv("MEGACONTEXT_KERNELS", raising=False)
    q, x, mask = _inputs(1, 3, 10, 8, torch.float32, "random")
    q, x = q.detach().cpu(), x.detach().cpu()
    mask = mask.cpu()
    out, lse = lens_stage1(q, x, mask)
    ref_out, ref_lse = lens_stage1_reference(q, x, mask)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_opcheck(force_triton):
    # schema, fake (meta) implementation and autograd registration of the custom op
    q, x, mask = _inputs(1, 5, 40, 16, torch.float32, "random")
    torch.library.opcheck(
        mod._lens_stage1_op,
        (q, x, mask, 32),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize(
    ("q_shape", "x_shape", "field"),
    [
        ((1, 4, 8), (1, 10), "x"),
        ((1, 4, 7), (1, 10, 8), "q"),
        ((2, 4, 8), (1, 10, 8), "q"),
        ((1, 4, 8), (1, 0, 8), "x"),
    ],
)
def test_shape_errors_name_the_tensor(q_shape, x_shape, field):
    with pytest.raises(ConfigError) as err:
        lens_stage1(torch.zeros(q_shape), torch.zeros(x_shape))
    assert err.value.field == field
    assert field in str(err.value)


def test_dtype_and_mask_errors():
    q, x = torch.zeros(1, 4, 8), torch.zeros(1, 10, 8)
    with pytest.raises(ConfigError, match="q must have x's dtype"):
        lens_stage1(q.half(), x)
    with pytest.raises(ConfigError, match="float32, float16 or bfloat16"):
        lens_stage1(q.double(), x.double())
    with pytest.raises(ConfigError, match=r"mask must be \[B, N\] = \[1, 10\]"):
        lens_stage1(q, x, torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ConfigError, match="mask must be a bool"):
        lens_stage1(q, x, torch.ones(1, 10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_rejects_too_wide_rows(force_triton, dtype):
    wide = mod.MAX_D[dtype] + 1
    q, x = torch.zeros(1, 2, wide, dtype=dtype), torch.zeros(1, 3, wide, dtype=dtype)
    with pytest.raises(ConfigError, match=f"D <= {mod.MAX_D[dtype]}"):
        lens_stage1(q.to(DEVICE), x.to(DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_realistic_shape(force_triton, dtype):
    q, x, mask = _inputs(2, 48, 8192 + 77, 512, dtype, "random")
    out, lse = lens_stage1(q, x, mask)
    ref_out, ref_lse = lens_stage1_reference(q, x, mask)
    assert_close(out, ref_out, TOL[dtype], "out")
    torch.testing.assert_close(lse, ref_lse, rtol=LSE_TOL, atol=LSE_TOL)


def test_empty_batch(force_triton):
    out, lse = lens_stage1(
        torch.zeros(0, 4, 8, device=DEVICE), torch.zeros(0, 10, 8, device=DEVICE)
    )
    assert out.shape == (0, 4, 8) and lse.shape == (0, 4)
