"""Bad values are refused where they are set, with a typed error naming the field
(issue 17, item 11): config fields on construction and on assignment, config files
that are not YAML text, GistNet/LensNet on the meta device."""

from __future__ import annotations

import pytest
import torch

import megacontext as mc
from megacontext.config import MAX_BLOCK_SIZE, MAX_W_MAX, MegaContextConfig

BAD = [
    ("block_size", 1),
    ("block_size", 0),
    ("block_size", 48),
    ("block_size", 2 * MAX_BLOCK_SIZE),
    ("w_max", 10**12),
    ("w_max", MAX_W_MAX + 1),
    ("w_max", 0),
    ("w_max", 10),  # cannot hold the protected tail
    ("model", ""),
    ("model", "   "),
    ("model", "a\nb"),
    ("levels", 0),
    ("kv_mode", "fast"),
]


@pytest.mark.parametrize(("field", "value"), BAD)
def test_bad_values_are_refused_on_construction(field, value):
    with pytest.raises(mc.ConfigError) as err:
        MegaContextConfig(**{field: value})
    assert err.value.field == field and field in str(err.value)


@pytest.mark.parametrize(("field", "value"), BAD)
def test_bad_values_are_refused_on_assignment_and_change_nothing(field, value):
    cfg = MegaContextConfig()
    before = cfg.model_dump()
    with pytest.raises(mc.ConfigError) as err:
        setattr(cfg, field, value)
    assert err.value.field == field
    assert cfg.model_dump() == before


def test_the_bounds_themselves_are_accepted():
    assert MegaContextConfig(block_size=2, recent_tokens=0, w_max=2).block_size == 2
    assert MegaContextConfig(block_size=MAX_BLOCK_SIZE, w_max=4 * MAX_BLOCK_SIZE).w_max
    assert MegaContextConfig(w_max=MAX_W_MAX).w_max == MAX_W_MAX


@pytest.mark.parametrize("kind", ["binary", "latin1", "directory"])
def test_from_yaml_names_a_file_that_is_not_yaml_text(tmp_path, kind):
    path = tmp_path / "cfg.yaml"
    if kind == "binary":
        path.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    elif kind == "latin1":
        path.write_bytes("model: caf\u00e9\n".encode("latin-1"))
    else:
        path.mkdir()
    with pytest.raises(mc.ConfigError) as err:
        MegaContextConfig.from_yaml(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("make", [lambda: mc.GistNet(16, block_size=4), lambda: mc.LensNet(16)])
def test_modules_on_the_meta_device_are_refused(tmp_path, make):
    module = make().to("meta")
    with pytest.raises(mc.ConfigError, match="meta device") as err:
        module.save(tmp_path / "m.safetensors")
    assert err.value.field == "device"
    if isinstance(module, mc.GistNet):
        call = lambda: module(torch.randn(2, 4, 16))  # noqa: E731
    else:
        n = 5
        call = lambda: module(  # noqa: E731
            torch.randn(1, n, 16),
            torch.randn(1, 6, 16),
            torch.zeros(1, n, dtype=torch.long),
            torch.ones(1, n, dtype=torch.long),
            torch.arange(n)[None],
        )
    with pytest.raises(mc.ConfigError, match="meta device"):
        call()
    saved = make().save(tmp_path / "real.safetensors")
    with pytest.raises(mc.ConfigError, match="meta"):
        type(module).load(saved, device="meta")
