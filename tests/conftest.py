"""Test-wide setup.

Triton kernels run on the CPU through Triton's interpreter when no CUDA device is
present. ``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so
it is set here, before any test module imports a kernel (pytest loads this file
first even when one test file is run on its own).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def force_triton(monkeypatch):
    """Run the Triton kernels (interpreted on the CPU) instead of the references."""
    monkeypatch.setenv("MEGACONTEXT_KERNELS", "triton")


@pytest.fixture(autouse=True, scope="session")
def _offline() -> None:
    # Tests never reach a hub: loading a model that is not on disk must fail fast.
    os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_base():
    """The seeded random 2-layer Llama (d=64) with the SmolLM2 tokenizer."""
    import megacontext as mc

    return mc.load_base("tiny-llama", device="cpu")


@pytest.fixture(scope="session")
def smollm2_base():
    """The embedded default model (SmolLM2-135M-Instruct), fp32 on the CPU."""
    import megacontext as mc

    return mc.load_base("smollm2-135m", device="cpu")
