"""Gist pooling: Triton kernel vs PyTorch eager vs torch.compile of the reference.

4,096 blocks × 32 rows × d ∈ {576, 2048, 4096}, 8 heads, pooling only (no output
projection: the projection is one cuBLAS matmul in every variant). The kernel cases
need CUDA (marked ``gpu``); the eager and compiled reference run everywhere (bf16 on
CUDA, fp32 on the CPU, where bf16 matmuls are not representative).

    .venv/bin/python -m pytest bench/bench_gist_pool.py --benchmark-enable \
        --benchmark-json=bench/results/gist_pool-<device>-<date>.json
    .venv/bin/python bench/bench_gist_pool.py bench/results/gist_pool-<device>-<date>.json

The second command prints the Markdown table (time, achieved GB/s, ratios) from the
JSON. Bytes moved = read x + read q + write pooled (the minimum any implementation
must move); GB/s = bytes / median time. ``fwd+bwd`` additionally reads x and dpooled
and writes dx.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from megacontext.kernels.gist_pool import gist_pool, gist_pool_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
BLOCKS, ROWS, HEADS = 4096, 32, 8
DIMS = (576, 2048, 4096)

# Peak HBM bandwidth (GB/s) of devices we may run on, for the "% of peak" column.
PEAK_GBPS = {"H100 80GB HBM3": 3350.0, "H100": 3350.0, "H200": 4800.0}

_compiled = {}


def _inputs(d: int, grad: bool):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(BLOCKS, ROWS, d, device=DEVICE, dtype=DTYPE, generator=g)
    q = torch.randn(HEADS, d // HEADS, device=DEVICE, dtype=DTYPE, generator=g)
    if grad:
        x.requires_grad_()
        q.requires_grad_()
    return x, q


def _bytes(d: int, mode: str) -> int:
    e = torch.tensor([], dtype=DTYPE).element_size()
    x, q, pooled = BLOCKS * ROWS * d * e, d * e, BLOCKS * d * e
    fwd = x + q + pooled
    return fwd if mode == "fwd" else fwd + x + pooled + x + q  # bwd: read x, dpooled; write dx, dq


def _impl(name: str):
    if name == "kernel":
        return gist_pool
    if name == "eager":
        return gist_pool_reference
    if "compile" not in _compiled:
        _compiled["compile"] = torch.compile(gist_pool_reference, dynamic=False)
    return _compiled["compile"]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


# bench/ is outside tests/, so tests/conftest.py's gpu skip does not apply here
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
IMPLS = [pytest.param("kernel", marks=GPU), "eager", "compile"]
MODES = ["fwd", pytest.param("fwd+bwd", marks=GPU)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("impl", IMPLS)
def test_gist_pool(benchmark, impl, d, mode, monkeypatch):
    if impl == "kernel":
        monkeypatch.setenv("MEGACONTEXT_KERNELS", "triton")
    fn = _impl(impl)
    x, q = _inputs(d, grad=mode != "fwd")
    dpooled = torch.randn(BLOCKS, d, device=DEVICE, dtype=DTYPE) if mode != "fwd" else None

    def run():
        if mode == "fwd":
            with torch.no_grad():
                out = fn(x, q)
        else:
            out = fn(x, q)
            torch.autograd.grad(out, (x, q), dpooled)
        _sync()
        return out

    run()  # compile / autotune / warm caches outside the timing
    benchmark.group = f"gist_pool {mode} d={d}"
    benchmark.extra_info.update(
        impl=impl,
        d=d,
        mode=mode,
        blocks=BLOCKS,
        rows=ROWS,
        heads=HEADS,
        dtype=str(DTYPE).removeprefix("torch."),
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        bytes=_bytes(d, mode),
    )
    rounds = 20 if CUDA else 3
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)


def _ratio(r: dict[str, dict], a: str, b: str) -> str:
    """How many times faster ``b`` is than ``a`` (median times)."""
    return f"{r[a]['median'] / r[b]['median']:.2f}×" if a in r and b in r else "–"


def summarize(path: str) -> str:
    """Markdown table of a --benchmark-json file: time, GB/s, ratios to eager."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    rows: dict[tuple[str, int], dict[str, dict]] = {}
    device = "?"
    for b in data["benchmarks"]:
        info = b["extra_info"]
        device = info["device"]
        rows.setdefault((info["mode"], info["d"]), {})[info["impl"]] = {
            "median": b["stats"]["median"],
            "bytes": info["bytes"],
        }
    peak = next((v for k, v in PEAK_GBPS.items() if k in device), None)
    impls = ["kernel", "eager", "compile"]
    head = "| mode | d | " + " | ".join(f"{i} ms | {i} GB/s" for i in impls)
    head += " | eager/compile | eager/kernel | compile/kernel |"
    if peak:
        head += " kernel % of peak |"
    out = [f"device: {device}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for (mode, d), r in sorted(rows.items()):
        cells = []
        for i in impls:
            if i in r:
                t = r[i]["median"]
                cells.append(f"{t * 1e3:.3f} | {r[i]['bytes'] / t / 1e9:.1f}")
            else:
                cells.append("– | –")
        line = f"| {mode} | {d} | " + " | ".join(cells)
        line += f" | {_ratio(r, 'eager', 'compile')} | {_ratio(r, 'eager', 'kernel')} | "
        line += f"{_ratio(r, 'compile', 'kernel')} |"
        if peak:
            k = r.get("kernel")
            line += f" {k['bytes'] / k['median'] / 1e9 / peak * 100:.0f}% |" if k else " – |"
        out.append(line)
    return "\n".join(out)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
