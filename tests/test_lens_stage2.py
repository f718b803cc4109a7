"""LensNet stage 2 fused with the scoring head, against its PyTorch reference.

Without CUDA the Triton kernel runs on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest.py before this module imports the kernel).
With CUDA it runs on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_close

from megacontext.errors import ConfigError
from megacontext.kernels import lens_stage2 as mod
from megacontext.kernels._dispatch import FLOAT_DTYPES
from megacontext.kernels.lens_stage2 import lens_stage2, lens_stage2_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tolerances, absolute for scores (they lie in [-1, 1]) and relative to max|reference|
# for the head-less output y. The reference computes in fp32 from the same rounded
# inputs; the kernel rounds the normalised rows, the probabilities and layernorm(y) to
# the input dtype before its three tensor-core products (fp32 accumulation):
# - fp32: summation order only -> 1e-5 (tf32 on a GPU, 10-bit mantissa -> 3e-3);
# - fp16: operands at 2^-11 relative; a score moves by ~1 ulp of fp16 near 1 -> 2e-3;
# - bf16: operands at 2^-8 relative; 2-3 ulps of bf16 near 1 -> 2.4e-2.
# Gradients come from the reference re-run on the saved inputs, so the forward
# tolerances apply to them too (inputs and incoming gradients are the same).
TOL = {
    torch.float32: 3e-3 if DEVICE == "cuda" else 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2.4e-2,
}
DTYPES = list(FLOAT_DTYPES)


def _inputs(B, N, D, H, T, hh, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=g) * scale + shift
        return t.to(DEVICE, dtype).requires_grad_()

    G = H * T
    x = r(B, N, D, shift=0.3)  # a non-zero mean: the LayerNorm centring matters
    a = r(B, D, G, scale=2.0 / D**0.5)  # logits ~ N(0, 4): peaked softmaxes
    a0 = r(B, G)
    c = r(B, G, D, scale=0.5)
    head = ()
    if hh:
        head = (r(D, hh, scale=1.0 / D**0.5), r(hh, scale=0.1), r(hh, scale=1.0 / hh**0.5), r(1))
    return (x, a, a0, c, *head)


# (B, N, D, H, T, Hh): N = 1; N not a multiple of BLOCK_N = 32; D below, at and above
# the 64-wide chunk (72 = one full chunk and a partial one); T = 6 (LensNet) and 5, H =
# 1 (padded to H_PAD = 2 so that H_PAD * T_PAD >= 16), 3 and 8; Hh odd, 0 = no head.
SHAPES = [
    (1, 1, 7, 1, 6, 5),
    (2, 37, 24, 2, 6, 20),
    (2, 70, 72, 3, 5, 0),
    (1, 33, 40, 8, 6, 16),
    (2, 45, 72, 3, 6, 33),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference(force_triton, shape, dtype):
    B, N, D, H, T, hh = shape
    inputs = _inputs(B, N, D, H, T, hh, dtype)
    out = lens_stage2(*inputs, n_heads=H)
    ref = lens_stage2_reference(*inputs, n_heads=H)
    tol = TOL[dtype]
    if hh:
        assert out.shape == (B, N)
        assert (out.abs() <= 1).all()
    assert_close(out, ref, tol, "forward", relative=not hh)

    g = torch.Generator().manual_seed(1)
    grad = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, inputs, grad)
    ref_grads = torch.autograd.grad(ref, inputs, grad)
    names = ["x", "a", "a0", "c", "w1", "b1", "w2", "b2"]
    for name, got, want in zip(names, grads, ref_grads, strict=False):
        assert torch.isfinite(got.float()).all(), name
        assert_close(got, want, tol, f"d{name}")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy
def test_saturated_scores_and_peaked_softmax_stay_finite(force_triton):
    x, a, a0, c, w1, b1, w2, b2 = _inputs(2, 40, 24, 2, 6, 8, torch.float32, seed=4)
    a = (a.detach() * 300).requires_grad_()  # logits ~ +-1e3: needs the per-head max
    b2 = torch.full_like(b2, 60.0)  # exp(2z) overflows: tanh must saturate to exactly 1
    out = lens_stage2(x, a, a0, c, w1, b1, w2, b2, n_heads=2)
    ref = lens_stage2_reference(x, a, a0, c, w1, b1, w2, b2, n_heads=2)
    assert torch.isfinite(out).all()
    assert (out == 1.0).all() and (ref == 1.0).all()
    b2 = torch.full_like(b2, -60.0)
    out = lens_stage2(x, a, a0, c, w1, b1, w2, b2, n_heads=2)
    assert (out == -1.0).all()


def test_deterministic(force_triton):
    inputs = _inputs(2, 50, 40, 8, 6, 16, torch.bfloat16, seed=2)
    assert torch.equal(lens_stage2(*inputs, n_heads=8), lens_stage2(*inputs, n_heads=8))


def test_cpu_default_is_the_reference(monkeypatch):
    monkeypatch.delenv("MEGACONTEXT_KERNELS", raising=False)
    inputs = [t.detach().cpu() for t in _inputs(1, 9, 16, 2, 6, 8, torch.float32)]
    assert torch.equal(lens_stage2(*inputs, n_heads=2), lens_stage2_reference(*inputs, n_heads=2))


def test_opcheck(force_triton):
    # schema, fake (meta) implementation and autograd registration of the custom op
    x, a, a0, c, w1, b1, w2, b2 = _inputs(1, 20, 16, 2, 6, 8, torch.float32)
    for args in (
        (x, a, a0, c, w1, b1, w2, b2, 2, 1e-5),
        (x, a, a0, c, None, None, None, None, 2, 1e-5),
    ):
        torch.library.opcheck(
            mod._lens_stage2_op,
            args,
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )


def test_errors_name_the_tensor():
    x, a, a0, c, w1, b1, w2, b2 = (t.detach() for t in _inputs(1, 5, 8, 2, 6, 4, torch.float32))
    cases = [
        ((x[0], a, a0, c), {}, "x"),
        ((x, a[:, :-1], a0, c), {}, "a"),
        ((x, a, a0[:, :-1], c), {}, "a0"),
        ((x, a, a0, c[:, :, :-1]), {}, "c"),
        ((x, a, a0, c, w1[:-1], b1, w2, b2), {}, "w1"),
        ((x, a, a0, c, w1, None, w2, b2), {}, "b1"),
        ((x, a, a0, c, w1, b1, w2[:-1], b2), {}, "w2"),
        ((x, a, a0, c, w1, b1, w2, b2.reshape(())), {}, "b2"),
        ((x, a.half(), a0, c), {}, "a"),
    ]
    for args, _, field in cases:
        with pytest.raises(ConfigError) as err:
            lens_stage2(*args, n_heads=2)
        assert err.value.field == field, field
        assert field in str(err.value)
    with pytest.raises(ConfigError) as err:
        lens_stage2(x, a, a0, c, n_heads=5)
    assert err.value.field == "n_heads"


def test_kernel_rejects_too_wide_head(force_triton):
    x, a, a0, c = (t.detach() for t in _inputs(1, 3, 8, 1, 6, 0, torch.float32))
    hh = mod.MAX_HIDDEN + 1
    w1, b1, w2, b2 = (torch.zeros(s, device=DEVICE) for s in ((8, hh), (hh,), (hh,), (1,)))
    with pytest.raises(ConfigError, match=f"Hh <= {mod.MAX_HIDDEN}"):
        lens_stage2(x, a, a0, c, w1, b1, w2, b2, n_heads=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_realistic_shape(force_triton, dtype):
    inputs = _inputs(2, 8192 + 77, 512, 8, 6, 128, dtype)
    out = lens_stage2(*inputs, n_heads=8)
    ref = lens_stage2_reference(*inputs, n_heads=8)
    assert_close(out, ref, TOL[dtype], "scores", relative=False)


def test_empty_batch(force_triton):
    x, a, a0, c, w1, b1, w2, b2 = (t.detach() for t in _inputs(1, 5, 8, 2, 6, 4, torch.float32))
    empty = [t[:0] for t in (x, a, a0, c)]
    assert lens_stage2(*empty, w1, b1, w2, b2, n_heads=2).shape == (0, 5)
    assert lens_stage2(*empty, n_heads=2).shape == (0, 5, 8)
