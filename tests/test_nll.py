from __future__ import annotations

import pytest
import torch

import megacontext as mc


def _full_forward_nll(base, ids):
    logp = base.model(input_ids=ids[None]).logits[0].float().log_softmax(-1)
    return -logp[:-1].gather(1, ids[1:, None])[:, 0]


def test_whole_sequence_in_one_window_equals_full_forward(tiny_base):
    ids = torch.randint(0, tiny_base.vocab_size, (77,), generator=torch.Generator().manual_seed(0))
    got = mc.token_nll(tiny_base, ids, window=128)
    torch.testing.assert_close(got, _full_forward_nll(tiny_base, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("window", "stride"), [(16, 8), (16, 1), (16, 15), (9, 4), (2, 1)])
def test_sliding_window_scores_each_target_once_with_its_window(tiny_base, window, stride):
    g = torch.Generator().manual_seed(window * 100 + stride)
    ids = torch.randint(0, tiny_base.vocab_size, (41,), generator=g)
    got = mc.token_nll(tiny_base, ids, window=window, stride=stride)
    assert got.shape == (40,)
    # Recompute each target from the definition: the context the sliding schedule
    # gives it is ids[start:t+1] where start is its window's start.
    done, expected = 0, torch.empty(40)
    while done < 40:
        end = min(41, done + 1 + (window - 1 if done == 0 else stride))
        start = max(0, end - window)
        ref = _full_forward_nll(tiny_base, ids[start:end])
        expected[done : end - 1] = ref[done - start :]
        done = end - 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_progress_callback_reaches_total(tiny_base):
    seen = []
    mc.token_nll(tiny_base, torch.arange(50), window=16, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (49, 49) and [d for d, _ in seen] == sorted(d for d, _ in seen)


@pytest.mark.parametrize(
    ("ids", "kwargs", "match"),
    [
        (torch.tensor([3]), {}, "at least 2 tokens"),
        (torch.arange(10), {"window": 1}, "window"),
        (torch.arange(10), {"window": 8, "stride": 8}, "stride"),
        (torch.tensor([1, 49152]), {}, "token ids"),
    ],
)
def test_bad_inputs(tiny_base, ids, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mc.token_nll(tiny_base, ids, **kwargs)
