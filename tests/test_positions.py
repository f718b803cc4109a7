"""RoPE position schemes: bounded whatever the history length, one definition for the
runtime, the trainer and the eval views, and validated against the base model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import megacontext as mc
from megacontext.focus import check_positions, position_bound, position_gap
from megacontext.working_context import POSITION_SCHEMES, WorkingContext, entry_positions


class _Tree:
    """The shape of a tree (no gists): what ``WorkingContext.from_tree`` reads."""

    def __init__(self, T: int, bs: int, levels: int):
        self.block_size, self.levels, self.num_tokens = bs, levels, T

    def num_nodes(self, level: int) -> int:
        return self.num_tokens // self.block_size**level


def _coarsest(T: int, bs: int, levels: int) -> int:
    p0 = max(T - 2 * bs, 0) // bs * bs
    digits = sum((p0 // bs**lv) % bs for lv in range(1, levels))
    return p0 // bs**levels + digits + (T - p0)


@st.composite
def _wcs(draw):
    """A legal WC of any history length (up to 2**31 tokens): the recency WC of a
    random budget, then some entries re-tiled (random LODs left of the protected
    tail), then up to a block of decoded tokens (a WC of up to w_max + bs - 1)."""
    bs = draw(st.sampled_from([2, 4, 8, 32]))
    levels = draw(st.integers(1, 6))
    w_max = draw(st.integers(3 * bs, 3000))
    T = draw(st.integers(0, 2**31))
    # the coarsest tiling (the largest aligned nodes left to right, then the
    # protected tail as tokens) must fit the budget: shrink T until it does
    while _coarsest(T, bs, levels) > w_max:
        T //= 7
    tree = _Tree(T, bs, levels)
    wc = WorkingContext.from_tree(tree, w_max)
    decoded = draw(st.integers(0, bs - 1))
    wc.extend(T + decoded)
    return wc, bs, w_max


@settings(max_examples=300, deadline=None)
@given(_wcs(), st.integers(0, 4096), st.sampled_from(["nearby", "hybrid", "compact"]))
def test_bounded_schemes_never_exceed_the_bound(case, extra, scheme):
    wc, bs, w_max = case
    horizon = 64
    bound = w_max + bs + horizon + extra  # any bound that holds the budget
    cfg = mc.MegaContextConfig(
        block_size=bs, levels=wc.max_level, w_max=w_max, horizon=horizon, positions=scheme
    )
    cfg.max_position = bound
    gap = position_gap(cfg)
    pos, nxt = entry_positions(wc.levels, wc.nodes, bs, scheme, max_gap=gap)
    n = len(wc)
    assert n <= w_max + bs - 1
    assert pos.dtype == torch.int64 and pos.shape == (n,)
    # every position, and the horizon's targets after the WC, below the bound
    assert nxt + horizon - 1 < bound
    if n:
        assert int(pos.max()) < nxt
        if scheme == "nearby":
            # gists in WC order, then every token in WC order: distinct positions
            for part in (pos[wc.levels != 0], pos[wc.levels == 0]):
                assert bool((part[1:] > part[:-1]).all())
            assert pos.unique().numel() == n
        else:
            assert bool((pos[1:] > pos[:-1]).all())  # WC order is position order
    # consecutive LOD0 entries of the tail keep their true distance
    tail = wc.levels == 0
    if n and bool(tail[-1]):
        k = n - int(torch.nonzero(~tail)[-1, 0]) - 1 if bool((~tail).any()) else n
        assert torch.equal(pos[n - k :] - pos[n - k], wc.nodes[n - k :] - wc.nodes[n - k])


def test_global_scheme_is_span_centres_and_unbounded():
    wc = WorkingContext.from_tree(_Tree(10**6, 32, 3), w_max=2048)
    pos, nxt = entry_positions(wc.levels, wc.nodes, 32, "global")
    assert torch.equal(pos, wc.starts + wc.spans // 2) and nxt == 10**6
    assert torch.equal(wc.positions(), pos) and wc.next_position() == 10**6
    cmp, n = entry_positions(wc.levels, wc.nodes, 32, "compact")
    assert torch.equal(cmp, torch.arange(len(wc))) and n == len(wc)


def test_hybrid_is_true_distances_while_short_and_capped_after():
    wc = WorkingContext.from_tree(_Tree(4000, 32, 2), w_max=256)
    far = int(torch.nonzero(wc.levels > 0)[-1, 0]) + 1
    t0 = int(wc.nodes[far])
    pos, nxt = entry_positions(wc.levels, wc.nodes, 32, "hybrid", max_gap=10**6)
    # uncapped: the tail at its own token indices, the far entries compacted in order
    assert torch.equal(pos[far:], wc.nodes[far:]) and nxt == 4000
    assert torch.equal(pos[:far], torch.arange(far))
    pos, nxt = entry_positions(wc.levels, wc.nodes, 32, "hybrid", max_gap=100)
    assert torch.equal(pos[far:], torch.arange(far, len(wc)) + 100) and nxt == len(wc) + 100
    assert t0 - far > 100
    # a WC of tokens only is positions 0..N-1 under every scheme
    wc = WorkingContext.from_tree(_Tree(200, 32, 2), w_max=256)
    for scheme in POSITION_SCHEMES:
        assert torch.equal(wc.positions(scheme, 50), torch.arange(200))


def test_nearby_moves_expanded_spans_next_to_the_recent_window():
    wc = WorkingContext.from_tree(_Tree(4000, 32, 2), w_max=256)
    # a recency WC has no far tokens: nearby is hybrid
    for gap in (0, 100, 10**6):
        assert torch.equal(wc.positions("nearby", gap), wc.positions("hybrid", gap))
        assert wc.next_position("nearby", gap) == wc.next_position("hybrid", gap)
    # expand the second LOD1 gist (tokens 32..63) in place
    levels, nodes = wc.levels.tolist(), wc.nodes.tolist()
    lv1 = [k for k, lv in enumerate(levels) if lv == 1]
    i = lv1[1]
    node = nodes[i]
    levels[i : i + 1] = [0] * 32
    nodes[i : i + 1] = list(range(node * 32, node * 32 + 32))
    lv_t = torch.tensor(levels)
    nd_t = torch.tensor(nodes)
    gist = lv_t != 0
    n, n_g = len(levels), int(gist.sum())
    far = int(torch.nonzero(gist)[-1, 0]) + 1
    for gap in (100, 10**6):
        pos, nxt = entry_positions(lv_t, nd_t, 32, "nearby", max_gap=gap)
        hyb, hnxt = entry_positions(lv_t, nd_t, 32, "hybrid", max_gap=gap)
        assert nxt == hnxt
        assert torch.equal(pos[far:], hyb[far:])  # the recent window does not move
        assert torch.equal(pos[gist], torch.arange(n_g))  # gists in order, far back
        span = pos[i : i + 32]
        # the expanded span: contiguous, right before the recent window's first token
        assert torch.equal(span, torch.arange(32) + int(pos[far]) - 32)
        # under hybrid the same span sits among the gists, far from the cursor
        assert int(hyb[i]) < n_g + 32 and nxt - int(span[0]) < nxt - int(hyb[i])
    assert n == len(wc) + 31


def test_config_validation():
    with pytest.raises(mc.ConfigError) as e:
        mc.MegaContextConfig(positions="absolute")
    assert e.value.field == "positions"
    with pytest.raises(mc.ConfigError) as e:
        mc.MegaContextConfig(max_position=0)
    assert e.value.field == "max_position"
    with pytest.raises(mc.ConfigError):
        entry_positions(torch.zeros(1), torch.zeros(1), 32, "rotary")
    cfg = mc.MegaContextConfig(w_max=1024)
    assert cfg.positions == "nearby" and cfg.max_position is None


def test_the_bound_is_checked_against_the_model(tiny_base):
    known = tiny_base.max_positions
    cfg = mc.MegaContextConfig(model=tiny_base.name, w_max=256, max_position=known + 1)
    with pytest.raises(mc.ConfigError) as e:
        mc.MegaContext(tiny_base, None, None, cfg)
    assert e.value.field == "max_position" and e.value.value == known + 1
    # a bounded scheme needs room for the budget plus a decoded block; a system is a
    # template (eval sets its budget per session), so its sessions check that
    cfg = mc.MegaContextConfig(model=tiny_base.name, w_max=256, max_position=256 + 31)
    system = mc.MegaContext(tiny_base, None, None, cfg)
    with pytest.raises(mc.ConfigError) as e:
        system.session()
    assert e.value.field == "w_max"
    system.with_config(w_max=128).session()
    # global is the unbounded ablation: no such requirement
    mc.MegaContext(tiny_base, None, None, cfg.replace(positions="global")).session()
    # the default bound is the model's trained context
    small = SimpleNamespace(max_positions=8192, name="m")
    cfg = mc.MegaContextConfig(w_max=1024)
    assert position_bound(cfg, small) == 8192
    assert position_gap(cfg, small) == 8192 - 1024 - 32 - 64
    check_positions(cfg, small)
    with pytest.raises(mc.ConfigError):
        check_positions(cfg.replace(w_max=8192), small)
    # far_gap caps how far back the far memory sits; it never lifts the bound's cap
    assert position_gap(cfg.replace(far_gap=1024), small) == 1024
    assert position_gap(cfg.replace(far_gap=10**6), small) == 8192 - 1024 - 32 - 64
    assert position_gap(cfg.replace(far_gap=0), small) == 0
    assert position_gap(cfg.replace(far_gap=64, positions="compact"), small) == 0
    with pytest.raises(mc.ConfigError) as e:
        mc.MegaContextConfig(far_gap=-1)
    assert e.value.field == "far_gap"


@torch.no_grad()
def test_far_gap_moves_only_the_far_memory_and_keeps_sessions_consistent(tiny_base):
    """A session under ``far_gap`` reads its gists at most that far behind the recent
    window (the recent window keeps true distances among itself), and its cached
    keys stay those of a fresh forward through decoding, as under the default."""
    gen = torch.Generator().manual_seed(3)
    cfg = mc.MegaContextConfig(
        model=tiny_base.name, block_size=8, w_max=96, horizon=8, max_position=600, far_gap=40
    )
    s = mc.MegaContext(tiny_base, None, None, cfg).session()
    s.ingest(torch.randint(0, 49152, (3000,), generator=gen))
    for _ in range(3):
        s.feed(torch.randint(0, 49152, (8,), generator=gen))
        wc, pos = s.wc, s.focus.positions()
        far = int(torch.nonzero(wc.levels > 0)[-1, 0]) + 1
        assert torch.equal(pos[:far], torch.arange(far))
        assert torch.equal(pos[far:], torch.arange(far, len(wc)) + 40)
        assert s.focus.next_position() == len(wc) + 40
        want = _layer0_keys(tiny_base, s)
        cached = s.cache.kv[0, 0, :1, :, : len(wc)].to(want.dtype)
        torch.testing.assert_close(cached, want, rtol=1e-4, atol=1e-4)
    uncapped = mc.MegaContext(tiny_base, None, None, cfg.replace(far_gap=None)).session()
    uncapped.ingest(s.tree.tokens(0, 3000))
    assert int(uncapped.focus.positions()[-1]) > 40 + len(uncapped.wc)  # pushed further back


class _RandomLens(torch.nn.Module):
    """Random scores, seeded: expands and collapses all over the WC."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, entries, tail, levels, span, distance, mask=None):
        return (torch.rand(levels.shape, generator=self.gen) * 2 - 1) + 0 * self.w


def _layer0_keys(base, session):
    """RoPE(k_proj(norm(embedding)), position) of every WC entry: what a fresh
    forward caches in layer 0 (layer-0 keys depend only on the entry and position)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    wc = session.wc
    layer = base.model.model.layers[0]
    attn = layer.self_attn
    x = layer.input_layernorm(wc.embeddings(base, session.tree)[None].to(base.dtype))
    k = attn.k_proj(x).view(1, len(wc), -1, attn.head_dim).transpose(1, 2)
    cos, sin = base.model.model.rotary_emb(x, session.focus.positions()[None])
    return apply_rotary_pos_emb(k, k, cos, sin)[1]


@pytest.mark.parametrize("mode", ["exact", "splice"])
@torch.no_grad()
def test_long_history_session_stays_bounded_and_consistent(tiny_base, mode):
    """A tiny-llama session reading 60x its position bound: after every refocus all
    positions (and the next one) are below the bound and every cached layer-0 key is
    the key a fresh forward gives the entry at its position."""
    bound = 300
    cfg = mc.MegaContextConfig(
        model=tiny_base.name,
        block_size=8,
        levels=3,
        w_max=96,
        horizon=8,
        max_position=bound,
        kv_mode=mode,
        tau_expand=0.0,
        tau_collapse=0.0,
        cooldown_steps=0,
        min_residency=0,
    )
    s = mc.MegaContext(tiny_base, None, _RandomLens(1), cfg, allocator_backend="python").session()
    moved = []  # kept entries re-rotated per splice
    splice = s.cache.splice

    def spy(index, lengths, position_delta=None):
        assert position_delta is not None
        moved.append(int(((index >= 0) & (position_delta != 0)).sum()))
        return splice(index, lengths, position_delta=position_delta)

    s.cache.splice = spy
    s.ingest(torch.randint(0, 49152, (18000,), generator=torch.Generator().manual_seed(0)))
    checked = 0
    for step in range(6):
        s.feed(torch.randint(0, 49152, (8,), generator=torch.Generator().manual_seed(step + 1)))
        pos = s.focus.positions()
        assert int(pos.max()) < bound and s.focus.next_position() + cfg.horizon - 1 < bound
        assert int(pos.max()) < s.focus.next_position()
        want = _layer0_keys(tiny_base, s)
        cached = s.cache.kv[0, 0, :1, :, : len(s.wc)].to(want.dtype)
        torch.testing.assert_close(cached, want, rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked == 6 and s.num_tokens == 18048
    assert sum(r["n_expand"] + r["n_collapse"] for r in s.history) > 0
    if mode == "splice":  # keys really moved, and were re-rotated rather than recomputed
        assert moved and sum(moved) > 0
    # the history is far past the bound: global would have fed positions near 18k
    assert int(s.wc.positions("global").max()) > 50 * bound


def test_trainer_forward_reads_the_runtime_positions(tiny_base):
    """The rollout's snapshots equal the session's WCs (on-policy) and the trainer's
    forward reads them at the session's positions: its NLL is the session's Loss@H."""
    from megacontext.train.forward import forward_rows, wc_embeddings, wc_positions, wc_row
    from megacontext.train.rollout import rollout

    cfg = mc.MegaContextConfig(
        model="tiny-llama",
        block_size=8,
        levels=2,
        w_max=40,
        horizon=8,
        max_position=90,  # gap capped at 90 - 40 - 8 - 8 = 34
        tau_expand=0.0,
        tau_collapse=0.0,
        cooldown_steps=0,
        min_residency=0,
    )
    g = mc.GistNet(tiny_base.dim, block_size=8, width=32, depth=1, heads=2, seed=1)
    torch.manual_seed(0)
    lens = mc.LensNet(tiny_base.dim, d_lens=32, heads=2)
    w = torch.randint(0, 1000, (160 + 3 * 8 + 8,), generator=torch.Generator().manual_seed(2))
    tree, snaps = rollout(tiny_base, g, lens, cfg, w, 160, 3, 8)
    session = mc.MegaContext(tiny_base, g, lens, cfg, allocator_backend="python").session()
    session.ingest(w[:160])
    capped = False
    for i, snap in enumerate(snaps):
        session.feed(w[160 + 8 * i : 168 + 8 * i])
        assert torch.equal(session.wc.nodes.long(), snap.nodes.long())
        pos, start = wc_positions(snap.levels, snap.nodes, cfg, tiny_base)
        assert torch.equal(pos, session.focus.positions().cpu())
        assert start == session.focus.next_position() and start + 8 <= 90
        capped |= start < snap.cursor
        with torch.no_grad():
            emb = wc_embeddings(tiny_base, w, snap.levels, snap.nodes, 8, "tree", tree)
            row, _ = wc_row(tiny_base, emb, snap.levels, snap.nodes, cfg)
            logp = forward_rows(tiny_base, [row], [snap.targets], [start])[0]
        nll = float(-logp.gather(-1, snap.targets[:, None]).mean())
        assert nll == pytest.approx(session.loss_at_h(snap.targets), abs=1e-4)
    assert capped  # the positions differ from the global ones here
