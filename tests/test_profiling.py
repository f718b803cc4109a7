from __future__ import annotations

import pytest

from megacontext import profiling


@pytest.fixture(autouse=True)
def _restore():
    saved = profiling._enabled
    yield
    profiling._enabled = saved


def test_disabled_range_is_a_shared_null_context(monkeypatch):
    monkeypatch.delenv("MEGACONTEXT_NVTX", raising=False)
    profiling._enabled = None
    assert profiling.enabled() is False
    first, second = profiling.range("a"), profiling.range("b")
    assert first is second  # no allocation per call when disabled
    with first:
        pass


def test_env_flag_needs_cuda(monkeypatch):
    import torch

    monkeypatch.setenv("MEGACONTEXT_NVTX", "1")
    profiling._enabled = None
    assert profiling.enabled() is torch.cuda.is_available()


def test_enabled_range_pushes_and_pops_nvtx():
    profiling.enable(True)
    with profiling.range("outer"), profiling.range("inner", color="blue"):
        x = 1
    assert x == 1
    with pytest.raises(RuntimeError), profiling.range("raises"):
        raise RuntimeError("the range still closes")
    profiling.enable(False)
    assert profiling.range("off") is profiling._NULL
