"""The method registry: one class adds a peer to the suites, the Parquet rows, the
report's tables and its plots; variants and external peers live in the same registry."""

from __future__ import annotations

import pytest
import torch

import megacontext as mc
from megacontext.errors import InputError
from megacontext.eval import methods as mth
from megacontext.eval.peers import View
from megacontext.eval.report import load_run, write_run
from megacontext.eval.suites import budget_sweep


@pytest.fixture
def registry():
    """Restore the registry after a test registers its own classes."""
    saved = dict(mth.REGISTRY)
    yield mth.REGISTRY
    mth.REGISTRY.clear()
    mth.REGISTRY.update(saved)


def test_registry_order_is_the_report_order():
    assert mth.peer_names() == [
        "full",
        "truncation",
        "streaming",
        "infllm",
        "mc_recency",
        "mc_attention",
        "mc_lexical",
        "mc_meanpool",
        "megacontext",
    ]
    assert mth.variant_names() == [
        "noncausal",
        "causal",
        "no_hysteresis",
        "recency",
        "attention",
        "lexical",
        "lexical_no_hysteresis",
        "lexical_unverified",
        "lexical_hold",
        "lexical_rescore",
        "lexical_feed_check",
        "lexical_no_feed_check",
        "random",
        "random_no_hysteresis",
    ]
    externals = [n for n, c in mth.REGISTRY.items() if issubclass(c, mth.External)]
    assert externals == sorted(externals) and all(n.startswith("kvpress_") for n in externals)
    # peers, then the external rows, then unregistered names alphabetically
    assert mth.order(["zeta", "kvpress_knorm", "megacontext", "full", "alpha"]) == [
        "full",
        "megacontext",
        "kvpress_knorm",
        "alpha",
        "zeta",
    ]
    assert mth.reference_names() == ["full"]
    assert mth.session_names() == [
        "mc_recency",
        "mc_attention",
        "mc_lexical",
        "mc_meanpool",
        "megacontext",
    ]


def test_peers_for_applies_the_method_rules(tiny_base):
    system = mc.MegaContext(tiny_base, None, None, mc.MegaContextConfig(model="tiny-llama"))
    names = [p.name for p in mth.peers_for(system)]
    # no GistNet: mean-pool is the system; no LensNet: recency is the system
    assert names == [
        "full",
        "truncation",
        "streaming",
        "infllm",
        "mc_attention",
        "mc_lexical",
        "megacontext",
    ]
    attention = system.with_config(lens="attention")
    names = [p.name for p in mth.peers_for(attention)]
    # lens: attention is the system; recency is not
    assert names == [
        "full",
        "truncation",
        "streaming",
        "infllm",
        "mc_recency",
        "mc_lexical",
        "megacontext",
    ]
    assert [p.name for p in mth.peers_for(None)] == ["full", "truncation", "streaming", "infllm"]
    assert [p.name for p in mth.peers_for(system, ["mc_recency"])] == ["mc_recency"]
    with pytest.raises(InputError, match="unknown methods"):
        mth.peers_for(system, ["nope"])


def test_a_name_is_registered_once(registry):
    with pytest.raises(InputError, match="registered twice"):

        class Again(mth.Peer):  # the definition is the registration
            name = "truncation"


def test_a_toy_peer_is_one_class(registry, tiny_base, tmp_path, monkeypatch):
    class FirstTokens(mth.Peer):
        """The first ``W`` tokens (a deliberately poor reader)."""

        name = "first_w"

        def view(self, base, history, budget, system=None):
            ids = torch.as_tensor(history).flatten()[:budget]
            n = int(ids.numel())
            return View(self.name, base.embed(ids), torch.arange(n), len(history))

    import matplotlib.axes

    labels: list[str] = []
    real_plot = matplotlib.axes.Axes.plot

    def spy(self, *args, **kw):
        labels.append(kw.get("label"))
        return real_plot(self, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    rows = budget_sweep(tiny_base, None, "tiny", log=lambda m: None)
    toy = [r for r in rows if r["method"] == "first_w"]
    assert toy and all(r["entries"] <= r["budget"] for r in toy)
    assert all(r["delta_nll"] == pytest.approx(r["nll"] - r["nll_full"]) for r in toy)
    run = write_run(tmp_path / "run", rows)
    saved, _, _ = load_run(run)
    assert {r["method"] for r in saved} >= {"full", "truncation", "first_w"}
    report = (run / "report.md").read_text()
    table_rows = [ln for ln in report.splitlines() if ln.startswith("| first_w |")]
    assert len(table_rows) == 2  # one per budget of the tiny sweep
    assert "first_w" in labels  # a line in the ΔNLL-vs-budget plot
    assert "full" not in labels  # the reference is not plotted
    assert (run / "budget_delta_nll.png").is_file()


def test_a_toy_variant_joins_the_ablation_registry(registry, tiny_base):
    class ToyRecency(mth.Variant):
        name = "toy_recency"

        def scorer(self, system, *, causal_lens, seed):
            return None

    from megacontext.eval.ablations import variant_system

    system = mc.MegaContext(tiny_base, None, None, mc.MegaContextConfig(model="tiny-llama"))
    assert "toy_recency" in mth.variant_names()
    mcx = variant_system(system, "toy_recency", 192)
    assert mcx.lensnet is None and mcx.config.w_max == 192
    with pytest.raises(InputError, match="needs a system with a LensNet"):
        variant_system(system, "noncausal", 192)
