from __future__ import annotations

from pathlib import Path

import pytest

import megacontext as mc

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_match_design_brief():
    c = mc.MegaContextConfig()
    assert (c.block_size, c.levels, c.w_max, c.horizon, c.n_diff) == (32, 2, 8192, 64, 4)
    assert (c.tau_expand, c.tau_collapse, c.cooldown_steps, c.min_residency) == (0.2, 0.2, 2, 3)
    assert c.kv_mode == "splice"
    assert c.protected_tokens == 64


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("w_max", -1),
        ("w_max", 0),
        ("block_size", 24),
        ("block_size", 0),
        ("kv_mode", "fancy"),
        ("levels", 0),
        ("tau_expand", 1.5),
        ("n_diff", -2),
        ("cooldown_steps", -1),
        ("horizon", 0),
        ("no_such_field", 3),
    ],
)
def test_bad_value_names_field_and_value(field, value):
    with pytest.raises(mc.ConfigError) as info:
        mc.MegaContextConfig(**{field: value})
    assert info.value.field == field
    assert info.value.value == value
    assert field in str(info.value) and repr(value) in str(info.value)


def test_budget_below_protected_tail_is_a_config_error():
    with pytest.raises(mc.ConfigError, match="w_max") as info:
        mc.MegaContextConfig(w_max=64)  # 64 protected + a partial block of 32 > 64
    assert info.value.field == "w_max"
    mc.MegaContextConfig(w_max=96)  # exactly fits


def test_assignment_is_validated_and_leaves_state_unchanged():
    c = mc.MegaContextConfig()
    with pytest.raises(mc.ConfigError, match="w_max"):
        c.w_max = -5
    assert c.w_max == 8192


def test_yaml_round_trip(tmp_path):
    c = mc.MegaContextConfig(w_max=1024, kv_mode="exact", recent_tokens=96, tau_expand=0.35)
    path = c.to_yaml(tmp_path / "sub" / "run.yaml")
    assert mc.MegaContextConfig.from_yaml(path) == c
    assert not list(path.parent.glob(".*tmp")), "temporary file left behind"


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("w_max: -3\n")
    with pytest.raises(mc.ConfigError, match=r"bad\.yaml") as info:
        mc.MegaContextConfig.from_yaml(bad)
    assert info.value.field == "w_max"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(mc.ConfigError, match="mapping"):
        mc.MegaContextConfig.from_yaml(bad)
    bad.write_text("w_max: [unclosed\n")
    with pytest.raises(mc.ConfigError, match="YAML"):
        mc.MegaContextConfig.from_yaml(bad)
    with pytest.raises(mc.ConfigError, match="not found"):
        mc.MegaContextConfig.from_yaml(tmp_path / "missing.yaml")


def test_shipped_configs_load():
    # run configs (MegaContextConfig); configs/train-*.yaml are trainer configs
    paths = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("train"))
    assert paths, "configs/ holds no default config"
    for path in paths:
        mc.MegaContextConfig.from_yaml(path)
    assert mc.MegaContextConfig.from_yaml(ROOT / "configs" / "smollm2-135m.yaml").model == (
        "smollm2-135m"
    )


def test_shipped_trainer_configs_load():
    from megacontext.train import load_train_config

    paths = sorted((ROOT / "configs").glob("train*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        cfg = load_train_config(path)
        assert cfg.window_length > 0, path
