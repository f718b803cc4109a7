from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

import megacontext as mc
from megacontext.cli import app
from megacontext.eval import accept as acc


def test_criterion_verdicts():
    assert acc.Criterion("dnll_code", 0.05, 0.1).passed
    assert not acc.Criterion("dnll_code", 0.15, 0.1).passed
    assert acc.Criterion("mean_residency", 3.0, 3.0, higher_is_better=True).passed
    assert not acc.Criterion("mean_residency", 2.9, 3.0, higher_is_better=True).passed
    assert not acc.Criterion("focus_swap_rate", math.nan, 0.25).passed  # undefined never passes
    assert acc.Criterion("x", 0.2, 0.1).line().startswith("FAIL")


def test_acceptance_measures_every_criterion(tiny_base):
    system = mc.MegaContext(tiny_base, None, None, mc.MegaContextConfig(w_max=128))
    crit = acc.run_acceptance(
        system, budget=128, docs=1, history=320, new_tokens=4, decode_blocks=3, log=lambda m: None
    )
    names = [c.name for c in crit]
    assert names == [
        "dnll_narrative",
        "dnll_code",
        "latency_overhead",
        "focus_swap_rate",
        "swap_rate",
        "pingpong",
        "mean_residency",
    ]
    focus, swap, pp = crit[3], crit[4], crit[5]
    # one refocus per decoded block and document (without a LensNet the ingest makes
    # none): 2 documents x 3 blocks; the discretionary rate is judged, the total shown
    assert "over 6 blocks, 6 refocus iterations" in focus.detail
    assert swap.informational and not focus.informational and not pp.informational
    assert 0 <= focus.value <= swap.value
    assert pp.value == 0
    dn = crit[0]
    assert math.isfinite(dn.value) and "truncation" in dn.detail
    assert crit[2].value > 0


def test_informational_rows_never_decide_the_exit_code():
    bar = acc.Criterion("dnll_code", 0.05, 0.1)
    info = acc.Criterion("focus_swap_rate", 9.0, 0.25, informational=True)
    assert not info.passed and info.verdict == "info (fail)"
    assert acc.all_passed([bar, info])
    assert not acc.all_passed([acc.Criterion("dnll_code", 0.5, 0.1), info])


def test_at_least_one_block_is_decoded(tiny_base):
    system = mc.MegaContext(tiny_base, None, None, mc.MegaContextConfig(w_max=128))
    with pytest.raises(mc.InputError, match="decode_blocks=0"):
        acc.run_acceptance(system, budget=128, history=320, decode_blocks=0, log=lambda m: None)


def test_history_must_fit_the_full_context_reference(tiny_base, monkeypatch):
    system = mc.MegaContext(tiny_base, None, None, mc.MegaContextConfig(w_max=128))
    monkeypatch.setattr(type(tiny_base), "max_positions", property(lambda self: 512))
    with pytest.raises(mc.InputError, match="context"):
        acc.run_acceptance(system, budget=128, history=500, log=lambda m: None)


def test_accept_exits_nonzero_on_a_missed_bar(tmp_path, monkeypatch):
    # an unreachable bar forces a miss: the command must report FAIL and exit 1
    monkeypatch.setitem(acc.BARS, "dnll_code", -100.0)
    out = tmp_path / "accept.md"
    args = ["accept", "--model", "tiny-llama", "--w-max", "128", "--docs", "1"]
    args += ["--history", "320", "--new-tokens", "4", "--decode-blocks", "2", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "FAIL  dnll_code" in result.output
    assert "| dnll_code |" in out.read_text()
