from __future__ import annotations

import pytest
import torch
from session_checks import RuleScorer

import megacontext as mc
from megacontext.runtime import wc_nll
from megacontext.working_context import with_sink


def _ids(n, seed=0):
    return torch.randint(0, 49152, (n,), generator=torch.Generator().manual_seed(seed))


def _fresh_logits(base, session):
    """The logits a fresh forward gives: the WC behind the attention sink when it
    starts with a gist (``attention_sink``), every entry at its scheme's position."""
    wc = session.wc
    embeds, positions = with_sink(
        base,
        wc.embeddings(base, session.tree),
        session.focus.positions(),
        wc.levels,
        session.config.attention_sink,
    )
    out = base.model(inputs_embeds=embeds[None], position_ids=positions[None])
    return out.logits[0, -1].float()


def _session(base, mode="exact", w_max=256, lens=True, **kw):
    cfg = mc.MegaContextConfig(model=base.name, w_max=w_max, kv_mode=mode, **kw)
    return mc.MegaContext(base, None, RuleScorer() if lens else None, cfg).session()


def test_exact_refocus_equals_a_fresh_forward(tiny_base):
    s = _session(tiny_base, "exact")
    s.ingest(_ids(2000))
    s.generate(96)
    assert any(r["n_expand"] for r in s.history) and any(r["n_collapse"] for r in s.history)
    torch.testing.assert_close(
        s.next_token_logits(), _fresh_logits(tiny_base, s), rtol=1e-4, atol=1e-4
    )


def test_splice_keeps_invariants_and_stays_close(tiny_base):
    # the check's mean rule only: the peak rule would drop the random scorer's focus
    # at the ingest, and the splice would then have nothing to follow
    s = _session(tiny_base, "splice", verify_peak=None)
    s.ingest(_ids(2000))
    before = s.cache.buffers[0].data_ptr(), s.cache.buffers[1].data_ptr()
    s.generate(96)
    assert (s.cache.buffers[0].data_ptr(), s.cache.buffers[1].data_ptr()) == before
    assert sum(r["n_expand"] + r["n_collapse"] for r in s.history) > 0
    s.wc.check(s.tree)
    diff = (s.next_token_logits() - _fresh_logits(tiny_base, s)).abs().max()
    assert diff < 1.0  # approximate by design; the splice benchmark measures its ΔNLL


def test_recency_only_session_never_exceeds_the_cache(tiny_base):
    s = _session(tiny_base, "splice", w_max=256, lens=False)
    s.ingest(_ids(100_000))
    assert s.num_tokens == 100_000 and s.wc.cost <= 256
    for _ in range(3):
        s.generate(32)
        assert max(s.cache.lengths) <= s.capacity == 256 + 32
        s.wc.check(s.tree)
    assert all(r["wc_cost"] <= 256 for r in s.history)
    # a full budget: each decoded block forces ceil(excess / 31) >= 1 collapses (the
    # budget floor); recency-only focus takes no other action
    decode = s.history[1:]
    assert all(r["n_budget_collapses"] >= 1 for r in decode)
    for r in decode:
        assert r["n_budget_collapses"] == r["n_collapse"] and r["focus_swap_rate"] == 0.0


def test_telemetry_rows_and_trace_match_the_wc(tiny_base):
    s = _session(tiny_base, "exact")
    s.ingest(_ids(1504))  # block-aligned: the 32 decoded tokens end on a refocus
    levels_before = s.wc.levels.clone()
    s.generate(32)
    assert len(s.history) == 2  # the ingest refocus and one block of decode
    row = s.history[-1]
    for key in (
        "loss_at_h",
        "swap_rate",
        "mean_residency",
        "latency_ms",
        "latency_gist_ms",
        "latency_lens_ms",
        "latency_allocator_ms",
        "latency_cache_ms",
        "latency_decode_ms",
        "token_budget_utilization",
    ):
        assert key in row
    assert row["token_budget_utilization"] == s.wc.cost / 256
    acted = [a for a in s.actions if a.step == row["step"]]
    assert row["n_expand"] + row["n_collapse"] == len(acted)
    # cost bookkeeping: 32 decoded tokens plus the actions' deltas
    assert s.wc.cost == len(levels_before) + 32 + sum(a.cost_delta for a in acted)


def test_loss_at_h_matches_definition_and_changes_nothing(tiny_base):
    s = _session(tiny_base, "exact", lens=False)
    s.ingest(_ids(700))
    targets = _ids(64, seed=5)
    logits = s.next_token_logits()
    got = s.loss_at_h(targets)
    kw = {
        "positions": s.config.positions,
        "max_gap": s.focus.max_gap,
        "sink": s.config.attention_sink,
    }
    expected = wc_nll(tiny_base, s.wc, s.tree, targets, s.num_tokens, **kw).mean()
    assert got == pytest.approx(float(expected), rel=1e-6)
    # the first target's NLL comes from the same logits the session decodes from
    first = -torch.log_softmax(logits, -1)[targets[0]]
    nll = wc_nll(tiny_base, s.wc, s.tree, targets, s.num_tokens, **kw)
    assert float(nll[0]) == pytest.approx(float(first), abs=1e-4)
    assert torch.equal(s.next_token_logits(), logits) and s.num_tokens == 700
    assert s.loss_at_h(targets, horizon=8) == pytest.approx(float(nll[:8].mean()), rel=1e-5)


def test_generate_options(tiny_base):
    s = _session(tiny_base, "exact", lens=False)
    s.ingest("def add(a, b):\n    return a + b\n" * 10)
    greedy = s.generate(5)
    assert isinstance(greedy, str) and s.num_tokens > 5
    t = s.generate(20, temperature=0.8, top_p=0.9, seed=1)
    assert isinstance(t, str)
    stopped = s.generate(50, stop=[""])  # any text contains "": stops after one token
    assert len(tiny_base.tokenizer.encode(stopped, add_special_tokens=False)) <= 2


def test_bad_inputs_leave_the_session_unchanged(tiny_base):
    s = _session(tiny_base, "splice")
    with pytest.raises(mc.InputError, match="ingest"):
        s.generate(3)
    with pytest.raises(mc.InputError, match="empty"):
        s.ingest("")
    s.ingest(_ids(500))
    snap = (s.num_tokens, s.wc.levels.clone(), s.next_token_logits())
    with pytest.raises(mc.InputError, match="49152"):
        s.ingest(torch.tensor([1, 2, 49152]))
    with pytest.raises(mc.InputError, match="-4"):
        s.ingest([3, -4])
    with pytest.raises(mc.InputError, match="integers"):
        s.ingest(torch.tensor([1.5]))
    with pytest.raises(mc.InputError, match="top_p"):
        s.generate(3, top_p=0)
    assert s.num_tokens == snap[0] and torch.equal(s.wc.levels, snap[1])
    assert torch.equal(s.next_token_logits(), snap[2])


def test_failed_ingest_rolls_back(tiny_base, monkeypatch):
    s = _session(tiny_base, "exact", lens=False)
    s.ingest(_ids(400))
    snap = (s.num_tokens, s.wc.nodes.clone(), s.next_token_logits())
    monkeypatch.setattr(s, "refocus", lambda: (_ for _ in ()).throw(RuntimeError("lens died")))
    s.system.lensnet = RuleScorer()
    with pytest.raises(RuntimeError, match="lens died"):
        s.ingest(_ids(300, seed=2))
    s.system.lensnet = None
    assert s.num_tokens == snap[0] and torch.equal(s.wc.nodes, snap[1])
    torch.testing.assert_close(s.next_token_logits(), snap[2])


def test_budget_and_model_errors(tiny_base):
    with pytest.raises(mc.ConfigError, match="w_max"):
        mc.MegaContextConfig(w_max=90)  # < 64 protected + a 32-token block
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    fake = mc.Base(model=gpt2, tokenizer=tiny_base.tokenizer, name="gpt2-tiny")
    with pytest.raises(mc.UnsupportedModelError, match="gpt2"):
        mc.MegaContext(fake)


@pytest.mark.parametrize("mode", ["exact", "splice"])
def test_saved_session_resumes_with_identical_logits(tiny_base, tmp_path, mode):
    s = _session(tiny_base, mode)
    s.ingest(_ids(1200))
    s.generate(40)
    s.save(tmp_path / "sess")
    r = mc.MegaContext.open(tmp_path / "sess", base=tiny_base, lensnet=RuleScorer())
    assert torch.equal(r.next_token_logits(), s.next_token_logits())
    assert torch.equal(r.wc.levels, s.wc.levels) and torch.equal(r.wc.nodes, s.wc.nodes)
    a, b = s.generate(40), r.generate(40)
    assert a == b
    torch.testing.assert_close(r.next_token_logits(), s.next_token_logits(), rtol=0, atol=1e-5)
    with pytest.raises(mc.StorageError, match="session.json"):
        mc.MegaContext.open(tmp_path, base=tiny_base)


@pytest.mark.parametrize("mode", ["exact", "splice"])
def test_batched_decode_equals_per_session_decode(tiny_base, mode):
    # different histories and WC lengths; the first stays under the budget, so its WC
    # starts with token 0 and reads no attention sink while the others do
    lengths = [20, 700, 1013, 1500]
    solo, batch = [], []
    for i, n in enumerate(lengths):
        for group in (solo, batch):
            s = _session(tiny_base, mode)
            s.ingest(_ids(n, seed=i))
            group.append(s)
    expected = [s.generate(70) for s in solo]
    got = batch[0].system.batch(batch).generate(70)
    assert got == expected
    for a, b in zip(solo, batch, strict=True):
        torch.testing.assert_close(b.next_token_logits(), a.next_token_logits(), rtol=0, atol=1e-5)
        assert [x[:4] for x in a.actions] == [x[:4] for x in b.actions]
        assert torch.equal(a.wc.nodes, b.wc.nodes)
    assert sum(len(s.actions) for s in batch) > 0
    assert [s.cache.sink_on[0] for s in batch] == [False, True, True, True]


def test_batch_input_errors(tiny_base):
    s = _session(tiny_base)
    with pytest.raises(mc.InputError, match="history"):
        s.system.batch([s])
    s.ingest(_ids(100))
    with pytest.raises(mc.InputError, match="twice"):
        s.system.batch([s, s])
    with pytest.raises(mc.InputError, match="at least one"):
        s.system.batch([])


def test_feed_scores_tokens_like_generate(tiny_base):
    a, b = _session(tiny_base, "exact"), _session(tiny_base, "exact")
    a.ingest(_ids(900))
    b.ingest(_ids(900))
    text = a.generate(40)
    ids = tiny_base.tokenizer.encode(text, add_special_tokens=False)
    first = -torch.log_softmax(b.next_token_logits(), -1)[ids[0]]
    nll = b.feed(ids)
    assert nll.shape == (len(ids),) and float(nll[0]) == pytest.approx(float(first))
    assert b.num_tokens == a.num_tokens and torch.equal(a.wc.nodes, b.wc.nodes)
    torch.testing.assert_close(b.next_token_logits(), a.next_token_logits())


def test_session_gists_each_level_with_its_own_weights(tiny_base):
    # every weight perturbed (an untrained GistNet is exact mean pooling, blind to its
    # level embedding) so that level 1 and level 2 gist differently; the session's
    # tree must match a tree appended with the GistNet itself
    cfg = mc.MegaContextConfig(model=tiny_base.name, w_max=64, block_size=8, levels=2)
    gistnet = mc.GistNet(tiny_base.dim, block_size=8, levels=2, width=32, depth=1, heads=2, seed=0)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        for p in gistnet.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        gistnet.level_embed.normal_()
    gistnet.eval()
    ids = _ids(256)
    s = mc.MegaContext(tiny_base, gistnet, None, cfg).session()
    s.ingest(ids)
    ref = mc.MegaContextTree(tiny_base.dim, block_size=8, levels=2, dtype=s.tree.dtype)
    ref.append(ids, tiny_base.embed, gistnet)
    for level in (1, 2):
        torch.testing.assert_close(s.tree.gists(level), ref.gists(level), rtol=0, atol=0)
    wrong = gistnet.at_level(1)(s.tree.gists(1)[:8][None].float())[0].to(s.tree.dtype)
    assert not torch.equal(wrong, s.tree.gists(2)[0])
