"""Region snapshots (``data.wc: region``) and tag-mixed windows for the GistNet phases."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import megacontext as mc
from megacontext.base import Base
from megacontext.data import build_shards
from megacontext.train import Trainer, load_train_config
from megacontext.train.config import RegionConfig
from megacontext.train.phases import gist_loss
from megacontext.train.rollout import region_snapshot, snapshot_wc

TINY = Path(__file__).resolve().parent.parent / "configs" / "train-tiny.yaml"
BS = 8


def _cfg(levels: int = 2) -> mc.MegaContextConfig:
    return mc.MegaContextConfig(
        model="tiny-llama", block_size=BS, levels=levels, w_max=512, horizon=8
    )


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("low", [0, 2])
def test_region_snapshot_tiles_the_history_with_one_region(seed, low):
    cfg = _cfg()
    region = RegionConfig(prefix_blocks=3, suffix_blocks=(low, 5), lod2_fraction=0.3)
    T = 12 * BS  # 12 blocks >= bs + 2: a LOD2 node fits
    window = torch.arange(T + cfg.horizon)
    snap = region_snapshot(window, cfg, region, cfg.horizon, torch.Generator().manual_seed(seed))
    assert snap.cursor == T and torch.equal(snap.targets, window[T:])
    # tiles [0, T) in order, no gaps or overlaps (not a runtime WC when the region
    # ends inside the protected tail, so not WorkingContext.check())
    span = BS**snap.levels
    starts = snap.nodes * span
    assert int(starts[0]) == 0 and int(starts[-1] + span[-1]) == T
    assert torch.equal(starts[1:], starts[:-1] + span[:-1])
    if low >= 2:
        snapshot_wc(snap, cfg).check()
    gist = torch.nonzero(snap.levels > 0).squeeze(1)
    assert gist.numel() >= 1 and bool((gist[1:] - gist[:-1] == 1).all())  # one region
    lv = int(snap.levels[gist[0]])
    assert bool((snap.levels[gist] == lv).all())
    tokens_after = int((snap.levels[gist[-1] + 1 :] == 0).sum())
    if lv == 2:
        assert gist.numel() == 1 and tokens_after >= low * BS
    else:
        assert int(gist[0]) <= 3 * BS  # prefix tokens
        assert low * BS <= tokens_after <= 5 * BS


def test_region_snapshot_draws_both_levels_and_is_deterministic():
    cfg = _cfg()
    region = RegionConfig(prefix_blocks=2, suffix_blocks=(2, 3), lod2_fraction=0.5)
    window = torch.arange(12 * BS + cfg.horizon)

    def levels(seed):
        g = torch.Generator().manual_seed(seed)
        return [
            int(region_snapshot(window, cfg, region, cfg.horizon, g).levels.max())
            for _ in range(30)
        ]

    assert levels(1) == levels(1)
    assert set(levels(1)) == {1, 2}
    no_lod2 = RegionConfig(prefix_blocks=2, suffix_blocks=(2, 3), lod2_fraction=0.0)
    g = torch.Generator().manual_seed(0)
    assert all(
        int(region_snapshot(window, cfg, no_lod2, cfg.horizon, g).levels.max()) == 1
        for _ in range(20)
    )


def test_region_snapshot_can_end_right_before_the_targets():
    """suffix 0: the gists are the last entries, as in the compression stress's `near`."""
    cfg = _cfg()
    region = RegionConfig(prefix_blocks=0, suffix_blocks=(0, 0), lod2_fraction=0.0)
    window = torch.arange(6 * BS + cfg.horizon)
    snap = region_snapshot(window, cfg, region, cfg.horizon, torch.Generator().manual_seed(0))
    assert snap.levels.tolist() == [1] * 6 and snap.nodes.tolist() == list(range(6))


def test_region_snapshot_rejects_a_ragged_window():
    cfg = _cfg()
    with pytest.raises(mc.InputError, match="multiple of the block size"):
        region_snapshot(torch.arange(5 * BS + 3 + 8), cfg, RegionConfig(), 8, torch.Generator())


def test_region_loss_reaches_gistnet_at_both_levels(tiny_base):
    cfg = _cfg()
    gist = mc.GistNet(tiny_base.dim, block_size=BS, levels=2, width=32, depth=1, heads=2, seed=0)
    window = torch.randint(
        0, 1000, (12 * BS + cfg.horizon,), generator=torch.Generator().manual_seed(0)
    )
    g = torch.Generator().manual_seed(3)
    lc = load_train_config(TINY).gist_loss
    seen = set()
    for _ in range(20):
        snap = region_snapshot(
            window,
            cfg,
            RegionConfig(lod2_fraction=0.5, prefix_blocks=2, suffix_blocks=(2, 3)),
            cfg.horizon,
            g,
        )
        level = int(snap.levels.max())
        if level in seen:
            continue
        seen.add(level)
        gist.zero_grad()
        loss, stats = gist_loss(tiny_base, gist, None, window, snap, cfg, lc)
        assert loss is not None and float(loss.detach()) >= 0 and "subst" in stats
        loss.backward()
        grads = [p.grad for p in gist.parameters() if p.grad is not None]
        assert grads and any(float(x.abs().sum()) > 0 for x in grads)
    assert seen == {1, 2}


def test_region_config_is_validated(tmp_path):
    with pytest.raises(mc.ConfigError, match="suffix_blocks"):
        load_train_config(TINY, ["data.wc=region", "data.region.suffix_blocks=[3, 2]"])
    with pytest.raises(mc.ConfigError, match="lod2_fraction"):
        load_train_config(TINY, ["data.wc=region", "megacontext.levels=1"])
    with pytest.raises(mc.ConfigError, match="prefix_blocks"):
        load_train_config(TINY, ["data.wc=region", "data.region.prefix_blocks=30"])
    with pytest.raises(mc.ConfigError, match="tag_mix"):
        load_train_config(TINY, ["data.tag_mix={poetry: 1.0}"])
    with pytest.raises(mc.ConfigError, match="tag_mix"):
        load_train_config(TINY, ["data.tag_mix={code: 0.0}"])


def test_region_warm_gist_trains_and_tag_mix_draws_each_tag(tiny_base, tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    words = " ".join(f"word{i}" for i in range(400))
    for k in range(6):
        (src / "pkg" / f"m{k}.py").write_text(f"def f{k}(x):\n    return x + {k}\n" * 60)
        (src / "pkg" / f"d{k}.md").write_text(f"Doc {k}. {words}\n")
    build_shards(
        [str(src)],
        tmp_path / "shards",
        tokenizer=tiny_base.tokenizer,
        model_name="tiny-llama",
        val_fraction=0.3,
        progress=False,
    )
    cfg = load_train_config(
        TINY,
        [
            f"artifacts={tmp_path}/artifacts",
            f"runs_dir={tmp_path}/runs",
            "data.kind=shards",
            f"data.path={tmp_path}/shards",
            "data.history=96",
            "data.blocks=1",
            "data.wc=region",
            "data.region={prefix_blocks: 2, suffix_blocks: [2, 3], lod2_fraction: 0.5}",
            "data.tag_mix={code: 0.5, doc: 0.5}",
            "cycles=0",
            "warm_gist.steps=2",
            "warm_lens.steps=0",
        ],
    )
    base = Base(
        model=copy.deepcopy(tiny_base.model), tokenizer=tiny_base.tokenizer, name="tiny-llama"
    )
    trainer = Trainer(cfg, base=base)
    before = {k: v.clone() for k, v in trainer.gistnet.state_dict().items()}
    trainer.run()
    after = trainer.gistnet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # the mixed source: deterministic, and both tags appear in a draw of 40 windows
    w = trainer.train_windows(40, 5)
    assert torch.equal(w, trainer.train_windows(40, 5))
    length = w.shape[1]

    def grams(tag):
        ds = mc.data.ShardDataset(tmp_path / "shards", "train", [tag])
        out = set()
        for i in range(len(ds)):
            t = ds.tokens(i).tolist()
            out |= {tuple(t[s : s + length]) for s in range(len(t) - length + 1)}
        return out

    code, doc = grams("code"), grams("doc")
    rows = [tuple(r) for r in w.tolist()]
    assert all(r in code or r in doc for r in rows)
    assert any(r in code for r in rows) and any(r in doc for r in rows)


def test_max_seconds_time_boxes_a_phase(tiny_base, tmp_path):
    """A phase stops starting steps once ``max_seconds`` have passed, and still writes
    its checkpoint with the steps it took."""
    base = Base(
        model=copy.deepcopy(tiny_base.model), tokenizer=tiny_base.tokenizer, name="tiny-llama"
    )
    cfg = load_train_config(
        TINY,
        [
            f"artifacts={tmp_path}/artifacts",
            f"runs_dir={tmp_path}/runs",
            "cycles=0",
            "warm_gist.steps=50",
            "warm_gist.max_seconds=0.000001",
            "warm_lens.steps=0",
        ],
    )
    trainer = Trainer(cfg, base=base)
    trainer.run()
    assert trainer.global_step == 1  # the first step starts at t = 0, no other does
    with pytest.raises(mc.ConfigError, match="max_seconds"):
        load_train_config(TINY, ["warm_gist.max_seconds=0"])
