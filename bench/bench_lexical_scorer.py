"""The lexical focus scorer (``lens: lexical``) vs one LensNet forward, per refocus.

One scoring call on a history of T ∈ {8,192, 131,072} tokens (random ids from a
49,152-token vocabulary, two gist levels) read through a recency working context of
W = 1,024 entries: ``lexical`` is :func:`~megacontext.lexical_scorer.lexical_scores`
(BM25 over every complete block before the protected tail, O(T · |q|), on the CPU
where the tree's ids live); ``lensnet`` is ``LensNet(576)`` (SmolLM2-135M's width,
the default d_lens) over the same W entries, where a session would run it.

    .venv/bin/python -m pytest bench/bench_lexical_scorer.py --benchmark-enable \\
        --benchmark-json=bench/results/lexical-scorer-<device>-<date>.json
    .venv/bin/python bench/bench_lexical_scorer.py bench/results/lexical-scorer-<device>-<date>.json

The summary prints lexical / lensnet per T. Absolute times on a shared CPU machine
are not claims.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import megacontext as mc
from megacontext.lensnet import LensNet
from megacontext.lexical_scorer import lexical_scores
from megacontext.tree import MegaContextTree
from megacontext.working_context import WorkingContext

W, DIM, BS = 1024, 576, 32
TS = (8192, 131072)
_state: dict = {}


def _history(T: int):
    if T not in _state:
        tree = MegaContextTree(8, block_size=BS, levels=2)
        ids = torch.randint(0, 49152, (T,), generator=torch.Generator().manual_seed(T))
        tree.append(ids, lambda x: torch.zeros(x.numel(), 8))
        wc = WorkingContext.from_tree(tree, W)
        cfg = mc.MegaContextConfig(w_max=W, lens="lexical")
        _state[T] = (tree, wc, cfg)
    return _state[T]


@pytest.mark.parametrize("T", TS)
def test_lexical(benchmark, T):
    tree, wc, cfg = _history(T)
    benchmark.group = f"T={T}"
    out = benchmark(lexical_scores, tree, wc, cfg)
    assert out.shape == (len(wc),)


@pytest.mark.parametrize("T", TS)
def test_lensnet(benchmark, T):
    _, wc, _ = _history(T)
    benchmark.group = f"T={T}"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lens = LensNet(DIM).to(dev).eval()
    n = len(wc)
    args = (
        torch.randn(1, n, DIM, device=dev),
        torch.randn(1, lens.config.tail_size, DIM, device=dev),
        wc.levels[None].to(dev),
        wc.spans[None].to(dev),
        torch.arange(n, 0, -1, device=dev)[None],
    )

    def run():
        with torch.no_grad():
            return lens(*args)[0].float().cpu()

    out = benchmark(run)
    assert out.shape[-1] == n


def summary(path: str) -> None:
    data = json.loads(Path(path).read_text())
    by = {}
    for b in data["benchmarks"]:
        by.setdefault(b["group"], {})[b["name"].split("[")[0]] = b["stats"]["median"]
    for group, d in sorted(by.items()):
        print(f"{group}: lexical / lensnet = {d['test_lexical'] / d['test_lensnet']:.2f}")


if __name__ == "__main__":
    summary(sys.argv[1])
