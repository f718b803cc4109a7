"""The trainer: differentiable WC forward, on-policy rollouts, phases with frozen
modules, checkpoints, resume = uninterrupted, telemetry, the tiny end-to-end run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import megacontext as mc
from megacontext.base import Base
from megacontext.lora import LoraConfig, inject_lora, lora_parameters, lora_targets
from megacontext.telemetry import read_run
from megacontext.train import Trainer, load_train_config
from megacontext.train.checkpoint import (
    COMPLETE,
    latest_checkpoint,
    load_checkpoint,
    write_checkpoint,
)
from megacontext.train.forward import forward_rows, full_context_logp, wc_embeddings, wc_positions
from megacontext.train.labels import module_hash
from megacontext.train.phases import boundary_weights, lora_loss
from megacontext.train.rollout import rollout
from megacontext.train.trainer import cosine_lambda

TINY = "configs/train-tiny.yaml"
FAST = [
    "batch_size=1",
    "grad_accum=2",
    "label_windows=1",
    "early_stop.windows=1",
    "labels.max_candidates=8",
    "warm_gist.steps=1",
    "warm_lens.steps=1",
    "b1.steps=2",
    "b2.steps=2",
    "b3.steps=1",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # module scope: set before the module-scoped runs below (results depend on the
    # thread count through summation order; tiny matmuls gain nothing from threads)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fresh_base(tiny_base) -> Base:
    """A private copy: the trainer injects LoRA into its base in place."""
    return Base(
        model=copy.deepcopy(tiny_base.model), tokenizer=tiny_base.tokenizer, name="tiny-llama"
    )


def config(tmp_path, *extra):
    return load_train_config(
        TINY, [f"artifacts={tmp_path}/artifacts", f"runs_dir={tmp_path}/runs", *FAST, *extra]
    )


def state(trainer) -> dict[str, str]:
    lora = {n: p for n, p in trainer.base.model.named_parameters() if "lora_" in n}
    return {
        "gistnet": module_hash(trainer.gistnet),
        "lensnet": module_hash(trainer.lensnet),
        "lora": module_hash(lora),
        "base": module_hash(
            {n: p for n, p in trainer.base.model.named_parameters() if "lora_" not in n}
        ),
    }


# ------------------------------------------------------------------ forward


def _global(bs: int) -> mc.MegaContextConfig:
    """A config whose positions are the seed's global ones (what these tests assert)."""
    return mc.MegaContextConfig(block_size=bs, positions="global")


def test_online_gists_get_gradients_at_both_levels(tiny_base):
    bs = 8
    g = mc.GistNet(tiny_base.dim, block_size=bs, width=32, depth=1, heads=2, seed=0)
    tokens = torch.randint(0, 1000, (140,), generator=torch.Generator().manual_seed(0))
    # untrained GistNet = mean pooling: the LOD1 entries equal the mean token embedding
    with torch.no_grad():
        emb0 = wc_embeddings(tiny_base, tokens, torch.tensor([1]), torch.tensor([8]), bs, gists=g)
    torch.testing.assert_close(
        emb0[0], tiny_base.embed(tokens[64:72]).mean(0), atol=1e-5, rtol=1e-5
    )
    with torch.no_grad():  # a non-zero read-out so gradients reach every weight
        g.cores[0].out_proj.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    # LOD2 node 0 (tokens 0..63), LOD1 nodes 8..15 (64..127), tokens 128..131
    levels = torch.tensor([2] + [1] * 8 + [0] * 4)
    nodes = torch.tensor([0, *range(8, 16), *range(128, 132)])
    emb = wc_embeddings(tiny_base, tokens, levels, nodes, bs, gists=g)
    logp = forward_rows(
        tiny_base, [(emb, wc_positions(levels, nodes, _global(bs))[0])], [tokens[132:140]], [132]
    )
    loss = -logp[0].gather(-1, tokens[132:140, None]).mean()
    loss.backward()
    core = g.cores[0]
    assert core.in_proj.weight.grad is not None and core.in_proj.weight.grad.abs().sum() > 0
    assert g.level_embed.grad[0].abs().sum() > 0
    assert g.level_embed.grad[1].abs().sum() > 0  # the LOD2 entry reached level 2


def test_forward_rows_padding_equals_single_rows(tiny_base):
    tokens = torch.randint(0, 1000, (80,), generator=torch.Generator().manual_seed(1))
    rows, tgts = [], []
    for n in (20, 33, 50):
        lv, nd = torch.zeros(n, dtype=torch.long), torch.arange(60 - n, 60)
        rows.append(
            (wc_embeddings(tiny_base, tokens, lv, nd, 8), wc_positions(lv, nd, _global(8))[0])
        )
        tgts.append(tokens[60:68])
    with torch.no_grad():
        batched = forward_rows(tiny_base, rows, tgts, [60] * 3)
        for r in range(3):
            single = forward_rows(tiny_base, [rows[r]], [tgts[r]], [60])[0]
            torch.testing.assert_close(batched[r], single, atol=1e-5, rtol=1e-5)
        # the WC holding every token is the full-context model
        full = full_context_logp(tiny_base, tokens, 60, 8)
        lv, nd = torch.zeros(60, dtype=torch.long), torch.arange(60)
        row = (wc_embeddings(tiny_base, tokens, lv, nd, 8), wc_positions(lv, nd, _global(8))[0])
        torch.testing.assert_close(
            forward_rows(tiny_base, [row], [tokens[60:68]], [60])[0], full, atol=1e-4, rtol=1e-4
        )


def test_rollout_is_on_policy(tiny_base):
    """The rollout's WCs equal those of a real Session fed the same tokens."""
    cfg = mc.MegaContextConfig(
        model="tiny-llama",
        block_size=8,
        levels=2,
        w_max=40,
        horizon=8,
        tau_expand=0.0,
        tau_collapse=0.0,
        cooldown_steps=0,
        min_residency=0,
    )
    g = mc.GistNet(tiny_base.dim, block_size=8, width=32, depth=1, heads=2, seed=1)
    torch.manual_seed(0)
    lens = mc.LensNet(tiny_base.dim, d_lens=32, heads=2)
    w = torch.randint(0, 1000, (160 + 3 * 8 + 8,), generator=torch.Generator().manual_seed(2))
    _, snaps = rollout(tiny_base, g, lens, cfg, w, 160, 3, 8)
    assert sum(s.n_collapse + s.n_expand for s in snaps) > 0
    session = mc.MegaContext(tiny_base, g, lens, cfg, allocator_backend="python").session()
    session.ingest(w[:160])
    for i, s in enumerate(snaps):
        session.feed(w[160 + 8 * i : 168 + 8 * i])
        assert torch.equal(session.wc.levels.long(), s.levels.long())
        assert torch.equal(session.wc.nodes.long(), s.nodes.long())
        assert torch.equal(s.targets, w[s.cursor : s.cursor + 8])


def test_lora_placement_and_gradients(tiny_base):
    base = fresh_base(tiny_base)
    names = lora_targets(base.model, "last", True)
    assert names[0] == "model.embed_tokens" and all(
        ".layers.1." in n or ".layers.0." in n for n in names[1:]
    )
    n = base.config.num_hidden_layers
    assert {f"model.layers.{n - 1}.self_attn.q_proj"} <= set(names)
    before = base.model(input_ids=torch.arange(10)[None]).logits
    inject_lora(base.model, LoraConfig(r=4, lora_blocks="first"))
    torch.testing.assert_close(base.model(input_ids=torch.arange(10)[None]).logits, before)  # B = 0
    params = lora_parameters(base.model)
    assert params and not any(p.requires_grad for p in base.model.parameters())
    for p in params:
        p.requires_grad_(True)
    cfg = mc.MegaContextConfig(model="tiny-llama", block_size=8, levels=2, w_max=40, horizon=8)
    w = torch.randint(0, 1000, (96 + 8 + 8,), generator=torch.Generator().manual_seed(3))
    tree, snaps = rollout(base, None, None, cfg, w, 96, 1, 8)
    loss, stats = lora_loss(base, tree, w, snaps[0], cfg, keepalive_weight=0.1)
    loss.backward()
    assert "keepalive" in stats
    named = dict(base.model.named_parameters())
    assert any(
        named[k].grad is not None and named[k].grad.abs().sum() > 0 for k in named if "lora_B" in k
    )
    assert all(p.grad is None for k, p in named.items() if "lora_" not in k)


def test_boundary_weights():
    w = boundary_weights(cursor=6, horizon=6, bs=8, weight=2.0, width=1)
    # positions 6..11: offsets 6,7,0,1,2,3 -> edges at 7 and 0
    assert w.tolist() == [1.0, 3.0, 3.0, 1.0, 1.0, 1.0]


def test_cosine_schedule():
    f = cosine_lambda(warmup=2, total=10, floor=0.1)
    assert [round(f(s), 4) for s in (0, 1)] == [0.5, 1.0]
    assert (
        f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    )
    assert f(6) == pytest.approx(0.55)


# ------------------------------------------------------------------ config


def test_config_overrides_and_errors(tmp_path):
    cfg = config(tmp_path, "lora.lora_blocks=first", "megacontext.w_max=48")
    assert cfg.lora.lora_blocks == "first" and cfg.mc_config().w_max == 48
    assert cfg.window_length == 192 + 2 * 8 + 8
    with pytest.raises(mc.ConfigError, match="lora_blocks"):
        config(tmp_path, "lora.lora_blocks=both")
    with pytest.raises(mc.ConfigError, match="history"):
        config(tmp_path, "data.history=100")
    with pytest.raises(mc.ConfigError, match="not key=value"):
        config(tmp_path, "cycles")
    with pytest.raises(mc.ConfigError, match="w_max"):
        config(tmp_path, "megacontext.w_max=3")
    with pytest.raises(mc.ConfigError, match="budgets"):
        config(tmp_path, "early_stop.budgets=[8, 40]")


def test_init_gistnet_starts_from_the_file_and_checks_it(tiny_base, tmp_path):
    """``init_gistnet``: the run's GistNet starts as the file's (an fp16 file, as a
    shipped memory's, trained in fp32), then trains; a file for another block size or
    width is a ConfigError naming it; ``gistnet:`` fields beside it are refused."""
    base_cfg = config(tmp_path)
    src = mc.GistNet(tiny_base.dim, block_size=8, levels=2, seed=7, width=32, depth=1, heads=2)
    path = src.half().save(tmp_path / "g.safetensors")
    trainer = Trainer(
        config(tmp_path, f"init_gistnet={path}", "gistnet={}", "cycles=0", "warm_lens.steps=0"),
        base=fresh_base(tiny_base),
    )
    assert trainer.gistnet.config == src.config
    assert all(p.dtype == torch.float32 for p in trainer.gistnet.parameters())
    assert module_hash(trainer.gistnet) == module_hash(src.float())
    trainer.run()
    assert module_hash(trainer.gistnet) != module_hash(src.float())
    with pytest.raises(mc.ConfigError, match="gistnet"):
        config(tmp_path, f"init_gistnet={path}")  # train-tiny.yaml sets gistnet: fields
    for name, other in (
        ("block_size", mc.GistNet(tiny_base.dim, block_size=16, levels=2, width=32, heads=2)),
        ("dim", mc.GistNet(tiny_base.dim * 2, block_size=8, levels=2, width=32, heads=2)),
        ("levels", mc.GistNet(tiny_base.dim, block_size=8, levels=1, width=32, heads=2)),
    ):
        wrong = other.save(tmp_path / f"{name}.safetensors")
        with pytest.raises(mc.ConfigError, match=name) as e:
            Trainer(config(tmp_path, f"init_gistnet={wrong}", "gistnet={}"), base=tiny_base)
        assert str(wrong) in str(e.value)
    assert base_cfg.init_gistnet is None


def test_checkpoint_write_is_atomic(tmp_path):
    def bad(d):
        (d / "x").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_checkpoint(tmp_path / "cycle1-b1", bad)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "cycle1-b2").mkdir()  # a directory without COMPLETE is ignored
    assert latest_checkpoint(tmp_path) is None


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def uninterrupted(tiny_base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    states = []
    trainer = Trainer(
        config(tmp),
        base=fresh_base(tiny_base),
        hooks=[lambda t, phase, cycle: states.append((phase, state(t)))],
    )
    before = state(trainer)
    result = trainer.run()
    return tmp, trainer, result, before, states


def test_tiny_end_to_end(uninterrupted):
    tmp, _trainer, result, before, states = uninterrupted
    assert result["done"] == 5 and not result["stopped"]
    root = tmp / "artifacts"
    for name in ("cycle0-warm-gist", "cycle0-warm-lens", "cycle1-b1", "cycle1-b2", "cycle1-b3"):
        d = root / "checkpoints" / "tiny" / name
        assert (d / COMPLETE).is_file() and (d / "gistnet.safetensors").is_file()
        assert (d / "lora" / "adapter_model.safetensors").is_file()
        assert (d / "lora" / "adapter_config.json").is_file()
    labels = sorted(p.name for p in (root / "deltas" / "tiny").glob("*.parquet"))
    assert labels == ["cycle0-warm-lens.parquet", "cycle1-b2.parquet"]
    t = pq.read_table(root / "deltas" / "tiny" / "cycle1-b2.parquet")
    assert set(t.column("kind").to_pylist()) <= {"expand", "collapse"} and t.num_rows > 0
    assert (tmp / "runs" / "tiny.yaml").is_file()
    iters, actions = (t.to_pylist() for t in read_run(root / "telemetry" / "tiny"))
    assert actions and all(a["kind"] in ("expand", "collapse") for a in actions)
    assert all(a["residency"] is not None and a["residency"] >= 0 for a in actions)
    assert any(
        r.get("swap_rate") is not None and r.get("mean_residency") is not None for r in iters
    )
    steps = [r for r in iters if r.get("grad_norm") is not None]
    assert len(steps) == 1 + 1 + 2 + 2 + 1
    assert all(r["lr"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in steps)
    assert any(r.get("val_loss_at_h_40") is not None for r in iters)
    # the label phases' progress: one row per window (warm-lens, then b2), in order
    prog = [r for r in iters if r.get("label_window") is not None]
    assert [(r["phase_index"], r["label_window"], r["label_windows"]) for r in prog] == [
        (1.0, 1.0, 1.0),
        (3.0, 1.0, 1.0),
    ]
    assert all(r["label_elapsed_s"] > 0 and r["label_eta_s"] == 0 for r in prog)
    assert prog[0]["label_rows"] > 0
    # every trained module moved in its phase
    assert states[-1][1]["gistnet"] != before["gistnet"]
    assert states[-1][1]["lensnet"] != before["lensnet"]
    assert states[-1][1]["lora"] != before["lora"]


def test_frozen_modules_bit_identical(uninterrupted):
    _, _, _, before, states = uninterrupted
    prev = before
    trained = {
        "warm-gist": "gistnet",
        "warm-lens": "lensnet",
        "b1": "gistnet",
        "b2": "lensnet",
        "b3": "lora",
    }
    for phase, now in states:
        for module in ("gistnet", "lensnet", "lora", "base"):
            if module != trained[phase]:
                assert now[module] == prev[module], f"{module} changed during {phase}"
        prev = now


def test_resume_equals_uninterrupted(uninterrupted, tiny_base, tmp_path):
    _, _, _, _, states = uninterrupted

    class Killed(Exception):
        pass

    def kill(t, phase, cycle):
        if phase == "b1":
            raise Killed

    with pytest.raises(Killed):
        Trainer(config(tmp_path), base=fresh_base(tiny_base), hooks=[kill]).run()
    ckpts = tmp_path / "artifacts" / "checkpoints" / "tiny"
    assert latest_checkpoint(ckpts).name == "cycle1-b1"
    resumed = Trainer(config(tmp_path), base=fresh_base(tiny_base))
    result = resumed.run(resume=True)
    assert result["done"] == 5
    assert state(resumed) == states[-1][1]
    meta = json.loads((ckpts / "cycle1-b3" / "trainer.json").read_text())
    assert meta["gistnet_hash"] == states[-1][1]["gistnet"]


class _Poison:
    """Unpickling this creates ``path``: proof that a pickle from the checkpoint ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_never_unpickles(uninterrupted, tiny_base, tmp_path):
    import shutil

    src = uninterrupted[0] / "artifacts" / "checkpoints" / "tiny" / "cycle1-b1"
    ckpts = tmp_path / "artifacts" / "checkpoints" / "tiny"
    marker = tmp_path / "pwned"
    # a poisoned rng.pt beside a valid pickle-free state: ignored, the run resumes
    shutil.copytree(src, ckpts / "cycle1-b1")
    torch.save(_Poison(marker), ckpts / "cycle1-b1" / "rng.pt")
    trainer = Trainer(config(tmp_path), base=fresh_base(tiny_base))
    trainer.load_state(ckpts / "cycle1-b1")
    assert not marker.exists() and trainer.done == 3
    # a checkpoint whose only RNG state is a pickle (an older format, or an attacker's)
    (ckpts / "cycle1-b1" / "rng.safetensors").unlink()
    before = state(trainer)
    with pytest.raises(mc.StorageError, match="rng.pt") as err:
        trainer.load_state(ckpts / "cycle1-b1")
    assert err.value.field == "rng" and not marker.exists()
    assert state(trainer) == before  # refused before any weight was touched


def test_rng_state_round_trip_without_pickle(tmp_path):
    import random

    import numpy as np

    from megacontext.train.checkpoint import load_rng_state, save_rng_state

    torch.manual_seed(5), np.random.seed(6), random.seed(7)
    random.gauss(0, 1), np.random.standard_normal()  # cached Gaussians in both states
    save_rng_state(tmp_path)
    want = (torch.rand(3), np.random.standard_normal(3), random.gauss(0, 1), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    from megacontext.train.checkpoint import set_rng_state

    set_rng_state(load_rng_state(tmp_path))
    got = (torch.rand(3), np.random.standard_normal(3), random.gauss(0, 1), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1])
    assert want[2:] == got[2:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rng.json", "rng.safetensors"]
    (tmp_path / "rng.json").write_text('{"numpy": 3}')
    with pytest.raises(mc.StorageError, match="rng.json"):
        load_rng_state(tmp_path)
    (tmp_path / "rng.safetensors").write_bytes(b"garbage")
    with pytest.raises(mc.StorageError, match="rng.safetensors"):
        load_rng_state(tmp_path)


def test_load_checkpoint_for_inference(uninterrupted, tiny_base):
    tmp, trainer, *_ = uninterrupted
    path = tmp / "artifacts" / "checkpoints" / "tiny" / "cycle1-b3"
    system = load_checkpoint(path, base=fresh_base(tiny_base))
    assert module_hash(system.gistnet) == module_hash(trainer.gistnet)
    assert module_hash(system.lensnet) == module_hash(trainer.lensnet)
    lora = {n: p for n, p in system.base.model.named_parameters() if "lora_" in n}
    assert module_hash(lora) == state(trainer)["lora"]
    session = system.session()
    session.ingest(torch.arange(100, 300))
    assert session.wc.cost <= system.config.w_max
    with pytest.raises(mc.StorageError, match="not a complete checkpoint"):
        load_checkpoint(tmp, base=fresh_base(tiny_base))
    same = mc.MegaContext.from_checkpoint(path, base=fresh_base(tiny_base))
    assert module_hash(same.lensnet) == module_hash(trainer.lensnet)


# ------------------------------------------------------------------ CLI and tools


def test_cli_train_and_label_tool(tmp_path, capsys):
    """`megacontext train` and `python -m tools.label_dnll` end to end (in process)."""
    from typer.testing import CliRunner

    from megacontext.cli import app
    from tools.label_dnll import main as label_main

    sets = [f"artifacts={tmp_path}/a", f"runs_dir={tmp_path}/runs", *FAST, "cycles=0"]
    args = ["train", TINY]
    for s in sets:
        args += ["--set", s]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "finished after 2 phases" in out.output
    ckpt = tmp_path / "a" / "checkpoints" / "tiny" / "cycle0-warm-lens"
    assert (ckpt / COMPLETE).is_file()
    bad = CliRunner().invoke(app, [*args, "--set", "lora.lora_blocks=both"])
    assert bad.exit_code == 2 and "lora_blocks" in bad.stderr  # one line, no traceback
    largs = [TINY, "--checkpoint", str(ckpt), "--cycle", "3"]
    for s in sets:
        largs += ["--set", s]
    assert label_main(largs) == 0
    assert "cycle3-label.parquet" in capsys.readouterr().out
    table = pq.read_table(tmp_path / "a" / "deltas" / "tiny" / "cycle3-label.parquet")
    assert set(table.column("cycle").to_pylist()) == {3}
    want = json.loads((ckpt / "trainer.json").read_text())["lensnet_hash"]
    assert table.column("lensnet_hash")[0].as_py() == want
    assert label_main([TINY, "--set", "data.history=100"]) == 2


def test_early_stop_rule(tiny_base, tmp_path):
    zero = [f"{p}.steps=0" for p in ("warm_gist", "warm_lens", "b1", "b2", "b3")]
    cfg = config(tmp_path, *zero, "cycles=3", "early_stop.every=phase", "early_stop.patience=2")
    trainer = Trainer(cfg, base=fresh_base(tiny_base))
    losses = iter([3.0, 2.0, 2.5, 2.0, 1.0])  # best 2.0, then two evaluations without gain
    trainer.evaluate = lambda: {40: next(losses)}
    result = trainer.run()
    assert result["stopped"] and result["done"] == 4
    assert [h["loss"] for h in result["early"]["history"]] == [3.0, 2.0, 2.5, 2.0]
    assert result["checkpoint"].name == "cycle1-b2"
    # resuming a stopped run does nothing more
    again = Trainer(cfg, base=fresh_base(tiny_base))
    assert again.run(resume=True)["done"] == 4


def test_demo_reports_every_stage(tiny_base, tmp_path, capsys):
    """The CPU demonstration's driver on tiny data: every stage is measured."""
    import sysconfig

    from megacontext import synthetic
    from megacontext.cli import run_alias
    from megacontext.data import build_shards

    def demo_main(argv: list[str]) -> int:  # `megacontext demo train` (was train.demo.main)
        return run_alias(["demo", "train"], argv)

    tok = tiny_base.tokenizer
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    topics = (stdlib / "pydoc_data" / "topics.py").read_text(encoding="utf-8")[:40000]
    (tmp_path / "src").mkdir()
    for i in range(10):  # ten documents of real prose, half of them held out
        (tmp_path / "src" / f"d{i}.txt").write_text(topics[i * 4000 : (i + 1) * 4000])
    build_shards(
        [tmp_path / "src"],
        tmp_path / "text",
        tokenizer=tok,
        model_name="tiny-llama",
        val_fraction=0.5,
        progress=False,
    )
    tasks = synthetic.generate_tasks(tok, 8, length=256, tasks=("passkey",), depths=[0.4], seed=1)
    synthetic.write_synthetic_shards(
        tmp_path / "synth", tasks, tokenizer=tok, model_name="tiny-llama", val_fraction=0.5
    )
    out = tmp_path / "demo.json"
    sets = [
        f"artifacts={tmp_path}/a",
        f"runs_dir={tmp_path}/runs",
        *FAST,
        "early_stop.enabled=false",
    ]
    args = [
        TINY,
        "--text-shards",
        str(tmp_path / "text"),
        "--synthetic-shards",
        str(tmp_path / "synth"),
        "--windows",
        "2",
        "--budget",
        "40",
        "--out",
        str(out),
    ]
    for s in sets:
        args += ["--set", s]
    assert demo_main(args) == 0
    res = json.loads(out.read_text())
    assert list(res["stages"]) == ["full", "truncation", "untrained", "warm start", "cycle 1"]
    assert res["windows"]["ordinary"] == 2 and res["windows"]["long_range"] >= 1
    assert all(v > 0 for row in res["stages"].values() for v in row.values())
    assert "| cycle 1 |" in capsys.readouterr().out


def _reads_overrides() -> dict[str, object]:
    return {
        "cycles": 0,
        "warm_gist.steps": 0,
        "warm_lens.steps": 2,
        "label_windows": 2,
        "labels.kind": "reads",
        "labels.top_blocks": 2,
        "labels.random_blocks": 2,
        "lensnet.relevance_buckets": 8,
        "lens_loss.budget_weight": 0.0,
    }


def test_a_retrieval_lensnet_trains_on_read_labels(tiny_base, tmp_path):
    """``labels.kind: reads`` with a LensNet that reads the relevance input: the
    warm-lens phase labels block reads (Parquet ``kind == 'read'``, each pointing at
    the gist that covers its block), trains on them and moves the relevance table."""
    cfg = config(tmp_path, *[f"{k}={v}" for k, v in _reads_overrides().items()])
    trainer = Trainer(cfg, base=fresh_base(tiny_base))
    before = trainer.lensnet.relevance_emb.weight.detach().clone()
    trainer.run()
    rows = pq.read_table(tmp_path / "artifacts" / "deltas" / "tiny" / "cycle0-warm-lens.parquet")
    rows = rows.to_pylist()
    assert 2 <= len(rows) <= 2 * 2 * 4  # windows x snapshots x (top + random)
    assert {r["kind"] for r in rows} == {"read"}
    assert all(r["level"] >= 1 for r in rows)
    assert not torch.equal(trainer.lensnet.relevance_emb.weight.detach(), before)
    # labels.reuse: a second run reads the first run's labels, and trains the same
    first = tmp_path / "artifacts" / "deltas" / "tiny" / "cycle0-warm-lens.parquet"
    again = Trainer(
        config(
            tmp_path / "again",
            *[f"{k}={v}" for k, v in _reads_overrides().items()],
            f"labels.reuse={first}",
        ),
        base=fresh_base(tiny_base),
    )
    again.run()
    assert module_hash(again.lensnet) == module_hash(trainer.lensnet)
    other = mc.GistNet(tiny_base.dim, block_size=8, levels=2, seed=99, width=32, depth=1, heads=2)
    wrong = Trainer(
        config(
            tmp_path / "wrong",
            *[f"{k}={v}" for k, v in _reads_overrides().items()],
            f"labels.reuse={first}",
        ),
        base=fresh_base(tiny_base),
    )
    wrong.gistnet.load_state_dict(other.state_dict())
    with pytest.raises(mc.ConfigError, match="labels.reuse") as e:
        wrong.run()
    assert e.value.field == "labels.reuse"
    # labels of other windows at the same cursors: caught by the snapshot's Loss@H
    table = pq.read_table(first).to_pylist()
    for r in table:
        r["nll_snapshot"] += 0.5
    tampered = tmp_path / "tampered.parquet"
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(first)), tampered)
    shifted = Trainer(
        config(
            tmp_path / "shifted",
            *[f"{k}={v}" for k, v in _reads_overrides().items()],
            f"labels.reuse={tampered}",
        ),
        base=fresh_base(tiny_base),
    )
    with pytest.raises(mc.ConfigError, match="Loss@H") as e:
        shifted.run()
    assert e.value.field == "labels.reuse"
    saved = mc.LensNet.load(
        tmp_path / "artifacts" / "checkpoints" / "tiny" / "cycle0-warm-lens" / "lensnet.safetensors"
    )
    assert saved.config.relevance_buckets == 8
