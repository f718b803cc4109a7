from __future__ import annotations

import copy

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


# ----------------------------------------------------------------------------------------
# splice with position deltas: kept keys re-rotated to their new positions


def _llama3_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


# Layer-0 keys after a splice against a fresh forward at the new positions. Each side
# rounds its angles p * f to fp32 (|error| <= ulp(p) / 2, ulp(4096) = 2^-11 rad at
# f <= 1): the turned key carries the roundings of p * f and delta * f, the fresh one
# that of (p + delta) * f, so fp32 keys agree to ~1e-3 of their magnitude. In bf16 both
# sides also round the projection and HF's bf16 rotation (cos and sin cast to bf16,
# products and the sum in bf16: a few 2^-9 steps each), hence 2^-5.
KEY_TOL = {torch.float32: 2e-3, torch.bfloat16: 2**-5}


def _fill(model, ids, positions, capacity):
    cache = MegaContextCache.for_model(model, batch_size=ids.shape[0], capacity=capacity)
    with torch.no_grad():
        model(ids, position_ids=positions, cache=cache, use_cache=True)
    return cache


@pytest.mark.parametrize(
    "which, dtype",
    [("tiny-llama", torch.float32), ("tiny-llama", torch.bfloat16), ("llama3", torch.float32)],
)
def test_splice_rerotates_kept_keys_to_a_fresh_forward(tiny_base, which, dtype):
    # a copy: casting the shared fixture's model would round its rotary buffer for good
    model = copy.deepcopy(tiny_base.model) if which == "tiny-llama" else _llama3_model()
    model = model.to(dtype)
    mc.patch(model)
    try:
        g = torch.Generator().manual_seed(21)
        B, n, cap = 2, 24, 32
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = torch.randint(0, vocab, (B, n), generator=g)
        # old positions: global-like, up to 4k; new ones: compact, bounded by 512
        P = torch.sort(torch.randint(0, 4096, (B, n), generator=g), dim=1).values
        cache = _fill(model, ids, P, cap)
        old = cache.kv.clone()
        # row 0 drops a third and permutes the rest, row 1 keeps everything in order
        # with two inserted (-1) slots; the new positions are new for every kept row
        kept0 = torch.randperm(n, generator=g)[:16]
        index = torch.full((B, 20), -1, dtype=torch.long)
        index[0, :16] = kept0
        index[1, :5], index[1, 7:20] = torch.arange(5), torch.arange(5, 18)
        new_pos = torch.randint(0, 512, (B, 20), generator=g)
        new_pos[0, :3] = P[0, kept0[:3]]  # three rows keep their position (delta 0)
        delta = new_pos - torch.gather(P, 1, index.clamp(min=0))
        cache.splice(index, [16, 20], delta)
        assert cache.lengths == [16, 20]
        for b in range(B):
            slots = (index[b] >= 0).nonzero().flatten()
            src = index[b, slots]
            fresh = _fill(model, ids[b : b + 1, src], new_pos[b : b + 1, slots], cap)
            got = cache.kv[0, 0, b, :, slots].float()
            want = fresh.kv[0, 0, 0, :, : len(slots)].float()
            scale = want.abs().max()
            torch.testing.assert_close(got, want, rtol=0, atol=KEY_TOL[dtype] * scale)
            # values move bit for bit (every layer); so do keys whose delta is 0
            assert torch.equal(cache.kv[:, 1, b, :, slots], old[:, 1, b, :, src])
            still = slots[delta[b, slots] == 0]
            assert torch.equal(cache.kv[:, 0, b, :, still], old[:, 0, b, :, index[b, still]])
            if b == 0:
                assert len(still) == 3
            # and the check can fail: the keys moved without rotation are far off
            stale = old[0, 0, b, :, src].float()
            assert (stale - want).abs().max() > 0.1 * scale
    finally:
        mc.unpatch(model)


def test_many_refocus_steps_keep_every_key_consistent(model):
    # the runtime's cycle, ten times: splice (kept rows move and re-rotate), then the
    # inserted entries are written at their slots by a planned forward; after every
    # step, every entry's layer-0 key equals a fresh forward of the whole new layout
    rng = torch.Generator().manual_seed(22)
    cap = 40
    entries = [
        (int(t), int(p))
        for t, p in zip(
            torch.randint(0, 49152, (30,), generator=rng),
            torch.randint(0, 2048, (30,), generator=rng),
            strict=True,
        )
    ]
    ids = torch.tensor([[t for t, _ in entries]])
    cache = _fill(model, ids, torch.tensor([[p for _, p in entries]]), cap)
    for step in range(10):
        n = len(entries)
        m = int(torch.randint(n // 2, n + 1, (), generator=rng))
        kept = torch.randperm(n, generator=rng)[:m]
        if step % 2:  # bounded schemes keep order; the cache allows any permutation
            kept = kept.sort().values
        f = int(torch.randint(0, min(5, cap - m) + 1, (), generator=rng))
        layout = [int(i) for i in kept] + [-1] * f
        layout = [layout[i] for i in torch.randperm(len(layout), generator=rng)]
        new_pos = torch.randint(0, 2048, (len(layout),), generator=rng)
        index = torch.tensor(layout)
        old_pos = torch.tensor([entries[i][1] if i >= 0 else 0 for i in layout])
        cache.splice(index[None], [len(layout)], (new_pos - old_pos)[None])
        fresh_tok = torch.randint(0, 49152, (f,), generator=rng)
        new_entries, k = [], 0
        for j, i in enumerate(layout):
            if i >= 0:
                new_entries.append((entries[i][0], int(new_pos[j])))
            else:
                new_entries.append((int(fresh_tok[k]), int(new_pos[j])))
                k += 1
        entries = new_entries
        slots = (index < 0).nonzero().flatten()
        if f:
            cache.plan(slots[None], [len(entries)])
            mask = (torch.arange(len(entries))[None, :] <= slots[:, None])[None, None]
            with torch.no_grad():
                model(
                    torch.tensor([[entries[int(s)][0] for s in slots]]),
                    position_ids=new_pos[slots][None],
                    attention_mask=mask,
                    cache=cache,
                    use_cache=True,
                )
        ref = _fill(
            model,
            torch.tensor([[t for t, _ in entries]]),
            torch.tensor([[p for _, p in entries]]),
            cap,
        )
        got, want = cache.kv[0, :, 0, :, : len(entries)], ref.kv[0, :, 0, :, : len(entries)]
        scale = want.abs().max()
        # each step adds at most one more pair of fp32 angle roundings (see KEY_TOL)
        torch.testing.assert_close(got, want, rtol=0, atol=(1 + step) * 1e-3 * scale)


def test_stacked_rows_rerotate(model):
    a = MegaContextCache.for_model(model, batch_size=1, capacity=16)
    b = MegaContextCache.for_model(model, batch_size=1, capacity=16)
    g = torch.Generator().manual_seed(23)
    for c in (a, b):
        c.kv.copy_(torch.randn(c.kv.shape, generator=g))
        c.set_lengths([10])
    both = MegaContextCache.stack([a, b])
    assert torch.equal(both.inv_freq, a.inv_freq)
    before = both.kv.clone()
    a.splice(torch.arange(10)[None], [10], torch.full((1, 10), 5))
    # row 0 of the shared buffer turned by 5 positions, row 1 untouched
    from megacontext.kernels.kv_splice import rope_rotate

    want = rope_rotate(before[:, 0, 0, :, :10], torch.tensor(5), a.inv_freq)
    torch.testing.assert_close(both.kv[:, 0, 0, :, :10], want, rtol=1e-6, atol=1e-6)
    assert torch.equal(both.kv[:, :, 1], before[:, :, 1])
    assert torch.equal(both.kv[:, 1, 0], before[:, 1, 0])


def test_rotation_inputs(model):
    from megacontext.cache import rope_inv_freq

    inv = rope_inv_freq(model)
    assert torch.equal(inv, model.model.rotary_emb.inv_freq.float())
    plain = MegaContextCache(2, 2, 16, 1, 8)
    with pytest.raises(mc.ConfigError, match="for_model"):
        plain.splice(torch.tensor([[0]]), [1], torch.tensor([[1]]))
    cache = MegaContextCache.for_model(model, batch_size=1, capacity=8)
    with pytest.raises(mc.InputError, match="position_delta must have index's shape"):
        cache.splice(torch.tensor([[0, 1]]), [2], torch.tensor([[1]]))
    with pytest.raises(mc.InputError, match="integer"):
        cache.splice(torch.tensor([[0]]), [1], torch.tensor([[1.0]]))
    with pytest.raises(mc.ConfigError, match=r"inv_freq must be \[head_dim / 2\]"):
        MegaContextCache(1, 1, 16, 1, 8, inv_freq=torch.ones(7))
    with pytest.raises(mc.ConfigError, match="even"):
        MegaContextCache(1, 1, 15, 1, 8, inv_freq=torch.ones(7))
    with pytest.raises(mc.UnsupportedModelError, match="no rotary embedding"):
        rope_inv_freq(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_splice_with_deltas_does_not_synchronise(dtype):
    # the refocus path on the GPU: index and deltas already on the device, one launch,
    # no device->host synchronisation (sync debug mode turns one into an error); the
    # result equals the reference on the CPU, and layer-0 keys a fresh forward
    from megacontext.kernels.kv_splice import kv_splice_reference

    model = _llama3_model().to("cuda", dtype)
    mc.patch(model)
    try:
        g = torch.Generator().manual_seed(24)
        B, n, cap = 2, 24, 32
        ids = torch.randint(0, 256, (B, n), generator=g).cuda()
        P = (torch.arange(n) * 150).expand(B, n).cuda()
        cache = _fill(model, ids, P, cap)
        index = torch.stack([torch.randperm(n, generator=g) for _ in range(B)]).cuda()
        new_pos = torch.stack([torch.randperm(n, generator=g) for _ in range(B)]).cuda()
        delta = new_pos - torch.gather(P, 1, index)
        warm = MegaContextCache.for_model(model, batch_size=B, capacity=cap)
        warm.splice(index, [n, n], delta)  # compile the kernel outside the checked call
        before = cache.kv.clone()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            cache.splice(index, [n, n], delta)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        full = torch.full((B, cap), -1, dtype=torch.long)
        full[:, :n] = index.cpu()
        fdelta = torch.zeros((B, cap), dtype=torch.long)
        fdelta[:, :n] = delta.cpu()
        ref = torch.zeros_like(before.cpu())
        kv_splice_reference(before.cpu(), ref, full, None, None, fdelta, cache.inv_freq.cpu())
        got = cache.kv[..., :n, :].cpu().float()
        want = ref[..., :n, :].float()
        tol = 4e-6 if dtype == torch.float32 else 2**-7
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max()))
        for b in range(B):
            fresh = _fill(model, ids[b : b + 1, index[b]], new_pos[b : b + 1], cap)
            k, f = cache.kv[0, 0, b, :, :n].float(), fresh.kv[0, 0, 0, :, :n].float()
            scale = f.abs().max()
            torch.testing.assert_close(k, f, rtol=0, atol=KEY_TOL[dtype] * scale)
    finally:
        mc.unpatch(model)
