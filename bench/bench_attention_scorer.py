"""The training-free attention scorer (``lens: attention``) vs one LensNet forward.

One focus-scoring call at N ∈ {1,024, 8,192} working-context entries with SmolLM2-135M
shapes (random tensors): 30 layers, 9 query heads, 3 KV heads, head_dim 64, d = 576.
``attention``: :class:`~megacontext.attention_scorer.AttentionScorer` over a
:class:`~megacontext.cache.MegaContextCache` holding N keys per layer and 32 recorded
query rows for the default layers (every 4th from the middle up: 15, 19, 23, 27),
returning the utilities on the CPU; ``lensnet``: ``LensNet(576)`` (d_lens 512, the
default) on the same N, scores on the CPU. Both run where the session would (CUDA in
bf16 when there is one, else fp32 on the CPU).

    .venv/bin/python -m pytest bench/bench_attention_scorer.py --benchmark-enable \
        --benchmark-json=bench/results/attention-scorer-<device>-<date>.json
    .venv/bin/python bench/bench_attention_scorer.py bench/results/attention-scorer-<device>-<date>.json

The summary prints the ratio attention / lensnet per N (the per-refocus cost of the
training-free scorer in units of a LensNet call). Absolute times on a shared CPU
machine are not claims.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megacontext.attention_scorer import AttentionScorer
from megacontext.cache import MegaContextCache
from megacontext.lensnet import LensNet
from megacontext.working_context import WorkingContext

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
LAYERS, HEADS, KV_HEADS, HEAD_DIM, DIM, BS = 30, 9, 3, 64, 576, 32
ROWS = 32
NS = (1024, 8192)
_cache: dict = {}


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _wc(n: int) -> WorkingContext:
    return WorkingContext(
        torch.zeros(n, dtype=torch.int64),
        torch.arange(n),
        block_size=BS,
        max_level=2,
        w_max=n,
        recent_tokens=2 * BS,
        num_tokens=n,
    )


def _attention(n: int):
    g = torch.Generator().manual_seed(0)
    config = SimpleNamespace(
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        hidden_size=HEADS * HEAD_DIM,
        head_dim=HEAD_DIM,
    )
    inv = 1.0 / (100000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    cache = MegaContextCache(
        LAYERS, KV_HEADS, HEAD_DIM, 1, n, DTYPE, DEVICE, double_buffer=False, inv_freq=inv
    )
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=g).to(DTYPE))
    cache.set_lengths([n])
    scorer = AttentionScorer(SimpleNamespace(config=config), cache, BS, rows=ROWS)
    rec = scorer.recorder
    rec.arm(torch.arange(n - ROWS, n), torch.arange(n - ROWS, n))
    for layer in scorer.layers:
        q = torch.randn(HEADS, ROWS, HEAD_DIM, generator=g).to(device=DEVICE, dtype=DTYPE)
        rec.write(layer, q)
    rec.disarm()
    wc = _wc(n)
    positions = torch.arange(n)
    return lambda: scorer(wc, positions)


def _lensnet(n: int):
    if "lens" not in _cache:
        torch.manual_seed(0)
        _cache["lens"] = LensNet(DIM).to(DEVICE, DTYPE).eval()
    lens = _cache["lens"]
    g = torch.Generator().manual_seed(1)
    entries = torch.randn(1, n, DIM, generator=g).to(device=DEVICE, dtype=DTYPE)
    tail = torch.randn(1, 6, DIM, generator=g).to(device=DEVICE, dtype=DTYPE)
    levels = torch.zeros(1, n, dtype=torch.long, device=DEVICE)
    spans = torch.ones(1, n, dtype=torch.long, device=DEVICE)
    distance = torch.arange(n, 0, -1, device=DEVICE)[None]

    def run():
        with torch.no_grad():
            return lens(entries, tail, levels, spans, distance)[0].float().cpu()

    return run


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("scorer", ["attention", "lensnet"])
def test_scoring_call(benchmark, scorer, n):
    fn = (_attention if scorer == "attention" else _lensnet)(n)
    out = fn()  # warm up outside the timing
    assert out.shape == (n,) and torch.isfinite(out).all()
    if scorer == "attention":
        assert float(out.abs().max()) <= 1.0

    def run():
        res = fn()
        _sync()
        return res

    benchmark.extra_info.update(
        {"scorer": scorer, "n": n, "device": DEVICE, "dtype": str(DTYPE).removeprefix("torch.")}
    )
    benchmark(run)


def summarize(path: str) -> list[str]:
    """``attention / lensnet`` time ratios per N from a ``--benchmark-json`` file: of
    the means and of the minima (the minimum is the steadier one on a shared machine)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    stats = {
        (b["extra_info"]["scorer"], b["extra_info"]["n"]): b["stats"]
        for b in data["benchmarks"]
        if "scorer" in b.get("extra_info", {})
    }
    lines = [
        "| N | attention mean / min (ms) | lensnet mean / min (ms) | ratio of means | ratio of minima |",
        "|---|---|---|---|---|",
    ]
    for n in sorted({k[1] for k in stats}):
        a, lens = stats.get(("attention", n)), stats.get(("lensnet", n))
        if a is None or lens is None:
            continue
        lines.append(
            f"| {n} | {a['mean'] * 1e3:.2f} / {a['min'] * 1e3:.2f} "
            f"| {lens['mean'] * 1e3:.2f} / {lens['min'] * 1e3:.2f} "
            f"| {a['mean'] / lens['mean']:.2f} | {a['min'] / lens['min']:.2f} |"
        )
    return lines


if __name__ == "__main__":
    print("\n".join(summarize(sys.argv[1])))
