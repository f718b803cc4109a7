from __future__ import annotations

import torch
from typer.testing import CliRunner

import megacontext as mc
from megacontext.cli import app
from megacontext.walkthrough import USER_TURN, project_text, run_walkthrough


def test_project_is_about_4k_tokens_and_defines_fetchuser(tiny_base):
    text = project_text()
    n = tiny_base.encode(text).numel()
    assert 3500 <= n <= 4500
    assert "export async function fetchUser" in text and "logger.ts" in text


def test_walkthrough_reports_what_the_run_did(tiny_base):
    torch.manual_seed(0)
    lens = mc.LensNet(64, d_lens=32, heads=4)
    cfg = mc.MegaContextConfig(model="tiny-llama", w_max=512, tau_expand=0.0, tau_collapse=0.0)
    session = mc.MegaContext(tiny_base, None, lens, cfg).session()
    result = run_walkthrough(session, max_new_tokens=40)
    md = result.markdown()
    for heading in ("## 1. Setup", "## 2. User turn", "## 3. LensNet pass", "## 6. Trace"):
        assert heading in md
    assert USER_TURN in md and "untrained LensNet" in md
    # every action of the session appears in the trace table
    assert result.actions == session.actions and len(result.actions) > 0
    for a in result.actions:
        assert f"| {a.step} | {a.kind} | {a.level} | {a.node} |" in md
    assert md.count("\n| ") >= len(session.history)


def test_demo_command_runs(tmp_path):
    out = tmp_path / "walk.md"
    result = CliRunner().invoke(
        app,
        [
            "demo",
            "walkthrough",
            "--model",
            "tiny-llama",
            "--w-max",
            "512",
            "--max-new-tokens",
            "8",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "## 4. Focus allocator" in out.read_text()
