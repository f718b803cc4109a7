"""The training-free attention scorer (``lens: attention``, megacontext/attention_scorer.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import megacontext as mc
from megacontext.attention_scorer import (
    AttentionScorer,
    attention_probs,
    attention_utility,
    default_layers,
)
from megacontext.focus import FocusLoop, refocus_after_ingest
from megacontext.hook import QueryRecorder, recording
from megacontext.working_context import with_sink


def _cfg(**kw):
    base = dict(
        model="tiny-llama",
        block_size=8,
        levels=2,
        w_max=40,
        horizon=8,
        lens="attention",
        attention_layers=[0, 1],
        attention_queries=4,
        cooldown_steps=0,
        min_residency=0,
        # the scores straight to the allocator: these tests check the scorer's own
        # verdicts; the retrieval plan (the default) has its tests below
        lens_plan="scores",
        # the check's mean rule only: on a random model no judged token reads a nat
        # better, so the peak rule (tested in test_focus.py) would drop every focus
        verify_peak=None,
    )
    return mc.MegaContextConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def peaky_base(tiny_base):
    """tiny-llama with q and k scaled 10x: its random attention is sharp enough that
    attention scores leave the thresholds' band (the seeded weights give near-uniform
    attention, |u| < 0.05)."""
    base = copy.deepcopy(tiny_base)
    with torch.no_grad():
        for layer in base.model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
    return base


def _ids(n, seed=0):
    return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed))


def _fresh_qk(base, embeds, positions, layers):
    """Post-RoPE queries and keys ``[H, n, D]`` of a fresh causal forward over
    ``embeds``, captured from each attention module's own inputs (no cache, no
    recorder): ``q_proj`` / ``k_proj`` and the model's RoPE."""
    model = base.model
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for layer in layers:
        attn = model.model.layers[layer].self_attn

        def grab(mod, args, kwargs, layer=layer):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            shape = (*h.shape[:-1], -1, mod.head_dim)
            q = mod.q_proj(h).view(shape).transpose(1, 2)
            k = mod.k_proj(h).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            out[layer] = (q[0], k[0])

        handles.append(attn.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with torch.no_grad():
            model(inputs_embeds=embeds[None], position_ids=positions[None])
    finally:
        for h in handles:
            h.remove()
    return out


def _no_actions(**kw):
    # |u| <= 1, so thresholds of 1 never act: the WC stays the recency WC
    return _cfg(tau_expand=1.0, tau_collapse=1.0, **kw)


def test_probs_equal_a_plain_recomputation_from_a_fresh_forward(tiny_base):
    """p = mean over layers, heads and the newest m query rows of softmax(q·k·scale)
    over all N entries, from a fresh forward's q and k."""
    cfg = _no_actions(kv_mode="exact")
    session = mc.MegaContext(tiny_base, None, None, cfg).session()
    session.ingest(_ids(150))
    wc = session.wc
    assert (wc.levels > 0).any()  # gists and tokens in the WC
    positions = session.focus.positions()
    p = session.attention_scorer.probs(wc, positions)
    m, n = cfg.attention_queries, len(wc)
    # the forward reads the attention sink first (the WC starts with a gist); the
    # scorer's softmax is over the WC's entries only
    embeds, pos = with_sink(
        tiny_base, wc.embeddings(tiny_base, session.tree), positions, wc.levels, True
    )
    assert len(pos) == n + 1
    qk = _fresh_qk(tiny_base, embeds, pos, [0, 1])
    ref = torch.zeros(n)
    for layer in (0, 1):
        q, k = (t[:, 1:] for t in qk[layer])
        k = repeat_kv(k[None], q.shape[0] // k.shape[0])[0]
        scale = tiny_base.model.model.layers[layer].self_attn.scaling
        logits = q[:, n - m :] @ k.transpose(-1, -2) * scale
        ref += logits.softmax(-1).mean(dim=(0, 1)) / 2
    torch.testing.assert_close(p, ref, rtol=1e-4, atol=1e-6)
    assert abs(float(p.sum()) - 1.0) < 1e-5
    u = session.scores()
    assert u.shape == (n,) and u.dtype == torch.float32
    assert float(u.min()) >= -1.0 and float(u.max()) <= 1.0
    torch.testing.assert_close(u, attention_utility(ref, cfg.block_size), rtol=1e-4, atol=1e-5)
    # share "block": a token's share is its block's, every token of one block alike
    session.attention_scorer.share = "block"
    u = session.scores()
    lv, st = wc.levels.cpu(), wc.starts.cpu()
    for b in set((st[lv == 0] // cfg.block_size).tolist()):
        sel = (lv == 0) & (st // cfg.block_size == b)
        share = ref[sel].sum() * n
        torch.testing.assert_close(
            u[sel], torch.tanh(torch.log(share) / math.log(8)).expand(int(sel.sum()))
        )
    gist = lv > 0
    torch.testing.assert_close(u[gist], torch.tanh(torch.log(ref[gist] * n) / math.log(8)))


def test_a_key_along_the_query_gets_the_top_score():
    """A cache whose key for entry j points along the queries: j gets the top
    probability and a positive utility above tau_expand; the rest fall below."""
    g = torch.Generator().manual_seed(0)
    H, Hkv, m, D, N, j = 4, 2, 3, 16, 64, 37
    q = torch.randn(H, m, D, generator=g)
    k = 0.1 * torch.randn(Hkv, N, D, generator=g)
    for h in range(Hkv):
        k[h, j] = 2.0 * q[2 * h : 2 * h + 2].mean(dim=(0, 1))
    p = attention_probs([q, q], [k, k], [D**-0.5, D**-0.5])
    u = attention_utility(p, 32)
    assert int(p.argmax()) == j and int(u.argmax()) == j
    assert float(u[j]) > 0.2
    others = torch.cat([u[:j], u[j + 1 :]])
    assert float(others.max()) < float(u[j])
    # sink = 1: the first entry is left out of the softmax and scores 0
    p1 = attention_probs([q], [k], [D**-0.5], sink=1)
    u1 = attention_utility(p1, 32, sink=1)
    assert p1[0] == 0 and u1[0] == 0 and abs(float(p1.sum()) - 1) < 1e-5
    assert int(u1.argmax()) == j


def test_utility_calibration():
    """u = tanh(log(p n) / log(bs)): uniform -> 0, bs x uniform -> tanh(1), 0 -> -1."""
    n, bs = 64, 4
    p = torch.full((n,), 1.0 / n)
    assert attention_utility(p, bs).abs().max() < 1e-6
    p2 = torch.zeros(n)
    p2[1], p2[2] = bs / n, 1 - bs / n
    u = attention_utility(p2, bs)
    assert math.isclose(float(u[1]), math.tanh(1.0), rel_tol=1e-5)
    assert float(u[3]) == -1.0
    p3 = torch.full((n,), 1.0 / (bs * n))
    assert math.isclose(float(attention_utility(p3, bs)[0]), -math.tanh(1.0), rel_tol=1e-5)
    # tokens aggregate per block, gists do not: a gist at 1/bs of the uniform share
    # and a whole block of bs tokens at that share each score -tanh(1) and 0
    levels = torch.tensor([1] * (n - bs) + [0] * bs)
    starts = torch.cat([torch.arange(n - bs) * bs, (n - bs) * bs + torch.arange(bs)])
    u = attention_utility(p3, bs, levels=levels, starts=starts)
    assert math.isclose(float(u[0]), -math.tanh(1.0), rel_tol=1e-5)
    assert u[n - bs :].abs().max() < 1e-6


def test_queries_are_rerotated_when_positions_move(peaky_base):
    """Under compact positions a refocus moves the newest tokens; the recorded layer-0
    queries (content depends only on the token) re-rotated to the new positions equal
    a fresh forward's layer-0 queries there."""
    cfg = _cfg(
        positions="compact",
        attention_layers=[0],
        tau_expand=0.0,
        tau_collapse=0.0,
        n_diff=1,  # one action changes the WC's length: the tail's positions move
        w_max=64,
    )
    session = mc.MegaContext(peaky_base, None, None, cfg).session()
    session.ingest(_ids(300, seed=2))
    assert session.actions  # the refocus after the ingest acted
    rec = session.attention_scorer.recorder
    wc, positions = session.wc, session.focus.positions()
    m = cfg.attention_queries
    now = positions[len(wc) - m :]
    assert not torch.equal(rec.positions.sort().values, now)  # the tail moved
    q = session.attention_scorer.queries(wc, positions)[0]  # [H, m, D]
    order = rec.tokens[rec.tokens >= 0].argsort()
    embeds = wc.embeddings(peaky_base, session.tree)
    fresh = _fresh_qk(peaky_base, embeds, positions, [0])[0][0]
    torch.testing.assert_close(q[:, order], fresh[:, len(wc) - m :], rtol=1e-4, atol=1e-5)


def test_session_with_attention_scorer_acts_and_decodes(peaky_base):
    """lens: attention through the public API: ingest refocuses (iterating while
    actions are taken), generate refocuses every block, the scorer's time is in the
    lens phase; a given LensNet is not used."""

    class Refuses(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, *args, **kw):
            raise AssertionError("lens: attention must not call the LensNet")

    cfg = _cfg(tau_expand=0.1, tau_collapse=0.1, refocus_iterations=3, n_diff=2, w_max=64)
    system = mc.MegaContext(peaky_base, None, Refuses(), cfg, allocator_backend="python")
    session = system.session()
    session.ingest(_ids(300, seed=2))
    after_ingest = len(session.history)
    assert after_ingest >= 1 and session.actions
    expands = [a for a in session.actions if a.kind == "expand"]
    collapses = [a for a in session.actions if a.kind == "collapse"]
    assert all(a.score > cfg.tau_expand for a in expands) and expands
    assert all(a.score < -cfg.tau_collapse for a in collapses)
    text = session.generate(24, stop_at_eos=False)
    assert isinstance(text, str)
    assert len(session.history) >= after_ingest + 3
    assert all(row["latency_lens_ms"] > 0 for row in session.history)
    assert session.wc.cost <= cfg.w_max + cfg.block_size
    rec = session.attention_scorer.recorder
    assert int(rec.tokens.max()) == session.num_tokens - 1  # decode steps are recorded


def test_ingest_refocus_iterates_until_no_action(peaky_base):
    """refocus_iterations bounds the refocuses after an ingest; one is the default."""
    ids = _ids(300, seed=2)
    kw = dict(tau_expand=0.0, tau_collapse=0.0, n_diff=2, w_max=64)
    one = mc.MegaContext(peaky_base, None, None, _cfg(**kw)).session()
    one.ingest(ids)
    assert len(one.history) == 1 and one.actions
    many = mc.MegaContext(peaky_base, None, None, _cfg(refocus_iterations=4, **kw)).session()
    many.ingest(ids)
    assert 2 <= len(many.history) <= 4
    assert all(row["n_expand"] + row["n_collapse"] for row in many.history[:-1])


def test_refocus_after_ingest_waits_out_the_cooldown():
    """Idle iterations end the loop only after cooldown_steps + 1 in a row (a node an
    expand created may change once its cooldown has passed); refocus_iterations
    bounds it."""
    pattern = iter([["a"], [], [], ["a"], [], [], [], ["a"]])
    cfg = mc.MegaContextConfig(cooldown_steps=2, refocus_iterations=10)
    assert refocus_after_ingest(cfg, lambda: next(pattern)) == 7
    cfg = mc.MegaContextConfig(cooldown_steps=0, refocus_iterations=10)
    assert refocus_after_ingest(cfg, lambda: []) == 1
    cfg = mc.MegaContextConfig(cooldown_steps=0, refocus_iterations=3)
    assert refocus_after_ingest(cfg, lambda: ["a"]) == 3


def test_batch_decode_records_each_sessions_queries(tiny_base):
    cfg = _cfg()
    system = mc.MegaContext(tiny_base, None, None, cfg)
    a, b = system.session(), system.session()
    a.ingest(_ids(60, seed=4))
    b.ingest(_ids(70, seed=5))
    batch = system.batch([a, b])
    batch.step([11, 12])
    for s in (a, b):
        rec = s.attention_scorer.recorder
        assert int(rec.tokens.max()) == s.num_tokens - 1
        assert s.scores().shape == (len(s.wc),)


def test_recorder_keeps_the_newest_rows_once(tiny_base):
    """The ring keeps the newest rows; re-arming a token supersedes its row and every
    later one (no token twice); rows come from the hook only while armed and inside
    recording(); unrecorded layers are ignored."""
    rec = QueryRecorder([1], rows=3, num_heads=2, head_dim=4)
    q = torch.randn(2, 5, 4)
    rec.arm(torch.arange(5), torch.arange(10, 15))
    rec.write(1, q)
    assert rec.tokens.tolist() == [12, 13, 14]
    assert torch.equal(rec.q[0], q[:, 2:].transpose(0, 1))
    rec.arm(torch.tensor([3]), torch.tensor([13]))  # recomputed: 13 and 14 superseded
    rec.write(1, q[:, :1])
    assert rec.tokens.tolist() == [12, 13, -1]
    assert torch.equal(rec.q[0, 1], q[:, 0])
    rec.disarm()
    rec.write(1, 5 * q)  # not armed: nothing written
    assert torch.equal(rec.q[0, 1], q[:, 0])
    # through the hook: only inside recording(), only the recorded layer
    live = QueryRecorder([1], rows=2, num_heads=4, head_dim=16)
    live.arm(torch.arange(3), torch.arange(3))
    with torch.no_grad():
        with recording([live]):
            tiny_base.model(input_ids=torch.arange(3)[None])
        assert live.tokens.tolist() == [1, 2] and live.q.abs().sum() > 0
        before = live.q.clone()
        tiny_base.model(input_ids=torch.arange(5)[None])
    assert torch.equal(live.q, before)


def test_config_validation(tiny_base):
    with pytest.raises(mc.ConfigError) as err:
        mc.MegaContextConfig(lens="quest")
    assert err.value.field == "lens"
    for bad in ([], [-1], [2, 2]):
        with pytest.raises(mc.ConfigError) as err:
            mc.MegaContextConfig(attention_layers=bad)
        assert err.value.field == "attention_layers"
    with pytest.raises(mc.ConfigError) as err:
        mc.MegaContextConfig(attention_share="span")
    assert err.value.field == "attention_share"
    with pytest.raises(mc.ConfigError) as err:
        mc.MegaContextConfig(attention_queries=0)
    assert err.value.field == "attention_queries"
    with pytest.raises(mc.ConfigError) as err:
        mc.MegaContext(tiny_base, None, None, _cfg(attention_layers=[5])).session()
    assert err.value.field == "attention_layers" and "2 layers" in str(err.value)
    with pytest.raises(mc.ConfigError) as err:
        FocusLoop(tiny_base, None, None, _cfg())
    assert err.value.field == "lens"
    assert default_layers(30) == [15, 19, 23, 27] and default_layers(2) == [1]
    block = mc.MegaContext(tiny_base, None, None, _cfg(attention_share="block")).session()
    assert block.attention_scorer.share == "block"
    assert block.attention_scorer.layers == [0, 1]
    assert mc.MegaContextConfig().lens == "lensnet"


def test_recency_lens_ignores_a_given_lensnet(tiny_base):
    lens = mc.LensNet(tiny_base.dim, d_lens=32, heads=2)
    cfg = _cfg(lens="recency")
    session = mc.MegaContext(tiny_base, None, lens, cfg).session()
    session.ingest(_ids(100))
    assert not session.focus.scoring and not session.history
    assert not session.scores().any()
    assert session.attention_scorer is None


def test_scorer_without_queries_scores_zeros(tiny_base):
    """Before any recorded forward (e.g. a session reopened from disk) the scorer
    gives zeros, and a cache out of step with the WC is an InvariantError."""
    cache = mc.MegaContextCache.for_model(tiny_base.model, batch_size=1, capacity=48)
    scorer = AttentionScorer(tiny_base.model, cache, 8, [1], 4)
    loop = FocusLoop(tiny_base, None, None, _cfg(), scorer=scorer)
    loop.ingest(_ids(30))
    with pytest.raises(mc.InvariantError, match="cache holds 0 rows"):
        scorer.probs(loop.wc, loop.positions())
    cache.set_lengths([len(loop.wc)])
    assert not loop.scores().any()


def _loop_with(tiny_base, fn, **kw):
    cfg = _cfg(w_max=64, n_diff=4, **kw)
    loop = FocusLoop(tiny_base, None, None, cfg, scorer=lambda wc, pos: fn(wc))
    loop.ingest(_ids(300, seed=3))
    return loop


@pytest.mark.parametrize("plan", ["scores", "retrieval", "auto"])
def test_retrieval_plan_moves_nothing_no_expand_needs(tiny_base, plan):
    """Uniformly low attention scores: sent straight to the allocator (``scores``)
    they collapse token blocks no budget asks for; under ``lens_plan: retrieval`` (and
    ``auto``, the default) nothing is opened, so nothing moves."""
    loop = _loop_with(tiny_base, lambda wc: torch.full((len(wc),), -0.9), lens_plan=plan)
    before = len(loop.wc)
    actions = loop.refocus().actions
    if plan == "scores":
        assert actions and all(a.kind == "collapse" for a in actions)
        assert len(loop.wc) < before
    else:
        assert actions == [] and len(loop.wc) == before


def test_retrieval_plan_opens_the_best_gist_and_makes_just_its_room(tiny_base):
    """One gist the scorer reads above tau_expand is opened; the room comes from the
    token blocks it reads least (the newest blocks read most here), no more."""
    target = {}

    def fn(wc):
        u = torch.zeros(len(wc))
        lv = wc.levels.cpu()
        tok = torch.nonzero(lv == 0).flatten()
        # token entries: utility rising with recency, all below tau
        u[tok] = torch.linspace(-0.15, 0.15, tok.numel())
        gists = torch.nonzero(lv == 1).flatten()
        if "node" not in target:
            target["node"] = int(wc.nodes[gists[0]])
        hit = gists[wc.nodes[gists].cpu() == target["node"]]
        u[hit] = 0.9
        return u

    loop = _loop_with(tiny_base, fn, lens_plan="retrieval", cooldown_steps=0)
    bs = loop.config.block_size
    free = loop.config.w_max - len(loop.wc)
    tok_before = loop.wc.starts[loop.wc.levels == 0].clone()
    actions = loop.refocus().actions
    expands = [a for a in actions if a.kind == "expand"]
    collapses = [a for a in actions if a.kind == "collapse"]
    assert len(expands) == 1 and int(expands[0].node) == target["node"]
    assert len(collapses) == max(0, -(-(bs - 1 - free) // (bs - 1))) >= 1
    # the collapsed token blocks are the ones read least: the oldest token blocks
    starts = sorted(int(s) for s in tok_before.tolist() if s % bs == 0)
    for a in collapses:
        assert int(a.node) * bs in starts[: len(collapses)]
    assert len(loop.wc) <= loop.config.w_max
