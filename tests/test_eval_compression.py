"""The compression stress suite on tiny-llama: its views, a run and its report."""

from __future__ import annotations

import math

import pytest
import torch

import megacontext as mc
from megacontext.errors import InputError
from megacontext.eval import compression as comp
from megacontext.eval.peers import untrained_system


@pytest.fixture(scope="module")
def base():
    return mc.load_base("tiny-llama")


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(10, 5000, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("node", [0, 1, 2])
def test_views_entries_and_positions(base, node):
    bs, T = 8, 192  # LOD2 nodes of 64 tokens; three of them
    ids = _ids(T)
    tree = comp.gist_history(base, ids, None, block_size=bs)
    views = comp.compression_views(base, tree, node)
    s, e = node * 64, (node + 1) * 64
    outside = torch.cat([torch.arange(s), torch.arange(e, T)])
    emb = base.embed(ids)
    ctrl, l1, l2, drop = (views[c] for c in comp.CONDITIONS)
    assert [v.entries for v in views.values()] == [T, T - 64 + 8, T - 64 + 1, T - 64]
    assert all(v.next_position == T for v in views.values())
    assert torch.equal(ctrl.positions, torch.arange(T))
    assert torch.equal(ctrl.embeds, emb)
    # gists at their span centres: start + span // 2, between the tokens around R
    assert torch.equal(
        l1.positions, torch.cat([torch.arange(s), torch.arange(s, e, 8) + 4, torch.arange(e, T)])
    )
    assert torch.equal(
        l2.positions, torch.cat([torch.arange(s), torch.tensor([s + 32]), torch.arange(e, T)])
    )
    assert torch.equal(drop.positions, outside)
    for v in (l1, l2, drop):
        keep = torch.isin(v.positions, outside) & (v.meta["levels"] == 0)
        assert torch.equal(v.embeds[keep], emb[v.positions[keep]])
    assert torch.equal(l1.embeds[s : s + 8], tree.gists(1)[s // 8 : e // 8].to(emb.dtype))
    assert torch.equal(l2.embeds[s], tree.gists(2)[node].to(emb.dtype))
    # mean-pool gists: the LOD1 gist is the (fp16-stored) mean of its 8 tokens' embeddings
    want = emb[s : s + 8].mean(0).to(torch.float16).float()
    assert torch.equal(l1.embeds[s], want)


def test_gists_are_the_runtime_trees(base):
    """The gists read here are the ones a real session's tree holds (mean pooling,
    and a GistNet whose level embeddings are zero, so level 1 and 2 agree)."""
    cfg = mc.MegaContextConfig(model="tiny-llama", block_size=8, w_max=64)
    ids = _ids(192, seed=1)
    gist = mc.GistNet(base.dim, seed=0, block_size=8, width=32, depth=1, heads=2)
    with torch.no_grad():
        for name, p in gist.named_parameters():
            if name.endswith("out_proj.weight"):
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(2))
    for g in (None, gist):
        session = mc.MegaContext(base, g, None, cfg).session()
        session.ingest(ids)
        tree = comp.gist_history(base, ids, g, block_size=8)
        for level in (1, 2):
            assert torch.equal(tree.gists(level), session.tree.gists(level))
    assert not torch.equal(tree.gists(1)[0].float(), base.embed(ids[:8]).mean(0))


def test_views_reject_bad_node_and_history(base):
    tree = comp.gist_history(base, _ids(100), None, block_size=8)
    with pytest.raises(InputError, match="multiple of 64"):
        comp.compression_views(base, tree, 0)
    tree = comp.gist_history(base, _ids(128), None, block_size=8)
    with pytest.raises(InputError, match="node 2"):
        comp.compression_views(base, tree, 2)
    with pytest.raises(InputError, match="condition 'lod3'"):
        comp.compression_views(base, tree, 0, ["lod3"])


@pytest.mark.parametrize("placement", comp.PLACEMENTS)
def test_passkey_statement_inside_region(base, placement):
    task = comp.compression_passkey(base, 2048, 1024, placement, seed=3)
    lo = 0 if placement == "far" else 1024
    s0, s1 = task["statement"]
    assert task["history"].numel() == 2048
    assert lo <= s0 < s1 <= lo + 1024
    key = task["key"]
    assert base.decode(task["answer"]) == f" {key}"
    assert torch.equal(task["stream"][-task["answer"].numel() :], task["answer"])
    assert key in base.decode(task["history"][s0:s1])
    # the key appears nowhere outside R
    outside = torch.cat([task["history"][:lo], task["history"][lo + 1024 :]])
    assert key not in base.decode(outside)


@pytest.fixture(scope="module")
def run(base, tmp_path_factory):
    from megacontext.eval.report import load_run
    from megacontext.eval.runner import run_eval

    system = untrained_system(base, mc.MegaContextConfig(model="tiny-llama"))
    out = run_eval(
        ["compression"],
        size="tiny",
        out_dir=tmp_path_factory.mktemp("comp") / "run",
        base=base,
        system=system,
        log=lambda m: None,
    )
    return out, load_run(out)[0]


def test_suite_rows(run):
    _, rows = run
    kinds = {r["kind"] for r in rows}
    assert kinds == {"narrative", "code", "passkey"}
    # 1 narrative + 1 code doc at both placements, 1 pass key per placement; 4 conditions
    assert len(rows) == (2 * 2 + 2) * 4
    entries = {"control": 2048, "lod1": 2048 - 1024 + 32, "lod2": 2048 - 1023, "dropped": 1024}
    ratio = {"control": 1.0, "lod1": 32.0, "lod2": 1024.0, "dropped": math.inf}
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        assert r["suite"] == "compression" and r["gistnet"] == "mean-pool"
        assert r["entries"] == entries[r["condition"]]
        assert r["ratio"] == ratio[r["condition"]]
        assert r["passed"] == (r["delta_control"] <= 0.2) and r["bar"] == 0.2
        assert len(r["token_nll"]) == r["horizon"]
        assert math.isclose(r["nll"], sum(r["token_nll"]) / r["horizon"], rel_tol=1e-6)
        groups.setdefault((r["doc"], r["placement"]), {})[r["condition"]] = r
    assert len(groups) == 6
    for g in groups.values():
        c, d = g["control"]["nll"], g["dropped"]["nll"]
        for r in g.values():
            assert r["delta_control"] == pytest.approx(r["nll"] - c, abs=1e-9)
            if abs(d - c) < 1e-3:
                assert math.isnan(r["kept_fraction"])
            else:
                assert r["kept_fraction"] == pytest.approx((d - r["nll"]) / (d - c))
    # the control does not depend on the placement: same targets, same full history
    for doc in {r["doc"] for r in rows if r["kind"] != "passkey"}:
        far, near = groups[(doc, "far")]["control"], groups[(doc, "near")]["control"]
        assert far["token_nll"] == near["token_nll"]
    # the answer " 12345": a space and five one-digit tokens (SmolLM2 splits digits)
    assert {r["horizon"] for r in rows if r["kind"] == "passkey"} == {6}


def test_report_section_and_plot(run):
    from megacontext.eval.report import build_report

    out, _ = run
    text = (out / "report.md").read_text()
    assert "## Compression stress" in text
    for kind in ("narrative", "code", "passkey"):
        assert f"### {kind}" in text
    assert "![ΔNLL vs control per condition and kind](compression.png)" in text
    assert (out / "compression.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| near | lod2 | 1024× | 1025 |" in text
    before = text
    (out / "compression.png").unlink()
    build_report(out)  # rebuilt from the Parquet alone
    assert (out / "report.md").read_text() == before
    assert (out / "compression.png").is_file()


def test_short_document_is_named(base):
    docs = [("code/short.py", "code", _ids(100))]
    with pytest.raises(InputError, match="'code/short.py' has 100 tokens"):
        comp.compression_suite(base, None, "tiny", documents=docs, log=lambda m: None)


def test_history_must_hold_two_aligned_nodes(base, monkeypatch):
    from megacontext.eval import suites

    cfg = {**suites.SIZES["tiny"]["compression"], "history": 1500}
    monkeypatch.setitem(suites.SIZES["tiny"], "compression", cfg)
    with pytest.raises(InputError, match="history=1500"):
        comp.compression_suite(base, None, "tiny", log=lambda m: None)


def _fake_rows(kind: str, nll: dict[str, float]) -> list[dict]:
    ratio = {"control": 1.0, "lod1": 32.0, "lod2": 1024.0, "dropped": math.inf}
    entries = {"control": 2048, "lod1": 1056, "lod2": 1025, "dropped": 1024}
    return [
        {
            "suite": "compression",
            "kind": kind,
            "doc": f"{kind}/d0",
            "placement": "far",
            "condition": c,
            "ratio": ratio[c],
            "entries": entries[c],
            "nll": v,
            "delta_control": v - nll["control"],
            "history_tokens": 2048,
            "horizon": 64,
            "region_start": 0,
            "region_end": 1024,
            "gistnet": "mean-pool",
            "reader": "frozen base",
        }
        for c, v in nll.items()
    ]


def test_section_verdicts(tmp_path):
    # code: R matters (dropping it costs 1 nat): lod1 within the bar, lod2 not;
    # narrative: dropping R costs 0.05 nats, so a pass there is trivial
    rows = _fake_rows("code", {"control": 1.0, "lod1": 1.1, "lod2": 1.5, "dropped": 2.0})
    rows += _fake_rows("narrative", {"control": 1.0, "lod1": 1.02, "lod2": 1.04, "dropped": 1.05})
    lines: list[str] = []
    comp.compression_section(rows, tmp_path, lines)
    text = "\n".join(lines)
    assert "| far | lod1 | 32× | 1056 | 1.100 | +0.100 | 0.900 | PASS |" in text
    assert "| far | lod2 | 1024× | 1025 | 1.500 | +0.500 | 0.500 | FAIL |" in text
    assert "| far | dropped | ∞ | 1024 | 2.000 | +1.000 | – | FAIL |" in text
    assert "| far | lod1 | 32× | 1056 | 1.020 | +0.020 | 0.600 | PASS (trivial) |" in text
    assert (tmp_path / "compression.png").is_file()


def test_views_under_the_runtime_hybrid_positions(base):
    """Under ``hybrid`` (the runtime default) the views read what a session would: the
    far part (tokens before R and R's gists) compacted in WC order, the tokens after R
    at their own indices while the history is short, and the targets right after."""
    bs, T = 8, 192
    tree = comp.gist_history(base, _ids(T), None, block_size=bs)
    views = comp.compression_views(base, tree, 1, scheme="hybrid", max_gap=10_000)
    s, e = 64, 128
    l1, l2, ctrl, drop = views["lod1"], views["lod2"], views["control"], views["dropped"]
    assert torch.equal(ctrl.positions, torch.arange(T)) and ctrl.next_position == T
    assert torch.equal(l1.positions, torch.cat([torch.arange(s + 8), torch.arange(e, T)]))
    assert torch.equal(l2.positions, torch.cat([torch.arange(s + 1), torch.arange(e, T)]))
    assert l1.next_position == l2.next_position == T
    # nothing is gisted: the dropped view closes the gap, like a truncation
    assert torch.equal(drop.positions, torch.arange(T - 64)) and drop.next_position == T - 64
    # a small max_gap pulls the tokens after R back towards the far part
    near = comp.compression_views(base, tree, 1, ["lod1"], scheme="hybrid", max_gap=3)["lod1"]
    assert torch.equal(
        near.positions, torch.cat([torch.arange(s + 8), torch.arange(e, T) - (e - s - 8) + 3])
    )
