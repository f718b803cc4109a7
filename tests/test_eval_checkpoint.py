"""Evaluating a trainer checkpoint: the system (GistNet, LensNet, LoRA adapter) reads
through its own adapted base, every peer and every acceptance reference through the
frozen base model."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import megacontext as mc
from megacontext.base import Base
from megacontext.cli import app
from megacontext.eval import accept as acc
from megacontext.eval.peers import full_view, view_nll
from megacontext.eval.suites import compare_methods
from megacontext.lora import LoraConfig, has_lora, inject_lora, save_lora
from megacontext.train import load_train_config
from megacontext.train.checkpoint import write_checkpoint

TINY = "configs/train-tiny.yaml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_base) -> Path:
    """A hand-written checkpoint whose LoRA adapter really changes the model's output
    (``B`` is random, not the trainer's zero init)."""
    cfg = load_train_config(TINY)
    model = copy.deepcopy(tiny_base.model)
    lc = LoraConfig(**cfg.lora.model_dump())
    inject_lora(model, lc)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0.0, 0.5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        mcc = cfg.mc_config()
        gistnet = mc.GistNet(
            tiny_base.dim, block_size=mcc.block_size, levels=mcc.levels, **cfg.gistnet
        )
        lensnet = mc.LensNet(tiny_base.dim, **cfg.lensnet)

    def write(tmp: Path) -> None:
        (tmp / "config.yaml").write_text(Path(TINY).read_text())
        gistnet.save(tmp / "gistnet.safetensors")
        lensnet.save(tmp / "lensnet.safetensors")
        save_lora(model, lc, tmp / "lora")
        (tmp / "trainer.json").write_text(json.dumps({"done": 1}))

    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "cycle1-b3", write)


def test_system_reads_through_its_adapter_peers_through_the_frozen_base(checkpoint, tiny_base):
    frozen = Base(
        model=copy.deepcopy(tiny_base.model), tokenizer=tiny_base.tokenizer, name="tiny-llama"
    )
    system = mc.MegaContext.from_checkpoint(checkpoint)
    assert has_lora(system.base.model) and not has_lora(frozen.model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (120,), generator=g)
    history, targets = ids[:112], ids[112:]
    # W >= T: every method reads the whole history, so only the model differs
    rows = compare_methods(
        frozen, history, targets, 128, system=system, methods=["full", "megacontext"]
    )
    by = {r["method"]: r["nll"] for r in rows}
    frozen_full = float(view_nll(frozen, full_view(frozen, history), targets).mean())
    adapted_full = float(view_nll(system.base, full_view(system.base, history), targets).mean())
    assert abs(frozen_full - adapted_full) > 1e-3  # the adapter matters
    assert by["full"] == pytest.approx(frozen_full, abs=1e-5)
    assert by["megacontext"] == pytest.approx(adapted_full, abs=1e-4)


def test_acceptance_reference_is_the_frozen_model(checkpoint, tiny_base, monkeypatch):
    system = mc.MegaContext.from_checkpoint(checkpoint)
    seen: list = []
    real = acc._dnll

    def spy(system_, frozen, docs, history, budget, decode_blocks):
        seen.append(frozen)
        return real(system_, frozen, docs, history, budget, decode_blocks)

    monkeypatch.setattr(acc, "_dnll", spy)
    crit = acc.run_acceptance(
        system, budget=128, docs=1, history=320, new_tokens=2, decode_blocks=2, log=lambda m: None
    )
    assert seen and all(not has_lora(b.model) for b in seen)
    assert seen[0] is not system.base
    assert all(math.isfinite(c.value) for c in crit[:3])


def test_cli_eval_checkpoint(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["eval", "budget", "--size", "tiny", "--model", "tiny-llama"]
    result = CliRunner().invoke(app, [*args, "--checkpoint", str(checkpoint), "--out", "ck"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "artifacts/reports/ck/meta.json").read_text())
    assert "LoRA adapter on the system's base: yes" in meta["system"]
    bad = CliRunner().invoke(
        app, [*args, "--checkpoint", str(checkpoint), "--gistnet", str(checkpoint / "x")]
    )
    assert bad.exit_code != 0 and "not both" in bad.output
    wrong = CliRunner().invoke(
        app, ["eval", "budget", "--size", "tiny", "--checkpoint", str(checkpoint), "--out", "x"]
    )
    assert wrong.exit_code != 0 and "tiny-llama" in wrong.output
    missing = CliRunner().invoke(app, [*args, "--checkpoint", str(tmp_path / "nope")])
    assert missing.exit_code != 0 and "nope" in missing.output


def test_one_reader_for_runtime_and_trainer(checkpoint, tiny_base, tmp_path):
    """``MegaContext.from_checkpoint`` and ``megacontext.train.load_checkpoint`` read
    through the one reader; a bad ``config.yaml`` is refused naming the file."""
    import shutil

    from megacontext.checkpoint import read_checkpoint
    from megacontext.train import load_checkpoint
    from megacontext.train.labels import module_hash

    def fresh() -> Base:
        return Base(model=copy.deepcopy(tiny_base.model), tokenizer=tiny_base.tokenizer, name="t")

    parts = read_checkpoint(checkpoint, base=fresh())
    a = mc.MegaContext.from_checkpoint(checkpoint, base=fresh())
    b = load_checkpoint(checkpoint, base=fresh())
    for system in (a, b):
        assert module_hash(system.gistnet) == module_hash(parts.gistnet)
        assert module_hash(system.lensnet) == module_hash(parts.lensnet)
        assert system.config == parts.config and has_lora(system.base.model)
    assert parts.config.w_max == load_train_config(TINY).mc_config().w_max
    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    text = (bad / "config.yaml").read_text()
    (bad / "config.yaml").write_text(text + "\nmegacontext:\n  block_size: 33\n")
    with pytest.raises(mc.ConfigError, match=r"config\.yaml.*block_size") as err:
        read_checkpoint(bad, base=fresh())
    assert err.value.field == "megacontext.block_size"
