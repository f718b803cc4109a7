"""The focus-ablation suite on tiny-llama: variants, ping-pong counting, the
sliding-window reference, the causal checkpoint path and the report section."""

from __future__ import annotations

import math

import pytest
import torch

import megacontext as mc
from megacontext.allocator import Action
from megacontext.errors import InputError
from megacontext.eval.ablations import (
    VARIANTS,
    GroupRandomLens,
    ablation_suite,
    causal_rel,
    causal_twin,
    pingpong_count,
    truncation_nll,
    variant_system,
)
from megacontext.eval.peers import untrained_system
from megacontext.eval.report import load_run, write_run
from megacontext.eval.suites import SIZES

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def base():
    return mc.load_base("tiny-llama")


@pytest.fixture(scope="module")
def system(base):
    return untrained_system(base, mc.MegaContextConfig(model="tiny-llama"))


@pytest.fixture(scope="module")
def suite_run(base, system):
    tel: list[dict] = []
    rows = ablation_suite(base, system, "tiny", telemetry=tel, log=lambda m: None)
    return rows, tel


# ------------------------------------------------------------------ metrics


def test_pingpong_count_hand_trace():
    trace = [
        Action(0, "expand", 1, 5, 0.9, 31),
        Action(1, "collapse", 1, 5, -0.9, -31),  # flip back after 1 step
        Action(2, "collapse", 1, 7, -0.5, -31),
        Action(3, "expand", 2, 0, 0.5, 31),  # another node: no flip
        Action(4, "expand", 1, 3, 0.5, 31),
        Action(6, "expand", 1, 5, 0.7, 31),  # collapse@1 -> expand@6: gap 5
        Action(9, "expand", 1, 7, 0.4, 31),  # collapse@2 -> expand@9: gap 7
        Action(10, "expand", 2, 1, 0.4, 31),
    ]
    out = pingpong_count(trace, window=5)
    assert out == {"flip_backs": 3, "pingpong": 2, "min_flip_gap": 1}
    assert pingpong_count(trace, window=0)["pingpong"] == 0
    assert pingpong_count(trace, window=7)["pingpong"] == 3
    # the telemetry's dict form gives the same counts
    dicts = [a._asdict() for a in trace]
    assert pingpong_count(dicts, window=5) == out
    assert pingpong_count([], window=5) == {"flip_backs": 0, "pingpong": 0, "min_flip_gap": None}
    with pytest.raises(InputError, match="window"):
        pingpong_count(trace, window=-1)
    with pytest.raises(InputError, match="kind"):
        pingpong_count([{"step": 0, "kind": "swap", "level": 1, "node": 0}], window=1)


def test_causal_rel():
    assert causal_rel(0.2, 0.1) == pytest.approx(0.5)
    assert causal_rel(0.2, 0.25) == pytest.approx(-0.25)
    assert causal_rel(-0.1, -0.2) == pytest.approx(1.0)  # both beat full context
    assert math.isnan(causal_rel(0.0, 0.1)) and math.isnan(causal_rel(math.nan, 0.1))


def test_truncation_nll_per_block(base):
    g = torch.Generator().manual_seed(3)
    hist = torch.randint(10, 5000, (50,), generator=g)
    cont = torch.randint(10, 5000, (7,), generator=g)
    w, ids = 16, torch.cat([hist, cont])

    def read(j: int, start: int) -> torch.Tensor:
        # token j of the continuation after tokens [start, 50 + j), one plain forward
        x = ids[start : 50 + j + 1]
        out = base.model(input_ids=x[None], position_ids=torch.arange(start, 50 + j + 1)[None])
        return -out.logits[0, -2].float().log_softmax(-1)[x[-1]]

    # block 1: every token after exactly its w predecessors
    want = torch.stack([read(j, 50 + j - w) for j in range(7)])
    torch.testing.assert_close(truncation_nll(base, hist, cont, w, 1), want, atol=1e-4, rtol=1e-4)
    # block 3: the window is refreshed at tokens 0, 3, 6 of the continuation
    want = torch.stack([read(j, 50 + (j // 3) * 3 - w) for j in range(7)])
    torch.testing.assert_close(truncation_nll(base, hist, cont, w, 3), want, atol=1e-4, rtol=1e-4)
    # a window covering everything is the full context
    full = torch.stack([read(j, 0) for j in range(7)])
    torch.testing.assert_close(
        truncation_nll(base, hist, cont, 10_000, 4), full, atol=1e-4, rtol=1e-4
    )
    with pytest.raises(InputError):
        truncation_nll(base, hist, cont[:0], w, 1)
    with pytest.raises(InputError):
        truncation_nll(base, hist, cont, w, 0)


def test_group_random_lens_gives_sibling_groups_one_score():
    lens = GroupRandomLens(seed=0, block_size=4)
    # a WC tiling 32 tokens (bs = 4): two LOD1 gists, 4 tokens, a LOD1 gist, 16 tokens
    spans = torch.tensor([[4, 4, 1, 1, 1, 1, 4] + [1] * 16])
    assert int(spans.sum()) == 32
    n = spans.shape[1]
    u = lens(torch.zeros(1, n, 8), None, None, spans, None)[0]
    assert u.shape == (n,) and bool((u.abs() <= 1).all())
    # tokens 8..11 are one sibling group (children of LOD1 node 2), 16..19 another
    assert torch.unique(u[2:6]).numel() == 1
    assert torch.unique(u[7:11]).numel() == 1
    # the gists of [0, 8) and [12, 16) are siblings (children of LOD2 node 0)
    assert u[0] == u[1] == u[6]
    v = lens(torch.zeros(1, n, 8), None, None, spans, None)[0]
    assert not torch.equal(u, v)  # a fresh draw every step


class _LevelLens(torch.nn.Module):
    """Tokens score 0.5 − 0.001 · token index, gists −0.3 − 0.01 · level."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, entries, tail, levels, spans, distance):
        span = spans[0].long()
        start = torch.cumsum(span, 0) - span
        lv = levels[0]
        u = torch.where(lv == 0, 0.5 - 0.001 * start, -0.3 - 0.01 * lv)
        return u[None].float()


def test_score_summary(base, system):
    from megacontext.eval.ablations import score_summary

    cfg = mc.MegaContextConfig(model="tiny-llama", w_max=192, tau_expand=1.0, tau_collapse=1.0)
    s = mc.MegaContext(base, None, _LevelLens(), cfg).session()
    s.ingest(torch.randint(10, 5000, (640,), generator=torch.Generator().manual_seed(0)))
    out = score_summary(s, "x")
    lv, nodes = s.wc.levels.long(), s.wc.nodes.long()
    tok = nodes[lv == 0]
    # complete token blocks present in the WC, restated from the token indices
    blocks = [k for k in range(int(tok.max()) // 32 + 1) if int((tok // 32 == k).sum()) == 32]
    assert blocks  # the WC holds whole blocks of tokens
    want_group = min(0.5 - 0.001 * (32 * k + 15.5) for k in blocks)
    assert out["x_group_min"] == pytest.approx(want_group, abs=1e-5)
    assert out["x_token_mean"] == pytest.approx(
        float((0.5 - 0.001 * tok.double()).mean()), abs=1e-5
    )
    assert out["x_gist_max"] == pytest.approx(-0.3 - 0.01 * int(lv[lv > 0].min()), abs=1e-6)


def test_variant_systems(base, system):
    w = 192
    for v in VARIANTS:
        mcx = variant_system(system, v, w)
        assert mcx.config.w_max == w and mcx.base is system.base
        assert mcx.gistnet is system.gistnet
        hyst = (mcx.config.cooldown_steps, mcx.config.min_residency)
        assert hyst == ((0, 0) if v.endswith("no_hysteresis") else (2, 3))
    assert variant_system(system, "noncausal", w).lensnet is system.lensnet
    assert variant_system(system, "recency", w).lensnet is None
    twin = variant_system(system, "causal", w).lensnet
    assert twin.config.causal and not system.lensnet.config.causal
    for (k, a), (k2, b) in zip(
        system.lensnet.state_dict().items(), twin.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b)
    with pytest.raises(InputError, match="unknown ablation variant"):
        variant_system(system, "causal_lens", w)


def test_causal_twin_scores_differ(system):
    twin = causal_twin(system.lensnet)
    g = torch.Generator().manual_seed(0)
    n, d = 40, system.base.dim
    args = (
        torch.randn(1, n, d, generator=g),
        torch.randn(1, 6, d, generator=g),
        torch.zeros(1, n, dtype=torch.long),
        torch.ones(1, n, dtype=torch.long),
        torch.arange(n, 0, -1)[None],
    )
    with torch.no_grad():
        assert not torch.allclose(system.lensnet(*args), twin(*args))


# ------------------------------------------------------------------ the suite


def test_every_variant_produces_a_row(suite_run):
    rows, tel = suite_run
    cfg = SIZES["tiny"]["ablation"]
    docs = {r["doc"] for r in rows}
    assert len(docs) == cfg["docs"]
    blocks = cfg["feed"] // 32
    for doc in docs:
        by = {r["method"]: r for r in rows if r["doc"] == doc}
        assert set(by) == {"full", "truncation", *VARIANTS}
        assert by["full"]["delta_nll"] == 0.0
        for v in VARIANTS:
            r = by[v]
            assert math.isfinite(r["nll"]) and len(r["token_nll"]) == cfg["feed"]
            assert r["delta_nll"] == pytest.approx(r["nll"] - by["full"]["nll"])
            assert r["blocks"] == blocks and r["refocus_iterations"] == blocks
            assert r["swap_rate"] == pytest.approx(r["actions"] / blocks)
            assert r["n_expand"] + r["n_collapse"] == r["actions"] == len(r["residencies"])
            assert r["entries"] <= cfg["budget"] + 31
            assert 0 <= r["budget_collapses"] <= r["n_collapse"]
            # decode-phase telemetry went to the sink
            assert len([t for t in tel if t["doc"] == doc and t["method"] == v]) == blocks
        assert by["causal"]["causal_source"] == "same weights"
        assert by["recency"]["scorer"] == "none"
        # LensNet variants carry their score summaries; the random scorer is not read
        assert all(math.isfinite(by[v]["end_token_mean"]) for v in ("noncausal", "causal"))
        assert "ingest_gist_max" not in by["random"] and "end_group_min" not in by["recency"]


def test_hysteresis_stops_the_random_scorers_ping_pong(suite_run):
    """Seeded case: the group-random scorer flips nodes back after one step when the
    hysteresis is off; with it, two actions on one node are >= max(2, 3) steps apart."""
    rows, _ = suite_run
    off = [r for r in rows if r["method"] == "random_no_hysteresis"]
    on = [r for r in rows if r["method"] == "random"]
    assert sum(r["pingpong"] for r in off) > sum(r["pingpong"] for r in on)
    assert min(r["min_flip_gap"] for r in off if r["min_flip_gap"] is not None) == 1
    assert all(r["min_flip_gap"] is None or r["min_flip_gap"] >= 3 for r in on)
    assert all(r["pingpong_window"] == 5 for r in on + off)


def test_report_section_renders(tmp_path, suite_run):
    rows, tel = suite_run
    out = write_run(tmp_path / "run", rows, tel, {"name": "abl", "model": "tiny-llama"})
    md = (out / "report.md").read_text()
    assert "## Focus ablations" in md
    assert (out / "ablation.png").read_bytes()[:8] == PNG
    assert "(ablation.png)" in md
    for v in VARIANTS:
        assert any(line.startswith(f"| {v} |") for line in md.splitlines()), v
    verdict = next(x for x in md.splitlines() if x.startswith("**Causal vs non-causal"))
    assert ("PASS" in verdict) != ("FAIL" in verdict) and "architecture probe" in verdict
    # the verdict's numbers are the rows' means
    nc = [r["delta_nll"] for r in rows if r["method"] == "noncausal"]
    ca = [r["delta_nll"] for r in rows if r["method"] == "causal"]
    rel = causal_rel(sum(ca) / len(ca), sum(nc) / len(nc))
    assert f"**{rel:+.3f}**" in verdict
    # the paired per-token difference line, from the rows' token NLLs
    d = [
        x - y
        for c in rows
        if c["method"] == "causal"
        for n in rows
        if n["method"] == "noncausal" and n["doc"] == c["doc"]
        for x, y in zip(c["token_nll"], n["token_nll"], strict=True)
    ]
    paired = next(x for x in md.splitlines() if x.startswith("Paired per-token"))
    assert f"over the {len(d)} fed tokens: {sum(d) / len(d):+.4f} ±" in paired
    assert "best expand" in md
    # residency histogram table: one row per variant
    assert "Residency histogram" in md
    # rebuilt from Parquet alone
    back, tel2, _ = load_run(out)
    assert len(back) == len(rows) and len(tel2) == len(tel)
    (out / "report.md").unlink()
    from megacontext.eval.report import build_report

    build_report(out)
    assert (out / "report.md").read_text() == md
    # rows without the budget-floor count (older runs) take it from the telemetry
    old = [{k: v for k, v in r.items() if k != "budget_collapses"} for r in rows]
    out2 = write_run(tmp_path / "old", old, tel, {"name": "abl", "model": "tiny-llama"})
    assert (out2 / "report.md").read_text() == md
    line = next(x for x in md.splitlines() if x.startswith("| random_no_hysteresis |"))
    r = [x for x in rows if x["method"] == "random_no_hysteresis"]
    assert f"| {sum(x['budget_collapses'] for x in r)} |" in line


def test_causal_checkpoint_is_used(tmp_path, base, system):
    from megacontext.lensnet import LensNet, LensNetConfig

    cfg = LensNetConfig(**{**system.lensnet.config.model_dump(), "causal": True})
    torch.manual_seed(1)
    path = LensNet(config=cfg).save(tmp_path / "causal.safetensors")
    rows = ablation_suite(
        base, system, "tiny", variants=["causal"], causal_lensnet=path, log=lambda m: None
    )
    causal = [r for r in rows if r["method"] == "causal"]
    assert len(causal) == SIZES["tiny"]["ablation"]["docs"]
    assert all(r["causal_source"].startswith(f"{path} (LensNet only") for r in causal)
    # a non-causal file is refused, naming the field
    flat = system.lensnet.save(tmp_path / "flat.safetensors")
    with pytest.raises(InputError, match="lensnet.causal"):
        ablation_suite(base, system, "tiny", variants=["causal"], causal_lensnet=flat)


def test_causal_checkpoint_directory_brings_its_whole_system(tmp_path, base, system):
    """A trainer checkpoint directory: the causal variant reads through that system's
    own base copy and GistNet; the other variants keep the system's."""
    from megacontext.eval.ablations import load_causal
    from megacontext.gistnet import GistNet
    from megacontext.lensnet import LensNet

    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "COMPLETE").write_text("ok\n")
    (d / "trainer.json").write_text('{"done": 0}')
    (d / "config.yaml").write_text("run: t\nmodel: tiny-llama\n")
    torch.manual_seed(2)
    GistNet(base.dim).save(d / "gistnet.safetensors")
    LensNet(base.dim, causal=True).save(d / "lensnet.safetensors")
    causal, source = load_causal(d, system)
    assert "whole checkpoint" in source
    mcx = variant_system(system, "causal", 192, causal_lens=causal)
    assert mcx.base is causal.base and mcx.base is not system.base
    assert mcx.gistnet is causal.gistnet and mcx.lensnet.config.causal
    assert mcx.config.w_max == 192 and mcx.config.block_size == system.config.block_size
    assert variant_system(system, "noncausal", 192, causal_lens=causal).base is system.base


def test_suite_input_errors(base, system):
    with pytest.raises(InputError, match="unknown ablation variants"):
        ablation_suite(base, system, "tiny", variants=["nope"])
    with pytest.raises(InputError, match="size"):
        ablation_suite(base, system, "huge")
    causal_sys = mc.MegaContext(base, None, causal_twin(system.lensnet), system.config)
    with pytest.raises(InputError, match="causal"):
        ablation_suite(base, causal_sys, "tiny")
    with pytest.raises(InputError, match="docs must be >= 1"):
        ablation_suite(base, system, "tiny", docs=0)


def test_docs_overrides_the_size(base, system):
    rows = ablation_suite(base, system, "tiny", variants=["recency"], docs=1, log=lambda m: None)
    assert len({r["doc"] for r in rows}) == 1
    assert {r["method"] for r in rows} <= {"full", "truncation", "recency"}


def test_cli_causal_lensnet_needs_the_ablation_suite(tmp_path):
    from typer.testing import CliRunner

    from megacontext.cli import app

    res = CliRunner().invoke(
        app,
        [
            "eval",
            "budget",
            "--size",
            "tiny",
            "--model",
            "tiny-llama",
            "--causal-lensnet",
            str(tmp_path / "x.safetensors"),
        ],
    )
    assert res.exit_code == 2
    assert "ablation" in res.output
