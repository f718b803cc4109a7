"""LensNet stage 1: Triton split-N kernel vs PyTorch eager vs torch.compile of the reference.

48 query rows (8 heads x 6 tail gists) over N ∈ {8,192, 65,536} entries of width
d_lens = 512 (LensNet's default; stage 1 runs after the d -> d_lens projection, so d =
2048 does not enter here). The kernel cases need CUDA (marked ``gpu``); the eager and
compiled reference run everywhere (bf16 on CUDA, fp32 on the CPU).

    .venv/bin/python -m pytest bench/bench_lens_stage1.py bench/bench_lens_stage2.py \
        bench/bench_lensnet.py --benchmark-enable --benchmark-json=bench/results/lens-<device>-<date>.json
    .venv/bin/python bench/bench_lensnet.py bench/results/lens-<device>-<date>.json

FLOPs = 4 M N D (scores and weighted sums); bytes = read x + q, write out + lse.
``fwd+bwd`` adds the backward's 3 products (6 M N D) and its reads and writes.
"""

from __future__ import annotations

import pytest
import torch

from megacontext.kernels.lens_stage1 import lens_stage1, lens_stage1_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
M, D = 48, 512
NS = (8192, 65536)
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
IMPLS = [pytest.param("kernel", marks=GPU), "eager", "compile"]
MODES = ["fwd", pytest.param("fwd+bwd", marks=GPU)]
_compiled = {}


def _impl(name):
    if name == "kernel":
        return lens_stage1
    if name == "eager":
        return lens_stage1_reference
    if "compile" not in _compiled:
        _compiled["compile"] = torch.compile(lens_stage1_reference, dynamic=False)
    return _compiled["compile"]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("impl", IMPLS)
def test_lens_stage1(benchmark, impl, n, mode, monkeypatch):
    if impl == "kernel":
        monkeypatch.setenv("MEGACONTEXT_KERNELS", "triton")
    fn = _impl(impl)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(1, M, D, device=DEVICE, dtype=DTYPE, generator=g) / D**0.5
    x = torch.randn(1, n, D, device=DEVICE, dtype=DTYPE, generator=g)
    grad = mode != "fwd"
    if grad:
        q.requires_grad_()
        x.requires_grad_()
    dout = torch.randn(1, M, D, device=DEVICE, dtype=DTYPE)

    def run():
        if grad:
            out, _ = fn(q, x)
            torch.autograd.grad(out, (q, x), dout)
        else:
            with torch.no_grad():
                out, _ = fn(q, x)
        _sync()
        return out

    run()  # compile / warm caches outside the timing
    e = torch.tensor([], dtype=DTYPE).element_size()
    flops = 4 * M * n * D
    nbytes = (n * D + 2 * M * D) * e + M * 4
    if grad:
        flops += 6 * M * n * D
        nbytes += (2 * n * D + 2 * M * D) * e  # read x again, write dx, read dout, write dq
    benchmark.group = f"lens_stage1 {mode} N={n}"
    benchmark.extra_info.update(
        op="lens_stage1",
        impl=impl,
        n=n,
        mode=mode,
        dtype=str(DTYPE).removeprefix("torch."),
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        flops=flops,
        bytes=nbytes,
    )
    benchmark.pedantic(run, rounds=20 if CUDA else 3, iterations=1, warmup_rounds=1)
