"""Counterfactual labels: batched ΔNLL/ΔKL against an unbatched recomputation,
utility signs, candidate legality, the Parquet schema."""

from __future__ import annotations

import pytest
import torch

import megacontext as mc
from megacontext.focus import position_gap
from megacontext.runtime import wc_nll
from megacontext.train.labels import (
    LABEL_COLUMNS,
    Candidate,
    apply_candidate,
    candidates,
    entry_targets,
    label_snapshot,
    read_labels,
    utility,
    write_labels,
)
from megacontext.train.rollout import rollout
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
    kw = {
        "positions": cfg.positions,
        "max_gap": position_gap(cfg, base),
        "sink": cfg.attention_sink,
    }
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
