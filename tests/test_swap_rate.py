"""Swap rate as the guide means it: forced (budget-floor) vs discretionary actions,
ping-pong against the allocator's hysteresis, and ``accept``'s verdict on them."""

from __future__ import annotations

import math

import pytest
import torch

import megacontext as mc
from megacontext.eval import accept as acc
from megacontext.eval.methods import GroupRandomLens
from megacontext.telemetry import budget_floor, pingpong_count, pingpongs, swap_counts


def _a(kind, cost_delta, step=0, level=1, node=0):
    return {"step": step, "kind": kind, "level": level, "node": node, "cost_delta": cost_delta}


def test_budget_floor_formula():
    assert budget_floor(512, 512, 32) == 0
    assert budget_floor(544, 512, 32) == 2  # 32 over: one collapse frees 31, two needed
    assert budget_floor(543, 512, 32) == 1
    assert budget_floor(100, 512, 32) == 0
    with pytest.raises(mc.InputError, match="block_size"):
        budget_floor(10, 5, 1)


def test_hand_built_trace_forced_and_discretionary():
    K, W = 32, 512
    # a full WC plus one decoded block (cost W + 31 after the block's 32 entries
    # replaced the partial block's entry): one forced collapse, then an expand
    # paid for by a collapse, then a collapse on score alone
    trace = [_a("collapse", -31), _a("expand", 31), _a("collapse", -31), _a("collapse", -31)]
    c = swap_counts(trace, cost_before=W + 31, cost_after=W - 31, w_max=W, block_size=K)
    assert c == (4, 1, 3, False)
    # a WC 40 over needs two collapses: both forced; the expand and the third
    # collapse (which made room for it) are discretionary
    trace = [_a("collapse", -31)] * 3 + [_a("expand", 31)]
    c = swap_counts(trace, cost_before=W + 40, cost_after=W - 22, w_max=W, block_size=K)
    assert c == (4, 2, 2, False)
    # under budget: nothing is forced
    c = swap_counts([_a("expand", 31)], cost_before=100, cost_after=131, w_max=W, block_size=K)
    assert c == (1, 0, 1, False)
    # hysteresis held back the collapses: the actions left the WC over budget and a
    # recency rebuild fixed it; everything in that step counts as forced
    c = swap_counts([_a("collapse", -31)], cost_before=W + 70, cost_after=W, w_max=W, block_size=K)
    assert c == (1, 1, 0, True)
    # the floor never exceeds the collapses taken
    c = swap_counts([], cost_before=W + 70, cost_after=W - 10, w_max=W, block_size=K)
    assert c == (0, 0, 0, True)


def test_swap_counts_rejects_costs_that_disagree_with_the_trace():
    with pytest.raises(mc.InvariantError, match="cost_after"):
        swap_counts([_a("expand", 31)], cost_before=100, cost_after=100, w_max=512, block_size=32)
    with pytest.raises(mc.InvariantError, match="w_max"):
        swap_counts([], cost_before=600, cost_after=600, w_max=512, block_size=32)
    with pytest.raises(mc.InputError, match="kind"):
        swap_counts([_a("swap", 0)], cost_before=1, cost_after=1, w_max=512, block_size=32)


def test_pingpongs_use_the_hysteresis_gap():
    # node (1, 0): expand at 0, collapse back at 2 (gap 2), expand again at 5 (gap 3)
    trace = [_a("expand", 31, 0), _a("collapse", -31, 2), _a("expand", 31, 5)]
    assert pingpongs(trace, cooldown_steps=2, min_residency=3) == 1  # 2 < 3
    assert pingpongs(trace, cooldown_steps=2, min_residency=2) == 0
    assert pingpongs(trace, cooldown_steps=4, min_residency=0) == 2  # both gaps < 4
    # refining further (another node) and repeating the same kind are not flip-backs
    same = [_a("expand", 31, 0), _a("expand", 31, 1, node=1), _a("collapse", -31, 1, node=2)]
    assert pingpongs(same, cooldown_steps=2, min_residency=3) == 0
    assert pingpong_count(trace, window=2)["flip_backs"] == 2


def _random_decode(tiny_base, cooldown, min_res, blocks=64):
    bs = 8
    cfg = mc.MegaContextConfig(
        model=tiny_base.name,
        block_size=bs,
        levels=2,
        w_max=96,
        recent_tokens=2 * bs,
        cooldown_steps=cooldown,
        min_residency=min_res,
        kv_mode="exact",
        # the allocator under a random scorer: the base model's check of the focus
        # (verify_tokens) would drop it at the ingest and keep it off while decoding
        verify_tokens=0,
    )
    s = mc.MegaContext(tiny_base, None, GroupRandomLens(seed=3, block_size=bs), cfg).session()
    g = torch.Generator().manual_seed(0)
    s.ingest(torch.randint(0, 1000, (40 * bs,), generator=g))
    n = len(s.history)
    s.feed(torch.randint(0, 1000, (blocks * bs,), generator=g))
    return s, s.history[n:]


def test_long_random_decode_has_no_pingpong_and_consistent_counts(tiny_base):
    s, rows = _random_decode(tiny_base, cooldown=2, min_res=3)
    assert len(rows) == 64 and sum(r["blocks"] for r in rows) == 64
    assert len(s.actions) > 64  # the random scorer acts beyond the floor
    assert pingpongs(s.actions, 2, 3) == 0
    assert pingpong_count(s.actions, window=100)["flip_backs"] > 0  # nodes do flip back
    for r in rows:
        assert r["n_budget_collapses"] + r["n_discretionary"] == r["n_expand"] + r["n_collapse"]
        assert r["focus_swap_rate"] == r["n_discretionary"] / r["blocks"]
    assert sum(r["n_discretionary"] for r in rows) > 0
    # the same check catches thrash: without hysteresis nodes flip back at once
    s0, _ = _random_decode(tiny_base, cooldown=0, min_res=0)
    assert pingpongs(s0.actions, 2, 3) > 0


def _rows(discretionary, blocks=100, forced=100):
    # one row per block; the first ``discretionary`` rows carry one extra action
    return [
        {
            "blocks": 1,
            "n_expand": int(i < discretionary),
            "n_collapse": 1,
            "n_budget_collapses": 1,
            "n_discretionary": int(i < discretionary),
        }
        for i in range(blocks)
    ]


def test_accept_judges_the_discretionary_rate_and_reports_the_total():
    ok = acc.swap_criteria(_rows(25), [[]], [4, 4], cooldown_steps=2, min_residency=3)
    by = {c.name: c for c in ok}
    assert [c.name for c in ok] == ["focus_swap_rate", "swap_rate", "pingpong", "mean_residency"]
    assert by["focus_swap_rate"].value == 0.25 and by["focus_swap_rate"].passed
    assert by["swap_rate"].value == 1.25 and by["swap_rate"].informational
    assert "FAIL" not in by["swap_rate"].verdict  # printed, never judged
    assert acc.all_passed(ok)
    bad = acc.swap_criteria(_rows(26), [[]], [4, 4], cooldown_steps=2, min_residency=3)
    assert bad[0].value == 0.26 and not bad[0].passed
    assert not acc.all_passed(bad)


def test_accept_fails_on_pingpong_or_low_residency():
    flip = [_a("expand", 31, 0), _a("collapse", -31, 1)]
    crit = acc.swap_criteria(_rows(0), [flip], [4, 4], cooldown_steps=2, min_residency=3)
    assert crit[2].name == "pingpong" and crit[2].value == 1 and not acc.all_passed(crit)
    crit = acc.swap_criteria(_rows(0), [[]], [2, 3], cooldown_steps=2, min_residency=3)
    assert not crit[3].passed and not acc.all_passed(crit)
    crit = acc.swap_criteria([], [[]], [], cooldown_steps=2, min_residency=3)
    assert math.isnan(crit[0].value) and not acc.all_passed(crit)


def test_accept_rejects_rows_whose_counts_disagree():
    rows = _rows(1)
    rows[0]["n_discretionary"] = 0
    with pytest.raises(mc.InputError, match="disagree"):
        acc.swap_criteria(rows, [[]], [4], cooldown_steps=2, min_residency=3)
