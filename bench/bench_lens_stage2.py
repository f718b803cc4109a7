"""LensNet stage 2 + scoring head: fused Triton kernel vs PyTorch eager vs torch.compile.

N ∈ {8,192, 65,536} entries of width d_lens = 512, 8 heads x 6 tail gists (G = 48),
head hidden width 128: what the last LensNet block runs per call. The kernel cases need
CUDA (marked ``gpu``); eager and compiled reference run everywhere (bf16 on CUDA, fp32
on the CPU). Run and summarise as in bench/bench_lens_stage1.py.

FLOPs = N (4 D G + 2 D Hh) (scores, weighted sum, head); bytes = read x, write the
scores (the folded a, c, w1 are ~0.2 MB and stay in cache).
"""

from __future__ import annotations

import pytest
import torch

from megacontext.kernels.lens_stage2 import lens_stage2, lens_stage2_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
D, H, T, HH = 512, 8, 6, 128
NS = (8192, 65536)
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
IMPLS = [pytest.param("kernel", marks=GPU), "eager", "compile"]
MODES = ["fwd", pytest.param("fwd+bwd", marks=GPU)]
_compiled = {}


def _impl(name):
    if name == "kernel":
        return lens_stage2
    if name == "eager":
        return lens_stage2_reference
    if "compile" not in _compiled:
        _compiled["compile"] = torch.compile(lens_stage2_reference, dynamic=False)
    return _compiled["compile"]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("impl", IMPLS)
def test_lens_stage2(benchmark, impl, n, mode, monkeypatch):
    if impl == "kernel":
        monkeypatch.setenv("MEGACONTEXT_KERNELS", "triton")
    fn = _impl(impl)
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE, generator=g) * scale).to(DTYPE)

    G = H * T
    inputs = [
        r(1, n, D),
        r(1, D, G, scale=D**-0.5),
        r(1, G),
        r(1, G, D, scale=0.1),
        r(D, HH, scale=D**-0.5),
        r(HH, scale=0.1),
        r(HH, scale=HH**-0.5),
        r(1),
    ]
    grad = mode != "fwd"
    if grad:
        for t in inputs:
            t.requires_grad_()
    dscores = torch.randn(1, n, device=DEVICE, dtype=DTYPE)

    def run():
        if grad:
            out = fn(*inputs, n_heads=H)
            torch.autograd.grad(out, inputs, dscores)
        else:
            with torch.no_grad():
                out = fn(*inputs, n_heads=H)
        _sync()
        return out

    run()
    e = torch.tensor([], dtype=DTYPE).element_size()
    flops = n * (4 * D * G + 2 * D * HH)
    nbytes = n * D * e + n * e
    if grad:
        flops *= 3  # the backward re-runs the forward and differentiates it (~2x)
        nbytes += 2 * n * D * e + n * e
    benchmark.group = f"lens_stage2 {mode} N={n}"
    benchmark.extra_info.update(
        op="lens_stage2",
        impl=impl,
        n=n,
        mode=mode,
        dtype=str(DTYPE).removeprefix("torch."),
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        flops=flops,
        bytes=nbytes,
    )
    benchmark.pedantic(run, rounds=20 if CUDA else 3, iterations=1, warmup_rounds=1)
