"""A 100,000-token history on the embedded model, on the CPU: time, peak RSS, budget.

Ingests 100,000 tokens of standard-library source into a SmolLM2-135M session with
``w_max = 2048``, then decodes 96 tokens (three refocus blocks). Checks, while it
runs, that the cache never holds more than ``W_max + K`` entries and that the
working context passes ``check()`` after every refocus; reports the ingest time,
tokens/s, decode ms/token and the process's peak resident memory.

    .venv/bin/python -m pytest bench/bench_runtime_ingest.py --benchmark-enable \
        --benchmark-json=bench/results/runtime_ingest-cpu-<date>.json -s
"""

from __future__ import annotations

import inspect
import resource
import time

import torch

import megacontext as mc

TOKENS, W_MAX, DECODE = 100_000, 2048, 96


def _history(base: mc.Base) -> torch.Tensor:
    import asyncio.base_events
    import email.message
    import typing

    text = "".join(inspect.getsource(m) for m in (typing, email.message, asyncio.base_events))
    ids = base.encode(text)
    return ids.repeat(-(-TOKENS // ids.numel()))[:TOKENS]


def test_ingest_100k(benchmark):
    base = mc.load_base("smollm2-135m")
    cfg = mc.MegaContextConfig(model=base.name, w_max=W_MAX)
    ids = _history(base)
    out = {}

    def run():
        session = mc.MegaContext(base, None, None, cfg).session()
        original = session.refocus
        peak_cache = [0]

        def checked_refocus():
            actions = original()
            session.wc.check(session.tree)
            peak_cache[0] = max(peak_cache[0], max(session.cache.lengths))
            return actions

        session.refocus = checked_refocus
        t0 = time.perf_counter()
        session.ingest(ids)
        t1 = time.perf_counter()
        session.generate(DECODE)
        t2 = time.perf_counter()
        assert max(session.cache.lengths) <= W_MAX + cfg.block_size
        assert peak_cache[0] <= W_MAX + cfg.block_size
        out.update(
            ingest_s=t1 - t0,
            ingest_tokens_per_s=TOKENS / (t1 - t0),
            decode_ms_per_token=(t2 - t1) * 1e3 / DECODE,
            refocus_iterations=len(session.history),
            wc=repr(session.wc),
            peak_cache_rows=peak_cache[0],
        )

    benchmark.pedantic(run, rounds=1, iterations=1)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    benchmark.extra_info.update(out, tokens=TOKENS, w_max=W_MAX, model=base.name)
    print(out)
