"""Counterfactual labels: batched ΔNLL/ΔKL against an unbatched recomputation,
utility signs, candidate legality, the Parquet schema."""

from __future__ import annotations

import pytest
import torch

import megacontext as mc
from megacontext.focus import position_gap
from megacontext.lexical_scorer import block_scores
from megacontext.runtime import wc_nll
from megacontext.train.labels import (
    LABEL_COLUMNS,
    Candidate,
    apply_candidate,
    candidates,
    entry_targets,
    label_reads,
    label_snapshot,
    open_reads,
    read_block,
    read_candidates,
    read_labels,
    utility,
    write_labels,
)
from megacontext.train.rollout import rollout, snapshot_wc
from megacontext.working_context import WorkingContext

BS = 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # module scope: set before the module-scoped runs below (results depend on the
    # thread count through summation order; tiny matmuls gain nothing from threads)
    # tiny matmuls: threads only contend with each other on the shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup(tiny_base):
    cfg = mc.MegaContextConfig(model="tiny-llama", block_size=BS, levels=2, w_max=40, horizon=8)
    g = mc.GistNet(tiny_base.dim, block_size=BS, width=32, depth=1, heads=2, seed=3)
    window = torch.randint(0, 2000, (192 + 2 * BS + 8,), generator=torch.Generator().manual_seed(5))
    tree, snaps = rollout(tiny_base, g, None, cfg, window, 192, 2, 8)
    return tiny_base, cfg, tree, window, snaps[-1]


def _nll_kwargs(base, cfg) -> dict:
    """``wc_nll``'s keyword arguments for the config's positions and sink."""
    return {
        "positions": cfg.positions,
        "max_gap": position_gap(cfg, base),
        "sink": cfg.attention_sink,
    }


def _wc(levels, nodes, cursor):
    return WorkingContext(levels, nodes, block_size=BS, max_level=2, w_max=10**6, num_tokens=cursor)


def test_candidates_are_legal_wcs(setup):
    _base, cfg, tree, _window, snap = setup
    cands = candidates(snap.levels, snap.nodes, snap.cursor, cfg)
    kinds = {c.kind for c in cands}
    assert kinds == {"expand", "collapse"}
    assert any(c.level == 2 for c in cands if c.kind == "expand")  # LOD2 is in play
    for c in cands:
        lv, nd = apply_candidate(snap.levels, snap.nodes, c, BS)
        _wc(lv, nd, snap.cursor).check(tree)
        delta = len(lv) - len(snap.levels)
        assert delta == (BS - 1 if c.kind == "expand" else -(BS - 1))


def test_batched_labels_match_unbatched_recomputation(setup):
    base, cfg, tree, window, snap = setup
    rows = label_snapshot(base, tree, window, snap, cfg, batch=5, temperature=0.05)
    assert len(rows) == len(candidates(snap.levels, snap.nodes, snap.cursor, cfg))
    kw = _nll_kwargs(base, cfg)
    with torch.no_grad():
        ref = wc_nll(
            base, _wc(snap.levels, snap.nodes, snap.cursor), tree, snap.targets, snap.cursor, **kw
        )
    for r in rows[:: max(1, len(rows) // 6)] + rows[-1:]:
        c = Candidate(r["kind"], r["entry"], r["level"], r["node"])
        lv, nd = apply_candidate(snap.levels, snap.nodes, c, BS)
        with torch.no_grad():
            nll = wc_nll(base, _wc(lv, nd, snap.cursor), tree, snap.targets, snap.cursor, **kw)
        dnll = float(nll.mean() - ref.mean())
        # fp32 on the CPU; padding and batching change the summation order only
        assert r["dnll"] == pytest.approx(dnll, abs=2e-5)
        assert r["nll_snapshot"] == pytest.approx(float(ref.mean()), abs=2e-5)
        assert r["dkl"] >= -1e-6
        # sign: a helpful expand (dnll < 0) and a harmful collapse (dnll > 0) are positive
        benefit = -dnll if r["kind"] == "expand" else dnll
        if abs(benefit) > 1e-4:
            assert (r["utility"] > 0) == (benefit > 0)


def test_batch_size_does_not_change_labels(setup):
    base, cfg, tree, window, snap = setup
    a = label_snapshot(base, tree, window, snap, cfg, batch=1, max_candidates=6, seed=1)
    b = label_snapshot(base, tree, window, snap, cfg, batch=7, max_candidates=6, seed=1)
    assert len(a) == 6
    for x, y in zip(a, b, strict=True):
        assert (x["kind"], x["entry"]) == (y["kind"], y["entry"])
        assert x["dnll"] == pytest.approx(y["dnll"], abs=2e-5)
        assert x["dkl"] == pytest.approx(y["dkl"], abs=2e-5)


def test_utility_formula():
    assert utility("expand", -0.1, 32, 0.05, 0.0) == pytest.approx(
        float(torch.tanh(torch.tensor(2.0)))
    )
    assert utility("collapse", 0.0, 32, 0.05, 0.001) < 0  # harmless collapse, entries cost
    assert utility("collapse", 0.2, 32, 0.05, 0.0) > 0  # harmful collapse: keep detail
    assert utility("expand", 0.01, 32, 0.05, 0.0) < 0


def test_entry_targets_average_labels():
    rows = [
        {"entry": 2, "n_entries": 1, "utility": 0.5},
        {"entry": 2, "n_entries": 3, "utility": -0.1},
    ]
    t, lab = entry_targets(rows, 6)
    assert lab.tolist() == [False, False, True, True, True, False]
    assert t[2].item() == pytest.approx(0.2)
    assert t[3].item() == pytest.approx(-0.1)


def test_parquet_roundtrip(tmp_path, setup):
    base, cfg, tree, window, snap = setup
    rows = label_snapshot(base, tree, window, snap, cfg, max_candidates=4)
    full = [
        {"run": "t", "cycle": 1, "gistnet_hash": "a", "lensnet_hash": "b", "lora_hash": "", **r}
        for r in rows
    ]
    path = write_labels(full, tmp_path / "d" / "cycle1-b2.parquet")
    back = read_labels(tmp_path / "d")
    assert len(back) == 4 and list(back[0]) == list(LABEL_COLUMNS)
    assert back[0]["dnll"] == pytest.approx(rows[0]["dnll"])
    assert not list(path.parent.glob(".*"))  # no temp files left
    with pytest.raises(mc.StorageError, match="lack columns"):
        write_labels([{"run": "x"}], tmp_path / "bad.parquet")
    assert not (tmp_path / "bad.parquet").exists()


# ---------------------------------------------------------------------- reads


def test_read_block_opens_the_covering_gist_down_to_the_block(setup):
    _base, _cfg, tree, _window, snap = setup
    lv, nd = snap.levels.cpu(), snap.nodes.cpu()
    seen_levels = set()
    for b in range(snap.cursor // BS):
        got = read_block(lv, nd, b, BS)
        cover = [
            k
            for k, (level, node) in enumerate(zip(lv.tolist(), nd.tolist(), strict=True))
            if level > 0 and node * BS**level <= b * BS < (node + 1) * BS**level
        ]
        if not cover:  # the block is tokens already
            assert got is None
            continue
        new_l, new_n, k = got
        assert k == cover[0]
        seen_levels.add(int(lv[k]))
        _wc(new_l, new_n, snap.cursor).check(tree)  # a legal tiling
        tok = (new_l == 0) & (new_n // BS == b)
        assert int(tok.sum()) == BS  # b is read as its tokens
        # only the covering gist changed: everything else is as before
        assert int((new_l > 0).sum()) == int((lv > 0).sum()) - 1 + ((BS - 1) * (int(lv[k]) - 1))
    assert seen_levels == {1, 2}  # LOD1 and LOD2 covers both exercised


def test_read_labels_value_the_block_and_point_at_its_gist(setup):
    base, cfg, tree, window, snap = setup
    rows = label_reads(base, tree, window, snap, cfg, batch=3, top_blocks=2, random_blocks=3)
    assert 1 <= len(rows) <= 5 and all(r["kind"] == "read" for r in rows)
    blocks = read_candidates(tree, snap, cfg, 2, 3, 0)
    assert [r["node"] for r in rows] == blocks
    # the top blocks by the lexical signal come first
    s = block_scores(tree, snapshot_wc(snap, cfg), cfg, query_end=snap.cursor)
    assert float(s[blocks[0]]) == pytest.approx(float(s[blocks][:2].max()))
    kw = _nll_kwargs(base, cfg)
    with torch.no_grad():
        ref = wc_nll(
            base, _wc(snap.levels, snap.nodes, snap.cursor), tree, snap.targets, snap.cursor, **kw
        )
        for r in rows:
            lv, nd, k = read_block(snap.levels, snap.nodes, r["node"], BS)
            assert r["entry"] == k and r["level"] == int(snap.levels[k])
            nll = wc_nll(base, _wc(lv, nd, snap.cursor), tree, snap.targets, snap.cursor, **kw)
            assert r["dnll"] == pytest.approx(float(nll.mean() - ref.mean()), abs=2e-5)
    assert set(LABEL_COLUMNS) - set(rows[0]) == {
        "run",
        "cycle",
        "gistnet_hash",
        "lensnet_hash",
        "lora_hash",
    }


def test_entry_targets_take_the_best_read():
    rows = [
        {"entry": 1, "n_entries": 1, "utility": -0.4, "kind": "read"},
        {"entry": 1, "n_entries": 1, "utility": 0.7, "kind": "read"},
        {"entry": 3, "n_entries": 1, "utility": 0.2, "kind": "expand"},
        {"entry": 3, "n_entries": 1, "utility": -0.2, "kind": "expand"},
    ]
    t, lab = entry_targets(rows, 5)
    assert lab.tolist() == [False, True, False, True, False]
    assert t[1].item() == pytest.approx(0.7) and t[3].item() == pytest.approx(0.0)


def test_open_reads_repoints_labels_at_the_opened_children(setup):
    _base, cfg, _tree, _window, snap = setup
    lv = snap.levels.tolist()
    k2 = lv.index(2)
    node = int(snap.nodes[k2])
    b = node * BS + 3  # an LOD1 block under that LOD2 gist
    rows = [
        {"entry": k2, "n_entries": 1, "level": 2, "node": b, "kind": "read", "utility": 0.9},
        {"entry": k2, "n_entries": 1, "level": 2, "node": b + 1, "kind": "read", "utility": -0.5},
    ]
    snap2, moved = open_reads(snap, rows, cfg)
    assert len(snap2.levels) == len(snap.levels) + BS - 1
    for r in moved:
        assert int(snap2.levels[r["entry"]]) == 1 and int(snap2.nodes[r["entry"]]) == r["node"]
    assert [r["utility"] for r in moved] == [0.9, -0.5]
    # nothing above tau_expand: nothing to open
    assert open_reads(snap, rows[1:], cfg) is None
