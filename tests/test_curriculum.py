"""The long-range curriculum: needles placed where claimed relative to the block
size, deterministic windows, training-split haystacks, config validation."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

import megacontext as mc
from megacontext.data import ShardDataset, build_shards
from megacontext.synthetic import TRAIN_SEED_BASE
from megacontext.train import Trainer, load_train_config
from megacontext.train.curriculum import curriculum_source, needle

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train-tiny.yaml"
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _stream(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 1000, (n, 400), generator=g)


@pytest.mark.parametrize("bs", [8, 32])
def test_placements_land_where_claimed(tiny_base, bs):
    enc = lambda t: tiny_base.encode(t).tolist()  # noqa: E731
    history = 256 if bs == 8 else 320
    for placement in ("edge", "straddle", "mid"):
        log: list[dict] = []
        src = curriculum_source(
            _stream,
            {"prose": _stream, "code": _stream},
            enc,
            history=history,
            block_size=bs,
            fraction=1.0,
            placements=[placement],
            log=log,
        )
        w = src(12, 3)
        assert len(log) == 12 and {r["kind"] for r in log} == {"passkey", "kv", "identifier"}
        for r in log:
            a, e, c = r["answer_start"], r["answer_end"], r["question_end"]
            assert r["seed"] >= TRAIN_SEED_BASE
            nd = needle(r["kind"], r["seed"], enc)
            row = w[r["index"]]
            # the statement's answer, the question at the first snapshot, the target
            assert row[a:e].tolist() == nd.answer == row[c : c + len(nd.answer)].tolist()
            assert c == history + bs and row[c - len(nd.question) : c].tolist() == nd.question
            assert e <= c - len(nd.question)
            assert r["placement"] == placement or (bs == 8 and r["placement"] == "edge")
            if r["placement"] == "edge":
                assert a % bs == 0
            elif r["placement"] == "straddle":
                m = (a // bs + 1) * bs
                assert a < m < e and abs((m - a) - (e - m)) <= 1
            else:
                assert a % bs > 0 and (e - 1) // bs == a // bs and e % bs != 0


def test_windows_are_deterministic_in_the_seed(tiny_base):
    enc = lambda t: tiny_base.encode(t).tolist()  # noqa: E731
    src = curriculum_source(
        _stream, {"prose": _stream, "code": _stream}, enc, history=256, block_size=8, fraction=0.5
    )
    a, b, c = src(16, 1), src(16, 1), src(16, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    plain = _stream(16, 1)
    mixed = (a != plain).any(1)
    assert 0 < int(mixed.sum()) < 16  # about half the windows carry a task
    none = curriculum_source(
        _stream, {"prose": _stream, "code": _stream}, enc, history=256, block_size=8, fraction=0.0
    )
    assert torch.equal(none(16, 1), plain)


def test_config_validation_names_the_field(tmp_path):
    base = [f"artifacts={tmp_path}/a", f"runs_dir={tmp_path}/r"]
    cfg = load_train_config(TINY, [*base, "data.curriculum={fraction: 0.25, kinds: [kv]}"])
    assert cfg.data.curriculum.fraction == 0.25 and cfg.data.curriculum.kinds == ["kv"]
    assert load_train_config(TINY, base).data.curriculum is None
    for bad, field in (
        ("{fraction: 1.5}", "data.curriculum.fraction"),
        ("{kinds: [needle]}", "data.curriculum.kinds"),
        ("{kinds: []}", "data.curriculum.kinds"),
        ("{kinds: [kv, kv]}", "data.curriculum"),
        ("{placements: [corner]}", "data.curriculum.placements"),
    ):
        with pytest.raises(mc.ConfigError) as err:
            load_train_config(TINY, [*base, f"data.curriculum={bad}"])
        assert err.value.field is not None and err.value.field.startswith(field), (bad, err.value)


def test_haystacks_come_from_the_training_split_only(tmp_path, tiny_base):
    lib = tmp_path / "lib"
    lib.mkdir()
    for name in ("turtle.py", "doctest.py", "zipfile.py", "inspect.py", "typing.py", "ast.py"):
        shutil.copy(STDLIB / name, lib / name)
    shutil.copy(STDLIB / "pydoc_data" / "topics.py", lib / "topics.py")
    out = tmp_path / "shards"
    build_shards(
        [lib], out, tokenizer=tiny_base.tokenizer, model_name="t", val_fraction=0.4, progress=False
    )
    train, val = ShardDataset(out, "train"), ShardDataset(out, "validation")
    assert len(train) and len(val)
    cfg = load_train_config(
        TINY,
        [
            f"artifacts={tmp_path}/a",
            f"runs_dir={tmp_path}/r",
            "cycles=0",
            "data.kind=shards",
            f"data.path={out}",
            "data.curriculum={fraction: 1.0}",
        ],
    )
    tr = Trainer(cfg, base=tiny_base)
    windows = tr.train_windows(6, 0)
    assert windows.shape == (6, cfg.window_length)
    docs = {
        s: [ds.doc(i)[0].tolist() for i in range(len(ds))] for s, ds in (("t", train), ("v", val))
    }

    def inside(piece, texts):
        n = len(piece)
        return any(d[i : i + n] == piece for d in texts for i in range(len(d) - n + 1))

    c = cfg.data.history + cfg.mc_config().block_size
    for w in windows:
        tail = w[c + 12 :].tolist()  # after the answer: untouched haystack
        assert inside(tail, docs["t"]) and not inside(tail, docs["v"])
    # validation windows carry no tasks
    assert torch.equal(
        tr.val_windows(2, 0),
        ShardDataset(out, "validation").sample_windows(cfg.window_length, 2, 0),
    )
