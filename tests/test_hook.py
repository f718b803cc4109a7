from __future__ import annotations

import sys
import types

import pytest
import torch

import megacontext as mc
from megacontext import hook


@pytest.fixture(autouse=True)
def _unpatched(tiny_base):
    # the fixture is session-wide: a session in an earlier test module patches its
    # model and keeps it patched (by design), so each test here starts from unpatched
    mc.unpatch(tiny_base.model)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("fixture", ["tiny_base", "smollm2_base"])
def test_patched_equals_unpatched_without_state(request, fixture):
    base = request.getfixturevalue(fixture)
    mc.unpatch(base.model)  # shared fixture, see _unpatched
    ids = torch.randint(0, base.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = _logits(base.model, ids)
    with mc.patched(base.model):
        assert hook.is_patched(base.model)
        out = _logits(base.model, ids)
    assert not hook.is_patched(base.model)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_patch_is_idempotent_and_unpatch_restores(tiny_base):
    model = tiny_base.model
    before = model.config._attn_implementation
    mc.patch(model)
    mc.patch(model)
    assert model.config._attn_implementation == hook.ATTENTION_NAME
    mc.unpatch(model)
    assert model.config._attn_implementation == before
    mc.unpatch(model)  # no-op
    assert model.config._attn_implementation == before


def test_context_manager_restores_on_error(tiny_base):
    with pytest.raises(RuntimeError, match="boom"), mc.patched(tiny_base.model):
        raise RuntimeError("boom")
    assert not hook.is_patched(tiny_base.model)


def test_patch_refuses_non_llama_models():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(mc.UnsupportedModelError, match="gpt2"):
        mc.patch(model)


def test_attention_backend_selection(monkeypatch):
    monkeypatch.delenv("MEGACONTEXT_ATTENTION", raising=False)
    assert hook.attention_backend("cpu") == "sdpa"
    monkeypatch.setenv("MEGACONTEXT_ATTENTION", "sdpa")
    assert hook.attention_backend("cuda") == "sdpa"
    monkeypatch.setenv("MEGACONTEXT_ATTENTION", "xformers")
    with pytest.raises(mc.ConfigError, match="MEGACONTEXT_ATTENTION"):
        hook.attention_backend("cpu")
    monkeypatch.setenv("MEGACONTEXT_ATTENTION", "flash")
    monkeypatch.setattr(hook, "_flash_installed", lambda: False)
    with pytest.raises(mc.ConfigError, match="flash-attn is not installed"):
        hook.attention_backend("cuda")


def test_flash_path_passes_flash_layout(monkeypatch):
    """flash-attn is an optional extra absent here; check the call we make into it
    (layout [B, S, H, D], scale, causal flag) and that it matches SDPA's math."""
    seen = {}

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
        seen.update(shape=q.shape, scale=softmax_scale, causal=causal)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=causal,
            scale=softmax_scale,
        )
        return out.transpose(1, 2)

    monkeypatch.setitem(
        sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func)
    )
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    out, weights = hook._flash_causal(None, q, k, v, 0.5)
    assert weights is None and seen == {"shape": (1, 5, 2, 8), "scale": 0.5, "causal": True}
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5)
    torch.testing.assert_close(out, ref.transpose(1, 2))
