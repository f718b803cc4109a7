"""Peers at equal budget: same tokens, same targets, W entries each (tiny-llama)."""

from __future__ import annotations

import math

import pytest
import torch

import megacontext as mc
from megacontext.errors import InputError
from megacontext.eval.methods import build_view, peer_names
from megacontext.eval.peers import (
    infllm_view,
    streaming_view,
    untrained_system,
    view_generate,
    view_nll,
)
from megacontext.eval.suites import add_derived, compare_methods

T, W, H = 300, 128, 12


@pytest.fixture(scope="module")
def base():
    return mc.load_base("tiny-llama")


@pytest.fixture(scope="module")
def system(base):
    return untrained_system(base, mc.MegaContextConfig(model="tiny-llama", w_max=W))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 5000, (T + H,), generator=g)
    return ids[:T], ids[T:]


def _direct_nll(base, ids, targets, positions):
    """Reference: input_ids forward of history+targets at the given positions."""
    x = torch.cat([ids, targets[:-1]])[None]
    pos = torch.cat([positions, torch.arange(H - 1) + positions[-1] + 1])[None]
    logits = base.model(input_ids=x, position_ids=pos).logits[0, -H:].float()
    return -logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]


def test_every_peer_reads_w_entries_and_the_same_targets(base, system, data):
    hist, tgt = data
    rows = compare_methods(base, hist, tgt, W, system=system)
    by = {r["method"]: r for r in rows}
    # untrained system: mean-pool gists, so mc_meanpool is the system itself
    assert set(by) == set(peer_names()) - {"mc_meanpool"}
    assert by["full"]["entries"] == T
    for m in ("truncation", "streaming", "infllm"):
        assert by[m]["entries"] == W, m
    for m in ("mc_recency", "mc_attention", "megacontext"):
        # MegaContext changes LOD in groups of 31: it reads at most W, at least W - 31
        assert W - 31 <= by[m]["entries"] <= W, m
    for r in rows:
        assert r["budget"] == W and r["horizon"] == H and r["history_tokens"] == T
        assert len(r["token_nll"]) == H
        r.pop("_session", None)
    add_derived(rows, ("budget",))
    assert by["full"]["delta_nll"] == 0.0
    # truncation recovers nothing by definition; NaN when it loses < 0.01 nats
    if abs(by["truncation"]["delta_trunc"]) < 0.01:
        assert math.isnan(by["truncation"]["recovered"])
    else:
        assert by["truncation"]["recovered"] == pytest.approx(0.0)


@torch.no_grad()
def test_view_nll_matches_direct_forward(base, data):
    hist, tgt = data
    full = view_nll(base, build_view(base, hist, W, "full"), tgt)
    ref = _direct_nll(base, hist, tgt, torch.arange(T))
    torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-4)
    trunc = view_nll(base, build_view(base, hist, W, "truncation"), tgt)
    ref = _direct_nll(base, hist[T - W :], tgt, torch.arange(T - W, T))
    torch.testing.assert_close(trunc, ref, rtol=1e-4, atol=1e-4)
    # streaming: 4 sinks + last W-4, positions re-indexed 0..W-1
    s = streaming_view(base, hist, W)
    assert torch.equal(s.positions, torch.arange(W)) and s.next_position == W
    ref = _direct_nll(base, torch.cat([hist[:4], hist[T - W + 4 :]]), tgt, torch.arange(W))
    torch.testing.assert_close(view_nll(base, s, tgt), ref, rtol=1e-4, atol=1e-4)


def test_mc_view_equals_runtime_wc_nll(base, system, data):
    from megacontext.runtime import wc_nll

    hist, tgt = data
    v = build_view(base, hist, W, "megacontext", system)
    s = v.session
    kw = {
        "positions": s.config.positions,
        "max_gap": s.focus.max_gap,
        "sink": s.config.attention_sink,
    }
    ref = wc_nll(base, s.wc, s.tree, tgt, s.num_tokens, **kw)
    torch.testing.assert_close(view_nll(base, v, tgt), ref.cpu().float(), rtol=1e-4, atol=1e-4)
    assert s.wc.cost <= W and s.config.w_max == W


def test_infllm_layout(base):
    # a history whose block 5 repeats the query tokens: retrieval must pick it
    g = torch.Generator().manual_seed(1)
    hist = torch.randint(10, 5000, (T,), generator=g)
    hist[4 + 5 * 32 : 4 + 6 * 32] = hist[T - 32 :].repeat(1)[:32]
    v = infllm_view(base, hist, W, query_tokens=32)
    assert v.entries == W
    assert 4 + 5 * 32 in v.meta["blocks"]
    blocks = v.meta["blocks"]
    assert blocks == sorted(blocks) and all((b - 4) % 32 == 0 for b in blocks)
    assert v.meta["window"] + 4 + 32 * len(blocks) == W
    # InfLLM's positions: sinks and blocks at one fixed position 0, the window at
    # true distances 1..L, the targets from L + 1
    far = 4 + 32 * len(blocks)
    assert torch.equal(v.positions[:far], torch.zeros(far, dtype=torch.long))
    assert torch.equal(v.positions[far:], torch.arange(1, v.meta["window"] + 1))
    assert v.next_position == v.meta["window"] + 1
    # short history: read everything
    assert infllm_view(base, hist[:100], W).entries == 100


def test_view_generate_is_greedy(base, data):
    hist, _ = data
    v = build_view(base, hist, W, "truncation")
    text = view_generate(base, v, 5, stop=("\x00never",))
    ids = hist[T - W :].clone()
    pos = torch.arange(W)  # truncation re-indexes the window from 0
    want = []
    for _ in range(5):
        logits = base.model(input_ids=ids[None], position_ids=pos[None]).logits[0, -1]
        tok = int(logits.argmax())
        want.append(tok)
        ids = torch.cat([ids, torch.tensor([tok])])
        pos = torch.cat([pos, pos[-1:] + 1])
    assert text == base.decode(want).strip()


def test_bad_inputs(base, data):
    hist, _ = data
    with pytest.raises(InputError):
        build_view(base, hist, W, "nope")
    with pytest.raises(InputError):
        build_view(base, hist, W, "megacontext")  # needs a system
    with pytest.raises(InputError):
        streaming_view(base, hist, 3)
    with pytest.raises(InputError):
        view_nll(base, build_view(base, hist, W, "truncation"), [])


def test_full_row_is_reused_across_budgets(base, data):
    hist, tgt = data
    reuse: dict = {}
    a = compare_methods(base, hist, tgt, 64, methods=["full", "truncation"], reuse=reuse)
    b = compare_methods(base, hist, tgt, 96, methods=["full", "truncation"], reuse=reuse)
    assert a[0]["nll"] == b[0]["nll"] and b[0]["budget"] == 96 and a[0]["budget"] == 64
    assert b[1]["entries"] == 96
