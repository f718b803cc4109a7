from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import megacontext as mc
from megacontext.cli import _summary_line, app, collect_info

runner = CliRunner()


def _flat(output: str) -> str:
    """Rich wraps error panels to the terminal width: compare text without the box."""
    return " ".join(re.sub("[\u2500-\u257f]", " ", output).split())


def test_info_reports_the_extension():
    data = collect_info()
    assert data["extension"]["available"] is True
    assert "cpp" in data["allocator_backends"]
    assert data["default_model"]["installed"] is True
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert "megacontext._C" in result.output
    result = runner.invoke(app, ["info", "--json"])
    assert json.loads(result.output)["extension"]["abi_version"] >= 1


def test_nll_on_a_file_with_tiny_llama(tmp_path):
    text = tmp_path / "sample.py"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    result = runner.invoke(
        app, ["nll", str(text), "--model", "tiny-llama", "--window", "64", "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["model"] == "tiny-llama" and out["targets"] == out["tokens"] - 1
    # a random model is near-uniform over 49,152 tokens: NLL close to ln(49152) ~ 10.8
    assert 9.0 < out["mean_nll"] < 12.0


def test_nll_module_option_and_limits():
    result = runner.invoke(
        app, ["nll", "--module", "json", "--model", "tiny-llama", "--max-tokens", "40"]
    )
    assert result.exit_code == 0, result.output
    assert "39 tokens scored" in _flat(result.output)


def test_nll_bad_inputs(tmp_path):
    result = runner.invoke(app, ["nll", str(tmp_path / "missing.txt")])
    assert result.exit_code == 2 and "not a file" in _flat(result.output)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    result = runner.invoke(app, ["nll", str(empty), "--model", "tiny-llama"])
    assert result.exit_code == 2 and "empty" in _flat(result.output)
    result = runner.invoke(app, ["nll"])
    assert result.exit_code == 2 and "exactly one" in _flat(result.output)


def test_typed_errors_become_one_line_messages(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    proc = subprocess.run(
        [sys.executable, "-m", "megacontext.cli", "nll", str(text), "--model", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "ModelNotAvailableError" in proc.stderr and "Traceback" not in proc.stderr


def test_run_ingests_answers_and_writes_telemetry(tmp_path):
    from megacontext.telemetry import read_run

    src = tmp_path / "history.py"
    src.write_text("def helper(x):\n    return x * 2\n" * 150)
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "run",
            str(src),
            "--prompt",
            "What does helper return?",
            "--model",
            "tiny-llama",
            "--w-max",
            "256",
            "--max-new-tokens",
            "40",
            "--run-dir",
            str(run_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "refocus iterations" in _flat(result.output) and "WC " in _flat(result.output)
    # the summary names the budget apart from the count, which decoded tokens can pass
    assert re.search(
        r"WC \d+ entries, budget 256 \(\d+% used at the last refocus\)", _flat(result.output)
    )
    iterations, _ = read_run(run_dir)
    assert iterations.num_rows >= 1  # one refocus per 32 decoded tokens
    assert max(iterations.column("wc_cost").to_pylist()) <= 256


def test_run_needs_a_source():
    result = runner.invoke(app, ["run", "--model", "tiny-llama"])
    assert result.exit_code == 2 and "at least one file" in _flat(result.output)


def test_chat_reads_turns_until_eof():
    result = runner.invoke(
        app,
        ["chat", "--model", "tiny-llama", "--w-max", "256", "--max-new-tokens", "4"],
        input="hello there\n\nsecond turn\n",
    )
    assert result.exit_code == 0, result.output
    assert _flat(result.output).count("refocus iterations") == 2


def test_one_command_line_for_the_demo_ablation_data_labels_and_costs(capsys):
    """The trainer's demo and ablation, data ingestion, labelling and the cost tables
    are subcommands; the older `python -m` spellings are aliases of them."""
    from megacontext.cli import run_alias
    from megacontext.gistnet import cost_table as gist_costs
    from megacontext.lensnet import cost_table as lens_costs

    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert {"ingest", "label", "costs", "train", "train-ablation"} <= names
    demo = next(g for g in app.registered_groups if g.name == "demo")
    assert {c.name for c in demo.typer_instance.registered_commands} >= {"walkthrough", "train"}
    result = CliRunner().invoke(app, ["costs", "gistnet"])
    assert result.exit_code == 0 and gist_costs() in result.output
    result = CliRunner().invoke(app, ["costs"])
    assert gist_costs() in result.output and lens_costs() in result.output
    assert CliRunner().invoke(app, ["costs", "tree"]).exit_code != 0
    for command in (["demo", "train"], ["train-ablation"], ["ingest"], ["label"]):
        assert run_alias(command, ["--help"]) == 0
        assert "Usage: megacontext " + " ".join(command) in capsys.readouterr().out


def test_default_budget_fits_the_models_positions(tiny_base):
    from megacontext.cli import _default_budget
    from megacontext.focus import check_positions

    bound = tiny_base.max_positions
    cfg = mc.MegaContextConfig(model="tiny-llama", w_max=bound)  # the default's shape
    fitted = _default_budget(cfg, tiny_base)
    assert fitted.w_max == (bound - cfg.block_size - cfg.horizon) // cfg.block_size * cfg.block_size
    check_positions(fitted, tiny_base)  # a session can be built on it
    with pytest.raises(mc.ConfigError, match="w_max"):
        check_positions(cfg, tiny_base)  # the unfitted default could not
    small = cfg.replace(w_max=256)
    assert _default_budget(small, tiny_base) is small
    glob = cfg.replace(positions="global")
    assert _default_budget(glob, tiny_base) is glob


@pytest.mark.parametrize("margin", [-100.0, 100.0])
def test_summary_line_says_what_the_focus_check_did(tiny_base, margin):
    cfg = mc.MegaContextConfig(
        model=tiny_base.name,
        w_max=256,
        lens="lexical",
        refocus_iterations=8,
        verify_tokens=16,
        verify_margin=margin,
        verify_peak=None,  # the margin alone decides
    )
    ids = torch.randint(5, 40000, (2000,), generator=torch.Generator().manual_seed(0))
    ids[-64:] = ids[300:364]  # the question repeats a far span: the scorer opens it
    s = mc.MegaContext(tiny_base, None, None, cfg).session()
    s.ingest(ids)
    line = _summary_line(s)
    v = s.focus.verdicts[-1]
    want = "kept" if margin < 0 else "dropped for recency"
    assert f"focus {want} by the check ({v.nll_focus:.2f} vs {v.nll_recency:.2f}" in line
    # no verdict (verify off): no such clause
    s.focus.verdicts.clear()
    assert "by the check" not in _summary_line(s)
