"""Suites on tiny-llama: the positional-consistency check through a real session."""

from __future__ import annotations

import pytest
import torch

import megacontext as mc
from megacontext.errors import InvariantError
from megacontext.eval.peers import untrained_system
from megacontext.eval.suites import positional_consistency, sweep_documents


@pytest.fixture(scope="module")
def base():
    return mc.load_base("tiny-llama")


def test_positional_consistency_after_swaps(base):
    system = untrained_system(base, mc.MegaContextConfig(model="tiny-llama", w_max=128))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 5000, (400,), generator=g)
    out = positional_consistency(base, system, ids[:320], ids[320:], budget=128)
    assert out["actions"] > 0  # the random scorer really swapped
    assert out["refocus_checked"] == 1 + 80 // 32
    assert out["gists_checked"] > 0
    assert out["max_key_err"] < 1e-4


def test_positional_consistency_catches_a_wrong_key(base, monkeypatch):
    system = untrained_system(base, mc.MegaContextConfig(model="tiny-llama", w_max=128))
    ids = torch.randint(10, 5000, (330,), generator=torch.Generator().manual_seed(1))
    from megacontext.working_context import WorkingContext

    real = WorkingContext.positions
    # a checker fed shifted gist positions must see the cached keys disagree
    monkeypatch.setattr(
        WorkingContext,
        "positions",
        lambda self, *a: real(self, *a) + (self.levels > 0).long(),
    )
    with pytest.raises(InvariantError):
        positional_consistency(base, system, ids[:320], ids[320:], budget=128)


def test_sweep_documents_alternate_code_and_prose(base):
    docs = sweep_documents(base, 2, 200)
    assert [k for _, k, _ in docs] == ["code", "prose"]
    assert all(ids.numel() == 200 for _, _, ids in docs)
