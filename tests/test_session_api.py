"""The public session API: every bad argument is an InputError naming it, and a call
that fails leaves the session exactly as it was."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_session_store import _ids, _session

import megacontext as mc


def _state(s):
    """Everything a call may change, as comparable values."""
    n = len(s.wc) if s.wc is not None else 0
    return (
        s.num_tokens,
        None if s.wc is None else (s.wc.levels.tolist(), s.wc.nodes.tolist()),
        None if s._next_logits is None else s.next_token_logits(),
        s.allocator.state_dict()["state"],
        s.cache.kv[..., :n, :].clone(),
        s.iteration,
        len(s.history),
        len(s.actions),
    )


def _same(a, b) -> bool:
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


BAD_IDS = [
    ([2**70], "text_or_ids"),
    (["a"], "text_or_ids"),
    (None, "text_or_ids"),
    (b"hello", "decode bytes"),
    ([], "empty"),
    (torch.tensor([], dtype=torch.long), "empty"),
    (torch.zeros(2, 40, dtype=torch.long), "1-D"),
    ([[1, 2], [3, 4]], "1-D"),
    (torch.tensor(7), "1-D"),
    ([1.5, 2.0], "integers"),
    ([True, False], "integers"),
    (np.array([2**63 + 5], dtype=np.uint64), "9223372036854775813"),
    ({1, 2}, "text_or_ids"),
]


def test_bad_ids_are_named_and_change_nothing(tiny_base):
    s = _session(tiny_base)
    s.ingest(_ids(300))
    before = _state(s)
    for ids, match in BAD_IDS:
        with pytest.raises(mc.InputError, match=match) as e:
            s.ingest(ids)
        assert "text_or_ids" in str(e.value), (ids, str(e.value))
        with pytest.raises(mc.InputError, match="ids"):
            s.feed(ids)
        with pytest.raises(mc.InputError, match="ids"):
            s.loss_at_h(ids)
        assert _same(_state(s), before), ids
    with pytest.raises(mc.InputError, match="empty"):
        s.ingest([])


@pytest.mark.parametrize("chunk", [-1, 0, 2.5, True, "8"])
def test_bad_chunk_tokens_is_refused_not_ignored(tiny_base, chunk):
    s = _session(tiny_base)
    s.ingest(_ids(100))
    before = _state(s)
    with pytest.raises(mc.InputError, match="chunk_tokens"):
        s.ingest(_ids(300, seed=1), chunk_tokens=chunk)
    assert _same(_state(s), before)
    assert s.ingest(_ids(300, seed=1), chunk_tokens=np.int64(100)) == 300
    assert s.num_tokens == 400


def test_a_batch_of_sequences_is_not_flattened(tiny_base):
    s = _session(tiny_base)
    s.ingest(_ids(300))
    before = _state(s)
    for call in (s.ingest, s.feed, s.loss_at_h):
        with pytest.raises(mc.InputError, match=r"shape \(2, 40\)"):
            call(torch.randint(0, 1000, (2, 40)))
    assert _same(_state(s), before)


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": "3"}, "max_new_tokens"),
        ({"max_new_tokens": None}, "max_new_tokens"),
        ({"max_new_tokens": 3, "temperature": math.nan}, "temperature"),
        ({"max_new_tokens": 3, "temperature": math.inf}, "temperature"),
        ({"max_new_tokens": 3, "temperature": -0.5}, "temperature"),
        ({"max_new_tokens": 3, "temperature": "hot"}, "temperature"),
        ({"max_new_tokens": 3, "top_p": math.nan}, "top_p"),
        ({"max_new_tokens": 3, "top_p": 0}, "top_p"),
        ({"max_new_tokens": 3, "top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 3, "stop": 5}, "stop"),
        ({"max_new_tokens": 3, "stop": ["ok", 5]}, "stop"),
        ({"max_new_tokens": 3, "seed": 1.5}, "seed"),
        ({"max_new_tokens": 3, "seed": "x"}, "seed"),
        ({"max_new_tokens": 3, "stop_at_eos": "no"}, "stop_at_eos"),
    ],
)
def test_bad_generate_arguments_are_named(tiny_base, kwargs, arg):
    s = _session(tiny_base)
    s.ingest(_ids(200))
    before = _state(s)
    with pytest.raises(mc.InputError, match=arg):
        s.generate(**kwargs)
    assert _same(_state(s), before)


def test_bad_horizon_and_progress(tiny_base):
    s = _session(tiny_base)
    s.ingest(_ids(200))
    for h in (0, -3, 2.5, "4"):
        with pytest.raises(mc.InputError, match="horizon"):
            s.loss_at_h(_ids(10), horizon=h)
    with pytest.raises(mc.InputError, match="progress"):
        s.ingest(_ids(10), progress="yes")
    assert s.num_tokens == 200
    # numpy and 0-d tensor integers are integers
    assert isinstance(s.loss_at_h(_ids(10), horizon=np.int32(4)), float)
    assert isinstance(s.generate(torch.tensor(2), seed=np.int64(3), temperature=0.5), str)


def _small(base):
    cfg = mc.MegaContextConfig(
        model=base.name, block_size=8, levels=1, recent_tokens=16, w_max=40, kv_mode="splice"
    )
    from session_checks import RuleScorer

    s = mc.MegaContext(base, None, RuleScorer(), cfg).session()
    s.ingest(_ids(184))  # the coarsest WC of 216 tokens no longer fits in 40 entries
    return s


@pytest.mark.parametrize("call", ["generate", "feed"])
def test_a_call_that_overflows_the_budget_changes_nothing(tiny_base, tmp_path, call):
    s, twin = _small(tiny_base), _small(tiny_base)
    s.generate(3), twin.generate(3)
    before = _state(s)
    with pytest.raises(mc.ConfigError, match="w_max=40 cannot hold"):
        if call == "generate":
            s.generate(60)
        else:
            s.feed(_ids(60, seed=4))
    after = _state(s)
    assert _same(after[:4], before[:4]) and _same(after[5:], before[5:])
    torch.testing.assert_close(after[4], before[4], rtol=0, atol=1e-5)
    assert len(s.wc) <= s.config.w_max + s.config.block_size
    s.save(tmp_path / "sess")  # savable, and reopens
    r = mc.MegaContext.open(tmp_path / "sess", base=tiny_base, lensnet=s.system.lensnet)
    assert torch.equal(r.next_token_logits(), s.next_token_logits())
    assert s.generate(20) == twin.generate(20)  # and it decodes on as if nothing failed
    torch.testing.assert_close(s.next_token_logits(), twin.next_token_logits())


def test_an_interrupted_generate_changes_nothing(tiny_base, monkeypatch):
    from megacontext import runtime

    s = _small(tiny_base)
    before = _state(s)
    calls = []
    real = runtime.sample_token

    def sample(*args):
        calls.append(1)
        if len(calls) == 12:  # after a refocus (every 8 tokens) rewrote cached rows
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(runtime, "sample_token", sample)
    with pytest.raises(KeyboardInterrupt):
        s.generate(20)
    after = _state(s)
    assert _same(after[:4], before[:4]) and _same(after[5:], before[5:])
    torch.testing.assert_close(after[4], before[4], rtol=0, atol=1e-5)


def test_batch_generate_arguments_are_named(tiny_base):
    a, b = _session(tiny_base), _session(tiny_base)
    a.ingest(_ids(200)), b.ingest(_ids(150, seed=1))
    batch = a.system.batch([a, b])
    for kwargs, arg in (
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"max_new_tokens": 2, "temperature": math.nan}, "temperature"),
        ({"max_new_tokens": 2, "top_p": 0}, "top_p"),
        ({"max_new_tokens": 2, "seed": "s"}, "seed"),
    ):
        with pytest.raises(mc.InputError, match=arg):
            batch.generate(**kwargs)
    assert a.num_tokens == 200 and b.num_tokens == 150
