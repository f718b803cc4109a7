"""Focus allocator step (python reference vs C++ vs CUDA) and the WC embedding gather.

One step of ``FocusAllocator.step`` (the public API: argument checks, the backend,
the WC update and the returned action list) on a working context of N entries
built by ``WorkingContext.from_tree`` at ``w_max = N`` (block size 32, 2 gist
levels; the WC is at its budget, so expands must be paid for by collapses), with
uniform random scores in [-1, 1] (many candidates on both queues, n_diff = 4).
Each round restores the same WC and hysteresis state, so every backend does the
same work. The cuda case (marked ``gpu``) times CUDA-graph replays of the device
op with CUDA events.

    .venv/bin/python -m pytest bench/bench_focus_allocator.py --benchmark-enable \
        --benchmark-json=bench/results/focus_allocator-<device>-<date>.json
    .venv/bin/python bench/bench_focus_allocator.py bench/results/focus_allocator-<device>-<date>.json

The second command prints the Markdown table and the cpp/python ratios.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

import megacontext as mc
from megacontext import native
from megacontext.allocator import FocusAllocator
from megacontext.working_context import WorkingContext

BS, LEVELS, DIM, VOCAB = 32, 2, 576, 49152
SIZES = (8192, 65536)
# graph replays timed per round of the CUDA case (per-step times divide by it)
CUDA_GRAPH_REPS = 200
CUDA = torch.cuda.is_available()
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]


class SyntheticTree:
    """The tree interface the WC needs, over preallocated tensors: ``T`` tokens with
    ``T // 32**l`` random gists per level (the bench measures the WC, not storage)."""

    def __init__(self, num_tokens: int, dim: int = DIM, with_data: bool = False):
        self.num_tokens, self.block_size, self.levels, self.dim = num_tokens, BS, LEVELS, dim
        self.dtype = torch.float16
        g = torch.Generator().manual_seed(0)
        self._ids = torch.randint(0, VOCAB, (num_tokens,), generator=g) if with_data else None
        self._gists = (
            [None]
            + [
                torch.randn(num_tokens // BS**lv, dim, generator=g).to(self.dtype)
                for lv in range(1, LEVELS + 1)
            ]
            if with_data
            else None
        )

    def num_nodes(self, level: int) -> int:
        return self.num_tokens if level == 0 else self.num_tokens // BS**level

    def tokens(self, start: int, end: int) -> torch.Tensor:
        return self._ids[start:end].clone()

    def gists(self, level: int) -> torch.Tensor:
        return self._gists[level]


def _history_for(n: int) -> int:
    # Long enough that from_tree must mix LOD2, LOD1 and LOD0 to fill w_max = n.
    return n * 250


def _setup(n: int, device: str = "cpu"):
    cfg = mc.MegaContextConfig(block_size=BS, levels=LEVELS, w_max=n)
    wc = WorkingContext.from_tree(SyntheticTree(_history_for(n)), n, device=device)
    g = torch.Generator().manual_seed(1)
    scores = (torch.rand(len(wc), generator=g) * 2 - 1).to(device)
    return cfg, wc, scores


BACKENDS = ["python", "cpp", pytest.param("cuda", marks=GPU)]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_allocator_step(benchmark, backend, n):
    if backend == "cpp" and not native.available():
        pytest.skip("megacontext._C not built")
    device = "cuda" if backend == "cuda" else "cpu"
    cfg, wc0, scores = _setup(n, device)
    alloc = FocusAllocator(cfg, backend)
    alloc.step(wc0.clone(), scores)  # sizes the state, warms caches
    alloc.reset()
    alloc._ensure_state(wc0.num_tokens, wc0.device)
    state0 = alloc._state.clone()
    benchmark.group = f"allocator step N={n}"
    benchmark.extra_info.update(backend=backend, n=len(wc0), w_max=n, tokens=wc0.num_tokens)

    if backend == "cuda":
        _bench_cuda(benchmark, alloc, wc0, scores, state0)
        return

    def setup():
        alloc._state.copy_(state0)
        return (wc0.clone(),), {}

    actions = []

    def run(wc):
        actions[:] = alloc.step(wc, scores)

    rounds = {"python": 3 if n > 10000 else 10, "cpp": 200}[backend]
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info["actions"] = len(actions)


def _bench_cuda(benchmark, alloc, wc0, scores, state0):
    """Device time of one step, with CUDA events around CUDA-graph replays of
    (restore the state, run the op): replays keep the host's launch overhead out
    of the measurement, so the events see the device work (the op's output
    zero-fills, the kernel and the copy that restores the state)."""
    from megacontext.allocator import focus_step

    p = alloc._params(wc0)
    args = (p.packed(),)
    state = state0.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (allocator pools, module load)
        for _ in range(3):
            state.copy_(state0)
            focus_step(wc0.levels, wc0.nodes, scores, state, *args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        state.copy_(state0)
        focus_step(wc0.levels, wc0.nodes, scores, state, *args)
    reps = CUDA_GRAPH_REPS
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run():
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps * 1e3  # µs per step

    run()
    benchmark.extra_info["cuda_event_us_per_step"] = run()
    benchmark.extra_info["reps"] = reps
    benchmark.pedantic(run, rounds=5, iterations=1)


@pytest.mark.parametrize("n", SIZES)
def test_wc_embedding_gather(benchmark, n):
    tree = SyntheticTree(_history_for(n), with_data=True)
    wc = WorkingContext.from_tree(tree, n)
    emb = torch.nn.Embedding(VOCAB, DIM)

    class Base:
        def embed(self, ids):
            return emb(ids)

    base = Base()
    counts = torch.bincount(wc.levels.to(torch.int64), minlength=LEVELS + 1).tolist()
    benchmark.group = f"wc embeddings N={n}"
    benchmark.extra_info.update(n=len(wc), d=DIM, per_level=counts)
    with torch.no_grad():
        out = benchmark.pedantic(
            wc.embeddings, args=(base, tree), rounds=20, iterations=1, warmup_rounds=1
        )
    assert out.shape == (len(wc), DIM)


# -------------------------------------------------------------------- the report


def summarize(path: str) -> str:
    with open(path) as fh:
        data = json.load(fh)
    rows, step = [], {}
    for b in data["benchmarks"]:
        info, st = b["extra_info"], b["stats"]
        med_us, min_us = st["median"] * 1e6, st["min"] * 1e6
        if "backend" in info:
            step[(info["backend"], info["w_max"])] = st["median"]
            what = f"step {info['backend']}"
            extra = f"{info.get('actions', '')} actions"
            if "cuda_event_us_per_step" in info:
                # a round is `reps` graph replays: report per step, as the median is
                reps = info.get("reps", CUDA_GRAPH_REPS)
                med_us, min_us = info["cuda_event_us_per_step"], min_us / reps
                extra = f"one CUDA-graph replay, {reps} per round (CUDA events)"
        else:
            what = "embeddings gather"
            extra = f"d={info['d']}, per level {info['per_level']}"
        n = info["n"]
        rows.append(f"| {what} | {n} | {med_us:,.1f} | {min_us:,.1f} | {extra} |")
    out = ["| case | N | median µs | min µs | notes |", "|---|---:|---:|---:|---|", *rows, ""]
    for n in SIZES:
        if ("python", n) in step and ("cpp", n) in step:
            ratio = step[("python", n)] / step[("cpp", n)]
            out.append(f"- cpp vs python at w_max={n}: **{ratio:.1f}× faster** (medians)")
    return "\n".join(out)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
