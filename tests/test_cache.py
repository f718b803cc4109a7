from __future__ import annotations

import pytest
import torch

import megacontext as mc
from megacontext.cache import MegaContextCache


@pytest.fixture
def model(tiny_base):
    mc.patch(tiny_base.model)
    yield tiny_base.model
    mc.unpatch(tiny_base.model)


def test_append_mode_decode_equals_full_forward(model):
    ids = torch.randint(0, 49152, (1, 30), generator=torch.Generator().manual_seed(0))
    full = model(ids).logits
    cache = MegaContextCache.for_model(model, batch_size=1, capacity=40)
    ptrs = [b.data_ptr() for b in cache.buffers]
    out = [model(ids[:, :20], cache=cache, use_cache=True).logits]
    for t in range(20, 30):
        out.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 30 and cache.lengths == [30]
    assert [b.data_ptr() for b in cache.buffers] == ptrs, "the cache reallocated"


def test_planned_writes_land_at_their_slots(model):
    cache = MegaContextCache.for_model(model, batch_size=2, capacity=16, double_buffer=False)
    _, _, B, H, _, D = cache.kv.shape
    key = torch.randn(B, H, 3, D)
    slots = torch.tensor([[1, 4, 7], [0, 2, 3]])
    cache.plan(slots, [8, 4])
    k, _ = cache.layers[0].update(key, -key, 0)
    assert k.shape == (B, H, 8, D)
    torch.testing.assert_close(cache.kv[0, 0, 0, :, [1, 4, 7]], key[0])
    torch.testing.assert_close(cache.kv[0, 1, 1, :, [0, 2, 3]], -key[1])
    assert cache.lengths == [8, 4]


def test_splice_moves_rows_in_one_gather(model):
    cache = MegaContextCache.for_model(model, batch_size=1, capacity=12)
    cache.kv.copy_(torch.randn_like(cache.kv))
    cache.lengths = [10]
    old = cache.kv.clone()
    # collapse slots 2..5 into one new entry at slot 2; rows 6..9 move left by 3
    index = torch.tensor([[0, 1, -1, 6, 7, 8, 9]])
    cache.splice(index, [7])
    new = cache.kv
    assert cache.active == 1
    torch.testing.assert_close(new[..., [0, 1, 3, 4, 5, 6], :], old[..., [0, 1, 6, 7, 8, 9], :])
    assert cache.lengths == [7] and cache.get_seq_length() == 7


def test_bad_inputs(model):
    cache = MegaContextCache.for_model(model, batch_size=1, capacity=8, double_buffer=False)
    with pytest.raises(ValueError, match="slots must be"):
        cache.plan(torch.tensor([1, 2]), [3])
    with pytest.raises(mc.InvariantError, match="capacity|cache holds"):
        cache.plan(torch.tensor([[0]]), [9])
    with pytest.raises(mc.InvariantError, match="second buffer"):
        cache.splice(torch.tensor([[0]]), [1])
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate([3])
    with pytest.raises(ValueError, match="positive"):
        MegaContextCache(0, 1, 8, 1, 8)
    ids = torch.zeros(1, 9, dtype=torch.long)
    with pytest.raises(mc.InvariantError, match="overflow"):
        model(ids, cache=cache, use_cache=True)


def test_state_dict_round_trip_and_set_lengths(model):
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(4))
    cache = MegaContextCache.for_model(model, batch_size=1, capacity=40)
    model(ids, cache=cache, use_cache=True)
    state = cache.state_dict()
    assert state["lengths"] == [12] and state["kv"].shape[4] == 12
    other = MegaContextCache.for_model(model, batch_size=1, capacity=40)
    other.load_state_dict(state)
    assert other.lengths == [12] and other.get_seq_length() == 12
    torch.testing.assert_close(other.kv[:, :, :, :, :12], cache.kv[:, :, :, :, :12], rtol=0, atol=0)
    # the next token decodes the same from the restored cache
    nxt = ids[:, -1:]
    a = model(nxt, cache=cache, use_cache=True).logits
    b = model(nxt, cache=other, use_cache=True).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    small = MegaContextCache.for_model(model, batch_size=1, capacity=8)
    with pytest.raises(mc.InputError, match="does not fit"):
        small.load_state_dict(state)
    with pytest.raises(mc.InputError, match="lengths must be"):
        other.set_lengths([41])
    other.set_lengths([5])
    assert other.lengths == [5] and other.layer_lengths == [5] * other.num_layers
