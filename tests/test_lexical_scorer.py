"""The lexical focus scorer (``lens: lexical``): BM25 relevance of the history's
blocks to the newest tokens, the outlier rule, the swap plan, and a session that
brings a planted far block back as tokens where recency does not."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import megacontext as mc
from megacontext.focus import lens_scores
from megacontext.lexical_scorer import (
    K1,
    block_overlap,
    block_relevance,
    block_scores,
    entry_relevance,
    followed_blocks,
    induction_blocks,
    key_terms,
    lexical_scores,
    query_weights,
    retrieval_scores,
    robust_z,
    wanted_blocks,
)

BS = 32
RARE = torch.arange(40000, 40008)


def _history(T: int = 2000, plant_block: int = 5, seed: int = 0) -> torch.Tensor:
    """Tokens from a small common vocabulary, ``RARE`` planted in one early block and
    repeated as the last tokens (the end of the query)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 1400, (T,), generator=g)
    s = plant_block * BS + 7
    ids[s : s + RARE.numel()] = RARE
    # the query window (64 tokens): tokens found nowhere else, then RARE
    ids[T - 64 :] = torch.arange(45000, 45064)
    ids[T - RARE.numel() :] = RARE
    return ids


def test_block_relevance_is_bm25():
    blocks = torch.tensor([[1, 2, 3, 4], [1, 1, 5, 6], [7, 8, 9, 1], [7, 7, 7, 7]])
    q = torch.tensor([1, 7, 1])  # duplicates count once
    s = block_relevance(blocks, q)
    n_b = 4
    idf1 = math.log1p((n_b - 3 + 0.5) / (3 + 0.5))
    idf7 = math.log1p((n_b - 2 + 0.5) / (2 + 0.5))

    def sat(tf: int) -> float:
        return tf * (K1 + 1) / (tf + K1)

    want = [idf1 * sat(1), idf1 * sat(2), idf1 * sat(1) + idf7 * sat(1), idf7 * sat(4)]
    assert torch.allclose(s, torch.tensor(want, dtype=torch.float32), atol=1e-6)
    assert s.dtype == torch.float32
    # a token in every block weighs less than a rare one
    assert idf1 < idf7
    assert torch.equal(block_relevance(blocks, torch.tensor([99])), torch.zeros(4))
    assert block_relevance(blocks[:0], q).shape == (0,)


@pytest.mark.parametrize("seed", range(5))
def test_block_relevance_equals_the_dense_formula(seed):
    g = torch.Generator().manual_seed(seed)
    n_b, bs = int(torch.randint(1, 40, (1,), generator=g)), int(2 ** (seed % 4 + 1))
    blocks = torch.randint(0, 30, (n_b, bs), generator=g)
    query = torch.randint(0, 40, (int(torch.randint(1, 50, (1,), generator=g)),), generator=g)
    q, w = query_weights(query, 8.0)
    tf = (blocks[:, :, None] == q[None, None, :]).sum(1).float()  # [n_b, |q|]
    df = (tf > 0).sum(0).float()
    idf = torch.log1p((n_b - df + 0.5) / (df + 0.5))
    want = (w * idf * tf * (K1 + 1) / (tf + K1)).sum(1)
    torch.testing.assert_close(block_relevance(blocks, query, 8.0), want)


def test_query_weights_favour_the_newest_tokens():
    q, w = query_weights(torch.tensor([5, 9, 5, 7]), half_life=2.0)
    assert q.tolist() == [5, 7, 9]
    # 5: newest occurrence 1 back; 7: the newest; 9: 2 back
    assert torch.allclose(w, torch.tensor([2**-0.5, 1.0, 0.5]))
    _, flat = query_weights(torch.tensor([5, 9, 5, 7]), half_life=math.inf)
    assert torch.equal(flat, torch.ones(3))
    # an old query token's match counts for less than a new one's
    blocks = torch.tensor([[1, 0, 0, 0], [2, 0, 0, 0], [3, 3, 3, 3]])
    s = block_relevance(blocks, torch.tensor([1, 2]), half_life=1.0)
    assert float(s[1]) == pytest.approx(2 * float(s[0]))


def test_wanted_blocks_outlier_rule_and_limit():
    s = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 9.0, 7.0])
    assert wanted_blocks(s, 4.0, 8).tolist() == [6, 7]
    assert wanted_blocks(s, 4.0, 1).tolist() == [6]
    assert wanted_blocks(s, 1e9, 8).numel() == 0
    assert wanted_blocks(s, 4.0, 0).numel() == 0
    # MAD 0 (most blocks share nothing with the query): the standard deviation
    sparse = torch.zeros(50)
    sparse[3] = 5.0
    assert wanted_blocks(sparse, 4.0, 8).tolist() == [3]
    assert wanted_blocks(torch.ones(10), 1.0, 8).numel() == 0  # nothing stands out


def test_block_overlap_is_the_share_of_bigrams_found_in_the_query():
    q = torch.tensor([5, 6, 7, 8, 5])  # bigrams 5-6, 6-7, 7-8, 8-5
    blocks = torch.tensor([[5, 6, 7, 8], [8, 7, 6, 5], [1, 5, 6, 2], [6, 7, 8, 5]])
    got = block_overlap(blocks, q)
    assert got.dtype == torch.float32
    # all three bigrams / none (reversed: same tokens, other order) / one / all three
    assert got.tolist() == pytest.approx([1.0, 0.0, 1 / 3, 1.0])
    assert block_overlap(blocks, q[:1]).tolist() == [0.0] * 4  # no bigram in the query
    assert block_overlap(blocks[:0], q).shape == (0,)
    # the dense definition on random ids
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 6, (30, 8), generator=g)
    query = torch.randint(0, 6, (20,), generator=g)
    pairs = set(itertools.pairwise(query.tolist()))
    want = [sum(p in pairs for p in itertools.pairwise(r.tolist())) / 7 for r in blocks]
    assert block_overlap(blocks, query).tolist() == pytest.approx(want)


def test_a_copy_brings_the_block_after_it_ranked_last():
    s = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 9.0, 7.0, 8.0, 1.0])
    copies = torch.zeros(10, dtype=torch.bool)
    copies[6] = True
    assert wanted_blocks(s, 4.0, 8).tolist() == [6, 8, 7]
    # 6 is a copy: 8 and 7 first, then what follows 6 (7, already wanted: skipped)
    assert wanted_blocks(s, 4.0, 8, copies).tolist() == [8, 7]
    copies[8] = True  # 8 a copy too: its successor 9 comes after 7
    assert wanted_blocks(s, 4.0, 8, copies).tolist() == [7, 9]
    assert wanted_blocks(s, 4.0, 1, copies).tolist() == [7]
    # a run of copies: the first block after the run; none past the last block
    copies[[7, 9]] = True
    assert wanted_blocks(s, 4.0, 8, copies).numel() == 0
    copies[9] = False
    assert wanted_blocks(s, 4.0, 8, copies).tolist() == [9]
    # the z-scores are those among the candidates: with two far outliers a third
    # one does not stand out (the standard deviation, the MAD being 0), without them
    # it does
    sparse = torch.zeros(50)
    sparse[[3, 4, 5]] = torch.tensor([40.0, 40.0, 5.0])
    assert wanted_blocks(sparse, 4.0, 8).tolist() == [3, 4]
    copies = torch.zeros(50, dtype=torch.bool)
    copies[[3, 4]] = True
    # (4's successor 5 is wanted already; 3's successor is the first non-copy, 5)
    assert wanted_blocks(sparse, 4.0, 8, copies).tolist() == [5]


def test_induction_blocks_are_what_followed_the_query_end_before():
    h = torch.tensor([1, 2, 3, 9, 5, 1, 2, 3, 7, 8, 1, 2, 3, 4, 0, 0])
    q = torch.tensor([6, 1, 2, 3])
    # "1 2 3" ends at 2, 7 and 12: the next tokens (3, 8, 13) are in blocks 0, 2, 3
    assert induction_blocks(h, q, 3, 4).tolist() == [3, 2, 0]  # the newest first
    assert induction_blocks(h, q, 4, 4).numel() == 0  # "6 1 2 3" never occurs
    assert induction_blocks(h, q, 0, 4).numel() == 0
    # an occurrence must end before stop - k (the query's own end, when it is pinned
    # inside the history) and have a next token
    assert induction_blocks(h, q, 3, 4, stop=12).tolist() == [2, 0]
    assert induction_blocks(h[:8], q, 3, 4).tolist() == [0]  # 7 is the last token
    # the same block once
    once = torch.tensor([2, 5, 2, 6, 0, 0, 0, 0])
    assert induction_blocks(once, torch.tensor([2]), 1, 4).tolist() == [0]


@pytest.fixture(scope="module")
def systems(tiny_base):
    # the scorer's own choice: the base model's check of it (verify_tokens, tested in
    # tests/test_focus.py) would read a random tiny model's guesses
    cfg = mc.MegaContextConfig(model="tiny-llama", w_max=256, refocus_iterations=8, verify_tokens=0)
    return {
        lens: mc.MegaContext(tiny_base, None, None, cfg.model_copy(update={"lens": lens}))
        for lens in ("lexical", "recency")
    }


def _tokens_of(wc, lo: int, hi: int) -> int:
    lv, st = wc.levels.cpu(), wc.starts.cpu()
    return int(((lv == 0) & (st >= lo) & (st < hi)).sum())


def test_session_brings_the_planted_block_back(systems):
    ids = _history()
    got = {}
    for lens, system in systems.items():
        s = system.session()
        s.ingest(ids)
        s.wc.check(s.tree)
        assert s.wc.cost <= 256
        got[lens] = s
    lo, hi = 5 * BS, 6 * BS
    assert _tokens_of(got["recency"].wc, lo, hi) == 0
    assert _tokens_of(got["lexical"].wc, lo, hi) == BS
    lex = got["lexical"]
    # it swapped: expands of the far gists above it and as many collapses as room needed
    kinds = [a.kind for a in lex.actions]
    assert "expand" in kinds and "collapse" in kinds
    # nearby positions: every token entry (the retrieved blocks, then the recent
    # window) at contiguous positions; the gists before them
    pos = lex.focus.positions().cpu()
    lv = lex.wc.levels.cpu()
    tok = pos[lv == 0]
    assert torch.equal(tok, torch.arange(tok.numel()) + int(tok[0]))
    assert int(pos[lv != 0].max()) < int(tok[0])
    far_tokens = int((lv[: int(torch.nonzero(lv != 0)[-1, 0])] == 0).sum())
    assert far_tokens >= BS
    # decoding keeps a legal WC within the budget and the block in it
    lex.generate(40, temperature=0.0)
    assert lex.wc.cost <= 256 + BS  # a decoded block may wait for the next refocus
    lex.refocus()
    lex.wc.check(lex.tree)
    assert _tokens_of(lex.wc, lo, hi) == BS


def test_nothing_relevant_is_the_recency_working_context(systems):
    ids = _history()
    ids[-64:] = torch.arange(45000, 45064)  # the query (64 tokens) matches nothing
    wcs = []
    for system in systems.values():
        s = system.session()
        s.ingest(ids)
        wcs.append((s.wc.levels.clone(), s.wc.nodes.clone(), len(s.actions)))
    (la, na, acts), (lb, nb, _) = wcs
    assert torch.equal(la, lb) and torch.equal(na, nb) and acts == 0


def test_scores_plan_exactly_the_room_needed(systems):
    s = systems["recency"].session()
    s.ingest(_history())
    wc, cfg = s.wc, systems["lexical"].config
    u = lexical_scores(s.tree, wc, cfg)
    assert u.shape == (len(wc),) and u.dtype == torch.float32
    lv = wc.levels.cpu()
    expand = int(((u == 1.0) & (lv > 0)).sum())
    assert expand == 1  # the one gist over the planted block
    need = expand * (BS - 1) - (cfg.w_max - len(wc))
    victims = int((u == -1.0).sum())
    assert victims == BS * max(-(-need // (BS - 1)), 0)
    # victims are whole token blocks outside the protected tail
    st = wc.starts.cpu()[u == -1.0]
    assert bool((lv[u == -1.0] == 0).all()) and int(st.max()) < wc.protected_start
    assert bool((torch.bincount(st // BS) % BS == 0).all())
    # every other entry is neutral
    assert int(((u != 0) & (u != 1.0) & (u != -1.0) & (u != 0.5)).sum()) == 0
    # a share of 0-blocks wants nothing
    none = cfg.model_copy(update={"retrieval_share": 0.01})
    assert torch.count_nonzero(lexical_scores(s.tree, wc, none)) == 0


def test_room_is_made_from_the_chosen_token_blocks(systems):
    ids = _history()
    s = systems["recency"].session()
    s.ingest(ids)
    wc = s.wc
    lv, st = wc.levels.cpu(), wc.starts.cpu()
    tok = (lv == 0) & (st < wc.protected_start)
    oldest = int(st[tok].min()) // BS
    # the oldest recent token block shares a (weak) query token: not the least relevant
    ids[oldest * BS + 3] = int(ids[-20])
    s = systems["recency"].session()
    s.ingest(ids)
    wc = s.wc
    counts = torch.bincount(st[tok] // BS)
    got = {}
    for room_from in ("least_relevant", "oldest"):
        cfg = systems["lexical"].config.model_copy(
            update={"room_from": room_from, "w_max": 200, "retrieval_share": 0.25}
        )
        u = lexical_scores(s.tree, wc, cfg)
        victims = sorted(set((wc.starts.cpu()[u == -1.0] // BS).tolist()))
        assert victims, "w_max below the WC's cost: the expand needs room"
        # the candidates: complete LOD0 blocks before the protected tail, not kept
        kept = set((st[u == 0.5] // BS).tolist())
        full = [b for b in range(counts.numel()) if counts[b] == BS and b not in kept]
        if room_from == "oldest":
            assert victims == full[: len(victims)]
        else:
            rel = block_scores(s.tree, wc, cfg)
            ranked = sorted(full, key=lambda b: (float(rel[b]), b))
            assert victims == sorted(ranked[: len(victims)])
        got[room_from] = victims
    assert oldest in got["oldest"] and oldest not in got["least_relevant"]
    with pytest.raises(ValueError):
        mc.MegaContextConfig(room_from="newest")


def test_a_match_at_a_block_end_brings_the_block_after_it():
    blocks = torch.full((5, 8), 7, dtype=torch.int64)  # 7: a common filler token
    blocks[1, 7] = 900  # the key term at the end of block 1: its value is in block 2
    blocks[3, 0] = 900  # at the start of block 3: what follows is in block 3 itself
    blocks[4, 7] = 900  # the last block: nothing after it
    query = torch.tensor([7, 7, 7, 900, 7])
    # the key terms: the rare 900 (in 3 of 5 blocks), not the common 7 (in all)
    q, w = query_weights(query, math.inf)
    df = torch.tensor([5.0, 3.0])
    key = key_terms(q, w, torch.log1p((5 - df + 0.5) / (df + 0.5)))
    assert key.tolist() == [900]
    want = torch.tensor([3, 1, 4])
    assert followed_blocks(blocks, want, key, 2).tolist() == [3, 1, 2, 4]
    assert followed_blocks(blocks, want, key, 0).tolist() == [3, 1, 4]
    # r = bs: every wanted block with a key term brings its successor
    assert followed_blocks(blocks, want, key, 8).tolist() == [3, 4, 1, 2]
    # only key terms count: the common 7 at the end of every block does not
    blocks[1, 7] = 7
    blocks[1, 2] = 900
    assert followed_blocks(blocks, torch.tensor([1]), key, 2).tolist() == [1]
    with pytest.raises(ValueError):
        mc.MegaContextConfig(lexical_follow=-1)


def test_query_tokens_seen_before_the_query_count_less():
    q, w = query_weights(torch.tensor([5, 9, 7]), math.inf, torch.tensor([9, 1]), 0.25)
    assert q.tolist() == [5, 7, 9] and w.tolist() == [1.0, 1.0, 0.25]
    # 1.0 leaves the weights alone; 0 drops a seen token's matches
    _, same = query_weights(torch.tensor([5, 9, 7]), math.inf, torch.tensor([9]), 1.0)
    assert torch.equal(same, torch.ones(3))
    blocks = torch.tensor([[9, 0, 0, 0], [5, 0, 0, 0]])
    s = block_relevance(blocks, torch.tensor([5, 9]), math.inf, torch.tensor([9]), 0.0)
    assert float(s[0]) == 0.0 and float(s[1]) > 0.0
    with pytest.raises(ValueError):
        mc.MegaContextConfig(lexical_seen_weight=1.5)


def test_a_far_copy_of_the_query_is_not_retrieved(tiny_base):
    """The text right before a question, copied far back, outranks what the question
    asks for; with ``lexical_max_overlap`` the copy is skipped and the planted block
    is brought back."""
    ids = _history()
    T = ids.numel()
    # a copy of the whole query window (64 tokens: two blocks, each matching it fully)
    ids[12 * BS : 12 * BS + 64] = ids[T - 64 :]
    # one block per refocus may be opened
    cfg = mc.MegaContextConfig(
        model="tiny-llama",
        w_max=256,
        refocus_iterations=8,
        lens="lexical",
        retrieval_share=0.125,
        lexical_induction=0,
        verify_tokens=0,
    )
    got = {}
    for rho, k in ((1.0, 0), (0.5, 0), (0.5, 8)):
        update = {"lexical_max_overlap": rho, "lexical_induction": k}
        system = mc.MegaContext(tiny_base, None, None, cfg.model_copy(update=update))
        s = system.session()
        s.ingest(ids)
        s.wc.check(s.tree)
        got[rho, k] = s.wc
    planted, copy, after = (5 * BS, 6 * BS), (12 * BS, 14 * BS), (14 * BS, 15 * BS)
    assert _tokens_of(got[1.0, 0], *planted) == 0 and _tokens_of(got[1.0, 0], *copy) > 0
    assert _tokens_of(got[0.5, 0], *planted) == BS and _tokens_of(got[0.5, 0], *copy) == 0
    # induction: the query's last 8 tokens occurred before (in the copy), so what
    # followed them there comes first and takes the one slot
    assert _tokens_of(got[0.5, 8], *after) == BS
    assert _tokens_of(got[0.5, 8], *planted) == 0 and _tokens_of(got[0.5, 8], *copy) == 0


def test_config_fields_are_validated():
    bad_values = (
        ("lexical_query", 0),
        ("lexical_half_life", 0.0),
        ("lexical_z", 0.0),
        ("retrieval_share", 1.5),
        ("lexical_max_overlap", 0.0),
        ("lexical_max_overlap", 1.5),
        ("lexical_induction", -1),
    )
    for field, bad in bad_values:
        with pytest.raises(mc.ConfigError) as e:
            mc.MegaContextConfig(**{field: bad})
        assert e.value.field == field
    with pytest.raises(mc.ConfigError) as e:
        mc.MegaContextConfig(lens="bm25")
    assert e.value.field == "lens"


def test_a_retrieved_span_is_read_by_what_follows_it(tiny_base):
    """Under splice, a refocus that expands recomputes from the first change
    (``kv_after_expand: exact``): the next-token logits equal the exact session's.
    With ``kv_after_expand: splice`` the kept tail keeps K/V computed without the
    span, and the logits differ."""
    ids = _history()
    logits = {}
    for mode, after in (("exact", "exact"), ("splice", "exact"), ("splice", "splice")):
        cfg = mc.MegaContextConfig(
            model="tiny-llama",
            w_max=256,
            refocus_iterations=8,
            lens="lexical",
            kv_mode=mode,
            kv_after_expand=after,
            verify_tokens=0,
        )
        s = mc.MegaContext(tiny_base, None, None, cfg).session()
        s.ingest(ids)
        assert any(a.kind == "expand" for a in s.actions)
        logits[(mode, after)] = s.next_token_logits()
    exact = logits[("exact", "exact")]
    torch.testing.assert_close(logits[("splice", "exact")], exact, rtol=1e-4, atol=1e-4)
    assert (logits[("splice", "splice")] - exact).abs().max() > 1e-3


def test_the_query_is_the_last_ingest_not_the_decoded_tokens(systems):
    """While a session decodes (or is fed), the retrieval stays the last ingest's:
    tokens it decodes that match another far block do not pull it in; an ingest of
    the same tokens does."""
    other = torch.arange(41000, 41008)
    ids = _history()
    ids[20 * BS + 3 : 20 * BS + 3 + other.numel()] = other
    s = systems["lexical"].session()
    s.ingest(ids)
    lo, hi = 20 * BS, 21 * BS
    assert _tokens_of(s.wc, lo, hi) == 0
    s.feed(torch.cat([torch.arange(45100, 45156), other]))  # two refocuses
    assert _tokens_of(s.wc, lo, hi) == 0
    assert _tokens_of(s.wc, 5 * BS, 6 * BS) == BS  # the ingest's retrieval kept
    s.ingest(torch.cat([torch.arange(45200, 45256), other]))
    assert _tokens_of(s.wc, lo, hi) == BS


def test_a_saved_session_keeps_its_query(systems, tmp_path):
    s = systems["lexical"].session()
    s.ingest(_history())
    s.feed(torch.arange(45100, 45140))
    s.save(tmp_path / "sess")
    r = mc.MegaContext.open(tmp_path / "sess", base=systems["lexical"].base)
    assert r.focus.query_end == s.focus.query_end == 2000
    assert torch.equal(r.scores(), s.scores())


# ------------------------------------------------------------- retrieval LensNet


def test_entry_relevance_is_the_best_block_under_each_entry(systems):
    s = systems["recency"].session()
    s.ingest(_history())
    wc, cfg = s.wc, systems["lexical"].config
    sc = block_scores(s.tree, wc, cfg)
    z = robust_z(sc)
    rel = entry_relevance(wc, z, BS)
    assert rel.shape == (len(wc),) and rel.dtype == torch.float32
    n_b = sc.numel()
    for i, (st, sp) in enumerate(zip(wc.starts.tolist(), wc.spans.tolist(), strict=True)):
        lo, hi = st // BS, min((st + sp - 1) // BS + 1, n_b)
        want = float(z[lo:hi].max()) if hi > lo else 0.0
        assert float(rel[i]) == pytest.approx(want, abs=1e-6), i
    # the planted block's z is an outlier and its covering gist carries it
    assert float(rel.max()) == pytest.approx(float(z[5]), abs=1e-6)
    assert torch.count_nonzero(entry_relevance(wc, None, BS)) == 0


def test_retrieval_scores_open_what_lensnet_wants_and_make_the_room(systems):
    s = systems["recency"].session()
    s.ingest(_history())
    wc, cfg = s.wc, systems["lexical"].config
    sc = block_scores(s.tree, wc, cfg)
    lv = wc.levels.cpu()
    # LensNet wanting the gist over the planted block gives the lexical plan exactly
    cover = (lv > 0) & (wc.starts.cpu() <= 5 * BS) & (wc.starts.cpu() + wc.spans.cpu() > 5 * BS)
    u = torch.where(cover, 0.9, -0.3)
    assert torch.equal(retrieval_scores(wc, cfg, sc, u), lexical_scores(s.tree, wc, cfg))
    # nothing above tau_expand: every score 0, the recency WC stays
    assert torch.count_nonzero(retrieval_scores(wc, cfg, sc, torch.full((len(wc),), 0.19))) == 0
    # at most retrieval_share * w_max / bs gists open, the best first
    gists = torch.nonzero(lv > 0).flatten()
    u = torch.zeros(len(wc))
    u[gists] = torch.linspace(0.3, 0.9, gists.numel())
    few = cfg.model_copy(update={"retrieval_share": 2 * BS / cfg.w_max})
    got = retrieval_scores(wc, few, sc, u)
    opened = torch.nonzero(got == 1.0).flatten().tolist()
    assert opened == gists[-2:].tolist()


def test_a_retrieval_lensnet_drives_the_focus_loop(tiny_base, systems):
    lens = mc.LensNet(tiny_base.dim, d_lens=32, heads=4, head_hidden=16, relevance_buckets=8)
    cfg = systems["lexical"].config.model_copy(update={"lens": "lensnet"})
    s = mc.MegaContext(tiny_base, None, lens, cfg).session()
    s.ingest(_history())
    s.wc.check(s.tree)
    assert s.wc.cost <= cfg.w_max
    loop = s.focus
    u, sc = lens_scores(lens, tiny_base, loop.tree, loop.wc, cfg, loop.query_end)
    assert sc is not None and torch.equal(sc, block_scores(loop.tree, loop.wc, cfg, loop.query_end))
    want = retrieval_scores(loop.wc, cfg, sc, u.detach().cpu())
    assert torch.equal(loop.scores(), want)


def test_lens_plan_picks_how_lensnet_scores_act(tiny_base, systems):
    cfg = systems["lexical"].config.model_copy(update={"lens": "lensnet"})
    plain = mc.LensNet(tiny_base.dim, d_lens=32, heads=4, head_hidden=16)
    rel = mc.LensNet(tiny_base.dim, d_lens=32, heads=4, head_hidden=16, relevance_buckets=8)
    for lens, plan, retrieval in (
        (plain, "auto", False),
        (plain, "retrieval", True),
        (rel, "auto", True),
        (rel, "scores", False),
    ):
        c = cfg.model_copy(update={"lens_plan": plan})
        s = mc.MegaContext(tiny_base, None, lens, c).session()
        s.ingest(_history())
        loop = s.focus
        u, sc = lens_scores(lens, tiny_base, loop.tree, loop.wc, c, loop.query_end)
        u = u.detach().cpu()
        if retrieval:
            sc = block_scores(loop.tree, loop.wc, c, loop.query_end)
            assert torch.equal(loop.scores(), retrieval_scores(loop.wc, c, sc, u))
        else:
            assert torch.equal(loop.scores(), u)
    with pytest.raises(mc.ConfigError):
        mc.MegaContextConfig(lens_plan="sometimes")
