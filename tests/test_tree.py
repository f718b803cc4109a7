"""MegaContextTree in RAM: addressing, gists against a per-block reference, chunking
invariance, refresh, input validation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import megacontext as mc
from megacontext.errors import ConfigError, StorageError
from megacontext.tree import MegaContextTree, mean_pool

VOCAB = 1000

# One rounding to the storage dtype separates the batched gist from the per-block
# reference (fp32 sums may be ordered differently); allow one ulp-ish of that dtype.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    # torch.testing.assert_close would do, but its first call imports torch.distributed
    # (seconds on a 2-core machine); this is the same |a - e| <= atol + rtol * |e| test.
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = actual.double(), expected.double()
    err = (a - e).abs() - (atol + rtol * e.abs())
    assert bool((err <= 0).all()), f"max excess {err.max().item():.3g} over the tolerance"


def make_embed(dim: int, seed: int = 0, dtype: torch.dtype = torch.float16):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(VOCAB, dim, generator=g).to(dtype)
    return table, lambda ids: table[ids]


def max_pool(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.float().amax(dim=1)


class Recorder:
    """A gistnet that records the batch sizes it is called with."""

    def __init__(self, fn=mean_pool):
        self.fn = fn
        self.batches: list[int] = []

    def __call__(self, blocks: torch.Tensor) -> torch.Tensor:
        self.batches.append(blocks.shape[0])
        return self.fn(blocks)


def reference_gists(ids, table, bs, levels, dtype, gistnet=mean_pool):
    """Gists computed one block at a time, straight from the definition."""
    out = []
    below = table[torch.as_tensor(ids, dtype=torch.int64)]
    for _ in range(levels):
        n = below.shape[0] // bs
        rows = [gistnet(below[b * bs : (b + 1) * bs][None])[0] for b in range(n)]
        g = torch.stack(rows).to(dtype) if rows else torch.empty(0, below.shape[1], dtype=dtype)
        out.append(g)
        below = g
    return out


def build(ids, embed, chunks, *, dim, bs, levels, dtype=torch.float16, gistnet=None):
    tree = MegaContextTree(dim, block_size=bs, levels=levels, dtype=dtype)
    pos = 0
    for c in chunks:
        tree.append(ids[pos : pos + c], embed, gistnet)
        pos += c
    tree.append(ids[pos:], embed, gistnet)
    return tree


def assert_same_tree(a: MegaContextTree, b: MegaContextTree) -> None:
    assert a.num_tokens == b.num_tokens
    assert torch.equal(a.tokens(0, a.num_tokens), b.tokens(0, b.num_tokens))
    for level in range(1, a.levels + 1):
        assert a.num_nodes(level) == b.num_nodes(level)
        assert torch.equal(a.gists(level), b.gists(level)), f"level {level} differs"


def test_public_export():
    assert mc.MegaContextTree is MegaContextTree
    assert mc.mean_pool is mean_pool
    assert "MegaContextTree" in mc.__all__ and "mean_pool" in mc.__all__


def test_empty_tree():
    tree = MegaContextTree(8)
    assert tree.num_tokens == 0
    assert tree.num_nodes(0) == tree.num_nodes(1) == tree.num_nodes(2) == 0
    assert tree.gists(1).shape == (0, 8) and tree.gists(1).dtype == torch.float16
    assert tree.tokens(0, 0).shape == (0,)
    assert tree.path is None and tree.writable
    tree.append([], lambda ids: pytest.fail("embed called for no tokens"))
    assert tree.num_tokens == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "bs,levels,n", [(32, 2, 32 * 32 * 2 + 45), (4, 1, 37), (4, 3, 4**3 * 2 + 19)]
)
def test_gists_match_reference(dtype, bs, levels, n):
    dim = 24
    table, embed = make_embed(dim)
    ids = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(1))
    tree = MegaContextTree(dim, block_size=bs, levels=levels, dtype=dtype)
    tree.append(ids, embed)
    ref = reference_gists(ids, table, bs, levels, dtype)
    assert tree.num_tokens == n
    assert torch.equal(tree.tokens(0, n), ids)
    assert tree.tokens(5, 9).dtype == torch.int64
    for level in range(1, levels + 1):
        assert tree.num_nodes(level) == n // bs**level
        g = tree.gists(level)
        assert g.shape == (n // bs**level, dim) and g.dtype == dtype
        assert_close(g.float(), ref[level - 1].float(), **TOL[dtype])


def test_lod2_is_gistnet_of_stored_lod1():
    # LOD2 is computed from the stored (fp16-rounded) LOD1 gists: exactly reproducible
    dim, bs = 16, 4
    _, embed = make_embed(dim)
    tree = MegaContextTree(dim, block_size=bs, levels=2)
    tree.append(torch.randint(0, VOCAB, (4 * 4 * 5 + 3,)), embed)
    g1 = tree.gists(1)
    expect = mean_pool(g1.reshape(-1, bs, dim)).to(torch.float16)
    assert torch.equal(tree.gists(2), expect)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunkings_give_identical_trees(dtype):
    dim, bs, levels = 12, 4, 3
    n = 4**3 * 3 + 29
    _, embed = make_embed(dim)
    ids = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(2))
    whole = build(ids, embed, [], dim=dim, bs=bs, levels=levels, dtype=dtype)
    ones = build(ids, embed, [1] * (n - 1), dim=dim, bs=bs, levels=levels, dtype=dtype)
    odd = build(ids, embed, [3, 7, 1, 13, 64, 5, 2], dim=dim, bs=bs, levels=levels, dtype=dtype)
    assert_same_tree(whole, ones)
    assert_same_tree(whole, odd)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 300),
    cuts=st.lists(st.integers(0, 300), max_size=12),
    bs=st.sampled_from([2, 3, 4]),
    levels=st.integers(1, 3),
    gist_batch=st.integers(1, 9),
)
def test_random_chunkings_property(n, cuts, bs, levels, gist_batch):
    dim = 8
    table, embed = make_embed(dim, seed=3)
    ids = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n))
    bounds = sorted({min(c, n) for c in cuts} | {0, n})
    tree = MegaContextTree(dim, block_size=bs, levels=levels)
    tree.gist_batch = gist_batch
    for a, b in itertools.pairwise(bounds):
        tree.append(ids[a:b], embed)
    whole = MegaContextTree(dim, block_size=bs, levels=levels)
    whole.append(ids, embed)
    assert_same_tree(tree, whole)
    ref = reference_gists(ids, table, bs, levels, torch.float16)
    for level in range(1, levels + 1):
        assert tree.num_nodes(level) == n // bs**level
        assert_close(tree.gists(level).float(), ref[level - 1].float(), **TOL[torch.float16])


def test_partial_tail_stays_lod0():
    dim, bs = 8, 4
    _, embed = make_embed(dim)
    tree = MegaContextTree(dim, block_size=bs, levels=2)
    tree.append([1, 2, 3], embed)
    assert (tree.num_tokens, tree.num_nodes(1), tree.num_nodes(2)) == (3, 0, 0)
    tree.append([4], embed)  # completes block 0
    assert (tree.num_tokens, tree.num_nodes(1), tree.num_nodes(2)) == (4, 1, 0)
    tree.append(list(range(11)), embed)  # 15 tokens: 3 blocks, LOD2 needs 4
    assert (tree.num_tokens, tree.num_nodes(1), tree.num_nodes(2)) == (15, 3, 0)
    tree.append([7], embed)
    assert (tree.num_tokens, tree.num_nodes(1), tree.num_nodes(2)) == (16, 4, 1)
    assert tree.tokens(0, 16).tolist() == [1, 2, 3, 4, *range(11), 7]


def test_gistnet_is_batched():
    dim, bs = 8, 4
    _, embed = make_embed(dim)
    rec = Recorder()
    tree = MegaContextTree(dim, block_size=bs, levels=2)
    tree.append(torch.randint(0, VOCAB, (bs * bs * 10,)), embed, rec)
    # 160 tokens: one call for all 40 LOD1 blocks, one for all 10 LOD2 groups
    assert rec.batches == [40, 10]
    rec.batches.clear()
    tree.gist_batch = 64
    tree.append(torch.randint(0, VOCAB, (bs * 100,)), embed, rec)
    assert rec.batches == [64, 36, 25]  # 100 new blocks in batches of 64, 25 new groups
    assert max(rec.batches) > 1


def test_embed_called_once_per_batch_with_cpu_int64():
    dim, bs = 8, 4
    table, _ = make_embed(dim)
    calls = []

    def embed(ids):
        calls.append((ids.dtype, ids.device.type, ids.shape[0]))
        return table[ids]

    tree = MegaContextTree(dim, block_size=bs, levels=1)
    tree.append(list(range(2)), embed)
    assert calls == []  # no block completed: nothing to embed
    tree.append(list(range(2, 13)), embed)
    assert calls == [(torch.int64, "cpu", 12)]  # the old tail plus the new complete blocks


def test_module_gistnet_runs_without_grad():
    dim, bs = 8, 4
    _, embed = make_embed(dim, dtype=torch.float32)

    class LinearPool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(dim, dim)

        def forward(self, x):
            assert not torch.is_grad_enabled()
            return self.proj(x.float()).mean(dim=1)

    net = LinearPool()
    tree = MegaContextTree(dim, block_size=bs, levels=2, dtype=torch.float32)
    tree.append(torch.randint(0, VOCAB, (50,)), embed, net)
    assert not tree.gists(1).requires_grad
    blocks = embed(tree.tokens(0, 48)).reshape(12, bs, dim)
    with torch.no_grad():
        assert_close(tree.gists(1), net(blocks), **TOL[torch.float32])


def test_refresh_recomputes_exactly():
    dim, bs, levels = 16, 4, 2
    _, embed = make_embed(dim)
    ids = torch.randint(0, VOCAB, (4 * 4 * 6 + 5,), generator=torch.Generator().manual_seed(5))
    tree = build(ids, embed, [], dim=dim, bs=bs, levels=levels)
    target = build(ids, embed, [], dim=dim, bs=bs, levels=levels, gistnet=max_pool)
    before1 = tree.gists(1).clone()

    tree.refresh(1, 3, 17, max_pool)  # embed defaults to the one from append
    g1 = tree.gists(1)
    assert torch.equal(g1[3:17], target.gists(1)[3:17])
    assert torch.equal(g1[:3], before1[:3]) and torch.equal(g1[17:], before1[17:])

    tree.refresh(1, 0, tree.num_nodes(1), max_pool, embed=embed)
    assert torch.equal(tree.gists(1), target.gists(1))
    tree.refresh(2, 0, tree.num_nodes(2), max_pool)
    assert_same_tree(tree, target)
    tree.refresh(2, 2, 2, max_pool)  # empty range is a no-op


def test_refresh_errors_leave_tree_unchanged():
    dim, bs = 8, 4
    _, embed = make_embed(dim)
    fresh = MegaContextTree(dim, block_size=bs, levels=2)
    fresh._embed = None
    with pytest.raises(ConfigError, match="level must be"):
        fresh.refresh(0, 0, 0, mean_pool)
    with pytest.raises(ConfigError, match="out of range"):
        fresh.refresh(1, 0, 1, mean_pool)

    tree = MegaContextTree(dim, block_size=bs, levels=2)
    tree.append(torch.randint(0, VOCAB, (40,)), embed)
    other = MegaContextTree(dim, block_size=bs, levels=2)
    other.append(tree.tokens(0, 40), embed)
    with pytest.raises(ConfigError, match="needs token embeddings"):
        other._embed = None
        other.refresh(1, 0, 1, mean_pool)
    calls = 0

    def flaky(x):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("boom")
        return max_pool(x)

    tree.gist_batch = 3
    snapshot = tree.gists(1).clone()
    with pytest.raises(RuntimeError, match="boom"):
        tree.refresh(1, 0, 10, flaky)
    assert torch.equal(tree.gists(1), snapshot)


def test_gists_is_a_view_not_a_copy():
    dim = 8
    _, embed = make_embed(dim)
    tree = MegaContextTree(dim, block_size=4, levels=1)
    tree.append(torch.randint(0, VOCAB, (40,)), embed)
    a, b = tree.gists(1), tree.gists(1)
    assert a.data_ptr() == b.data_ptr()


@pytest.mark.parametrize(
    "bad,match",
    [
        ([[1, 2], [3, 4]], "1-D"),
        ([1.5, 2.0], "integers"),
        (torch.tensor([1.0]), "integer tensor"),
        (torch.tensor([True, False]), "integer tensor"),
        ([-1, 2], "-1"),
        (np.array([2**32], dtype=np.uint64), "2\\*\\*32"),
        (torch.tensor([2**32]), "2\\*\\*32"),
    ],
)
def test_bad_token_ids(bad, match):
    _, embed = make_embed(8)
    tree = MegaContextTree(8, block_size=4)
    with pytest.raises(ConfigError, match=match) as err:
        tree.append(bad, embed)
    assert err.value.field == "token_ids"
    assert tree.num_tokens == 0


def test_accepts_sequences_arrays_tensors():
    vals = [5, 6, 7, 2**32 - 1]
    for ids in (vals, tuple(vals), np.array(vals, dtype=np.uint32), torch.tensor(vals)):
        tree = MegaContextTree(8, block_size=4, levels=1)
        tree.append(ids, lambda i: torch.zeros(len(i), 8))
        assert tree.tokens(0, 4).tolist() == vals


def test_bad_embed_and_gistnet_shapes_leave_tree_unchanged():
    dim, bs = 8, 4
    table, embed = make_embed(dim)
    tree = MegaContextTree(dim, block_size=bs, levels=2)
    tree.append([1, 2], embed)
    with pytest.raises(ConfigError, match=r"embed returned \(8, 7\)") as err:
        tree.append(list(range(6)), lambda ids: table[ids][:, :7])
    assert err.value.field == "embed"
    with pytest.raises(ConfigError, match=r"gistnet returned \(2, 1, 8\)"):
        tree.append(list(range(6)), embed, lambda x: x.float().mean(1, keepdim=True))
    with pytest.raises(ConfigError, match="gistnet returned list"):
        tree.append(list(range(6)), embed, lambda x: [0])

    # a failure in LOD2 (after LOD0/LOD1 rows were written) still commits nothing
    def bad_at_lod2(x):  # LOD1 batch is [4, bs, d] of fp16 embeddings, LOD2 batch is [1, ...]
        return None if x.shape[0] == 1 else mean_pool(x)

    with pytest.raises(ConfigError, match="gistnet returned NoneType"):
        tree.append(list(range(14)), embed, bad_at_lod2)
    assert (tree.num_tokens, tree.num_nodes(1), tree.num_nodes(2)) == (2, 0, 0)
    assert tree.tokens(0, 2).tolist() == [1, 2]
    tree.append(list(range(14)), embed)
    assert (tree.num_tokens, tree.num_nodes(1), tree.num_nodes(2)) == (16, 4, 1)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(dim=0), "dim"),
        (dict(dim=70000), "dim"),
        (dict(dim=8, block_size=1), "block_size"),
        (dict(dim=8, levels=0), "levels"),
        (dict(dim=8, dtype=torch.float64), "dtype"),
        (dict(dim=8, model_name="x" * 32), "model_name"),
        (dict(dim=8.0), "dim"),
    ],
)
def test_bad_construction(kwargs, field):
    with pytest.raises(ConfigError) as err:
        MegaContextTree(**kwargs)
    assert err.value.field == field


def test_range_errors():
    _, embed = make_embed(8)
    tree = MegaContextTree(8, block_size=4, levels=2)
    tree.append(list(range(10)), embed)
    with pytest.raises(ConfigError, match="out of range"):
        tree.tokens(5, 11)
    with pytest.raises(ConfigError, match="out of range"):
        tree.tokens(6, 5)
    for level in (0, 3, -1):
        with pytest.raises(ConfigError, match="level must be"):
            tree.gists(level)
    with pytest.raises(ConfigError, match="level must be"):
        tree.num_nodes(3)
    assert "LOD0=10" in repr(tree) and "RAM" in repr(tree)


def test_storage_error_type_is_exported():
    # read-only refusal is tested in test_storage.py; the error type is the public one
    assert issubclass(StorageError, mc.MegaContextError)


def test_level_aware_gistnet_uses_at_level():
    dim, bs = 8, 4
    _, embed = make_embed(dim)
    seen = []

    class Leveled:
        def __call__(self, x):
            raise AssertionError("the tree must call at_level(l), not the gistnet itself")

        def at_level(self, level):
            def fn(x):
                seen.append((level, x.shape[0]))
                return mean_pool(x) * level

            return fn

    tree = MegaContextTree(dim, block_size=bs, levels=2)
    tree.append(torch.randint(0, VOCAB, (bs * bs * 2,)), embed, Leveled())
    assert seen == [(1, 8), (2, 2)]
    plain = MegaContextTree(dim, block_size=bs, levels=1)
    plain.append(tree.tokens(0, 32), embed)
    assert torch.equal(tree.gists(1), plain.gists(1))  # level 1 scale is 1
    expect = (mean_pool(tree.gists(1).reshape(2, bs, dim)) * 2).half()
    assert torch.equal(tree.gists(2), expect)
    tree.refresh(2, 0, 2, Leveled())
    assert seen[-1] == (2, 2)


def test_truncate_then_append_equals_a_fresh_tree():
    dim, bs, levels = 8, 4, 3
    _, embed = make_embed(dim)
    ids = torch.randint(0, VOCAB, (700,), generator=torch.Generator().manual_seed(9))
    tree = build(ids, embed, [], dim=dim, bs=bs, levels=levels)
    for keep in (517, 517, 64, 63, 0):
        tree.truncate(keep)
        assert_same_tree(tree, build(ids[:keep], embed, [], dim=dim, bs=bs, levels=levels))
    tree.append(ids, embed)
    assert_same_tree(tree, build(ids, embed, [], dim=dim, bs=bs, levels=levels))
    for bad in (-1, 701, True):
        with pytest.raises(ConfigError, match="truncate") as err:
            tree.truncate(bad)
        assert err.value.field == "num_tokens"
