"""LensNet forward: the kernel path vs PyTorch eager vs torch.compile of the reference path.

d = 2048 (entries and tail in the base model's width), d_lens = 512, 8 heads, one dual
block, N ∈ {8,192, 65,536}, B = 1: one focus-scoring call. ``kernel`` is LensNet on
CUDA (split-N stage 1 + fused stage 2/head kernels); ``eager`` and ``compile`` force
the PyTorch references (``MEGACONTEXT_KERNELS=reference``). The kernel cases need CUDA
(marked ``gpu``). Targets on an H100/H200: the kernel path under 100 µs at N = 8,192
and at least 2x faster than eager.

Run all three LensNet benchmarks and summarise them (time, TFLOP/s, GB/s, ratios):

    .venv/bin/python -m pytest bench/bench_lens_stage1.py bench/bench_lens_stage2.py \
        bench/bench_lensnet.py --benchmark-enable --benchmark-json=bench/results/lens-<device>-<date>.json
    .venv/bin/python bench/bench_lensnet.py bench/results/lens-<device>-<date>.json

FLOPs come from ``LensNetConfig.flops`` (matmul FLOPs as the kernels compute them);
bytes = read the entries (N x d) and write the scores.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from megacontext.lensnet import LensNet

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
DIM = 2048
NS = (8192, 65536)
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
IMPLS = [pytest.param("kernel", marks=GPU), "eager", "compile"]
_cache = {}


def _model():
    if "lens" not in _cache:
        torch.manual_seed(0)
        _cache["lens"] = LensNet(DIM).to(DEVICE, DTYPE).eval()
    return _cache["lens"]


def _impl(name):
    lens = _model()
    if name != "compile":
        return lens
    if "compile" not in _cache:
        _cache["compile"] = torch.compile(lens, dynamic=False)
    return _cache["compile"]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("impl", IMPLS)
def test_lensnet_forward(benchmark, impl, n, monkeypatch):
    monkeypatch.setenv("MEGACONTEXT_KERNELS", "triton" if impl == "kernel" else "reference")
    fn = _impl(impl)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    entries = torch.randn(1, n, DIM, device=DEVICE, generator=g).to(DTYPE)
    tail = torch.randn(1, 6, DIM, device=DEVICE, generator=g).to(DTYPE)
    levels = torch.randint(0, 3, (1, n), device=DEVICE, generator=g)
    span = 32**levels
    distance = torch.arange(n, device=DEVICE).flip(0)[None]

    def run():
        with torch.no_grad():
            out = fn(entries, tail, levels, span, distance)
        _sync()
        return out

    run()
    e = torch.tensor([], dtype=DTYPE).element_size()
    benchmark.group = f"lensnet fwd N={n}"
    benchmark.extra_info.update(
        op="lensnet",
        impl=impl,
        n=n,
        mode="fwd",
        dtype=str(DTYPE).removeprefix("torch."),
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        flops=_model().config.flops(n)["total"],
        bytes=(n * DIM + n) * e,
    )
    benchmark.pedantic(run, rounds=20 if CUDA else 3, iterations=1, warmup_rounds=1)


def _ratio(r, a, b):
    """How many times faster ``b`` is than ``a`` (median times)."""
    return f"{r[a] / r[b]:.2f}×" if a in r and b in r else "–"


def summarize(path: str) -> str:
    """Markdown table of a --benchmark-json file: time, TFLOP/s, GB/s, ratios."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    rows: dict[tuple, dict] = {}
    device = "?"
    for b in data["benchmarks"]:
        info = b["extra_info"]
        device = info["device"]
        key = (info["op"], info["mode"], info["n"])
        row = rows.setdefault(key, {"t": {}, "flops": info["flops"], "bytes": info["bytes"]})
        row["t"][info["impl"]] = b["stats"]["median"]
    impls = ["kernel", "eager", "compile"]
    head = "| op | mode | N | " + " | ".join(f"{i} ms | {i} TFLOP/s | {i} GB/s" for i in impls)
    head += " | eager/compile | eager/kernel | compile/kernel |"
    out = [f"device: {device}", "", head, "|" + "---|" * (head.count("|") - 1)]
    order = {"lens_stage1": 0, "lens_stage2": 1, "lensnet": 2}
    for key in sorted(rows, key=lambda k: (order.get(k[0], 9), k[1], k[2])):
        r = rows[key]
        cells = []
        for i in impls:
            t = r["t"].get(i)
            if t is None:
                cells.append("– | – | –")
            else:
                cells.append(
                    f"{t * 1e3:.3f} | {r['flops'] / t / 1e12:.3f} | {r['bytes'] / t / 1e9:.2f}"
                )
        t = r["t"]
        out.append(
            f"| {key[0]} | {key[1]} | {key[2]:,} | "
            + " | ".join(cells)
            + f" | {_ratio(t, 'eager', 'compile')} | {_ratio(t, 'eager', 'kernel')} | "
            + f"{_ratio(t, 'compile', 'kernel')} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
