"""The focus loop (megacontext/focus.py): one loop under the runtime and the trainer."""

from __future__ import annotations

import pytest
import torch

import megacontext as mc
from megacontext.cache import MegaContextCache
from megacontext.focus import FocusLoop, lens_inputs, lens_tail, refocus_after_ingest
from megacontext.nll import nll_after
from megacontext.train.rollout import rollout
from megacontext.working_context import WorkingContext, with_sink


def _cfg(**kw):
    base = dict(
        model="tiny-llama",
        block_size=8,
        levels=2,
        w_max=40,
        horizon=8,
        tau_expand=0.0,
        tau_collapse=0.0,
        cooldown_steps=0,
        min_residency=0,
        # the check's mean rule alone (verify_margin decides); the peak rule
        # (verify_peak, the default 1.0) has its own test
        verify_peak=None,
    )
    return mc.MegaContextConfig(**{**base, **kw})


@pytest.mark.parametrize("tail", [1, 3, 9])
def test_non_default_tail_size_in_session_and_rollout(tiny_base, tail):
    """LensNet's tail size comes from its own config: a LensNet with tail_size != 6
    scores in a Session and in the trainer's rollout, and both stay equal."""
    cfg = _cfg()
    torch.manual_seed(0)
    lens = mc.LensNet(tiny_base.dim, d_lens=32, heads=2, tail_size=tail)
    w = torch.randint(0, 1000, (160 + 3 * 8 + 8,), generator=torch.Generator().manual_seed(2))
    _, snaps = rollout(tiny_base, None, lens, cfg, w, 160, 3, 8)
    session = mc.MegaContext(tiny_base, None, lens, cfg, allocator_backend="python").session()
    session.ingest(w[:160])
    assert session.focus.lens_inputs()[1].shape == (1, tail, tiny_base.dim)
    for i, s in enumerate(snaps):
        session.feed(w[160 + 8 * i : 168 + 8 * i])
        assert torch.equal(session.wc.levels.long(), s.levels.long())
        assert torch.equal(session.wc.nodes.long(), s.nodes.long())


def test_lens_tail_layout(tiny_base):
    """Row 0: the newest gist of the highest level that has one; the last row: the
    mean embedding of the newest block_size tokens; the rows before it: the newest
    LOD1 gists, oldest first; zeros elsewhere; a lagging cursor reads only the gists
    and tokens at that cursor."""
    loop = FocusLoop(tiny_base, None, None, _cfg())
    loop.ingest(torch.arange(100))  # 12 LOD1 gists, 1 LOD2 gist
    g1, g2 = loop.tree.gists(1), loop.tree.gists(2)

    def newest(cursor):
        return tiny_base.embed(torch.arange(max(cursor - 8, 0), cursor)).float().mean(0)

    t = lens_tail(tiny_base, loop.tree, 100, 5)
    assert torch.equal(t[0], g2[0].to(t.dtype))
    assert torch.equal(t[1:4], g1[9:12].to(t.dtype))
    torch.testing.assert_close(t[4], newest(100).to(t.dtype))
    t = lens_tail(tiny_base, loop.tree, 24, 6)  # 3 LOD1 gists, no LOD2 yet
    assert torch.equal(t[0], g1[2].to(t.dtype))
    assert not t[1].any()
    assert torch.equal(t[2:5], g1[0:3].to(t.dtype))
    torch.testing.assert_close(t[5], newest(24).to(t.dtype))
    t = lens_tail(tiny_base, loop.tree, 5, 3)  # no gist yet: the 5 tokens only
    assert not t[:2].any()
    torch.testing.assert_close(t[2], newest(5).to(t.dtype))
    assert torch.equal(lens_tail(tiny_base, loop.tree, 100, 1)[0], g2[0].to(t.dtype))


def test_lens_tail_sees_tokens_inside_a_partial_block(tiny_base):
    """Tokens appended after the last complete block (a short question) change the
    tail LensNet reads at the next refocus, in the session and in the trainer's
    inputs alike (one function)."""
    cfg = _cfg()
    session = mc.MegaContext(tiny_base, None, None, cfg).session()
    session.ingest(torch.arange(96))  # 12 complete blocks
    before = session.focus.lens_inputs()[1].clone()
    session.ingest(torch.tensor([500, 501, 502]))  # 3 tokens of a partial block
    after = session.focus.lens_inputs()[1]
    assert not torch.equal(before, after)
    assert torch.equal(before[0, :-1], after[0, :-1])  # only the newest-tokens row moved
    wc = session.wc
    assert torch.equal(lens_inputs(tiny_base, session.tree, wc, 6)[1], after)
    view = tiny_base.embed(torch.tensor([91, 92, 93, 94, 95, 500, 501, 502])).float().mean(0)
    torch.testing.assert_close(after[0, -1], view.to(after.dtype))


def test_session_and_rollout_share_one_loop(tiny_base):
    """A Session's focus state is its FocusLoop's: no copy to keep in step."""
    session = mc.MegaContext(tiny_base, None, None, _cfg()).session()
    session.ingest(torch.arange(50))
    assert isinstance(session.focus, FocusLoop)
    assert session.tree is session.focus.tree and session.wc is session.focus.wc
    assert session.allocator is session.focus.allocator


class _GistsUp(torch.nn.Module):
    """Scores every gist up and every token down: the allocator keeps changing nodes."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, entries, tail, levels, span, distance, mask=None):
        return torch.where(levels > 0, 0.9, -0.9).float() + 0 * self.w


def test_refocus_reports_a_forced_rebuild(tiny_base):
    """Hysteresis holding back every needed collapse rebuilds the WC by recency and
    says so; the WC stays within W_max."""
    cfg = _cfg(min_residency=1000, cooldown_steps=1000)
    loop = FocusLoop(tiny_base, None, _GistsUp(), cfg, allocator_backend="python")
    loop.ingest(torch.arange(160))
    loop.refocus()
    forced = []
    for b in range(8):
        loop.append(torch.arange(160 + 8 * b, 168 + 8 * b))
        res = loop.refocus()
        assert loop.wc.cost <= cfg.w_max
        assert res.cost_before == len(res.old_levels) and res.changed
        forced.append(res.forced)
    assert any(forced) and not all(forced)


def test_nll_after_rows_equal_single_rows_and_log_probs(tiny_base):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (40,), generator=g)
    emb = tiny_base.embed(ids)
    rows = [(emb[:30], torch.arange(30)), (emb[10:30], torch.arange(10, 30))]
    tgt = [ids[30:36], ids[30:36]]
    nll = nll_after(tiny_base, rows, tgt, [30, 30])
    logp = nll_after(tiny_base, rows, tgt, [30, 30], log_probs=True)
    assert nll.shape == (2, 6) and logp.shape[:2] == (2, 6)
    torch.testing.assert_close(nll, -logp.gather(-1, ids[30:36].expand(2, 6)[..., None])[..., 0])
    for r in range(2):
        single = nll_after(tiny_base, [rows[r]], [tgt[r]], [30])[0]
        torch.testing.assert_close(nll[r], single, rtol=1e-4, atol=1e-4)
    full = tiny_base.model(input_ids=ids[None, :35]).logits[0, 29:35].float().log_softmax(-1)
    ref = -full.gather(-1, ids[30:36, None])[:, 0]
    torch.testing.assert_close(nll[0], ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(mc.InputError, match="same H"):
        nll_after(tiny_base, rows, [ids[30:36], ids[30:35]], [30, 30])


def test_cache_stack_names_the_mismatched_field(tiny_base):
    a = MegaContextCache.for_model(tiny_base.model, batch_size=1, capacity=40)
    b = MegaContextCache.for_model(tiny_base.model, batch_size=1, capacity=48)
    with pytest.raises(mc.InputError, match="capacity=48"):
        MegaContextCache.stack([a, b])
    two = MegaContextCache.for_model(tiny_base.model, batch_size=2, capacity=40)
    with pytest.raises(mc.InputError, match="batch_size=2"):
        MegaContextCache.stack([a, two])
    with pytest.raises(mc.ConfigError, match="capacity=0") as err:
        MegaContextCache(2, 2, 8, 1, 0)
    assert err.value.field == "capacity"


def test_with_config_carries_every_field(tiny_base):
    lens = mc.LensNet(tiny_base.dim, d_lens=32, heads=2)
    system = mc.MegaContext(tiny_base, None, lens, _cfg(), allocator_backend="python")
    other = system.with_config(w_max=48)
    assert other.config.w_max == 48 and other.config.block_size == system.config.block_size
    assert other.base is tiny_base and other.lensnet is lens and other.gistnet is None
    assert other.allocator_backend == "python"
    assert system.config.w_max == 40  # the original is unchanged
    assert system.with_config(lensnet=None).lensnet is None
    with pytest.raises(mc.ConfigError, match="w_max"):
        system.with_config(w_max=-1)


def _planted(n: int = 3000, seed: int = 0) -> torch.Tensor:
    """Random tokens whose last 64 repeat a far span: the lexical scorer opens it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40000, (n,), generator=g)
    ids[-64:] = ids[500:564]
    return ids


def _tail_token_nll(base, loop, wc, v):
    """NLL ``[v]`` of the history's last ``v`` tokens read inside ``wc``, and their ids:
    one plain forward over the whole WC (behind the sink when it reads one)."""
    emb, pos = with_sink(base, wc.embeddings(base, loop.tree), loop.positions(wc), wc.levels, True)
    logits = base.model(inputs_embeds=emb[None], position_ids=pos[None]).logits[0].float()
    lp = logits.log_softmax(-1)[len(emb) - v - 1 : len(emb) - 1]
    T = loop.num_tokens
    ids = torch.as_tensor(loop.tree.tokens(T - v, T), dtype=torch.int64)
    return -lp.gather(1, ids[:, None]).squeeze(1), ids


def _tail_nll(base, loop, wc, v):
    return float(_tail_token_nll(base, loop, wc, v)[0].mean())


def _verified(base, ids, cfg):
    """A loop over ``ids`` after its ingest refocuses and the check: ``(loop, the
    recency WC, the focused WC the check judged)``."""
    loop = FocusLoop(base, None, None, cfg)
    loop.ingest(ids)
    recency = WorkingContext.from_tree(loop.tree, cfg.w_max, cfg.protected_tokens)
    focused = []

    def step():
        acts = loop.refocus().actions
        focused.append(loop.wc.clone())
        return acts

    refocus_after_ingest(cfg, step, loop.verify)
    return loop, recency, focused[-1]


@pytest.mark.parametrize("margin", [-100.0, 100.0])
def test_verify_reads_both_working_contexts_and_keeps_the_better(tiny_base, margin):
    v = 24
    cfg = _cfg(
        w_max=512, lens="lexical", refocus_iterations=8, verify_tokens=v, verify_margin=margin
    )
    loop, recency, focus_wc = _verified(tiny_base, _planted(), cfg)
    (verdict,) = loop.verdicts
    assert not torch.equal(focus_wc.nodes.cpu(), recency.nodes.cpu())  # the scorer acted
    assert verdict.tokens == v
    assert verdict.nll_focus == pytest.approx(_tail_nll(tiny_base, loop, focus_wc, v), abs=2e-4)
    assert verdict.nll_recency == pytest.approx(_tail_nll(tiny_base, loop, recency, v), abs=2e-4)
    # a margin of -100 keeps any focus, +100 none
    assert verdict.kept == (margin < 0)
    want = focus_wc if margin < 0 else recency
    assert torch.equal(loop.wc.levels.cpu(), want.levels.cpu())
    assert torch.equal(loop.wc.nodes.cpu(), want.nodes.cpu())


def test_verify_is_skipped_when_nothing_moved_or_off(tiny_base):
    cfg = _cfg(w_max=512, lens="lexical", refocus_iterations=8, verify_tokens=0)
    loop = FocusLoop(tiny_base, None, None, cfg)
    loop.ingest(_planted())
    refocus_after_ingest(cfg, lambda: loop.refocus().actions, loop.verify)
    assert loop.verdicts == []  # off
    on = cfg.model_copy(update={"verify_tokens": 16})
    loop.config = on
    loop.verify()  # called directly on the recency WC: same as recency, no forward
    assert loop.verdicts[-1].kept
    loop.rebuild()
    loop.verify()
    assert loop.verdicts[-1].tokens == 0 and loop.verdicts[-1].kept


def test_a_session_that_reverts_to_recency_keeps_an_exact_cache(tiny_base):
    ids = _planted()
    got = {}
    for name, margin in (("kept", -100.0), ("reverted", 100.0), ("recency", None)):
        extra = {"lens": "recency"} if margin is None else {"verify_margin": margin}
        cfg = _cfg(**{"w_max": 512, "lens": "lexical", "refocus_iterations": 8, **extra})
        cfg = cfg.model_copy(update={"verify_tokens": 16})
        s = mc.MegaContext(tiny_base, None, None, cfg).session()
        s.ingest(ids)
        got[name] = s
    rev, rec, kept = got["reverted"], got["recency"], got["kept"]
    assert not torch.equal(kept.wc.nodes.cpu(), rec.wc.nodes.cpu())
    assert torch.equal(rev.wc.levels.cpu(), rec.wc.levels.cpu())
    assert torch.equal(rev.wc.nodes.cpu(), rec.wc.nodes.cpu())
    assert not rev.focus.verdicts[-1].kept and kept.focus.verdicts[-1].kept
    # the session reads the recency row from its prefill's logits (one row less to
    # run): the same numbers as the focus loop's two-row forward
    loop = FocusLoop(tiny_base, None, None, rev.config)
    loop.ingest(ids)
    refocus_after_ingest(rev.config, lambda: loop.refocus().actions, loop.verify)
    (alone,) = loop.verdicts
    (got,) = rev.focus.verdicts
    assert got.tokens == alone.tokens == 16
    assert got.nll_recency == pytest.approx(alone.nll_recency, abs=1e-4)
    assert got.nll_focus == pytest.approx(alone.nll_focus, abs=1e-4)
    # the reverted session's next-token logits are the recency session's: its cache
    # was recomputed for the WC it went back to
    torch.testing.assert_close(rev.next_token_logits(), rec.next_token_logits(), atol=1e-4, rtol=0)
    # the rejected focus stays rejected while the session decodes: no expand comes
    # back (the lexical query is still the ingest's), only budget collapses
    assert rev.focus.vetoed and not kept.focus.vetoed
    n = len(rev.actions)
    rev.generate(40, temperature=0.0)
    rev.wc.check(rev.tree)
    assert all(a.kind == "collapse" for a in rev.actions[n:])


def _fed_session(tiny_base, **kw):
    """A session over ``_planted()`` whose ingest check kept the lexical focus."""
    cfg = _cfg(w_max=512, lens="lexical", refocus_iterations=8, verify_margin=-100.0)
    cfg = cfg.model_copy(update={"verify_tokens": 16, "verify_feed": True, **kw})
    s = mc.MegaContext(tiny_base, None, None, cfg).session()
    s.ingest(_planted())
    assert s.focus.verdicts[-1].kept and s.focus.verdicts[-1].tokens == 16
    assert s.focus.feed_check == 0 and not s.focus.vetoed
    return s


def test_verify_feed_judges_the_focus_on_the_fed_tokens(tiny_base):
    s = _fed_session(tiny_base)
    g = torch.Generator().manual_seed(3)
    fed = torch.randint(5, 40000, (40,), generator=g)
    s.feed(fed[:15])
    assert len(s.focus.verdicts) == 1 and s.focus.feed_check == 15  # not due yet
    # the check's two rows, computed here before the 16th token: after it the loop
    # reads the focused and the recency WC on the 16 fed tokens
    s.feed(fed[15:16])
    assert s.focus.feed_check is None  # judged once, nothing armed again
    _, verdict = s.focus.verdicts
    assert verdict.tokens == 16 and verdict.kept  # the margin keeps any focus
    loop = s.focus
    rec = loop.recency()
    assert verdict.nll_recency == pytest.approx(_tail_nll(tiny_base, loop, rec, 16), abs=2e-4)
    assert verdict.nll_focus == pytest.approx(_tail_nll(tiny_base, loop, loop.wc, 16), abs=2e-4)
    s.feed(fed[16:])
    assert len(s.focus.verdicts) == 2  # once per ingest


def test_verify_feed_puts_recency_back_with_an_exact_cache(tiny_base):
    s = _fed_session(tiny_base)
    # the same session, told to demand a 100-nat gain from now on: the feed check drops
    s.focus.config = s.focus.config.model_copy(update={"verify_margin": 100.0})
    fed = torch.randint(5, 40000, (16,), generator=torch.Generator().manual_seed(4))
    s.feed(fed)
    verdict = s.focus.verdicts[-1]
    assert not verdict.kept and s.focus.vetoed
    rec = s.focus.recency()
    assert torch.equal(s.wc.levels.cpu(), rec.levels.cpu())
    assert torch.equal(s.wc.nodes.cpu(), rec.nodes.cpu())
    # the cache was recomputed from the first changed entry: the next-token logits
    # are a fresh forward's over the recency WC
    emb, pos = with_sink(
        tiny_base, rec.embeddings(tiny_base, s.tree), s.focus.positions(rec), rec.levels, True
    )
    fresh = tiny_base.model(inputs_embeds=emb[None], position_ids=pos[None]).logits[0, -1]
    torch.testing.assert_close(s.next_token_logits(), fresh.float(), atol=1e-4, rtol=0)


def test_verify_feed_waits_while_the_working_context_is_the_recency_one(tiny_base):
    cfg = _cfg(w_max=512, lens="lexical", refocus_iterations=8, verify_margin=-100.0)
    cfg = cfg.model_copy(update={"verify_tokens": 16, "verify_feed": True})
    s = mc.MegaContext(tiny_base, None, None, cfg).session()
    ids = 5 + torch.randperm(40000, generator=torch.Generator().manual_seed(6))[:3000]
    s.ingest(ids)  # no token repeats: the scorer wants nothing, no check ran
    assert s.focus.verdicts == [] and s.focus.feed_check == 0
    s.feed(torch.arange(42000, 42040))  # nor do these tokens occur before
    # nothing to judge yet: the WC is the recency one, the check stays armed
    assert s.focus.verdicts == [] and s.focus.feed_check == 40
    assert not s.focus.feed_check_due()


def test_verify_feed_is_cancelled_by_generation_and_off_by_default(tiny_base, tmp_path):
    s = _fed_session(tiny_base)
    s.generate(4, temperature=0.0)
    assert s.focus.feed_check is None  # the model's own text would favour the focus
    s.feed(torch.randint(5, 40000, (24,), generator=torch.Generator().manual_seed(5)))
    assert len(s.focus.verdicts) == 1
    cfg = _cfg(w_max=512, lens="lexical", refocus_iterations=8, verify_margin=-100.0)
    d = mc.MegaContext(
        tiny_base, None, None, cfg.model_copy(update={"verify_tokens": 16})
    ).session()
    d.ingest(_planted())
    assert not d.config.verify_feed and d.focus.feed_check is None
    # a pending check survives a save, and a failed feed leaves it as it was
    p = _fed_session(tiny_base)
    p.feed(torch.tensor([7, 8, 9]))
    with pytest.raises(mc.InputError):
        p.feed(torch.tensor([10, -1]))
    assert p.focus.feed_check == 3
    back = p.system.open(p.save(tmp_path / "p"))
    assert back.focus.feed_check == 3


def test_decode_focus_hold_keeps_the_opened_blocks_and_collapses_the_oldest(tiny_base, tmp_path):
    cfg = _cfg(w_max=512, lens="lexical", refocus_iterations=8, verify_margin=-100.0)
    system = mc.MegaContext(
        tiny_base, None, None, cfg.model_copy(update={"verify_tokens": 16, "decode_focus": "hold"})
    )
    s = system.session()
    s.ingest(_planted())
    held = s.focus.held
    assert held is not None and held.numel() > 0  # the planted span was opened
    assert torch.equal(held, s.focus.opened_blocks())
    fed = 5 + torch.randperm(40000, generator=torch.Generator().manual_seed(8))[:64]
    for i in range(0, 64, 8):
        s.feed(fed[i : i + 8])
        s.wc.check(s.tree)
        bs = s.config.block_size
        blocks = torch.unique(s.wc.nodes[s.wc.levels == 0].cpu().long() // bs)
        # the held blocks stay tokens; every other token block is one run that ends
        # at the newest token: the budget collapsed the oldest, no hole in between
        assert torch.isin(held, blocks).all()
        run = blocks[~torch.isin(blocks, held)]
        assert torch.equal(run, torch.arange(int(run[0]), int(run[0]) + run.numel()))
        assert int(run[-1]) == (s.num_tokens - 1) // bs
    assert all(a.kind == "collapse" for a in s.actions[-8:])
    back = system.open(s.save(tmp_path / "s"))
    assert torch.equal(back.focus.held, held)
    # the next ingest is a new question: nothing held from the last one until it ends
    back.ingest(torch.arange(45000, 45100))
    assert back.focus.held is not None and back.focus.held.numel() == 0


def test_a_saved_session_keeps_its_veto(tiny_base, tmp_path):
    cfg = _cfg(w_max=512, lens="lexical", refocus_iterations=8, verify_margin=100.0)
    system = mc.MegaContext(tiny_base, None, None, cfg.model_copy(update={"verify_tokens": 16}))
    s = system.session()
    s.ingest(_planted())
    assert s.focus.vetoed
    path = s.save(tmp_path / "s")
    back = system.open(path)
    assert back.focus.vetoed
    # the next ingest is a new question (here one that matches nothing): the veto
    # was the last question's
    back.ingest(torch.arange(45000, 45100))
    assert not back.focus.vetoed


def _guarded(base, ids, v, **guard):
    """``(loop, recency WC, focus WC, verdict)`` of the lexical focus over ``ids``
    judged on ``v`` tokens by the mean rule with a margin that keeps any focus, plus
    the one extra rule in ``guard`` (``verify_unmatched`` or ``verify_peak``)."""
    cfg = _cfg(
        w_max=512,
        lens="lexical",
        refocus_iterations=8,
        verify_tokens=v,
        verify_margin=-100.0,  # the mean rule keeps any focus
        **guard,
    )
    loop, recency, focus_wc = _verified(base, ids, cfg)
    return loop, recency, focus_wc, loop.verdicts[-1]


@pytest.mark.parametrize("side", [-1.0, 1.0])
def test_verify_unmatched_bounds_the_harm_on_tokens_no_opened_span_holds(tiny_base, side):
    v = 24
    ids = _planted()
    # the last 12 tokens occur nowhere else: no opened span can hold them
    ids[-12:] = torch.arange(40000, 40012)

    def verdict(u):
        return _guarded(tiny_base, ids, v, verify_unmatched=u)

    loop, recency, focus_wc, off = verdict(None)
    assert off.kept  # the guard off: the margin keeps the focus
    focus_nll, judged = _tail_token_nll(tiny_base, loop, focus_wc, v)
    rec_nll, _ = _tail_token_nll(tiny_base, loop, recency, v)
    # the opened spans: history indices the focus reads as tokens and recency does not
    f_idx = focus_wc.nodes[focus_wc.levels == 0]
    r_idx = recency.nodes[recency.levels == 0]
    opened = f_idx[~torch.isin(f_idx, r_idx)]
    assert opened.numel() > 0
    free = ~torch.isin(judged, loop.tree.tokens(0, loop.num_tokens)[opened])
    assert int(free.sum()) >= 12
    harm = float((focus_nll - rec_nll)[free].mean())
    assert off.unmatched == pytest.approx(harm, abs=2e-4)
    # a bound just above the harm keeps the focus, just below drops it for recency
    loop, _, _, guarded = verdict(harm + side * 1e-3)
    assert guarded.unmatched == pytest.approx(harm, abs=2e-4)
    assert guarded.kept == (side > 0)
    want = focus_wc if side > 0 else recency
    assert torch.equal(loop.wc.nodes.cpu(), want.nodes.cpu())
    assert loop.vetoed == (side < 0)


@pytest.mark.parametrize("side", [-1.0, 1.0])
def test_verify_peak_needs_one_judged_token_read_c_nats_better(tiny_base, side):
    v = 24
    ids = _planted()

    def verdict(c):
        return _guarded(tiny_base, ids, v, verify_peak=c)

    loop, recency, focus_wc, off = verdict(None)
    assert off.kept
    focus_nll, _ = _tail_token_nll(tiny_base, loop, focus_wc, v)
    rec_nll, _ = _tail_token_nll(tiny_base, loop, recency, v)
    peak = float((rec_nll - focus_nll).max())
    assert off.peak == pytest.approx(peak, abs=2e-4)
    # a bar just below the peak keeps the focus, just above it drops it for recency
    loop, _, _, guarded = verdict(peak - side * 1e-3)
    assert guarded.peak == pytest.approx(peak, abs=2e-4)
    assert guarded.kept == (side > 0)
    want = focus_wc if side > 0 else recency
    assert torch.equal(loop.wc.nodes.cpu(), want.nodes.cpu())
    assert loop.vetoed == (side < 0)


def test_verify_fields_are_validated():
    with pytest.raises(mc.ConfigError, match="verify_tokens"):
        mc.MegaContextConfig(model="tiny-llama", verify_tokens=-1)
    with pytest.raises(mc.ConfigError, match="verify_unmatched"):
        mc.MegaContextConfig(model="tiny-llama", verify_unmatched="high")
    for bad in ("high", float("nan"), float("inf")):
        with pytest.raises(mc.ConfigError, match="verify_peak"):
            mc.MegaContextConfig(model="tiny-llama", verify_peak=bad)


@pytest.mark.parametrize("margin", [-100.0, 100.0])
def test_verify_before_judges_the_focus_of_the_earlier_query(tiny_base, margin):
    cfg = _cfg(w_max=512, lens="lexical", refocus_iterations=8, verify_margin=margin)
    cfg = cfg.model_copy(update={"verify_tokens": 16, "verify_query": "before"})
    # the query before the last 16 tokens still ends with a copy of a far span
    loop = FocusLoop(tiny_base, None, None, cfg)
    loop.ingest(_planted())
    refocus_after_ingest(cfg, lambda: loop.refocus().actions, loop.verify)
    (verdict,) = loop.verdicts
    assert verdict.tokens == 16 and verdict.kept == (margin < 0)
    # only the last 16 tokens copy a far span: the earlier query retrieves nothing,
    # so there is nothing to judge and the focus stays, whatever the margin
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 40000, (3000,), generator=g)
    ids[-80:-16] = torch.arange(45000, 45064)  # found nowhere else
    ids[-16:] = ids[500:516]
    loop = FocusLoop(tiny_base, None, None, cfg)
    loop.ingest(ids)
    refocus_after_ingest(cfg, lambda: loop.refocus().actions, loop.verify)
    (verdict,) = loop.verdicts
    assert verdict.tokens == 0 and verdict.kept
    recency = WorkingContext.from_tree(loop.tree, cfg.w_max, cfg.protected_tokens)
    assert not torch.equal(loop.wc.nodes.cpu(), recency.nodes.cpu())
