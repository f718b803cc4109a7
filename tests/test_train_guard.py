"""Checkpoints refuse what would mix runs or read outside themselves (issue 17, items
8, 10, 11): a resume from another run's config, a changed architecture, links out of
the checkpoint, a trainer.json or megacontext_lora.json with bad fields."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import megacontext as mc
from megacontext.base import Base
from megacontext.lora import read_lora_config
from megacontext.train import Trainer, load_train_config
from megacontext.train.checkpoint import (
    RESUME_FREE_FIELDS,
    check_links,
    latest_checkpoint,
    read_trainer_state,
    resume_mismatch,
)
from megacontext.train.labels import module_hash

TINY = "configs/train-tiny.yaml"
FAST = [
    "batch_size=1",
    "grad_accum=1",
    "label_windows=1",
    "early_stop.enabled=false",
    "labels.max_candidates=4",
    "warm_gist.steps=1",
    "warm_lens.steps=1",
    "b1.steps=1",
    "b2.steps=1",
    "b3.steps=1",
]


class Killed(Exception):
    pass


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fresh_base(tiny_base) -> Base:
    return Base(
        model=copy.deepcopy(tiny_base.model), tokenizer=tiny_base.tokenizer, name="tiny-llama"
    )


def config(tmp_path, *extra):
    return load_train_config(
        TINY, [f"artifacts={tmp_path}/artifacts", f"runs_dir={tmp_path}/runs", *FAST, *extra]
    )


def run_until(tiny_base, cfg, phase: str) -> None:
    """Run ``cfg`` and kill it right after ``phase``'s checkpoint."""

    def kill(_t, p, _c):
        if p == phase:
            raise Killed

    with pytest.raises(Killed):
        Trainer(cfg, base=fresh_base(tiny_base), hooks=[kill]).run()


def hashes(t: Trainer) -> tuple[str, str, int]:
    return module_hash(t.gistnet), module_hash(t.lensnet), t.done


@pytest.fixture(scope="module")
def killed_run(tiny_base, tmp_path_factory):
    """A seed-0 run killed after warm-lens: checkpoints cycle0-warm-gist, -warm-lens."""
    tmp = tmp_path_factory.mktemp("killed")
    run_until(tiny_base, config(tmp), "warm-lens")
    return tmp


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "artifacts", dst / "artifacts")
    return dst / "artifacts" / "checkpoints" / "tiny"


# ------------------------------------------------------------------ item 8: resume


def test_resume_refuses_a_checkpoint_of_another_seed(killed_run, tiny_base, tmp_path):
    ckpts = copy_run(killed_run, tmp_path)
    # restarted (not resumed) with another seed, killed after its first phase: the
    # newest checkpoint (warm-lens) is still the seed-0 run's
    run_until(tiny_base, config(tmp_path, "seed=1"), "warm-gist")
    assert latest_checkpoint(ckpts).name == "cycle0-warm-lens"
    trainer = Trainer(config(tmp_path, "seed=1"), base=fresh_base(tiny_base))
    before = hashes(trainer)
    with pytest.raises(mc.ConfigError, match="seed: checkpoint 0, this run 1") as err:
        trainer.run(resume=True)
    assert err.value.field == "seed"
    assert hashes(trainer) == before  # refused before anything was loaded
    # the seed-0 config resumes the seed-0 run
    assert Trainer(config(tmp_path), base=fresh_base(tiny_base)).run(resume=True)["done"] == 5


def test_resume_refuses_a_changed_architecture(killed_run, tiny_base, tmp_path):
    copy_run(killed_run, tmp_path)
    for override, field in (
        ("lensnet.d_lens=64", "lensnet.d_lens"),
        ("gistnet.width=64", "gistnet.width"),
        ("megacontext.levels=3", "megacontext.levels"),
    ):
        cfg = config(tmp_path, override)
        trainer = Trainer(cfg, base=fresh_base(tiny_base))
        with pytest.raises(mc.ConfigError) as err:
            trainer.run(resume=True)
        assert field in str(err.value) and "size mismatch" not in str(err.value)
        assert err.value.field == field
        assert trainer.done == 0


def test_resume_lists_every_differing_field_and_ignores_placement(killed_run, tmp_path):
    path = killed_run / "artifacts" / "checkpoints" / "tiny" / "cycle0-warm-lens"
    same = config(tmp_path, "device=cpu", "allocator_backend=cpp", "run=renamed")
    assert resume_mismatch(path, same) == []  # artifacts, runs_dir, device ... are free
    assert {"run", "artifacts", "runs_dir", "device", "allocator_backend"} == RESUME_FREE_FIELDS
    diff = resume_mismatch(path, config(killed_run, "seed=3", "b1.lr=0.5", "data.blocks=3"))
    assert [(k, a, b) for k, a, b in diff] == [
        ("b1.lr", 0.001, 0.5),
        ("data.blocks", 2, 3),
        ("seed", 0, 3),
    ]
    # a defaulted megacontext field equals the same value written out
    assert resume_mismatch(path, config(killed_run, "megacontext.seed=0")) == []


def test_load_state_refuses_weights_of_another_shape(killed_run, tiny_base, tmp_path):
    ckpts = copy_run(killed_run, tmp_path)
    other = mc.LensNet(64, d_lens=16, heads=2, head_hidden=16)
    other.save(ckpts / "cycle0-warm-lens" / "lensnet.safetensors")
    trainer = Trainer(config(tmp_path), base=fresh_base(tiny_base))
    before = hashes(trainer)
    with pytest.raises(mc.StorageError, match="another architecture") as err:
        trainer.load_state(ckpts / "cycle0-warm-lens")
    assert err.value.field == "shape" and "lensnet.safetensors" in str(err.value)
    assert hashes(trainer) == before


# ------------------------------------------------------------------ item 10: links


@pytest.mark.parametrize(
    "member", ["gistnet.safetensors", "lensnet.safetensors", "trainer.json", "lora"]
)
def test_checkpoint_links_out_of_the_directory_are_refused(killed_run, tiny_base, tmp_path, member):
    ckpts = copy_run(killed_run, tmp_path)
    path = ckpts / "cycle0-warm-lens"
    outside = tmp_path / "outside"
    outside.mkdir()
    os.rename(path / member, outside / member)
    os.symlink(outside / member, path / member)
    trainer = Trainer(config(tmp_path), base=fresh_base(tiny_base))
    before = hashes(trainer)
    with pytest.raises(mc.StorageError, match="outside the checkpoint") as err:
        trainer.load_state(path)
    assert err.value.field == "link" and err.value.path == str(path / member)
    assert hashes(trainer) == before
    with pytest.raises(mc.StorageError, match="outside the checkpoint"):
        mc.MegaContext.from_checkpoint(path, base=fresh_base(tiny_base))


def test_a_link_inside_the_checkpoint_is_followed(killed_run, tmp_path):
    ckpts = copy_run(killed_run, tmp_path)
    path = ckpts / "cycle0-warm-lens"
    os.rename(path / "gistnet.safetensors", path / "g.safetensors")
    os.symlink("g.safetensors", path / "gistnet.safetensors")
    check_links(path)
    assert read_trainer_state(path)["done"] == 2


# ------------------------------------------------------------------ item 11: files


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda s: s.pop("done"), "done"),
        (lambda s: s.update(done="2"), "done"),
        (lambda s: s.update(done=-1), "done"),
        (lambda s: s.update(done=99), "done"),
        (lambda s: s.pop("global_step"), "global_step"),
        (lambda s: s.update(early=[]), "early"),
        (lambda s: s["early"].pop("stopped"), "early"),
        (lambda s: s.pop("plan"), "plan"),
    ],
)
def test_trainer_json_fields_are_checked(killed_run, tmp_path, edit, field):
    ckpts = copy_run(killed_run, tmp_path)
    file = ckpts / "cycle0-warm-lens" / "trainer.json"
    state = json.loads(file.read_text())
    edit(state)
    file.write_text(json.dumps(state))
    with pytest.raises(mc.StorageError) as err:
        read_trainer_state(file.parent, resume=True)
    assert err.value.field == field and str(file) in str(err.value)
    # what inference reads needs only 'done'; a field that is there must be valid
    if field == "done" or field in state:
        with pytest.raises(mc.StorageError):
            latest_checkpoint(ckpts)
    else:
        assert latest_checkpoint(ckpts) == file.parent


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", b"\xff\xfe", "[]"])
def test_trainer_json_that_is_not_an_object(killed_run, tmp_path, text):
    ckpts = copy_run(killed_run, tmp_path)
    file = ckpts / "cycle0-warm-lens" / "trainer.json"
    file.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(mc.StorageError, match="trainer.json") as err:
        read_trainer_state(file.parent)
    assert err.value.field == "json"


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ('{"r": 2}', "r"),
        ('{"r": "eight"}', "r"),
        ('{"lora_blocks": "middle"}', "lora_blocks"),
        ('{"unknown": 1}', "unknown"),
        ("[4]", "json"),
        ("{", "json"),
    ],
)
def test_bad_lora_json_is_a_storage_error(killed_run, tiny_base, tmp_path, content, field):
    ckpts = copy_run(killed_run, tmp_path)
    file = ckpts / "cycle0-warm-lens" / "lora" / "megacontext_lora.json"
    file.write_text(content)
    with pytest.raises(mc.StorageError) as err:
        read_lora_config(file)
    assert err.value.field == field and str(file) in str(err.value)
    trainer = Trainer(config(tmp_path), base=fresh_base(tiny_base))
    with pytest.raises(mc.StorageError, match="megacontext_lora.json"):
        trainer.load_state(file.parent.parent)


def test_cli_resume_of_another_seed_is_one_line_naming_seed(killed_run, tmp_path):
    from typer.testing import CliRunner

    from megacontext.cli import app

    copy_run(killed_run, tmp_path)
    args = ["train", TINY, "--resume"]
    for item in (f"artifacts={tmp_path}/artifacts", f"runs_dir={tmp_path}/runs", *FAST):
        args += ["--set", item]
    result = CliRunner().invoke(app, [*args, "--set", "seed=7"])
    assert result.exit_code == 2, result.output
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "ConfigError" in line and "seed: checkpoint 0, this run 7" in line
    assert "Traceback" not in result.output


def test_missing_or_bad_checkpoint_config_is_a_storage_error(killed_run, tmp_path):
    ckpts = copy_run(killed_run, tmp_path)
    path = ckpts / "cycle0-warm-lens"
    (path / "config.yaml").write_bytes(b"\x00\xff")
    with pytest.raises(mc.StorageError, match="config.yaml") as err:
        resume_mismatch(path, config(tmp_path))
    assert err.value.field == "config"
    (path / "config.yaml").unlink()
    with pytest.raises(mc.StorageError, match="config.yaml"):
        resume_mismatch(path, config(tmp_path))


def test_text_data_that_is_not_utf8_is_named(tiny_base, tmp_path):
    bad = tmp_path / "corpus.txt"
    bad.write_bytes(b"caf\xe9 " * 100)
    cfg = config(tmp_path, "data.kind=text", f"data.paths=[{bad}]")
    with pytest.raises(mc.ConfigError, match="corpus.txt") as err:
        Trainer(cfg, base=fresh_base(tiny_base))
    assert err.value.field == "data.paths"
