"""The training ablation driver (megacontext.train.ablation) on tiny-llama."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import megacontext as mc
from megacontext.cli import app
from megacontext.train.ablation import (
    VARIANTS,
    equivalent_checkpoint,
    format_table,
    run_ablation,
    train_variant,
    variant_config,
)
from megacontext.train.config import load_train_config
from megacontext.train.trainer import Trainer


def main(args: list[str]) -> int:
    """``megacontext train-ablation ARGS`` in process (the older ``python -m
    megacontext.train.ablation`` is its alias): its output on stdout, a typed error
    raised as itself."""
    result = CliRunner().invoke(app, ["train-ablation", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    print(result.output, end="")
    return result.exit_code


TINY = "configs/train-tiny.yaml"
FAST = [
    "batch_size=1",
    "grad_accum=1",
    "label_windows=1",
    "labels.max_candidates=8",
    "warm_gist.steps=1",
    "warm_lens.steps=1",
    "b1.steps=1",
    "b2.steps=1",
    "b3.steps=1",
    "early_stop.enabled=false",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # results are compared bit for bit across runs; summation order follows threads
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shards(tiny_base, tmp_path_factory):
    from megacontext import synthetic
    from megacontext.data import build_shards

    root = tmp_path_factory.mktemp("ablation-data")
    tok = tiny_base.tokenizer
    topics = Path(sysconfig.get_paths()["stdlib"], "pydoc_data", "topics.py").read_text("utf-8")
    (root / "src").mkdir()
    for i in range(10):
        (root / "src" / f"d{i}.txt").write_text(topics[i * 4000 : (i + 1) * 4000])
    build_shards(
        [root / "src"],
        root / "text",
        tokenizer=tok,
        model_name="tiny-llama",
        val_fraction=0.5,
        progress=False,
    )
    tasks = synthetic.generate_tasks(tok, 8, length=256, tasks=("passkey",), depths=[0.4], seed=1)
    synthetic.write_synthetic_shards(
        root / "synth", tasks, tokenizer=tok, model_name="tiny-llama", val_fraction=0.5
    )
    return root


def overrides(root: Path) -> list[str]:
    return [f"artifacts={root}/a", f"runs_dir={root}/runs", *FAST]


@pytest.fixture(scope="module")
def ablation(shards):
    """Every variant through the driver (freeze-lora reused from all's B2)."""
    out = shards / "ablation.json"
    args = [TINY, "--text-shards", str(shards / "text"), "--synthetic-shards"]
    args += [str(shards / "synth"), "--windows", "2", "--budget", "40", "--out", str(out)]
    for s in overrides(shards):
        args += ["--set", s]
    assert main(args) == 0
    return out, json.loads(out.read_text())


def checkpoint(res: dict, variant: str) -> Path:
    return Path(res["variants"][variant]["checkpoint"])


def initial_state(cfg) -> Trainer:
    return Trainer(cfg, base=mc.load_base("tiny-llama", device="cpu"))


def same(tensors: dict, module: torch.nn.Module) -> bool:
    state = module.state_dict()
    return tensors.keys() == state.keys() and all(torch.equal(tensors[k], state[k]) for k in state)


def test_variant_overrides(shards):
    o = overrides(shards)
    cfgs = {v: variant_config(TINY, v, o) for v in VARIANTS}
    assert {c.cycles for c in cfgs.values()} == {1}
    assert cfgs["all"].run == "tiny-abl-all"
    assert (cfgs["freeze-gistnet"].warm_gist.steps, cfgs["freeze-gistnet"].b1.steps) == (0, 0)
    assert cfgs["freeze-gistnet"].warm_lens.steps == 1 and cfgs["freeze-gistnet"].b3.steps == 1
    assert (cfgs["freeze-lensnet"].warm_lens.steps, cfgs["freeze-lensnet"].b2.steps) == (0, 0)
    assert cfgs["freeze-lora"].b3.steps == 0 and cfgs["freeze-lora"].b2.steps == 1
    assert cfgs["causal-lensnet"].lensnet["causal"] is True
    assert cfgs["all"].lensnet.get("causal", False) is False


def test_unknown_variant_is_a_config_error(shards):
    with pytest.raises(mc.ConfigError, match="freeze-everything"):
        variant_config(TINY, "freeze-everything")
    # through the CLI a typed error is one line on stderr and exit code 2
    args = ["train-ablation", TINY, "--text-shards", "x", "--synthetic-shards", "y"]
    result = CliRunner().invoke(app, [*args, "--variants", "freeze-all"])
    assert result.exit_code == 2
    assert "ConfigError" in result.stderr and "freeze-all" in result.stderr


def test_frozen_module_keeps_its_initialisation(ablation, shards):
    _, res = ablation
    o = overrides(shards)
    init = {v: initial_state(variant_config(TINY, v, o)) for v in ("all", "freeze-gistnet")}
    # init does not depend on the variant's steps: GistNet and LensNet are seeded
    assert same(
        load_file(checkpoint(res, "freeze-gistnet") / "gistnet.safetensors"),
        init["freeze-gistnet"].gistnet,
    )
    assert same(
        load_file(checkpoint(res, "freeze-lensnet") / "lensnet.safetensors"),
        init["all"].lensnet,
    )
    # and a trained module does move
    assert not same(load_file(checkpoint(res, "all") / "gistnet.safetensors"), init["all"].gistnet)
    assert not same(load_file(checkpoint(res, "all") / "lensnet.safetensors"), init["all"].lensnet)
    assert (checkpoint(res, "all") / "lora").is_dir()
    # frozen LoRA: no adapter at all (reused from all's B2: an untrained zero adapter)
    assert not (Path(shards / "a/checkpoints/tiny-abl-freeze-lora")).exists()


def test_causal_variant_checkpoint(ablation):
    _, res = ablation
    lens = mc.LensNet.load(checkpoint(res, "causal-lensnet") / "lensnet.safetensors")
    assert lens.config.causal is True
    saved = load_train_config(checkpoint(res, "causal-lensnet") / "config.yaml")
    assert saved.lensnet["causal"] is True and saved.run == "tiny-abl-causal-lensnet"
    assert mc.LensNet.load(checkpoint(res, "all") / "lensnet.safetensors").config.causal is False


def test_reuse_equals_training(ablation, shards):
    """freeze-lora trained for real ends bit-identical to all's B2 checkpoint, with the
    same held-out NLLs: the reuse rule holds."""
    _, res = ablation
    row = res["variants"]["freeze-lora"]
    assert row["reused_from"] == str(shards / "a/checkpoints/tiny-abl-all/cycle1-b2")
    assert row["train_seconds"] is None
    cfg = variant_config(TINY, "freeze-lora", [*overrides(shards), "run=own"])
    trained = train_variant(cfg, base=mc.load_base("tiny-llama", device="cpu"))
    assert trained["checkpoint"].name == "cycle1-b3" and trained["train_seconds"] > 0
    assert not (trained["checkpoint"] / "lora").exists()
    reused = Path(row["reused_from"])
    for name in ("gistnet.safetensors", "lensnet.safetensors"):
        a, b = load_file(trained["checkpoint"] / name), load_file(reused / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = run_ablation(
        TINY,
        str(shards / "text"),
        str(shards / "synth"),
        ["freeze-lora"],
        windows=2,
        budget=40,
        overrides=[*overrides(shards), "run=own"],
        reuse=False,
        log=lambda *_: None,
    )
    assert again["variants"]["freeze-lora"]["nll"] == row["nll"]


def test_equivalent_checkpoint_rules(ablation, shards):
    o = overrides(shards)
    runs = ["tiny-abl-all"]
    for v in ("freeze-gistnet", "freeze-lensnet", "causal-lensnet"):
        assert equivalent_checkpoint(variant_config(TINY, v, o), runs) is None
    # a longer run with the same phases: its cycle-1 checkpoints are the 1-cycle runs
    cfg = load_train_config(TINY, [*o, "run=two", "cycles=2"])
    Trainer(cfg, base=mc.load_base("tiny-llama", device="cpu")).run()
    root = shards / "a/checkpoints/two"
    assert equivalent_checkpoint(variant_config(TINY, "all", o), ["two"]) == root / "cycle1-b3"
    lora_free = variant_config(TINY, "freeze-lora", o)
    assert equivalent_checkpoint(lora_free, ["two"]) == root / "cycle1-b2"
    # the thread count changes the arithmetic: "two" has no record of its threads
    assert equivalent_checkpoint(lora_free, ["two"], threads=1) is None
    assert equivalent_checkpoint(lora_free, ["tiny-abl-all"], threads=2) is None
    assert equivalent_checkpoint(lora_free, ["tiny-abl-all"], threads=1) is not None
    # any other change to a trained phase or a module breaks the match
    changed = variant_config(TINY, "all", [*o, "b1.lr=0.002"])
    assert equivalent_checkpoint(changed, ["two"]) is None
    changed = variant_config(TINY, "freeze-lora", [*o, "gistnet.width=48"])
    assert equivalent_checkpoint(changed, ["two"]) is None


def test_driver_json_and_table(ablation, shards, capsys):
    out, res = ablation
    assert list(res["variants"]) == list(VARIANTS)
    assert res["windows"]["ordinary"] == 2 and res["windows"]["long_range"] >= 1
    full = res["baselines"]["full"]
    for row in res["variants"].values():
        for s in ("ordinary", "long_range"):
            assert len(row["nll"][s]) == res["windows"][s]
            assert row["delta_full"][s] == pytest.approx(
                sum(row["nll"][s]) / len(row["nll"][s]) - sum(full[s]) / len(full[s])
            )
        assert row["eval_seconds"] > 0
    assert res["variants"]["all"]["drop"] == {"ordinary": 0.0, "long_range": 0.0}
    trained = [v for v in VARIANTS if v != "freeze-lora"]
    assert all(res["variants"][v]["train_seconds"] > 0 for v in trained)
    table = format_table(res)
    assert "| freeze-lensnet |" in table and "| full context |" in table and "reused" in table
    # rerunning resumes: nothing is trained or evaluated again, the same table
    before = out.read_text()
    args = [TINY, "--text-shards", str(shards / "text"), "--synthetic-shards"]
    args += [str(shards / "synth"), "--windows", "2", "--budget", "40", "--out", str(out)]
    for s in overrides(shards):
        args += ["--set", s]
    capsys.readouterr()
    assert main(args) == 0
    assert table in capsys.readouterr().out
    assert json.loads(before)["variants"] == json.loads(out.read_text())["variants"]
