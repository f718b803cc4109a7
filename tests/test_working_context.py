"""WorkingContext: construction from a tree, derived tensors, embeddings, check()."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import megacontext as mc
from megacontext.tree import MegaContextTree
from megacontext.working_context import WorkingContext, protected_start

VOCAB = 97


class TinyBase:
    """Stands in for mc.Base: ``embed(ids) -> [..., d]`` through an nn.Embedding."""

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32):
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, dim).to(dtype)
        self.dim = dim
        self.calls = 0

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.emb(ids)


def make_tree(num_tokens: int, block_size: int = 4, levels: int = 2, dim: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(VOCAB, dim, generator=g)
    tree = MegaContextTree(dim, block_size=block_size, levels=levels, dtype=torch.float32)
    if num_tokens:
        tree.append(torch.randint(0, VOCAB, (num_tokens,), generator=g), lambda ids: table[ids])
    return tree


def make_wc(entries, *, bs=4, top=2, w_max=1000, recent=None, T=None) -> WorkingContext:
    levels = torch.tensor([e[0] for e in entries], dtype=torch.int32)
    nodes = torch.tensor([e[1] for e in entries], dtype=torch.int64)
    if T is None:
        T = max(((n + 1) * bs**lv for lv, n in entries), default=0)
    return WorkingContext(
        levels,
        nodes,
        block_size=bs,
        max_level=top,
        w_max=w_max,
        recent_tokens=recent,
        num_tokens=T,
    )


def tokens(a: int, b: int) -> list[tuple[int, int]]:
    return [(0, i) for i in range(a, b)]


# ----------------------------------------------------------------------- from_tree


def test_from_tree_empty_history():
    tree = make_tree(0)
    wc = WorkingContext.from_tree(tree, w_max=64)
    assert len(wc) == 0 and wc.cost == 0 and wc.num_tokens == 0
    wc.check(tree)
    assert wc.positions().shape == (0,)
    assert wc.embeddings(TinyBase(6), tree).shape == (0, 6)


def test_from_tree_shorter_than_one_block_is_all_lod0():
    tree = make_tree(3)
    wc = WorkingContext.from_tree(tree, w_max=64)
    assert wc.levels.tolist() == [0, 0, 0] and wc.nodes.tolist() == [0, 1, 2]
    wc.check(tree)


def test_from_tree_budget_smaller_than_protected_tail_is_config_error():
    tree = make_tree(100)
    with pytest.raises(mc.ConfigError, match="protected tail") as err:
        WorkingContext.from_tree(tree, w_max=11, recent_tokens=8)  # 8 + bs 4 > 11
    assert err.value.field == "w_max"
    # Exactly recent + bs fits (a short history, whose coarsest WC fits too).
    short = make_tree(9)
    WorkingContext.from_tree(short, w_max=12, recent_tokens=8).check(short)


def test_from_tree_history_too_long_for_budget_is_config_error():
    tree = make_tree(4 * 16 * 40, block_size=4, levels=2)  # 40 LOD2 nodes
    with pytest.raises(mc.ConfigError, match="coarsest"):
        WorkingContext.from_tree(tree, w_max=30, recent_tokens=4)


def test_from_tree_staircase_newest_finest():
    bs, top = 4, 2
    tree = make_tree(16 * 6 + 7, block_size=bs, levels=top)  # 103 tokens
    wc = WorkingContext.from_tree(tree, w_max=40, recent_tokens=8)
    wc.check(tree)
    lv = wc.levels.tolist()
    assert lv == sorted(lv, reverse=True)  # LOD2s, then LOD1s, then tokens
    assert lv[-1] == 0 and lv[0] == 2
    # As fine as the budget allows: one more expand would not fit.
    assert len(wc) + bs - 1 > 40
    # The protected tail [p0, T) is LOD0.
    p0 = protected_start(103, 8, bs)
    assert wc.starts[wc.levels > 0].max() + 4 <= p0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(0, 700),
    bs=st.sampled_from([2, 4, 8]),
    top=st.integers(1, 3),
    recent=st.integers(0, 20),
    slack=st.integers(0, 200),
)
def test_from_tree_is_legal_monotone_and_maximal(T, bs, top, recent, slack):
    tree = make_tree(T, block_size=bs, levels=top)
    w_max = recent + bs + slack
    try:
        wc = WorkingContext.from_tree(tree, w_max=w_max, recent_tokens=recent)
    except mc.ConfigError as exc:
        assert "coarsest" in str(exc)
        return
    wc.check(tree)
    lv = wc.levels.tolist()
    assert lv == sorted(lv, reverse=True)
    if (wc.levels > 0).any():
        assert len(wc) + bs - 1 > w_max  # no further expand fits


# ------------------------------------------------------------- derived tensors


def test_starts_spans_positions_cost():
    # bs=4: one LOD2 gist (tokens 0..15), one LOD1 (16..19), tokens 20..22.
    wc = make_wc([(2, 0), (1, 4), *tokens(20, 23)], recent=3)
    assert wc.spans.tolist() == [16, 4, 1, 1, 1]
    assert wc.starts.tolist() == [0, 16, 20, 21, 22]
    assert wc.positions().tolist() == [8, 18, 20, 21, 22]
    assert wc.cost == 5 and len(wc) == 5
    assert wc.levels.dtype == torch.int32 and wc.nodes.dtype == torch.int64
    wc.check()


def test_extend_appends_tokens_and_clone_is_independent():
    wc = make_wc([(1, 0), *tokens(4, 6)], recent=2)
    wc2 = wc.clone()
    wc.extend(9)
    assert wc.levels.tolist() == [1, 0, 0, 0, 0, 0] and wc.nodes.tolist()[-3:] == [6, 7, 8]
    assert wc.num_tokens == 9 and len(wc2) == 3
    wc.check()
    with pytest.raises(mc.ConfigError):
        wc.extend(5)


# ------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embeddings_match_per_entry_gather(dtype):
    bs, top = 4, 2
    tree = make_tree(16 * 3 + 9, block_size=bs, levels=top, dim=6)
    wc = make_wc(
        [(2, 0), (1, 4), (1, 5), *tokens(24, 28), (1, 7), (2, 2), *tokens(48, 57)],
        bs=bs,
        top=top,
        recent=4,
        T=57,
    )
    wc.check(tree)
    base = TinyBase(6, dtype)
    out = wc.embeddings(base, tree)
    assert out.shape == (len(wc), 6) and out.dtype == dtype
    assert base.calls == 1  # token embeddings in one call
    ids = tree.tokens(0, 57)
    for i, (lv, node) in enumerate(zip(wc.levels.tolist(), wc.nodes.tolist(), strict=True)):
        if lv == 0:
            want = base.emb.weight[ids[node]]
        else:
            want = tree.gists(lv)[node].to(dtype)
        torch.testing.assert_close(out[i], want, rtol=0, atol=0)  # copies, exact


# ------------------------------------------------------------------------ check()


@pytest.mark.parametrize(
    "entries, T, kind, entry",
    [
        # gap: tokens 4..7 missing
        ([*tokens(0, 4), *tokens(8, 12)], 12, "gap", 4),
        # gap at the end
        ([(1, 0), (1, 1)], 12, "gap", 2),
        # overlap: token 2 listed twice
        ([*tokens(0, 3), (0, 2), *tokens(3, 8)], 8, "overlap", 3),
        # LOD1 node 0 after its own tokens 0..3: overlap (lies inside covered tokens)
        ([*tokens(0, 4), (1, 0), *tokens(4, 8)], 8, "overlap", 4),
        # LOD2 node 0 listed after LOD1 nodes 0, 1 of its own span: mixed sibling group
        ([(1, 0), (1, 1), (2, 0), *tokens(16, 20)], 20, "mixed sibling group", 2),
        # tokens 0..1 then LOD1 node 1: block 0 only partly present
        ([(0, 0), (0, 1), (1, 1), *tokens(8, 12)], 12, "misalignment", 2),
    ],
)
def test_check_tiling_errors_name_the_entry(entries, T, kind, entry):
    wc = make_wc(entries, T=T, recent=0)
    with pytest.raises(mc.InvariantError, match=kind) as err:
        wc.check()
    assert err.value.entry == entry
    assert f"entry {entry}" in str(err.value) or kind == "gap"


def test_check_over_budget():
    wc = make_wc(tokens(0, 10), w_max=8, recent=0)
    with pytest.raises(mc.InvariantError, match="over budget") as err:
        wc.check()
    assert err.value.entry == 8


def test_check_unprotected_tail():
    # T=12, recent=5: p0 = floor(7/4)*4 = 4, tokens 4..11 must be LOD0.
    wc = make_wc([(1, 0), (1, 1), *tokens(8, 12)], T=12, recent=5)
    with pytest.raises(mc.InvariantError, match="unprotected tail") as err:
        wc.check()
    assert err.value.entry == 1
    make_wc([(1, 0), *tokens(4, 12)], T=12, recent=5).check()


def test_check_gist_of_missing_node():
    tree = make_tree(10, block_size=4, levels=2)  # 2 complete blocks + 2 tokens
    # The partial block (tokens 8..9) has no LOD1 gist.
    wc = make_wc([(1, 0), (1, 1), (1, 2)], T=10, recent=0)
    with pytest.raises(mc.InvariantError, match="does not exist") as err:
        wc.check(tree)
    assert err.value.entry == 2
    # A WC claiming more history than the tree has.
    short = make_tree(6, block_size=4, levels=2)
    wc = make_wc([(1, 0), (1, 1), *tokens(8, 10)], T=10, recent=0)
    wc.check(tree)
    with pytest.raises(mc.InvariantError, match="does not exist"):
        wc.check(short)


def test_check_bad_level_and_node():
    with pytest.raises(mc.InvariantError, match="outside") as err:
        make_wc([(3, 0)], T=64, top=2, recent=0).check()
    assert err.value.entry == 0
    with pytest.raises(mc.InvariantError, match="negative"):
        make_wc([(0, -1), (0, 0)], T=1, recent=0).check()


def random_legal_entries(rng, T, bs, top, recent):
    """A random legal tiling: [0, p0) by random aligned complete nodes, tail LOD0."""
    p0 = protected_start(T, recent, bs)
    out, c = [], 0
    while c < p0:
        options = [lv for lv in range(top + 1) if c % bs**lv == 0 and c + bs**lv <= p0]
        lv = options[int(rng.integers(len(options)))]
        out.append((lv, c // bs**lv))
        c += bs**lv
    return out + tokens(p0, T)


@settings(max_examples=80, deadline=None)
@given(
    T=st.integers(1, 300),
    bs=st.sampled_from([2, 4]),
    top=st.integers(1, 3),
    recent=st.integers(0, 9),
    seed=st.integers(0, 2**31),
    mutation=st.sampled_from(["drop", "dup", "coarsen", "swap", "none"]),
)
def test_random_tilings_pass_and_mutations_fail(T, bs, top, recent, seed, mutation):
    import numpy as np

    rng = np.random.default_rng(seed)
    entries = random_legal_entries(rng, T, bs, top, recent)
    make_wc(entries, bs=bs, top=top, recent=recent, T=T).check()
    i = int(rng.integers(len(entries)))
    if mutation == "none":
        return
    if mutation == "drop":
        bad = entries[:i] + entries[i + 1 :]
    elif mutation == "dup":
        bad = entries[: i + 1] + entries[i:]
    elif mutation == "swap":
        if len(entries) < 2:
            return
        j = (i + 1) % len(entries)
        bad = list(entries)
        bad[i], bad[j] = bad[j], bad[i]
    else:  # replace entry i by its parent without removing its siblings
        lv, node = entries[i]
        if lv >= top:
            return
        bad = [*entries[:i], (lv + 1, node // bs), *entries[i + 1 :]]
    with pytest.raises(mc.InvariantError) as err:
        make_wc(bad, bs=bs, top=top, recent=recent, T=T).check()
    assert err.value.entry is not None


def test_embeddings_from_an_on_disk_tree(tmp_path):
    g = torch.Generator().manual_seed(5)
    table = torch.randn(VOCAB, 8, generator=g)
    tree = MegaContextTree(8, block_size=4, levels=2, dtype=torch.float16)
    tree.append(torch.randint(0, VOCAB, (150,), generator=g), lambda ids: table[ids])
    tree.save(tmp_path / "t")
    disk = MegaContextTree.open(tmp_path / "t", mode="r")
    wc = WorkingContext.from_tree(disk, w_max=40, recent_tokens=6)
    wc.check(disk)
    base = TinyBase(8)
    torch.testing.assert_close(wc.embeddings(base, disk), wc.embeddings(base, tree), rtol=0, atol=0)


def test_tail_start_is_the_first_entry_of_the_trailing_tokens():
    assert WorkingContext.from_tree(make_tree(0), w_max=64).tail_start == 0
    assert WorkingContext.from_tree(make_tree(3), w_max=64).tail_start == 0
    wc = WorkingContext.from_tree(make_tree(300), w_max=64)
    lv = wc.levels.tolist()
    t = wc.tail_start
    assert 0 < t < len(wc) and lv[t - 1] != 0 and all(x == 0 for x in lv[t:])
