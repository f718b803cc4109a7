"""FocusAllocator: each rule on hand-built WCs, backend agreement and invariants on
random trees/WCs/scores (hypothesis), hysteresis (ping-pong), the custom op.

Block size 4 keeps the hand-built cases readable: LOD1 node b covers tokens
[4b, 4b+4), LOD2 node b covers [16b, 16b+16), a collapse/expand costs -3/+3.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import megacontext as mc
from megacontext import native
from megacontext.allocator import (
    _MAX_TOP,
    ACTION_COLS,
    Action,
    FocusAllocator,
    StepParams,
    _capacities,
    _native_params,
    actions_from_tensor,
    actions_to_tensor,
    focus_step,
)
from megacontext.tree import MegaContextTree
from megacontext.working_context import WorkingContext, protected_start

HOST_BACKENDS = ["python", "cpp"]
needs_ext = pytest.mark.skipif(not native.available(), reason="megacontext._C not built")


def config(**kw) -> mc.MegaContextConfig:
    base = dict(block_size=4, levels=2, w_max=1000, recent_tokens=8, n_diff=4)
    base.update(kw)
    return mc.MegaContextConfig(**base)


def make_wc(entries, cfg: mc.MegaContextConfig, T: int | None = None) -> WorkingContext:
    bs = cfg.block_size
    if T is None:
        T = max(((n + 1) * bs**lv for lv, n in entries), default=0)
    return WorkingContext(
        torch.tensor([e[0] for e in entries], dtype=torch.int32),
        torch.tensor([e[1] for e in entries], dtype=torch.int64),
        block_size=bs,
        max_level=cfg.levels,
        w_max=cfg.w_max,
        recent_tokens=cfg.protected_tokens,
        num_tokens=T,
    )


def tokens(a: int, b: int) -> list[tuple[int, int]]:
    return [(0, i) for i in range(a, b)]


def f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def run(backend, cfg, wc, scores):
    alloc = FocusAllocator(cfg, backend)
    return alloc.step(wc, torch.tensor(scores, dtype=torch.float32))


def brief(actions: list[Action]) -> list[tuple[str, int, int]]:
    return [(a.kind[0].upper(), a.level, a.node) for a in actions]


@pytest.fixture(params=HOST_BACKENDS)
def backend(request):
    if request.param == "cpp" and not native.available():
        pytest.skip("megacontext._C not built")
    return request.param


# ------------------------------------------------------------------ single rules


def test_expand_threshold_order_and_recency_tie_break(backend):
    cfg = config()
    # LOD1 gists 0..5 (tokens 0..23), protected tail tokens 24..31.
    wc = make_wc([(1, b) for b in range(6)] + tokens(24, 32), cfg)
    scores = [0.2, 0.5, 0.9, 0.5, 0.1, 0.21] + [0.0] * 8
    acts = run(backend, cfg, wc, scores)
    # 0.2 is not > tau; the 0.5 tie goes to the newer span (node 3) first.
    assert brief(acts) == [("E", 1, 2), ("E", 1, 3), ("E", 1, 1), ("E", 1, 5)]
    assert [a.score for a in acts] == [f32(0.9), f32(0.5), f32(0.5), f32(0.21)]
    assert all(a.cost_delta == 3 and a.step == 0 for a in acts)
    wc.check()
    assert len(wc) == 14 + 4 * 3


def test_collapse_lowest_first_ties_older_first(backend):
    cfg = config(n_diff=3)
    wc = make_wc(tokens(0, 24), cfg)  # blocks 0..3 collapsible, 4..5 protected
    scores = [-0.5] * 4 + [-0.5] * 4 + [-0.9] * 4 + [-0.3] * 4 + [-1.0] * 8
    acts = run(backend, cfg, wc, scores)
    assert brief(acts) == [("C", 1, 2), ("C", 1, 0), ("C", 1, 1)]
    assert acts[0].score == f32(-0.9) and acts[0].cost_delta == -3
    assert wc.levels.tolist() == [1, 1, 1] + [0] * 4 + [0] * 8
    wc.check()


def test_alternation_starts_with_expand(backend):
    cfg = config()
    # LOD1 gists 0..3, blocks 4..7 as tokens, tail 32..39.
    wc = make_wc([(1, b) for b in range(4)] + tokens(16, 40), cfg)
    blocks = [-0.9, -0.8, -0.7, -0.6]
    scores = [0.9, 0.8, 0.7, 0.6] + [s for s in blocks for _ in range(4)] + [0.0] * 8
    acts = run(backend, cfg, wc, scores)
    assert brief(acts) == [("E", 1, 0), ("C", 1, 4), ("E", 1, 1), ("C", 1, 5)]
    wc.check()


@pytest.mark.parametrize("n_diff", [0, 1, 2, 3])
def test_n_diff_limits_actions(backend, n_diff):
    cfg = config(n_diff=n_diff)
    wc = make_wc([(1, b) for b in range(4)] + tokens(16, 40), cfg)
    scores = [0.9, 0.8, 0.7, 0.6] + [-0.9] * 16 + [0.0] * 8
    acts = run(backend, cfg, wc, scores)
    assert len(acts) == n_diff


def test_expand_that_does_not_fit_takes_collapses_first(backend):
    cfg = config(w_max=30)
    wc = make_wc([(1, b) for b in range(4)] + tokens(16, 40), cfg)  # cost 28
    blocks = [-0.9, -0.8, -0.7, -0.6]
    scores = [0.9, 0.8, 0.7, 0.6] + [s for s in blocks for _ in range(4)] + [0.0] * 8
    acts = run(backend, cfg, wc, scores)
    # 28 + 3 > 30: collapse block 4 first (25), expand (28), collapse (25), expand (28).
    assert brief(acts) == [("C", 1, 4), ("E", 1, 0), ("C", 1, 5), ("E", 1, 1)]
    assert len(wc) == 28
    wc.check()


def test_expand_without_room_and_without_collapses_does_nothing(backend):
    cfg = config(w_max=30)
    wc = make_wc([(1, b) for b in range(4)] + tokens(16, 40), cfg)
    scores = [0.9, 0.8, 0.7, 0.6] + [0.0] * 24  # no collapse below -tau
    assert run(backend, cfg, wc, scores) == []
    assert len(wc) == 28


def test_over_budget_start_collapses_first_beyond_n_diff(backend):
    cfg = config(w_max=30, n_diff=1)
    wc = make_wc(tokens(0, 40), cfg)  # cost 40 > 30; blocks 0..7 collapsible
    block = [0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, 0.6]
    scores = [s for s in block for _ in range(4)] + [0.9] * 8
    acts = run(backend, cfg, wc, scores)
    # Lowest score first, ignoring tau and n_diff, until 40 - 4*3 = 28 <= 30.
    assert brief(acts) == [("C", 1, 6), ("C", 1, 5), ("C", 1, 4), ("C", 1, 3)]
    assert len(wc) == 28
    wc.check()


def test_over_budget_then_normal_phase(backend):
    cfg = config(w_max=37, n_diff=2)
    wc = make_wc([(1, 0), (1, 1), (1, 2), (1, 3), *tokens(16, 52)], cfg)  # cost 40
    scores = [0.9, 0.0, 0.0, 0.0] + [-0.1] * 4 + [-0.5] * 4 + [0.0] * 28
    acts = run(backend, cfg, wc, scores)
    # Forced: block 5 (-0.5) -> 37. Then n_diff=2: expand (1,0) does not fit (40);
    # the only thresholded collapse is gone, so nothing more.
    assert brief(acts) == [("C", 1, 5)]
    wc.check()


def test_masks_lod0_top_level_protected_tail_nan(backend):
    # LOD0 never expands; tokens of the protected tail never collapse.
    cfg = config()
    wc = make_wc(tokens(0, 8), cfg)
    assert run(backend, cfg, wc, [1.0] * 4 + [-1.0] * 4) == []
    # The top level never collapses (levels=1: LOD1 is the top).
    cfg1 = config(levels=1)
    wc = make_wc([(1, b) for b in range(4)] + tokens(16, 24), cfg1)
    assert run(backend, cfg1, wc, [-1.0] * 12) == []
    # A NaN score masks its candidates (the gist, and the group holding it).
    wc = make_wc([(1, b) for b in range(4)] + tokens(16, 24), cfg)
    scores = [math.nan, -1.0, -1.0, -1.0] + [0.0] * 8
    assert run(backend, cfg, wc, scores) == []
    scores = [math.nan, 0.9, -1.0, -1.0] + [0.0] * 8
    assert brief(run(backend, cfg, wc, scores)) == [("E", 1, 1)]


def test_expand_removes_the_collapse_group_holding_it(backend):
    cfg = config()
    wc = make_wc([(1, b) for b in range(4)] + tokens(16, 24), cfg)
    scores = [0.9, -0.9, -0.9, -0.9] + [0.0] * 8  # group mean -0.45: also a candidate
    assert brief(run(backend, cfg, wc, scores)) == [("E", 1, 0)]
    wc.check()


def test_collapse_removes_expands_of_its_members(backend):
    cfg = config(w_max=18, n_diff=4)
    # Cost 20 > 18: forced collapse of the LOD1 group (mean -0.45) removes (1,0).
    wc = make_wc([(1, b) for b in range(4)] + tokens(16, 32), cfg)
    scores = [0.9, -0.9, -0.9, -0.9] + [0.0] * 16
    acts = run(backend, cfg, wc, scores)
    assert brief(acts) == [("C", 2, 0)]
    wc.check()


def test_cooldown_and_min_residency_on_one_node(backend):
    cfg = config(cooldown_steps=2, min_residency=3)
    alloc = FocusAllocator(cfg, backend)
    wc = make_wc([(1, b) for b in range(4)] + tokens(16, 24), cfg)

    def step(up: bool):
        if up:  # expand (1,0) when it is a gist
            s = [0.9 if (lv, nd) == (1, 0) else 0.0 for lv, nd in zip(*_entries(wc), strict=False)]
        else:  # collapse tokens 0..3 when they are tokens
            s = [-0.9 if lv == 0 and nd < 4 else 0.0 for lv, nd in zip(*_entries(wc), strict=False)]
        return brief(alloc.step(wc, torch.tensor(s)))

    assert step(True) == [("E", 1, 0)]  # t=0
    assert step(False) == []  # t=1: tokens created at 0, cooldown 2
    assert step(False) == []  # t=2: flipping back needs residency 3
    assert step(False) == [("C", 1, 0)]  # t=3
    assert step(True) == []  # t=4: gist created at 3 (cooldown)
    assert step(True) == []  # t=5: flip back within residency
    assert step(True) == [("E", 1, 0)]  # t=6
    assert alloc.step_count == 7
    assert alloc.last_changed(1)[0].item() == 6


def test_cooldown_without_residency_for_refinement(backend):
    # Expanding a child of a freshly expanded gist is not a flip back: only the
    # cooldown applies, not min_residency.
    cfg = config(cooldown_steps=2, min_residency=5)
    alloc = FocusAllocator(cfg, backend)
    wc = make_wc([(2, 0), *tokens(16, 24)], cfg)

    def scores():
        return torch.tensor(
            [
                0.9 if lv == 2 or (lv, nd) == (1, 3) else 0.0
                for lv, nd in zip(*_entries(wc), strict=False)
            ]
        )

    assert brief(alloc.step(wc, scores())) == [("E", 2, 0)]
    assert brief(alloc.step(wc, scores())) == []  # t=1 < cooldown
    assert brief(alloc.step(wc, scores())) == [("E", 1, 3)]  # t=2, residency not needed
    wc.check()


def _entries(wc):
    return wc.levels.tolist(), wc.nodes.tolist()


# -------------------------------------------------------------- front end, trace


def test_action_tensor_roundtrip():
    acts = [Action(3, "expand", 1, 7, 0.5, 31), Action(3, "collapse", 2, 0, -0.25, -31)]
    t = actions_to_tensor(acts)
    assert t.shape == (2, 6) and t.dtype == torch.float64
    assert t[1].tolist() == [3, 1, 2, 0, -0.25, -31]
    assert actions_from_tensor(t) == acts
    assert actions_to_tensor([]).shape == (0, 6)


def test_config_mismatch_and_bad_scores_are_errors():
    cfg = config()
    wc = make_wc(tokens(0, 8), cfg)
    alloc = FocusAllocator(cfg, "python")
    with pytest.raises(mc.ConfigError, match="scores") as err:
        alloc.step(wc, torch.zeros(7))
    assert err.value.field == "scores"
    other = make_wc(tokens(0, 8), config(w_max=999))
    with pytest.raises(mc.ConfigError, match="w_max"):
        alloc.step(other, torch.zeros(8))
    with pytest.raises(mc.ConfigError, match="backend"):
        FocusAllocator(cfg, "tpu")
    alloc.step(wc, torch.zeros(1, 8))  # [1, N] is accepted


def test_budget_smaller_than_protected_tail_is_error_at_construction():
    with pytest.raises(mc.ConfigError, match="w_max"):
        mc.MegaContextConfig(block_size=4, levels=2, w_max=11, recent_tokens=8)
    tree = MegaContextTree(4, block_size=4, levels=2, dtype=torch.float32)
    with pytest.raises(mc.ConfigError, match="protected tail"):
        WorkingContext.from_tree(tree, w_max=11, recent_tokens=8)


def test_backend_resolution(monkeypatch):
    cfg = config()
    wc = make_wc(tokens(0, 8), cfg)
    alloc = FocusAllocator(cfg)
    assert alloc.resolve_backend(wc) == ("cpp" if native.available() else "python")
    monkeypatch.setenv("MEGACONTEXT_BACKEND", "python")
    assert alloc.resolve_backend(wc) == "python"
    monkeypatch.setenv("MEGACONTEXT_BACKEND", "cuda")
    with pytest.raises(mc.BackendUnavailableError):
        alloc.resolve_backend(wc)  # the WC is on the CPU
    monkeypatch.delenv("MEGACONTEXT_BACKEND")
    if not native.cuda_available():
        with pytest.raises(mc.BackendUnavailableError):
            FocusAllocator(cfg, "cuda")


def test_top_level_export():
    assert mc.FocusAllocator is FocusAllocator
    assert mc.WorkingContext is WorkingContext
    assert mc.Action is Action


# ---------------------------------------------------------------- random inputs


def make_tree(T, bs, top, seed=0):
    g = torch.Generator().manual_seed(seed)
    tree = MegaContextTree(4, block_size=bs, levels=top, dtype=torch.float32)
    if T:
        table = torch.randn(50, 4, generator=g)
        tree.append(torch.randint(0, 50, (T,), generator=g), lambda ids: table[ids])
    return tree


def random_tiling(rng, T, bs, top, recent):
    p0 = protected_start(T, recent, bs)
    out, c = [], 0
    while c < p0:
        options = [lv for lv in range(top + 1) if c % bs**lv == 0 and c + bs**lv <= p0]
        lv = options[int(rng.integers(len(options)))]
        out.append((lv, c // bs**lv))
        c += bs**lv
    return out + tokens(p0, T)


def random_scores(rng, n, style):
    if style == "uniform":
        s = rng.uniform(-1, 1, n)
    elif style == "ties":  # few distinct values: exercises every tie-break
        s = rng.choice([-0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75], n)
    else:  # sparse NaN
        s = rng.uniform(-1, 1, n)
        s[rng.random(n) < 0.05] = np.nan
    return torch.tensor(s, dtype=torch.float32)


class HysteresisChecker:
    """Re-states the documented hysteresis from the action trace alone: an entry
    changes no sooner than ``cooldown`` steps after it appeared, and a node flips
    back no sooner than ``min_residency`` steps after its own last change."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.created: dict[tuple[int, int], int] = {}
        self.last: dict[tuple[int, int], int] = {}

    def feed(self, t, actions):
        bs, cd, mr = self.cfg.block_size, self.cfg.cooldown_steps, self.cfg.min_residency
        for a in actions:
            key = (a.level, a.node)
            if a.kind == "expand":
                c = self.created.get(key)
                if c is not None:
                    assert t - c >= cd, (a, c)
                    if self.last.get(key) == c:  # made by a collapse into it
                        assert t - c >= mr, (a, c)
                for j in range(bs):
                    self.created[(a.level - 1, a.node * bs + j)] = t
            else:
                for j in range(bs):
                    c = self.created.get((a.level - 1, a.node * bs + j))
                    assert c is None or t - c >= cd, (a, c)
                prev = self.last.get(key)
                assert prev is None or t - prev >= mr, (a, prev)
                self.created[key] = t
            self.last[key] = t


@needs_ext
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.one_of(st.integers(0, 40), st.integers(100, 600)),
    bs=st.sampled_from([2, 4]),
    top=st.integers(1, 3),
    recent=st.integers(0, 10),
    slack=st.integers(0, 80),
    n_diff=st.integers(0, 6),
    tau_e=st.sampled_from([0.0, 0.2, 0.5]),
    tau_c=st.sampled_from([0.0, 0.2, 0.5]),
    cooldown=st.integers(0, 3),
    min_res=st.integers(0, 4),
    steps=st.integers(1, 8),
    style=st.sampled_from(["uniform", "ties", "nan"]),
    start=st.sampled_from(["from_tree", "random"]),
    threads=st.sampled_from([1, 4, 32, 1024]),
    seed=st.integers(0, 2**31),
)
def test_random_backends_agree_and_invariants_hold(
    threads,
    T,
    bs,
    top,
    recent,
    slack,
    n_diff,
    tau_e,
    tau_c,
    cooldown,
    min_res,
    steps,
    style,
    start,
    seed,
):
    rng = np.random.default_rng(seed)
    tree = make_tree(T, bs, top, seed)
    if start == "random":
        entries = random_tiling(rng, T, bs, top, recent)
        w_max = max(len(entries), recent + bs) + slack
    else:
        w_max = recent + bs + slack
    cfg = mc.MegaContextConfig(
        block_size=bs,
        levels=top,
        w_max=w_max,
        recent_tokens=recent,
        n_diff=n_diff,
        tau_expand=tau_e,
        tau_collapse=tau_c,
        cooldown_steps=cooldown,
        min_residency=min_res,
    )
    if start == "random":
        wc = make_wc(entries, cfg, T=T)
    else:
        try:
            wc = WorkingContext.from_tree(tree, w_max, recent)
        except mc.ConfigError:
            return  # history too long for this budget: covered in test_working_context
    wc.check(tree)
    py, cpp = FocusAllocator(cfg, "python"), FocusAllocator(cfg, "cpp")
    # The CUDA kernel's selection (strided thread scans + tree reduction), run on
    # the host: the same shared code the device runs.
    emu = FocusAllocator(cfg, "cpp")
    emu._emulate_threads = threads
    wc_cpp, wc_emu = wc.clone(), wc.clone()
    checker = HysteresisChecker(cfg)
    taken = 0
    for t in range(steps):
        scores = random_scores(rng, len(wc), style)
        acts = py.step(wc, scores)
        assert cpp.step(wc_cpp, scores) == acts
        assert emu.step(wc_emu, scores) == acts
        assert torch.equal(wc.levels, wc_cpp.levels) and torch.equal(wc.nodes, wc_cpp.nodes)
        assert torch.equal(wc.levels, wc_emu.levels) and torch.equal(wc.nodes, wc_emu.nodes)
        assert torch.equal(py._state, cpp._state) and torch.equal(py._state, emu._state)
        wc.check(tree)
        assert len(wc) <= w_max
        assert len(acts) <= n_diff  # a legal start never needs forced collapses
        assert all(a.step == t for a in acts)
        checker.feed(t, acts)
        taken += len(acts)
    event(f"actions taken: {'yes' if taken else 'no'}")


@needs_ext
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(1, 400),
    bs=st.sampled_from([2, 4]),
    top=st.integers(1, 3),
    recent=st.integers(0, 8),
    over=st.integers(1, 60),
    seed=st.integers(0, 2**31),
)
def test_random_over_budget_start_collapses_first_until_it_fits(T, bs, top, recent, over, seed):
    rng = np.random.default_rng(seed)
    coarsest = len(random_tiling(_Largest(), T, bs, top, recent))
    w_max = max(coarsest, recent + bs, T - over)
    if w_max >= T:
        return
    cfg = mc.MegaContextConfig(
        block_size=bs,
        levels=top,
        w_max=w_max,
        recent_tokens=recent,
        n_diff=2,
        cooldown_steps=0,
        min_residency=0,
    )
    wc = make_wc(tokens(0, T), cfg, T=T)  # e.g. a fresh ingest: everything LOD0
    py, cpp = FocusAllocator(cfg, "python"), FocusAllocator(cfg, "cpp")
    wc_cpp = wc.clone()
    for _ in range(2 * top + 2):
        before = len(wc)
        if before <= w_max:
            break
        scores = random_scores(rng, len(wc), "uniform")
        acts = py.step(wc, scores)
        assert cpp.step(wc_cpp, scores) == acts
        assert torch.equal(wc.levels, wc_cpp.levels) and torch.equal(wc.nodes, wc_cpp.nodes)
        # The forced phase: leading collapses, lowest score first, while over budget.
        cost, k = before, 0
        while cost > w_max and k < len(acts) and acts[k].kind == "collapse":
            cost += acts[k].cost_delta
            k += 1
        assert k >= 1
        forced = [a.score for a in acts[:k]]
        assert forced == sorted(forced)
        # No expand happens while the WC is still over budget.
        assert cost <= w_max or all(a.kind == "collapse" for a in acts)
        assert len(wc) < before
    assert len(wc) <= w_max
    wc.check()


class _Largest:
    """A stand-in rng whose choice is always the coarsest option (largest level)."""

    def integers(self, n):
        return n - 1


@needs_ext
@pytest.mark.parametrize("cooldown, min_res", [(2, 3), (0, 0), (1, 4), (3, 1)])
def test_ping_pong_no_node_flips_faster_than_hysteresis(cooldown, min_res):
    bs, top = 4, 2
    tree = make_tree(16 * 12 + 5, bs, top)
    cfg = mc.MegaContextConfig(
        block_size=bs,
        levels=top,
        w_max=80,
        recent_tokens=8,
        n_diff=6,
        cooldown_steps=cooldown,
        min_residency=min_res,
    )
    for backend in HOST_BACKENDS:
        wc = WorkingContext.from_tree(tree, cfg.w_max, cfg.recent_tokens)
        alloc = FocusAllocator(cfg, backend)
        history: dict[tuple[int, int], list[int]] = {}
        for t in range(40):
            sign = 1.0 if t % 2 == 0 else -1.0
            acts = alloc.step(wc, torch.full((len(wc),), 0.9 * sign))
            wc.check(tree)
            for a in acts:
                history.setdefault((a.level, a.node), []).append(t)
        gaps = [b - a for steps in history.values() for a, b in itertools.pairwise(steps)]
        assert gaps, "the ping-pong must make some node flip back"
        assert min(gaps) >= max(cooldown, min_res, 1)
        if cooldown == min_res == 0:
            assert min(gaps) == 1  # without hysteresis it does thrash


# --------------------------------------------------------------- the custom op


@needs_ext
def test_custom_op_cpu_matches_backend_and_passes_opcheck():
    cfg = config(w_max=40)
    wc = make_wc([(1, b) for b in range(4)] + tokens(16, 40), cfg)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6] + [-0.9] * 16 + [0.0] * 8)
    alloc = FocusAllocator(cfg, "cpp")
    alloc._ensure_state(wc.num_tokens, wc.device)
    p = alloc._params(wc)
    args = (wc.levels, wc.nodes, scores, alloc._state.clone(), p.packed())
    torch.library.opcheck(focus_step, args)
    out_levels, out_nodes, actions, counts = focus_step(*args)
    ref = wc.clone()
    want = alloc.step(ref, scores)
    n, a = counts.tolist()
    assert actions_from_tensor(actions[:a]) == want
    assert torch.equal(out_levels[:n], ref.levels) and torch.equal(out_nodes[:n], ref.nodes)


@needs_ext
def test_custom_op_under_torch_compile():
    cfg = config(w_max=40)
    wc = make_wc([(1, b) for b in range(4)] + tokens(16, 40), cfg)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6] + [-0.9] * 16 + [0.0] * 8)
    alloc = FocusAllocator(cfg, "cpp")
    alloc._ensure_state(wc.num_tokens, wc.device)
    p = alloc._params(wc)
    state = alloc._state.clone()
    packed = p.packed()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def compiled(levels, nodes, scores, state):
        return torch.ops.megacontext.focus_step(levels, nodes, scores, state, packed)

    _out_levels, _out_nodes, actions, counts = compiled(wc.levels, wc.nodes, scores, state)
    assert int(state[0]) == 1  # the step counter lives in the mutated state
    want = alloc.step(wc.clone(), scores)
    assert actions_from_tensor(actions[: int(counts[1])]) == want


@needs_ext
def test_python_layouts_are_the_extensions():
    """StepParams' fields, the action columns and the level limit: one definition.

    The python backend runs without _C, so these are written in Python too; the
    native paths read _C's, and this pins the two to each other."""
    C = native.extension()
    assert tuple(f.name for f in dataclasses.fields(StepParams)) == C.STEP_PARAM_FIELDS
    assert Action._fields == C.ALLOC_ACTION_FIELDS
    assert ACTION_COLS == C.ALLOC_ACTION_COLS == len(C.ALLOC_ACTION_FIELDS)
    assert _MAX_TOP == C.ALLOC_MAX_TOP


def test_python_backend_needs_no_extension(monkeypatch):
    """Without _C the python backend (and auto, which falls back to it) still steps,
    and asking for the native backends or the op's packed params is a typed error."""
    cfg = config(w_max=40)
    wc = make_wc([(1, b) for b in range(4)] + tokens(16, 40), cfg)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6] + [-0.9] * 16 + [0.0] * 8)
    want = FocusAllocator(cfg, "python").step(wc.clone(), scores)
    monkeypatch.setattr(native, "_load", lambda: (None, "not built (test)"))
    monkeypatch.delenv("MEGACONTEXT_BACKEND", raising=False)
    alloc = FocusAllocator(cfg)
    assert alloc.resolve_backend(wc) == "python"
    assert alloc.step(wc.clone(), scores) == want
    assert actions_from_tensor(actions_to_tensor(want)) == want
    with pytest.raises(mc.BackendUnavailableError, match="not built"):
        FocusAllocator(cfg, "cpp")
    alloc._ensure_state(wc.num_tokens, wc.device)
    with pytest.raises(mc.BackendUnavailableError, match="not built"):
        alloc._params(wc).packed()


@needs_ext
def test_step_params_cross_as_one_struct():
    cfg = config(w_max=40, tau_expand=0.3, tau_collapse=0.7)
    wc = make_wc([(1, b) for b in range(4)] + tokens(16, 40), cfg)
    alloc = FocusAllocator(cfg, "cpp")
    alloc._ensure_state(wc.num_tokens, wc.device)
    p = alloc._params(wc)
    packed = p.packed()
    assert len(packed) == len(StepParams.__dataclass_fields__) - 2 + 2 * (p.top + 1)
    native_p = _native_params(packed)
    for f in dataclasses.fields(StepParams):
        got = getattr(native_p, f.name)
        assert (tuple(got) if isinstance(got, list) else got) == getattr(p, f.name), f.name
    assert native_p.packed() == packed
    for n in (0, 7, 40):
        assert _capacities(n, p.block_size, p.n_diff) == (
            native_p.out_capacity(n),
            native_p.actions_capacity(n),
        )


@needs_ext
@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda v: v[:-1], "expected"),
        (lambda v: [*v, 0.0], "expected"),
        (lambda v: v[:3], "at least"),
        (lambda v: [4.5, *v[1:]], "block_size must be an integer"),
        (lambda v: [v[0], 9.0, *v[2:]], "top level"),
        (lambda v: [*v[:3], -1.0, *v[4:]], "w_max"),
    ],
)
def test_bad_packed_params_are_a_config_error(edit, match):
    cfg = config(w_max=40)
    wc = make_wc([(1, b) for b in range(4)] + tokens(16, 40), cfg)
    scores = torch.zeros(len(wc))
    alloc = FocusAllocator(cfg, "cpp")
    alloc._ensure_state(wc.num_tokens, wc.device)
    bad = edit(alloc._params(wc).packed())
    with pytest.raises(mc.ConfigError, match=match):
        focus_step(wc.levels, wc.nodes, scores, alloc._state.clone(), bad)
    with pytest.raises(mc.ConfigError, match=match):
        _native_params(bad)


# ------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@settings(max_examples=40, deadline=None)
@given(T=st.integers(0, 3000), steps=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_cuda_backend_matches_cpp(T, steps, seed):
    rng = np.random.default_rng(seed)
    bs, top = 4, 3
    tree = make_tree(T, bs, top, seed)
    cfg = mc.MegaContextConfig(block_size=bs, levels=top, w_max=300, recent_tokens=8)
    try:
        wc = WorkingContext.from_tree(tree, cfg.w_max, cfg.recent_tokens)
    except mc.ConfigError:
        return
    cpu, gpu = FocusAllocator(cfg, "cpp"), FocusAllocator(cfg, "cuda")
    wc_gpu = wc.to("cuda")
    for _ in range(steps):
        scores = random_scores(rng, len(wc), "ties")
        assert gpu.step(wc_gpu, scores.cuda()) == cpu.step(wc, scores)
        assert torch.equal(wc_gpu.levels.cpu(), wc.levels)
        assert torch.equal(wc_gpu.nodes.cpu(), wc.nodes)
    assert torch.equal(gpu._state.cpu(), cpu._state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_op_in_a_cuda_graph_and_auto_picks_cuda():
    cfg = config(w_max=40)
    wc = make_wc([(1, b) for b in range(4)] + tokens(16, 40), cfg)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6] + [-0.9] * 16 + [0.0] * 8)
    assert FocusAllocator(cfg).resolve_backend(wc.to("cuda")) == "cuda"
    alloc = FocusAllocator(cfg, "cpp")
    alloc._ensure_state(wc.num_tokens, wc.device)
    p = alloc._params(wc)
    args = (p.packed(),)
    lv, nd, sc = wc.levels.cuda(), wc.nodes.cuda(), scores.cuda()
    state = alloc._state.cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture
        focus_step(lv, nd, sc, state.clone(), *args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_levels, out_nodes, actions, counts = focus_step(lv, nd, sc, state, *args)
    graph.replay()
    torch.cuda.synchronize()
    ref = wc.clone()
    want = alloc.step(ref, scores)
    n, a = counts.tolist()
    assert actions_from_tensor(actions[:a]) == want
    assert torch.equal(out_levels[:n].cpu(), ref.levels)
    assert torch.equal(out_nodes[:n].cpu(), ref.nodes)
    assert int(state[0]) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_host_backends_accept_a_wc_on_the_gpu(backend):
    cfg = config(w_max=40)
    wc = make_wc([(1, b) for b in range(4)] + tokens(16, 40), cfg)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6] + [-0.9] * 16 + [0.0] * 8)
    on_gpu = wc.to("cuda")
    want = FocusAllocator(cfg, backend).step(wc, scores)
    assert FocusAllocator(cfg, backend).step(on_gpu, scores.cuda()) == want
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.nodes.cpu(), wc.nodes)


def test_impossible_level_is_an_invariant_error(backend):
    cfg = config()
    wc = make_wc([(3, 0), *tokens(64, 72)], cfg)  # level 3 > top 2
    alloc = FocusAllocator(cfg, backend)
    with pytest.raises(mc.InvariantError, match="entry 0") as err:
        alloc.step(wc, torch.zeros(len(wc)))
    assert err.value.entry == 0 and alloc.step_count == 0


@needs_ext
def test_growing_history_extend_then_step_stays_legal():
    # The runtime loop: append a block to the tree, extend the WC (now over budget),
    # step (forced collapses bring it back), with the real tree checking existence.
    bs, top = 4, 2
    g = torch.Generator().manual_seed(3)
    table = torch.randn(50, 4, generator=g)
    tree = MegaContextTree(4, block_size=bs, levels=top, dtype=torch.float32)
    tree.append(torch.randint(0, 50, (200,), generator=g), lambda ids: table[ids])
    cfg = mc.MegaContextConfig(block_size=bs, levels=top, w_max=60, recent_tokens=8)
    wc = WorkingContext.from_tree(tree, cfg.w_max, cfg.recent_tokens)
    wc_cpp = wc.clone()
    py, cpp = FocusAllocator(cfg, "python"), FocusAllocator(cfg, "cpp")
    forced = 0
    for _ in range(60):
        tree.append(torch.randint(0, 50, (5,), generator=g), lambda ids: table[ids])
        wc.extend(tree.num_tokens)
        wc_cpp.extend(tree.num_tokens)
        over = len(wc) > cfg.w_max
        scores = torch.rand(len(wc), generator=g) * 2 - 1
        acts = py.step(wc, scores)
        assert cpp.step(wc_cpp, scores) == acts
        assert torch.equal(wc.nodes, wc_cpp.nodes) and torch.equal(wc.levels, wc_cpp.levels)
        wc.check(tree)
        forced += over
    assert forced > 0  # the scenario does exercise the over-budget phase


@pytest.mark.parametrize("T", [0, 3, 7])
def test_step_on_empty_and_sub_block_histories(backend, T):
    cfg = config()
    tree = make_tree(T, 4, 2)
    wc = WorkingContext.from_tree(tree, cfg.w_max, cfg.recent_tokens)
    alloc = FocusAllocator(cfg, backend)
    assert alloc.step(wc, torch.ones(len(wc))) == []
    assert alloc.step(wc, -torch.ones(len(wc))) == []
    assert alloc.step_count == 2 and len(wc) == T
    wc.check(tree)


def test_state_dict_round_trip():
    """An allocator restored from state_dict() takes the same next actions."""
    cfg = config(block_size=4, levels=2, w_max=20, cooldown_steps=2, min_residency=2)
    tree = MegaContextTree(8, block_size=4, levels=2, dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    tree.append(torch.arange(96), lambda ids: torch.randn(ids.numel(), 8, generator=gen))
    wc = WorkingContext.from_tree(tree, 20, cfg.protected_tokens)
    a = FocusAllocator(cfg, backend="python")
    for _ in range(3):
        a.step(wc, torch.rand(len(wc), generator=gen) * 2 - 1)
    state = a.state_dict()
    b = FocusAllocator(cfg, backend="python")
    b.load_state_dict(state)
    assert b.step_count == a.step_count
    for lv in (1, 2):
        assert torch.equal(b.last_changed(lv), a.last_changed(lv))
    scores = torch.rand(len(wc), generator=gen) * 2 - 1
    wc_b = wc.clone()
    assert a.step(wc, scores) == b.step(wc_b, scores)
    assert torch.equal(wc.levels, wc_b.levels) and torch.equal(wc.nodes, wc_b.nodes)
    with pytest.raises(mc.ConfigError, match="caps"):
        FocusAllocator(config(levels=3), backend="python").load_state_dict(state)
