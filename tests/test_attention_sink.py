"""The attention sink: a WC that starts with a gist is read behind one sink token.

``reads_sink``/``with_sink`` define it; the cache keeps the sink's K/V in a slot
before its logical slots; the runtime, the eval views and the trainer's forward read
the same thing (their equalities are tested where each lives: test_runtime,
test_positions, test_labels, test_eval_peers)."""

from __future__ import annotations

import pytest
import torch

import megacontext as mc
from megacontext.cache import MegaContextCache
from megacontext.runtime import wc_nll
from megacontext.working_context import reads_sink, sink_position, with_sink


def _ids(n, seed=0):
    return torch.randint(0, 49152, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def model(tiny_base):
    mc.patch(tiny_base.model)
    yield tiny_base.model
    mc.unpatch(tiny_base.model)


def test_reads_sink_only_before_a_gist():
    assert reads_sink(torch.tensor([2, 1, 0]))
    assert not reads_sink(torch.tensor([0, 0, 0]))
    assert not reads_sink(torch.tensor([2, 1, 0]), enabled=False)
    assert not reads_sink(torch.zeros(0, dtype=torch.int32))


def test_with_sink_prepends_the_sink_token_before_the_first_token_entry(tiny_base):
    emb = torch.randn(3, tiny_base.dim)
    pos = torch.tensor([5, 6, 9])
    e, p = with_sink(tiny_base, emb, pos, torch.tensor([1, 0, 0]), True)
    assert e.shape == (4, tiny_base.dim) and p.tolist() == [5, 5, 6, 9]
    _, p = with_sink(tiny_base, emb, pos, torch.tensor([1, 0, 0]), True, "start")
    assert p.tolist() == [0, 5, 6, 9]
    want = tiny_base.embed(torch.tensor([tiny_base.sink_token_id]))[0]
    torch.testing.assert_close(e[0], want.to(e.dtype))
    assert torch.equal(e[1:], emb)
    for levels, on in ((torch.tensor([0, 0, 0]), True), (torch.tensor([1, 0, 0]), False)):
        e, p = with_sink(tiny_base, emb, pos, levels, on)
        assert e is emb and p is pos


def test_sink_position_is_right_before_the_first_token_entry():
    # nearby: gists at 0..2, a retrieved span (LOD0 inside the far memory) and the
    # recent window at 900.. : the sink goes right before the span
    levels = torch.tensor([2, 1, 0, 0, 1, 0, 0])
    pos = torch.tensor([0, 1, 900, 901, 2, 902, 903])
    assert sink_position(pos, levels) == 899
    assert sink_position(pos, levels, "start") == 0
    # a window that starts at position 0 (compact, no gist before it): not below 0
    assert sink_position(torch.tensor([0, 1]), torch.tensor([0, 0])) == 0
    assert sink_position(torch.tensor([0, 1]), torch.tensor([1, 1])) == 0
    with pytest.raises(mc.ConfigError, match="sink place"):
        sink_position(pos, levels, "middle")
    with pytest.raises(mc.ConfigError, match="sink_at"):
        mc.MegaContextConfig(sink_at="middle")


def test_sink_token_is_bos_else_eos(tiny_base):
    tok = tiny_base.tokenizer
    want = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    assert tiny_base.sink_token_id == (0 if want is None else want)


def test_cache_sink_slots_are_outside_the_logical_slots(model):
    cache = MegaContextCache.for_model(model, batch_size=2, capacity=8, sink=1)
    L, _, B, H, C, D = cache.kv.shape
    assert C == 8 and cache.physical.shape[4] == 9
    k, v = torch.randn(L, H, 1, D), torch.randn(L, H, 1, D)
    cache.set_sink(k, v)
    for buf in cache.buffers:
        torch.testing.assert_close(buf[:, 0, 1, :, :1], k)
        torch.testing.assert_close(buf[:, 1, 0, :, :1], v)
    key = torch.randn(B, H, 2, D)
    cache.plan(torch.tensor([[0, 1], [2, 3]]), [2, 4])
    got_k, _ = cache.layers[0].update(key, -key, 0)
    assert got_k.shape == (B, H, 5, D)  # the sink slot, then 4 logical slots
    torch.testing.assert_close(cache.kv[0, 0, 1, :, [2, 3]], key[1])
    torch.testing.assert_close(got_k[0, :, 0], k[0, :, 0])
    with pytest.raises(mc.InputError, match="set_sink"):
        cache.set_sink(torch.randn(L, H, 2, D), v)
    with pytest.raises(mc.ConfigError, match="sink"):
        MegaContextCache.for_model(model, batch_size=1, capacity=8, sink=-1)


def test_cache_mask_reads_the_sink_per_row(model):
    cache = MegaContextCache.for_model(model, batch_size=2, capacity=8, sink=1)
    cache.sink_on = [True, False]
    mask = cache.attention_mask(torch.tensor([[2], [0]]), [3, 1])
    assert mask.shape == (2, 1, 1, 4)
    assert mask[0, 0, 0].tolist() == [True, True, True, True]
    assert mask[1, 0, 0].tolist() == [False, True, False, False]
    assert cache.needs_mask()
    cache.sink_on = [True, True]
    assert not cache.needs_mask()
    plain = MegaContextCache.for_model(model, batch_size=1, capacity=8)
    assert not plain.needs_mask()
    assert plain.attention_mask(torch.tensor([[1]]), [2]).shape == (1, 1, 1, 2)


def test_splice_never_moves_the_sink(model):
    cache = MegaContextCache.for_model(model, batch_size=1, capacity=12, sink=1)
    ref = MegaContextCache.for_model(model, batch_size=1, capacity=12)
    L, _, _, H, _, D = cache.kv.shape
    sink_k, sink_v = torch.randn(L, H, 1, D), torch.randn(L, H, 1, D)
    cache.set_sink(sink_k, sink_v)
    rows = torch.randn_like(cache.kv)
    cache.kv.copy_(rows)
    ref.kv.copy_(rows)
    cache.lengths = ref.lengths = [10]
    index = torch.tensor([[0, 1, -1, 6, 7, 8, 9]])
    delta = torch.tensor([[0, 0, 0, -3, -3, -3, -3]])
    for c in (cache, ref):
        c.splice(index, [7], position_delta=delta)
    torch.testing.assert_close(cache.kv[..., :7, :], ref.kv[..., :7, :], rtol=0, atol=0)
    torch.testing.assert_close(cache.physical[:, 0, 0, :, :1], sink_k, rtol=0, atol=0)
    torch.testing.assert_close(cache.physical[:, 1, 0, :, :1], sink_v, rtol=0, atol=0)


def test_append_mode_is_refused_with_a_sink(model):
    cache = MegaContextCache.for_model(model, batch_size=1, capacity=8, sink=1)
    with pytest.raises(mc.InvariantError, match="plan"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache, use_cache=True)


def test_state_dict_keeps_the_sink_flag(model):
    cache = MegaContextCache.for_model(model, batch_size=1, capacity=8, sink=1)
    cache.kv.copy_(torch.randn_like(cache.kv))
    cache.lengths, cache.sink_on = [5], [True]
    state = cache.state_dict()
    other = MegaContextCache.for_model(model, batch_size=1, capacity=8, sink=1)
    other.load_state_dict(state)
    assert other.sink_on == [True] and other.lengths == [5]
    torch.testing.assert_close(other.kv[..., :5, :], cache.kv[..., :5, :])


def _session(base, **kw):
    cfg = mc.MegaContextConfig(model=base.name, w_max=128, block_size=8, levels=2, **kw)
    return mc.MegaContext(base, None, None, cfg).session()


def _fresh(base, s, sink):
    embeds, pos = with_sink(
        base,
        s.wc.embeddings(base, s.tree),
        s.focus.positions(),
        s.wc.levels,
        sink,
        s.config.sink_at,
    )
    return base.model(inputs_embeds=embeds[None], position_ids=pos[None]).logits[0, -1].float()


def _placed(s) -> int:
    return sink_position(s.focus.positions(), s.wc.levels, s.config.sink_at)


@pytest.mark.parametrize("mode", ["exact", "splice"])
@pytest.mark.parametrize("at", ["window", "start"])
def test_the_sink_comes_in_when_the_first_entry_becomes_a_gist(tiny_base, mode, at):
    s = _session(tiny_base, kv_mode=mode, sink_at=at)
    s.ingest(_ids(100))
    assert int(s.wc.levels[0]) == 0 and s.cache.sink_on == [False]
    torch.testing.assert_close(
        s.next_token_logits(), _fresh(tiny_base, s, False), atol=1e-4, rtol=1e-4
    )
    s.ingest(_ids(400, seed=1))  # past the budget: the oldest tokens become gists
    assert int(s.wc.levels[0]) > 0 and s.cache.sink_on == [True]
    torch.testing.assert_close(
        s.next_token_logits(), _fresh(tiny_base, s, True), atol=1e-4, rtol=1e-4
    )
    was = s._sink_position
    assert was == _placed(s) and (was > 0) == (at == "window")
    s.generate(40)  # decode across refocuses with the sink in place
    assert s.cache.sink_on == [True]
    # the cached sink follows the window (a refocus that adds gists moves it)
    assert s._sink_position == _placed(s) and (s._sink_position != was) == (at == "window")
    if mode == "exact":  # splice keeps K/V computed in older contexts by design
        torch.testing.assert_close(
            s.next_token_logits(), _fresh(tiny_base, s, True), atol=1e-4, rtol=1e-4
        )


def test_the_sink_changes_what_the_model_reads(tiny_base):
    on, off = _session(tiny_base), _session(tiny_base, attention_sink=False)
    for s in (on, off):
        s.ingest(_ids(600))
    assert on.cache.sink_on == [True] and off.cache.sink_on == [False]
    assert off.cache.sink == 0
    torch.testing.assert_close(
        off.next_token_logits(), _fresh(tiny_base, off, False), atol=1e-4, rtol=1e-4
    )
    assert not torch.allclose(on.next_token_logits(), off.next_token_logits(), atol=1e-3)
    tgt = _ids(16, seed=3)
    kw = {"positions": on.config.positions, "max_gap": on.focus.max_gap}
    with_s = wc_nll(tiny_base, on.wc, on.tree, tgt, on.num_tokens, sink=True, **kw)
    without = wc_nll(tiny_base, on.wc, on.tree, tgt, on.num_tokens, sink=False, **kw)
    assert on.loss_at_h(tgt) == pytest.approx(float(with_s.mean()), rel=1e-5)
    assert not torch.allclose(with_s, without)


def test_a_saved_session_reopens_with_its_sink(tiny_base, tmp_path):
    s = _session(tiny_base)
    s.ingest(_ids(600))
    s.save(tmp_path / "s")
    r = mc.MegaContext.open(tmp_path / "s", base=tiny_base)
    assert r.cache.sink_on == [True]
    torch.testing.assert_close(r.next_token_logits(), s.next_token_logits(), rtol=0, atol=1e-5)
    assert r.generate(20) == s.generate(20)


def test_a_session_saved_before_the_sink_moved_is_recomputed(tiny_base, tmp_path, monkeypatch):
    # a session written before kv_sink_position existed read its sink at position 0
    from megacontext import session_store

    write = session_store.write_session

    def old_write(path, *, meta, **kw):
        meta = {k: v for k, v in meta.items() if k != "kv_sink_position"}
        return write(path, meta=meta, **kw)

    s = _session(tiny_base, kv_mode="exact")
    s.ingest(_ids(600))
    assert s._sink_position > 0
    monkeypatch.setattr(session_store, "write_session", old_write)
    s.save(tmp_path / "s")
    r = mc.MegaContext.open(tmp_path / "s", base=tiny_base)
    assert r.cache.sink_on == [True] and r._sink_position == _placed(r)
    torch.testing.assert_close(
        r.next_token_logits(), _fresh(tiny_base, r, True), atol=1e-4, rtol=1e-4
    )


@torch.no_grad()
def test_a_moved_sink_is_what_a_forward_at_its_position_writes(tiny_base):
    # the sink reads only itself: its value never depends on its position and its key
    # is the position-0 key rotated, at every layer
    s = _session(tiny_base)
    for position in (777, 3, 0):
        s._move_sink(position)
        one = MegaContextCache.for_model(
            tiny_base.model, batch_size=1, capacity=1, double_buffer=False
        )
        one.plan(torch.zeros(1, 1, dtype=torch.long), [1])
        tiny_base.model(
            inputs_embeds=tiny_base.embed(torch.tensor([[tiny_base.sink_token_id]])),
            position_ids=torch.full((1, 1), position, dtype=torch.long),
            use_cache=True,
            **{s._cache_kw: one},
        )
        for buf in s.cache.buffers:
            torch.testing.assert_close(
                buf[:, :, 0, :, :1], one.kv[:, :, 0, :, :1], atol=1e-5, rtol=1e-5
            )
    assert s._sink_position == 0
