"""KV refocus: ``splice`` against ``exact`` on the same text — ΔNLL and cost.

Both modes read the same history and are fed the same continuation token by token
(teacher forcing, :meth:`Session.feed`), with the same focus decisions: LensNet's
scores depend on the entries' embeddings, not on the cache, so the allocator takes
identical actions in both modes. ``exact`` recomputes the cache after the first
changed entry (equal to a fresh forward); ``splice`` moves kept rows and computes
only inserted ones, so entries after a change keep K/V computed under the old
context. The benchmark reports the mean NLL of the continuation in each mode, their
difference (splice's approximation error, in nats per token), and the time of the
whole feed (refocus included) in each mode.

An untrained LensNet with ``tau_expand = tau_collapse = 0`` makes the allocator act
at every refocus (its small scores of both signs pass a zero threshold), which is the
stress case for splice. ``MEGACONTEXT_BENCH_MODEL`` (default ``smollm2-135m``).

    .venv/bin/python -m pytest bench/bench_kv_refocus.py --benchmark-enable \
        --benchmark-json=bench/results/kv_refocus-cpu-<date>.json
    .venv/bin/python bench/bench_kv_refocus.py bench/results/kv_refocus-cpu-<date>.json
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import megacontext as mc

MODEL = os.environ.get("MEGACONTEXT_BENCH_MODEL", "smollm2-135m")
W_MAX, HISTORY, CONTINUATION = 512, 2048, 256


@pytest.fixture(scope="module")
def base():
    return mc.load_base(MODEL)


@pytest.fixture(scope="module")
def text_ids(base):
    import email.message

    ids = base.encode(inspect.getsource(email.message))
    assert ids.numel() >= HISTORY + CONTINUATION
    return ids[:HISTORY], ids[HISTORY : HISTORY + CONTINUATION]


@pytest.mark.parametrize("mode", ["exact", "splice"])
def test_feed(benchmark, base, text_ids, mode):
    history, continuation = text_ids
    cfg = mc.MegaContextConfig(
        model=base.name, w_max=W_MAX, kv_mode=mode, tau_expand=0.0, tau_collapse=0.0
    )
    torch.manual_seed(0)  # the same untrained LensNet in both modes
    lens = mc.LensNet(base.dim).to(device=base.device, dtype=base.dtype).eval()
    system = mc.MegaContext(base, None, lens, cfg)
    state = {}

    def setup():
        session = system.session()
        session.ingest(history)
        state["s"] = session

    def feed():
        state["nll"] = state["s"].feed(continuation)

    benchmark.pedantic(feed, setup=setup, rounds=1, iterations=1)
    s = state["s"]
    benchmark.extra_info.update(
        mode=mode,
        model=base.name,
        w_max=W_MAX,
        tokens=int(continuation.numel()),
        mean_nll=float(state["nll"].mean()),
        actions=len(s.actions),
        actions_trace=[list(a[:4]) for a in s.actions],
        cache_ms=sum(r["latency_cache_ms"] for r in s.history),
    )


def report(path: str) -> str:
    data = json.loads(Path(path).read_text())
    by = {b["extra_info"]["mode"]: b for b in data["benchmarks"]}
    ex, sp = by["exact"]["extra_info"], by["splice"]["extra_info"]
    same = ex["actions_trace"] == sp["actions_trace"]
    lines = [
        f"model {ex['model']}, W_max {ex['w_max']}, {ex['tokens']} teacher-forced tokens, "
        f"{ex['actions']} allocator actions (identical in both modes: {same})",
        "",
        "| mode | mean NLL (nats) | feed time (s) | KV refocus time (ms) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for mode in ("exact", "splice"):
        e = by[mode]["extra_info"]
        lines.append(
            f"| {mode} | {e['mean_nll']:.4f} | {by[mode]['stats']['median']:.2f} | "
            f"{e['cache_ms']:.0f} |"
        )
    lines += ["", f"ΔNLL (splice - exact): {sp['mean_nll'] - ex['mean_nll']:+.4f} nats/token"]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(sys.argv[1]))
