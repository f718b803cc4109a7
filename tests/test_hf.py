"""transformers-native generation with the memory (megacontext/hf.py): generate(),
streamers, stopping, left-padded batches, pipelines and multi-turn chat, each
checked against the Session API on the same memory."""

from __future__ import annotations

import threading

import pytest
import torch
from session_checks import RuleScorer
from transformers import (
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
    pipeline,
)

import megacontext as mc
from megacontext.hf import Chat, MegaContextForCausalLM

W_MAX, K = 96, 16


def _ids(n, seed=0):
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed))


def _system(base, lens=True):
    cfg = mc.MegaContextConfig(model=base.name, w_max=W_MAX, block_size=K)
    return mc.MegaContext(base, None, RuleScorer(far=60) if lens else None, cfg)


def _history(session):
    return session.tree.tokens(0, session.num_tokens)


class CacheRows(StoppingCriteria):
    """Records, after every step, the most KV rows any row's session holds (and
    checks the cache and the WC agree); never stops."""

    def __init__(self, model):
        self.model = model
        self.rows: list[int] = []

    def __call__(self, input_ids, scores, **kwargs):
        for s in self.model.sessions:
            assert s.cache.lengths[0] == len(s.wc)
        self.rows.append(max(s.cache.lengths[0] for s in self.model.sessions))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@pytest.fixture
def model(tiny_base):
    return MegaContextForCausalLM(_system(tiny_base))


def test_greedy_equals_session_generate_and_the_cache_stays_in_budget(tiny_base, model):
    prompt = _ids(300)
    ref = model.system.session()
    ref.ingest(prompt)
    text = ref.generate(32, stop_at_eos=False)

    watch = CacheRows(model)
    out = model.generate(
        prompt[None],
        max_new_tokens=32,
        do_sample=False,
        eos_token_id=None,
        stopping_criteria=StoppingCriteriaList([watch]),
    )
    new = out[0, 300:]
    assert new.numel() == 32
    assert tiny_base.decode(new) == text
    s = model.sessions[0]
    assert torch.equal(_history(s), _history(ref))
    assert torch.equal(s.next_token_logits(), ref.next_token_logits())
    assert torch.equal(s.wc.nodes, ref.wc.nodes) and torch.equal(s.wc.levels, ref.wc.levels)
    assert [a[:4] for a in s.actions] == [a[:4] for a in ref.actions] and s.actions
    # the prompt alone is longer than the cache; the cache never grew past W_max + K
    assert s.cache.capacity == W_MAX + K < 300
    assert len(watch.rows) == 32 and max(watch.rows) <= W_MAX + K
    assert s.cache.lengths[0] <= W_MAX + K
    assert model.ingested == [300]


def test_sampled_logits_are_the_sessions_logits(model):
    prompt = _ids(260, seed=1)
    torch.manual_seed(0)
    out = model.generate(
        prompt[None],
        max_new_tokens=16,
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        eos_token_id=None,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    new = out.sequences[0, 260:]
    assert new.numel() == len(out.scores) == len(out.logits) == 16
    ref = model.system.session()
    ref.ingest(prompt)
    for step, tok in enumerate(new.tolist()):
        torch.testing.assert_close(out.logits[step][0], ref.next_token_logits(), rtol=0, atol=0)
        kept = torch.isfinite(out.scores[step][0])
        assert kept.sum() <= 40 and kept[tok]  # top_k, and the sampled token survived it
        ref.feed([tok])
    assert torch.equal(_history(model.sessions[0]), _history(ref))
    torch.manual_seed(0)
    again = model.generate(
        prompt[None], max_new_tokens=16, do_sample=True, temperature=0.7, top_p=0.9, top_k=40
    )
    assert torch.equal(again[0, : out.sequences.shape[1]], out.sequences[0, : again.shape[1]])


def test_stopping_eos_strings_and_criteria_keep_the_memory_exact(tiny_base, model):
    prompt = _ids(200, seed=2)
    full = model.generate(prompt[None], max_new_tokens=12, do_sample=False, eos_token_id=None)
    g = full[0, 200:].tolist()

    def check(out, most):
        n = out.shape[1] - 200
        assert 1 <= n <= most
        s = model.sessions[0]
        assert torch.equal(_history(s), out[0].cpu())
        assert out[0, 200:].tolist() == g[:n]
        return n

    # eos_token_id: stops at the first occurrence of that token, which is kept
    out = model.generate(prompt[None], max_new_tokens=12, do_sample=False, eos_token_id=g[3])
    assert check(out, 4) == g.index(g[3]) + 1

    stop = tiny_base.decode(g[:5])
    out = model.generate(prompt[None], max_new_tokens=12, do_sample=False, stop_strings=[stop])
    n = check(out, 5)
    assert tiny_base.decode(out[0, 200:]).endswith(stop[-1]) or n == 5

    class After(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = input_ids.shape[1] - 200 >= 7
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool)

    out = model.generate(
        prompt[None],
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        stopping_criteria=StoppingCriteriaList([After()]),
    )
    assert check(out, 7) == 7


def test_streamers_see_the_generated_text(model, capsys):
    prompt = _ids(150, seed=3)
    out = model.generate(prompt[None], max_new_tokens=10, do_sample=False, eos_token_id=None)
    text = model.tokenizer.decode(out[0, 150:])

    model.generate(
        prompt[None],
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=None,
        streamer=TextStreamer(model.tokenizer, skip_prompt=True),
    )
    assert capsys.readouterr().out == text + "\n"

    streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True)
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, streamer=streamer)
    worker = threading.Thread(target=model.generate, args=(prompt[None],), kwargs=kwargs)
    worker.start()
    streamed = "".join(streamer)
    worker.join()
    assert streamed == text


def test_left_padded_batch_equals_each_row_alone(tiny_base, model):
    lengths = [230, 300, 170]
    prompts = [_ids(n, seed=10 + i) for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.full((3, width), 7, dtype=torch.long)  # any id: masked out
    mask = torch.zeros(3, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - p.numel() :] = p
        mask[b, width - p.numel() :] = 1

    calls = []

    def count(module, args, kwargs):
        calls.append(tuple(kwargs["inputs_embeds"].shape[:2]))

    hook = tiny_base.model.register_forward_pre_hook(count, with_kwargs=True)
    watch = CacheRows(model)
    try:
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=None,
            stopping_criteria=StoppingCriteriaList([watch]),
        )
    finally:
        hook.remove()
    # one batched forward per decoded token (19 in the loop + the final token)
    assert calls.count((3, 1)) == 20
    assert max(watch.rows) <= W_MAX + K
    assert model.ingested == lengths
    for b, p in enumerate(prompts):
        ref = model.system.session()
        ref.ingest(p)
        text = ref.generate(20, stop_at_eos=False)
        assert tiny_base.decode(out[b, width:]) == text
        assert torch.equal(_history(model.sessions[b]), _history(ref))


def test_a_row_stopped_early_keeps_no_padding(model):
    lengths = [120, 180]
    prompts = [_ids(n, seed=20 + i) for i, n in enumerate(lengths)]
    solo = []
    for p in prompts:
        out = model.generate(p[None], max_new_tokens=8, do_sample=False, eos_token_id=None)
        solo.append(out[0, p.numel() :].tolist())
    eos = solo[0][0]
    assert eos not in solo[1]
    ids = torch.zeros(2, 180, dtype=torch.long)
    mask = torch.zeros(2, 180, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, 180 - p.numel() :], mask[b, 180 - p.numel() :] = p, 1
    model.reset()
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos
    )
    row0, row1 = model.sessions
    assert torch.equal(_history(row0), torch.cat([prompts[0], torch.tensor([eos])]))
    assert out[1, 180:].tolist() == solo[1]
    assert torch.equal(_history(row1), out[1, 180 - lengths[1] :])


def test_a_longer_prompt_ingests_only_its_new_tokens(model, monkeypatch):
    prompt, extra = _ids(220, seed=4), _ids(40, seed=5)
    first = model.generate(prompt[None], max_new_tokens=10, do_sample=False, eos_token_id=None)
    session = model.sessions[0]
    seen = []
    ingest = mc.Session.ingest
    monkeypatch.setattr(
        mc.Session, "ingest", lambda self, ids, *a, **k: seen.append(len(ids)) or ingest(self, ids)
    )
    second = torch.cat([first[0], extra])
    out = model.generate(second[None], max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert model.sessions[0] is session and model.ingested == [40] and seen == [40]

    ref = model.system.session()
    ingest(ref, prompt)
    ref.generate(10, stop_at_eos=False)
    ingest(ref, extra)
    assert model.tokenizer.decode(out[0, second.numel() :]) == ref.generate(10, stop_at_eos=False)
    assert torch.equal(_history(session), _history(ref))


def test_pipeline_text_and_chat(model):
    tok = model.tokenizer
    generator = pipeline("text-generation", model=model, tokenizer=tok)
    prompt = " ".join(f"item {i} is blue." for i in range(60))
    got = generator(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert got == prompt + tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    messages = [{"role": "user", "content": prompt}]
    reply = generator(messages, max_new_tokens=8, do_sample=False)[0]["generated_text"][-1]
    assert reply["role"] == "assistant"
    chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    chat_ids = chat_ids["input_ids"] if not torch.is_tensor(chat_ids) else chat_ids
    assert model.sessions[0].num_tokens >= chat_ids.shape[1]
    assert torch.equal(_history(model.sessions[0])[: chat_ids.shape[1]], chat_ids[0])


def test_chat_turns_append_to_one_memory(model, monkeypatch):
    tok = model.tokenizer
    chat = Chat(model)
    facts = " ".join(f"Locker {i} holds code {4000 + 7 * i}." for i in range(40))
    chat.send(facts, max_new_tokens=6, do_sample=False)
    session = chat.session
    first_len = session.num_tokens
    assert chat.ingested == first_len - 6

    seen = []
    ingest = mc.Session.ingest
    monkeypatch.setattr(
        mc.Session, "ingest", lambda self, ids, *a, **k: seen.append(len(ids)) or ingest(self, ids)
    )
    chat.send("Which code is in locker 3?", max_new_tokens=6, do_sample=False)
    assert chat.session is session
    rendered = tok.apply_chat_template(
        chat.messages[:-1], add_generation_prompt=True, tokenize=False
    )
    transcript = tok.encode(rendered, add_special_tokens=False)
    assert seen == [chat.ingested] and 0 < chat.ingested < 40 < len(transcript)
    assert session.num_tokens == first_len + chat.ingested + 6
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]


def test_from_base_takes_a_transformers_model_and_a_name(tiny_base):
    m = MegaContextForCausalLM.from_base(
        tiny_base.model, tokenizer=tiny_base.tokenizer, w_max=W_MAX, block_size=K
    )
    assert m.system.config.w_max == W_MAX and m.device == tiny_base.device
    out = m.generate(_ids(150)[None], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 153)
    named = MegaContextForCausalLM.from_base("tiny-llama", device="cpu", w_max=W_MAX)
    assert named.system.base.name == "tiny-llama" and named.config.model_type == "megacontext"
    with pytest.raises(mc.ConfigError):
        MegaContextForCausalLM.from_base(tiny_base, w_max=-1)


def test_unsupported_uses_raise_input_errors(model):
    ids = _ids(50)[None]
    with pytest.raises(mc.InputError, match="num_beams"):
        model.generate(ids, max_new_tokens=2, num_beams=2)
    with pytest.raises(mc.InputError, match="left padding"):
        model.generate(
            torch.cat([ids, ids]),
            attention_mask=torch.tensor([[1] * 50, [1] * 49 + [0]]),
            max_new_tokens=2,
        )
    with pytest.raises(mc.InputError, match="use_cache"):
        model.generate(ids, max_new_tokens=2, use_cache=False)
    with pytest.raises(mc.InputError, match="outside the vocabulary"):
        model.generate(torch.tensor([[1, 2, 10**6]]), max_new_tokens=2)
    with pytest.raises(mc.InputError, match="masks every token"):
        model(input_ids=torch.cat([ids, ids]), attention_mask=torch.zeros(2, 50, dtype=torch.long))
    with pytest.raises(mc.InputError):
        model.sessions = ["not a session"]
    with pytest.raises(mc.InputError, match="no weights"):
        MegaContextForCausalLM.from_pretrained("anything")


def test_forward_is_the_memorys_prefill_and_step(model):
    ids = _ids(120)
    out = model(input_ids=ids[None])
    ref = model.system.session()
    ref.ingest(ids)
    assert out.logits.shape == (1, 1, model.system.base.vocab_size)
    assert torch.equal(out.logits[0, 0], ref.next_token_logits())
    step = model(input_ids=torch.tensor([[5]]), cache=out.cache)
    ref.feed([5])
    assert torch.equal(step.logits[0, 0], ref.next_token_logits())


@pytest.mark.slow
def test_greedy_equals_session_generate_on_the_embedded_model(smollm2_base):
    model = MegaContextForCausalLM.from_base(smollm2_base, w_max=128, block_size=16)
    text = "The capital of France is Paris. " * 4 + "Alice bought apples and pears. " * 16
    ids = model.tokenizer(text + "Question: what is the capital of France? Answer:").input_ids
    ids = torch.tensor(ids)
    out = model.generate(ids[None], max_new_tokens=16, do_sample=False)
    ref = model.system.session()
    ref.ingest(ids)
    assert model.tokenizer.decode(out[0, ids.numel() :]) == ref.generate(16)
    assert torch.equal(_history(model.sessions[0]), _history(ref))
    assert model.sessions[0].cache.lengths[0] <= 128 + 16
