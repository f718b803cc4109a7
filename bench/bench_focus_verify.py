"""The focus check after an ingest (``verify_tokens``) vs the ingest's own prefill.

:meth:`megacontext.focus.FocusLoop.verify` reads the last ``v = 32`` tokens of the
history under the focused working context and under the recency one: one forward of
the base model over two rows of about ``W`` entries. The prefill that every ingest
already runs is one forward over one row of ``W`` entries. Both on the embedded model
(SmolLM2-135M), ``W = 1,024``, a history of 8,192 tokens whose last 64 repeat a far
span (so the lexical scorer opens it and there is something to check).

    .venv/bin/python -m pytest bench/bench_focus_verify.py --benchmark-enable \\
        --benchmark-json=bench/results/focus-verify-<device>-<date>.json
    .venv/bin/python bench/bench_focus_verify.py bench/results/focus-verify-<device>-<date>.json

``verify_session`` is the same check given the recency WC's tail logits, as a
session runs it (its ingest prefill computed them): one row. The summary prints each
over prefill. Absolute times on a shared CPU machine are not claims.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import megacontext as mc
from megacontext.focus import FocusLoop, refocus_after_ingest
from megacontext.nll import context_logprobs
from megacontext.working_context import WorkingContext, with_sink

W, T = 1024, 8192
_state: dict = {}


def _loop():
    if not _state:
        base = mc.load_base("smollm2-135m")
        ids = torch.randint(5, base.vocab_size, (T,), generator=torch.Generator().manual_seed(0))
        ids[-64:] = ids[1000:1064]
        cfg = mc.MegaContextConfig(
            model=base.name, w_max=W, lens="lexical", refocus_iterations=8, verify_tokens=0
        )
        loop = FocusLoop(base, None, None, cfg)
        loop.ingest(ids)
        refocus_after_ingest(cfg, lambda: loop.refocus().actions)
        assert loop.verdicts == [] and len(loop.wc) > 0
        loop.config = cfg.model_copy(update={"verify_tokens": 32})
        _state.update(base=base, loop=loop, focused=loop.wc.clone())
    return _state


def test_verify(benchmark):
    s = _loop()
    loop = s["loop"]

    def reset():
        loop.wc = s["focused"].clone()
        return (), {}

    benchmark.group = f"W={W}"
    benchmark.pedantic(loop.verify, setup=reset, rounds=5, warmup_rounds=1)
    assert loop.verdicts[-1].tokens == 32  # both WCs were read


def test_verify_session(benchmark):
    """What a :class:`~megacontext.runtime.Session` runs: the recency row's logits come
    from its ingest prefill, so the check is one row."""
    s = _loop()
    base, loop = s["base"], s["loop"]
    recency = WorkingContext.from_tree(loop.tree, W, loop.config.protected_tokens)
    emb, pos = with_sink(
        base, recency.embeddings(base, loop.tree), loop.positions(recency), recency.levels, True
    )
    with torch.no_grad():
        logits = context_logprobs(base, emb[None], pos[None], logits_to_keep=33)[0]

    def reset():
        loop.wc = s["focused"].clone()
        return (logits,), {}

    benchmark.group = f"W={W}"
    benchmark.pedantic(loop.verify, setup=reset, rounds=5, warmup_rounds=1)
    assert loop.verdicts[-1].tokens == 32


def test_prefill(benchmark):
    s = _loop()
    base, loop, wc = s["base"], s["loop"], s["focused"]
    emb, pos = with_sink(base, wc.embeddings(base, loop.tree), loop.positions(wc), wc.levels, True)
    benchmark.group = f"W={W}"

    def run():
        with torch.no_grad():
            return context_logprobs(base, emb[None], pos[None])

    out = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    assert out.shape[:2] == (1, 1)


def summary(path: str) -> None:
    data = json.loads(Path(path).read_text())
    by = {}
    for b in data["benchmarks"]:
        by.setdefault(b["group"], {})[b["name"]] = b["stats"]["median"]
    for group, d in sorted(by.items()):
        for name in ("test_verify", "test_verify_session"):
            print(f"{group}: {name[5:]} / prefill = {d[name] / d['test_prefill']:.2f}")


if __name__ == "__main__":
    summary(sys.argv[1])
