"""KV splice: Triton kernel vs PyTorch eager vs torch.compile of the reference.

Whole-cache refocus at ``C = 8192 + 32`` slots, B = 1, bf16, for two model shapes:
SmolLM2-135M (L=30 layers, H=3 kv-heads, D=64) and Llama-3.1-8B (L=32, H=8, D=128).
The splice is a realistic one: 8,068 live entries, four gists expanded into 32 tokens
each (later rows shift right by 31 at each), so 8,064 kept rows move and 128 fresh
rows are scattered, giving 8,192 live entries and 32 free slots for decoding.

Each case runs twice: the plain splice, and the re-rotating splice (``rotate``) in
which every kept key is also turned by its position delta, as under the compact
position scheme (position = slot, so a row shifted right by ``31 * k`` slots moves
``31 * k`` positions; the rows before the first expand keep theirs, delta 0).
Positions move, the bytes do not: a rotating splice moves the same rows (plus the
``[1, C]`` deltas), so its GB/s column reads against the same memcpy.

Implementations: ``kernel`` (the Triton kernel, CUDA only), ``runs`` (the CPU path of
``kv_splice``: one strided ``copy_`` per run of consecutive rows; it reads the index
on the host), ``eager`` (``kv_splice_reference``), ``compile`` (``torch.compile`` of
the reference), and ``memcpy``: ``dst.copy_(src)`` over the whole buffer, not a
splice, but the copy bandwidth this device reaches, to read the GB/s columns against.

    .venv/bin/python -m pytest bench/bench_kv_splice.py --benchmark-enable \
        --benchmark-json=bench/results/kv_splice-<device>-<date>.json
    .venv/bin/python bench/bench_kv_splice.py bench/results/kv_splice-<device>-<date>.json

The second command prints the Markdown table (time, achieved GB/s, ratios) from the
JSON. Bytes moved = the minimum any implementation must move: read every kept row
and fresh row once, write every live destination row once (each ``D`` wide, for all
``L*2*H`` planes), plus the ``index`` and ``fresh_slots`` tensors; GB/s = bytes /
median time. The kernel cases need CUDA (marked ``gpu``).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from megacontext.kernels import kv_splice as ks
from megacontext.kernels.kv_splice import kv_splice, kv_splice_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16
C = 8192 + 32
OLD_LIVE = 8192 - 4 * 31
EXPAND_AT = (100, 2000, 5000, 7000)  # entry positions in the WC being edited, in order
SHAPES = {"smollm2-135m": (30, 3, 64), "llama-3.1-8b": (32, 8, 128)}

# Peak HBM bandwidth (GB/s) of devices we may run on, for the "% of peak" column.
PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}

_compiled = {}


def splice_plan(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``index [1, C]`` and ``fresh_slots [1, 128]`` for four expands of an 8,068-entry WC."""
    entries = list(range(OLD_LIVE))
    nxt = OLD_LIVE
    for p in EXPAND_AT:
        entries = entries[:p] + list(range(nxt, nxt + 32)) + entries[p + 1 :]
        nxt += 32
    index = torch.full((1, C), -1, dtype=torch.int32)
    slots = []
    for j, e in enumerate(entries):
        if e < OLD_LIVE:
            index[0, j] = e
        else:
            slots.append(j)
    return index.to(device), torch.tensor([slots], dtype=torch.int32, device=device)


def _inputs(shape: str):
    L, H, D = SHAPES[shape]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    src = torch.randn(L, 2, 1, H, C, D, device=DEVICE, dtype=DTYPE, generator=g)
    dst = torch.zeros_like(src)
    index, slots = splice_plan(DEVICE)
    fresh = torch.randn(L, 2, 1, H, slots.shape[1], D, device=DEVICE, dtype=DTYPE, generator=g)
    return src, dst, index, fresh, slots


def rotation(shape: str, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``position_delta [1, C]`` (int32) of the compact scheme (position = slot: a
    kept row moved from slot ``i`` to ``j`` moves ``j - i`` positions) and the
    ``inv_freq [D/2]`` of the model's default RoPE (theta 10,000 for SmolLM2,
    500,000 for Llama-3.1)."""
    _, _, D = SHAPES[shape]
    theta = 500000.0 if shape.startswith("llama") else 10000.0
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32, device=index.device) / D)
    slots = torch.arange(C, dtype=torch.int32, device=index.device)[None]
    delta = torch.where(index >= 0, slots - index, 0).to(torch.int32)
    return delta, inv


def _bytes(shape: str, impl: str, index: torch.Tensor, slots: torch.Tensor) -> int:
    L, H, D = SHAPES[shape]
    e = torch.tensor([], dtype=DTYPE).element_size()
    planes = L * 2 * H
    if impl == "memcpy":
        return 2 * planes * C * D * e
    kept = int((index >= 0).sum())
    fresh = int((slots >= 0).sum())
    rows = planes * (kept + fresh) * D * e
    return 2 * rows + index.numel() * index.element_size() + slots.numel() * slots.element_size()


def _reference_nocheck(src, dst, index, fresh, slots, delta=None, inv=None):
    # value checks synchronise (and break a compiled graph); the plan is known-good
    kv_splice_reference(src, dst, index, fresh, slots, delta, inv, check=False)


def _impl(name: str):
    if name == "kernel":
        return kv_splice
    if name == "eager":
        return _reference_nocheck
    if name == "runs":
        return ks._kv_splice_runs
    if name == "memcpy":
        return lambda src, dst, *_: dst.copy_(src)
    if "compile" not in _compiled:
        _compiled["compile"] = torch.compile(_reference_nocheck, dynamic=False)
    return _compiled["compile"]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


# bench/ is outside tests/, so tests/conftest.py's gpu skip does not apply here
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
IMPLS = [pytest.param("kernel", marks=GPU), "runs", "eager", "compile", "memcpy"]


@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rotate"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_kv_splice(benchmark, impl, shape, rotate, monkeypatch):
    if rotate and impl == "memcpy":
        pytest.skip("memcpy is the same bandwidth ceiling for both")
    if impl == "kernel":
        monkeypatch.setenv("MEGACONTEXT_KERNELS", "triton")
    fn = _impl(impl)
    src, dst, index, fresh, slots = _inputs(shape)
    extra = rotation(shape, index) if rotate else ()

    def run():
        fn(src, dst, index, fresh, slots, *extra)
        _sync()

    run()  # compile / JIT / warm caches outside the timing
    if impl != "memcpy":  # the timed function really splices
        expected = torch.zeros_like(src)
        kv_splice_reference(src, expected, index, fresh, slots, *extra)
        if rotate:  # rotated keys within one bf16 rounding of the reference's
            assert torch.equal(dst[:, 1].view(torch.int16), expected[:, 1].view(torch.int16))
            torch.testing.assert_close(dst, expected, rtol=2**-7, atol=2**-7 * 4)
        else:
            assert torch.equal(dst.view(torch.int16), expected.view(torch.int16)), impl
        del expected
    L, H, D = SHAPES[shape]
    benchmark.group = f"kv_splice {shape}" + (" rotate" if rotate else "")
    benchmark.extra_info.update(
        impl=impl,
        shape=shape,
        rotate=rotate,
        L=L,
        H=H,
        D=D,
        C=C,
        B=1,
        kept_rows=int((index >= 0).sum()),
        fresh_rows=int((slots >= 0).sum()),
        dtype=str(DTYPE).removeprefix("torch."),
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        torch=torch.__version__,
        bytes=_bytes(shape, impl, index, slots) + (C * 4 + D * 2 if rotate else 0),
    )
    rounds = 20 if CUDA else 3
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)


def _ratio(r: dict[str, dict], a: str, b: str) -> str:
    """How many times faster ``b`` is than ``a`` (median times)."""
    return f"{r[a]['median'] / r[b]['median']:.2f}×" if a in r and b in r else "–"


def summarize(path: str) -> str:
    """Markdown table of a --benchmark-json file: time, GB/s, ratios."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    rows: dict[str, dict[str, dict]] = {}
    device = "?"
    for b in data["benchmarks"]:
        info = b["extra_info"]
        device = info["device"]
        case = info["shape"] + (" rotate" if info.get("rotate") else "")
        rows.setdefault(case, {})[info["impl"]] = {
            "median": b["stats"]["median"],
            "bytes": info["bytes"],
        }
    peak = next((v for k, v in PEAK_GBPS.items() if k in device), None)
    impls = ["kernel", "runs", "eager", "compile", "memcpy"]
    head = "| shape | " + " | ".join(f"{i} ms | {i} GB/s" for i in impls)
    head += " | eager/compile | eager/runs | compile/runs | eager/kernel | compile/kernel |"
    if peak:
        head += " kernel % of peak |"
    out = [f"device: {device}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for shape in [f"{s}{r}" for s in SHAPES for r in ("", " rotate")]:
        r = rows.get(shape)
        if not r:
            continue
        if shape.endswith(" rotate") and "memcpy" in rows.get(shape.removesuffix(" rotate"), {}):
            r = {**r, "memcpy": rows[shape.removesuffix(" rotate")]["memcpy"]}
        cells = []
        for i in impls:
            if i in r:
                t = r[i]["median"]
                cells.append(f"{t * 1e3:.3f} | {r[i]['bytes'] / t / 1e9:.1f}")
            else:
                cells.append("– | –")
        line = f"| {shape} | " + " | ".join(cells)
        line += f" | {_ratio(r, 'eager', 'compile')} | {_ratio(r, 'eager', 'runs')} | "
        line += f"{_ratio(r, 'compile', 'runs')} | {_ratio(r, 'eager', 'kernel')} | "
        line += f"{_ratio(r, 'compile', 'kernel')} |"
        if peak:
            k = r.get("kernel")
            line += f" {k['bytes'] / k['median'] / 1e9 / peak * 100:.0f}% |" if k else " – |"
        out.append(line)
    return "\n".join(out)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
