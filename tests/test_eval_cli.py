"""`megacontext eval` / `megacontext report` through typer's CliRunner (tiny-llama)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from megacontext.cli import app

runner = CliRunner()


def test_eval_then_report(tmp_path, monkeypatch):
    pytest.importorskip("megacontext.synthetic")
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(
        app, ["eval", "needle", "--size", "tiny", "--model", "tiny-llama", "--out", "t"]
    )
    assert res.exit_code == 0, res.output
    run = tmp_path / "artifacts" / "reports" / "t"
    md = (run / "report.md").read_text()
    assert "Needle in a haystack" in md
    for m in (
        "| truncation | 128 |",
        "| streaming | 128 |",
        "| infllm | 128 |",
        "| mc_recency | 128 |",
        "| megacontext | 128 |",
    ):
        assert m in md
    (run / "report.md").unlink()
    res = runner.invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    assert (run / "report.md").read_text() == md


def test_report_errors(tmp_path):
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2  # typer's BadParameter (the StorageError's message)


def test_eval_rejects_unknown_suite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["eval", "bogus", "--size", "tiny", "--model", "tiny-llama"])
    assert res.exit_code != 0
