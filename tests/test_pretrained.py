"""Pretrained memories (megacontext/pretrained.py): export from a trainer checkpoint,
read back checked, ``MegaContext.pretrained``, the errors (missing, truncated, altered,
another base, unknown name, size cap), ``$MEGACONTEXT_MEMORIES``, the CLI defaults and
the wheel's include rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import megacontext as mc
from megacontext import pretrained
from megacontext.base import Base
from megacontext.checkpoint import COMPLETE
from megacontext.cli import app
from megacontext.gistnet import GistNet
from megacontext.lensnet import LensNet
from megacontext.pretrained import (
    MAX_BYTES,
    available_memories,
    export_memory,
    memory_for_model,
    read_memory,
)

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()

MC_SECTION = {
    "block_size": 8,
    "levels": 2,
    "w_max": 40,
    "horizon": 8,
    "tau_expand": 0.1,
    "tau_collapse": 0.1,
    "cooldown_steps": 1,
    "min_residency": 1,
}


def write_checkpoint(path: Path, dim: int = 64, lora: bool = False) -> Path:
    """A complete trainer checkpoint directory in the layout megacontext.train writes
    (the files inference reads): GistNet, LensNet, config.yaml, trainer.json, COMPLETE."""
    path.mkdir(parents=True)
    GistNet(dim, block_size=8, width=32, depth=1, heads=2, seed=1).save(
        path / "gistnet.safetensors"
    )
    torch.manual_seed(2)
    LensNet(dim, d_lens=32, heads=2, head_hidden=32).save(path / "lensnet.safetensors")
    config = {
        "run": "tiny",
        "model": "tiny-llama",
        "device": None,
        "seed": 0,
        "runs_dir": "configs/runs",
        "megacontext": MC_SECTION,
        "data": {"kind": "random", "history": 192, "blocks": 2},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    state = {
        "done": 2,
        "global_step": 4,
        "early": {"best": None, "bad": 0, "stopped": False, "history": []},
        "plan": [["warm-gist", 0], ["warm-lens", 0], ["b1", 1]],
    }
    (path / "trainer.json").write_text(json.dumps(state))
    if lora:
        (path / "lora").mkdir()
    (path / COMPLETE).write_text("ok\n")
    return path


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "ckpt")


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    """An empty memories root in place of the package's."""
    r = tmp_path / "memories"
    r.mkdir()
    monkeypatch.setenv("MEGACONTEXT_MEMORIES", str(r))
    return r


@pytest.fixture
def exported(checkpoint, root, tiny_base) -> Path:
    return export_memory(checkpoint, root / "tiny", "tiny", base=tiny_base)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_export_then_read_gives_the_weights_after_the_cast(checkpoint, root, tiny_base, dtype):
    out = export_memory(checkpoint, root / "tiny", "tiny", base=tiny_base, dtype=dtype)
    mem = read_memory("tiny", base=tiny_base)
    assert mem.path == out
    for file, got in (("gistnet", mem.gistnet), ("lensnet", mem.lensnet)):
        cls = GistNet if file == "gistnet" else LensNet
        want = cls.load(checkpoint / f"{file}.safetensors")
        for k, v in _state(want).items():
            ref = v.to(dtype).to(v.dtype) if v.is_floating_point() else v
            assert torch.equal(got.state_dict()[k], ref), (file, k)
    with open(out / "memory.json") as fh:
        manifest = json.load(fh)
    assert manifest["format"] == "megacontext-memory" and manifest["version"] == 1
    assert manifest["dtype"] == str(dtype).removeprefix("torch.")
    assert manifest["base"]["name"] == "tiny-llama"
    assert manifest["base"]["hidden_size"] == 64 and manifest["base"]["num_layers"] == 2
    assert manifest["base"]["vocab_size"] == tiny_base.vocab_size
    # training-only fields (budget, horizon) stay behind; the policy's are carried
    assert "w_max" not in manifest["config"] and "horizon" not in manifest["config"]
    assert manifest["config"]["block_size"] == 8 and manifest["config"]["tau_expand"] == 0.1
    assert manifest["focus"] == "lensnet"
    prov = manifest["provenance"]
    assert prov["seed"] == 0 and prov["run"] == "tiny" and prov["data"] == "random"
    assert prov["config_file"] == "configs/runs/tiny.yaml"
    assert prov["phases"] == ["warm-gist@0", "warm-lens@0"] and prov["global_step"] == 4
    for name, facts in manifest["files"].items():
        assert (out / name).stat().st_size == facts["bytes"]
    card = (out / "MODEL_CARD.md").read_text()
    assert manifest["files"]["gistnet.safetensors"]["sha256"] in card


def test_pretrained_runs_a_session(exported, tiny_base):
    system = mc.MegaContext.pretrained("tiny", base=tiny_base, w_max=48)
    assert isinstance(system.gistnet, GistNet) and isinstance(system.lensnet, LensNet)
    assert system.config.block_size == 8 and system.config.tau_expand == 0.1
    assert system.config.w_max == 48  # a change over the memory's defaults
    session = system.session()
    session.ingest(torch.randint(0, 1000, (100,)))
    out = session.generate(8)
    assert isinstance(out, str)
    assert session.num_tokens >= 100
    assert session.wc.cost <= 48 + 8  # W_max + one decode block (the cache capacity)
    # the same from the directory
    assert mc.MegaContext.pretrained(exported, base=tiny_base).config.block_size == 8


def test_pretrained_loads_the_manifests_base(exported):
    system = mc.MegaContext.pretrained("tiny", device="cpu")
    assert system.base.name == "tiny-llama"


def test_pretrained_refuses_a_device_for_a_given_base(exported, tiny_base):
    with pytest.raises(mc.ConfigError, match="device and dtype apply to the base"):
        mc.MegaContext.pretrained("tiny", base=tiny_base, device="cpu")


def test_config_and_provenance_are_passed_through(checkpoint, root, tiny_base):
    out = export_memory(
        checkpoint,
        root / "tiny",
        "tiny",
        base=tiny_base,
        include_lensnet=False,
        config={"w_max": 64, "positions": "compact"},
        provenance={"command": "megacontext train configs/train-tiny.yaml", "split": "train"},
        evaluation="| method | dNLL |\n|---|---|\n| memory | 0.1 |",
    )
    mem = read_memory(out)
    assert mem.lensnet is None and mem.manifest.focus == "recency"
    assert mem.config["w_max"] == 64 and mem.config["positions"] == "compact"
    assert mem.manifest.provenance.command == "megacontext train configs/train-tiny.yaml"
    assert "| memory | 0.1 |" in (out / "MODEL_CARD.md").read_text()
    # a re-export keeps the card's evaluation unless a new one is given
    export_memory(checkpoint, out, "tiny", base=tiny_base)
    assert "| memory | 0.1 |" in (out / "MODEL_CARD.md").read_text()


def test_a_bad_config_field_is_refused_at_export(checkpoint, root, tiny_base):
    with pytest.raises(mc.ConfigError, match="positions") as exc:
        export_memory(checkpoint, root / "x", "x", base=tiny_base, config={"positions": "sideways"})
    assert exc.value.field == "config.positions"
    assert not (root / "x").exists()


# --------------------------------------------------------------------------- errors


def test_a_missing_file_is_named(exported, tiny_base):
    (exported / "lensnet.safetensors").unlink()
    with pytest.raises(mc.StorageError, match=r"lensnet\.safetensors: missing"):
        read_memory(exported, base=tiny_base)


def test_a_missing_manifest_is_named(exported):
    (exported / "memory.json").unlink()
    with pytest.raises(mc.StorageError, match=r"memory\.json: memory manifest not found"):
        read_memory(exported)


def test_a_truncated_file_is_named_with_its_size(exported):
    path = exported / "gistnet.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(
        mc.StorageError, match=rf"gistnet\.safetensors: truncated: {len(data) - 100} of {len(data)}"
    ):
        read_memory(exported)


def test_a_changed_byte_fails_the_checksum(exported):
    path = exported / "gistnet.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor: the file still parses
    path.write_bytes(bytes(data))
    GistNet.load(path)  # loads fine: only the checksum sees it
    with pytest.raises(mc.StorageError, match=r"gistnet\.safetensors: checksum mismatch"):
        read_memory(exported)


def test_another_base_model_is_named_with_both_values(exported, tiny_base):
    other = Base(model=tiny_base.model, tokenizer=tiny_base.tokenizer, name="other-llama")
    with pytest.raises(mc.ConfigError, match="base.name='tiny-llama'.*'other-llama'") as exc:
        read_memory(exported, base=other)
    assert exc.value.field == "base.name"
    with pytest.raises(mc.ConfigError, match="base.name"):
        mc.MegaContext.pretrained(exported, base=other)


@pytest.mark.parametrize(
    ("field", "value"),
    [("hidden_size", 128), ("vocab_size", 7), ("num_layers", 30), ("vocab_sha256", "0" * 64)],
)
def test_another_base_shape_is_named(exported, tiny_base, field, value):
    path = exported / "memory.json"
    manifest = json.loads(path.read_text())
    manifest["base"][field] = value
    path.write_text(json.dumps(manifest))
    with pytest.raises(mc.ConfigError, match=rf"base\.{field}={value!r}") as exc:
        read_memory(exported, base=tiny_base)
    assert exc.value.field == f"base.{field}"


def test_a_gistnet_of_another_width_than_the_manifest_is_refused(exported):
    path = exported / "memory.json"
    manifest = json.loads(path.read_text())
    manifest["base"]["hidden_size"] = 128
    path.write_text(json.dumps(manifest))
    with pytest.raises(mc.StorageError, match="dim 64 does not match.*base.hidden_size 128"):
        read_memory(exported)


def test_an_unknown_name_lists_the_available_ones(exported):
    with pytest.raises(mc.ConfigError, match=r"unknown memory 'nope'; available: tiny") as exc:
        read_memory("nope")
    assert exc.value.field == "name"


def test_a_missing_directory_is_a_storage_error(tmp_path):
    with pytest.raises(mc.StorageError, match="does not exist"):
        read_memory(tmp_path / "nowhere")


def test_a_newer_manifest_version_is_refused(exported):
    path = exported / "memory.json"
    manifest = json.loads(path.read_text())
    manifest["version"] = 2
    path.write_text(json.dumps(manifest))
    with pytest.raises(mc.StorageError, match="unsupported version 2") as exc:
        read_memory(exported)
    assert exc.value.field == "version"


def test_a_manifest_file_entry_outside_the_known_files_is_refused(exported):
    path = exported / "memory.json"
    manifest = json.loads(path.read_text())
    manifest["files"]["../../etc/passwd"] = manifest["files"]["gistnet.safetensors"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(mc.StorageError, match="unknown entries"):
        read_memory(exported)


def test_the_size_cap(checkpoint, root, tiny_base):
    assert MAX_BYTES == 24_000_000
    with pytest.raises(mc.ConfigError, match="more than the cap of 1,000") as exc:
        export_memory(checkpoint, root / "big", "big", base=tiny_base, max_bytes=1000)
    assert exc.value.field == "bytes"
    assert not (root / "big").exists() and list(root.iterdir()) == []


def test_export_never_replaces_a_users_directory(checkpoint, root, tiny_base):
    mine = root / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(mc.StorageError, match="not a memory export"):
        export_memory(checkpoint, mine, "mine", base=tiny_base)
    assert (mine / "notes.txt").read_text() == "keep me"
    # a previous export with a user's file in it is refused as well
    out = export_memory(checkpoint, root / "tiny", "tiny", base=tiny_base)
    (out / "notes.txt").write_text("keep me too")
    with pytest.raises(mc.StorageError, match="notes.txt"):
        export_memory(checkpoint, out, "tiny", base=tiny_base)
    export_memory(checkpoint, mine, "mine", base=tiny_base, force=True)
    assert not (mine / "notes.txt").exists() and read_memory(mine).manifest.name == "mine"


def test_a_checkpoint_with_lora_is_refused_unless_dropped(tmp_path, root, tiny_base):
    ckpt = write_checkpoint(tmp_path / "lora-ckpt", lora=True)
    with pytest.raises(mc.ConfigError, match="LoRA"):
        export_memory(ckpt, root / "x", "x", base=tiny_base)
    export_memory(ckpt, root / "x", "x", base=tiny_base, drop_lora=True)


def test_an_untrained_module_is_not_exported(checkpoint, root, tiny_base):
    state = json.loads((checkpoint / "trainer.json").read_text())
    state["done"] = 1  # warm-gist only: the LensNet is as initialised
    (checkpoint / "trainer.json").write_text(json.dumps(state))
    with pytest.raises(mc.ConfigError, match="no completed phase trained the lensnet") as exc:
        export_memory(checkpoint, root / "x", "x", base=tiny_base)
    assert exc.value.field == "lensnet"
    export_memory(checkpoint, root / "x", "x", base=tiny_base, include_lensnet=False)
    # a phase that ran 0 steps trained nothing
    config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    config["warm_gist"] = {"steps": 0}
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(mc.ConfigError, match="no completed phase trained the gistnet"):
        export_memory(checkpoint, root / "y", "y", base=tiny_base, include_lensnet=False)


def test_an_incomplete_checkpoint_is_refused(checkpoint, root, tiny_base):
    (checkpoint / COMPLETE).unlink()
    with pytest.raises(mc.StorageError, match="not a complete checkpoint"):
        export_memory(checkpoint, root / "x", "x", base=tiny_base)


# --------------------------------------------------------------------------- lookup


def test_available_memories_reads_the_env_root(exported, root, tmp_path, monkeypatch):
    assert available_memories() == ["tiny"]
    assert mc.available_memories() == ["tiny"]
    assert memory_for_model("tiny-llama") == "tiny"
    assert memory_for_model(" Tiny-Llama") == "tiny"  # as load_base reads built-in names
    assert memory_for_model("smollm2-135m") is None
    other = tmp_path / "empty-root"
    other.mkdir()
    monkeypatch.setenv("MEGACONTEXT_MEMORIES", str(other))
    assert available_memories() == [] and memory_for_model("tiny-llama") is None


def test_the_package_root_is_the_default(monkeypatch):
    monkeypatch.delenv("MEGACONTEXT_MEMORIES", raising=False)
    assert pretrained.memories_root() == ROOT / "megacontext" / "memories"


# --------------------------------------------------------------------------- CLI


def _run(*args: str):
    return runner.invoke(app, ["run", *args, "--model", "tiny-llama", "--max-new-tokens", "2"])


@pytest.fixture
def text(tmp_path) -> str:
    p = tmp_path / "t.txt"
    p.write_text("def add(a, b):\n    return a + b\n" * 20)
    return str(p)


@pytest.fixture
def systems(monkeypatch) -> list[tuple]:
    """``(gistnet, lensnet, config)`` of every ``mc.MegaContext`` built from now on."""
    seen: list[tuple] = []
    real = mc.MegaContext.__init__

    def spy(self, base, gistnet=None, lensnet=None, config=None, **kw):
        seen.append((gistnet, lensnet, config))
        real(self, base, gistnet, lensnet, config, **kw)

    monkeypatch.setattr(mc.MegaContext, "__init__", spy)
    return seen


def test_run_uses_the_shipped_memory_by_default(exported, text, systems):
    seen = systems
    result = _run(text)
    assert result.exit_code == 0, result.output
    assert "memory: tiny" in result.stderr
    gist, lens, cfg = seen[-1]
    assert isinstance(gist, GistNet) and isinstance(lens, LensNet) and cfg.tau_expand == 0.1
    result = _run(text, "--untrained")
    assert result.exit_code == 0, result.output
    assert "memory:" not in result.stderr
    assert seen[-1][0] is None and seen[-1][1] is None


def test_accept_measures_the_shipped_memory_by_default(exported, checkpoint, systems):
    seen = systems
    args = ["accept", "--model", "tiny-llama", "--w-max", "128", "--docs", "1"]
    args += ["--history", "320", "--new-tokens", "4", "--decode-blocks", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code in (0, 1), result.output  # a bar may pass or fail: both report
    gist, lens, cfg = seen[0]
    assert isinstance(gist, GistNet) and isinstance(lens, LensNet) and cfg.tau_expand == 0.1
    seen.clear()
    result = runner.invoke(app, [*args, "--untrained"])
    assert result.exit_code in (0, 1), result.output
    assert seen[0][0] is None and seen[0][1] is None and seen[0][2].tau_expand == 0.2
    gist = str(checkpoint / "gistnet.safetensors")
    result = runner.invoke(app, [*args, "--untrained", "--gistnet", gist])
    assert result.exit_code == 2 and "--untrained" in result.stderr


def test_eval_measures_the_shipped_memory_by_default(exported, checkpoint, systems, tmp_path):
    seen = systems
    args = ["eval", "needle", "--size", "tiny", "--model", "tiny-llama"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "memory: tiny" in result.stderr
    gist, lens, cfg = seen[0]
    assert isinstance(gist, GistNet) and isinstance(lens, LensNet) and cfg.tau_expand == 0.1
    seen.clear()
    result = runner.invoke(app, [*args, "--untrained", "--out", str(tmp_path / "u")])
    assert result.exit_code == 0, result.output
    assert "memory:" not in result.stderr
    gist, lens, cfg = seen[0]  # mean pooling and the seeded untrained LensNet
    assert gist is None and isinstance(lens, LensNet) and cfg.tau_expand == 0.2
    gist = str(checkpoint / "gistnet.safetensors")
    result = runner.invoke(app, [*args, "--untrained", "--gistnet", gist])
    assert result.exit_code == 2 and "--untrained" in result.stderr


def test_run_without_a_shipped_memory_is_untrained(root, text, systems):
    seen = systems
    result = _run(text)
    assert result.exit_code == 0, result.output
    assert [c[:2] for c in seen] == [(None, None)] and "memory:" not in result.stderr


def test_explicit_weights_override_the_memory(exported, checkpoint, text, tmp_path, systems):
    seen = systems
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"block_size": 8, "w_max": 64}))
    gist = str(checkpoint / "gistnet.safetensors")
    result = _run(text, "--gistnet", gist, "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "memory:" not in result.stderr
    gist_used, lens_used, cfg = seen[-1]
    assert isinstance(gist_used, GistNet) and lens_used is None
    assert cfg.tau_expand == 0.2  # the design default: nothing of the memory's
    # --config's fields win over the memory's defaults, the rest come from the memory
    result = _run(text, "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "memory: tiny" in result.stderr
    gist_used, lens_used, cfg = seen[-1]
    assert isinstance(lens_used, LensNet) and cfg.w_max == 64 and cfg.tau_expand == 0.1


@pytest.mark.parametrize("extra", [["--gistnet", "G"], ["--lensnet", "L"], ["--checkpoint", "C"]])
@pytest.mark.parametrize("command", ["run", "chat"])
def test_untrained_conflicts_with_explicit_weights(exported, checkpoint, text, extra, command):
    value = {
        "G": str(checkpoint / "gistnet.safetensors"),
        "L": str(checkpoint / "lensnet.safetensors"),
        "C": str(checkpoint),
    }[extra[1]]
    args = [command, text, "--model", "tiny-llama", "--untrained", extra[0], value]
    result = runner.invoke(app, args, input="")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--untrained" in lines[0] and extra[0] in lines[0]


def test_run_reads_a_checkpoint(tmp_path, text, root):
    ckpt = write_checkpoint(tmp_path / "c2")
    result = _run(text, "--checkpoint", str(ckpt))
    assert result.exit_code == 0, result.output


def test_a_broken_shipped_memory_is_an_error_not_a_silent_fallback(exported, text):
    (exported / "gistnet.safetensors").write_bytes(b"x")
    result = _run(text)
    assert result.exit_code == 2
    assert "gistnet.safetensors" in result.stderr and "truncated" in result.stderr


def test_export_memory_command(checkpoint, root, tiny_base):
    result = runner.invoke(
        app,
        [
            "export-memory",
            str(checkpoint),
            "--name",
            "cli",
            "--dtype",
            "bf16",
            "--no-lensnet",
            "--default",
            "w_max=64",
            "--provenance",
            "command=megacontext train configs/train-tiny.yaml",
        ],
    )
    assert result.exit_code == 0, result.output
    mem = read_memory("cli", base=tiny_base)
    assert mem.manifest.dtype == "bfloat16" and mem.lensnet is None
    assert mem.config["w_max"] == 64
    assert mem.manifest.provenance.command == "megacontext train configs/train-tiny.yaml"
    again = runner.invoke(app, ["export-memory", str(checkpoint), "--name", "Bad Name"])
    assert again.exit_code == 2 and again.stderr.startswith("error:")


# --------------------------------------------------------------------------- packaging


def test_the_wheel_carries_the_memories():
    """scikit-build-core puts every file under megacontext/ into the wheel unless a
    wheel.exclude or a .gitignore rule drops it (checked with `uv build --wheel`, see
    docs/pretrained.md); no rule may drop a memory's files."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(ROOT / "pyproject.toml", "rb") as fh:
        sk = tomllib.load(fh)["tool"]["scikit-build"]
    assert "megacontext" in sk["wheel"]["packages"]
    files = [
        "megacontext/memories/smollm2-135m/memory.json",
        "megacontext/memories/smollm2-135m/gistnet.safetensors",
        "megacontext/memories/smollm2-135m/lensnet.safetensors",
        "megacontext/memories/smollm2-135m/MODEL_CARD.md",
    ]
    rules = list(sk["wheel"].get("exclude", [])) + list(sk.get("sdist", {}).get("exclude", []))
    ignore = [
        line.strip()
        for line in (ROOT / ".gitignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for f in files:
        for rule in rules:
            assert not fnmatch.fnmatch(f, rule), (f, rule)
        for rule in ignore:
            name = rule.strip("/")
            parts = f.split("/")
            assert not any(fnmatch.fnmatch(p, name) for p in parts), (f, rule)
    assert (ROOT / "megacontext" / "memories" / "README.md").is_file()


def test_export_from_a_real_trainer_checkpoint(tiny_base, root, tmp_path):
    """The trainer's own checkpoint (configs/train-tiny.yaml, warm start only) exports
    and runs: the layout read here is the one megacontext.train writes."""
    import copy

    from megacontext.train import Trainer, load_train_config
    from megacontext.train.checkpoint import latest_checkpoint

    cfg = load_train_config(
        "configs/train-tiny.yaml",
        [
            f"artifacts={tmp_path}/artifacts",
            f"runs_dir={tmp_path}/runs",
            "cycles=0",
            "batch_size=1",
            "warm_gist.steps=1",
            "warm_lens.steps=1",
            "early_stop.enabled=false",
        ],
    )
    base = Base(copy.deepcopy(tiny_base.model), tiny_base.tokenizer, "tiny-llama")
    Trainer(cfg, base=base).run()
    ckpt = latest_checkpoint(tmp_path / "artifacts" / "checkpoints" / "tiny")
    lora = (ckpt / "lora").is_dir()
    out = export_memory(ckpt, root / "trained", "trained", base=tiny_base, drop_lora=lora)
    mem = read_memory("trained", base=tiny_base)
    assert mem.manifest.provenance.phases == ["warm-gist@0", "warm-lens@0"]
    assert mem.manifest.provenance.config_file == f"{tmp_path}/runs/tiny.yaml"
    assert mem.config["block_size"] == 8 and "w_max" not in mem.config
    session = mc.MegaContext.pretrained(out, base=tiny_base).session()
    session.ingest(torch.randint(0, 1000, (80,)))
    assert isinstance(session.generate(2), str)


def test_fitting_budget_lowers_only_what_does_not_fit():
    from types import SimpleNamespace

    from megacontext.focus import fitting_budget

    base = SimpleNamespace(max_positions=1000, name="fake")
    cfg = mc.MegaContextConfig(model="fake", w_max=8192, block_size=32, horizon=64)
    assert fitting_budget(cfg, base) == (1000 - 32 - 64) // 32 * 32 == 896
    assert fitting_budget(cfg.replace(w_max=512), base) == 512
    assert fitting_budget(cfg.replace(positions="global"), base) == 8192
    assert fitting_budget(cfg, SimpleNamespace(max_positions=0)) == 8192  # bound unknown


def test_the_shipped_memory_loads_with_its_default_budget(smollm2_base):
    """The design's default w_max (8,192) does not fit SmolLM2's 8,192 positions under
    the bounded default scheme; `pretrained()` picks the largest budget that does, and
    keeps one the caller gives."""
    if "smollm2-135m" not in mc.available_memories():
        pytest.skip("no smollm2-135m memory in this memories folder")
    system = mc.MegaContext.pretrained("smollm2-135m", base=smollm2_base)
    assert system.config.w_max == 8096 and system.gistnet is not None
    system.session()  # a session's budget check passes
    assert (
        mc.MegaContext.pretrained("smollm2-135m", base=smollm2_base, w_max=512).config.w_max == 512
    )
