"""What the kernel tests share: the comparison of a kernel's output with its reference.

tests/ is on ``sys.path`` under pytest (rootdir-relative imports of test helpers), so
the kernel tests import this module by name. The per-dtype tolerances stay in each
test file: they follow from each kernel's own arithmetic, which its comment derives.
"""

from __future__ import annotations

import torch


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str, relative: bool = True
) -> None:
    """Same shape and dtype, and ``|actual - expected| <= tol * (|expected| + scale)``.

    ``scale = max(1, max|expected|)`` when ``relative`` (a one-ulp difference in a
    large entry is amplified into entries near zero by a following product), else 1
    (outputs bounded by 1, such as tanh scores). ``what`` names the failing quantity.
    """
    assert actual.shape == expected.shape, what
    assert actual.dtype == expected.dtype, what
    a, e = actual.float(), expected.float()
    scale = max(1.0, e.abs().max().item()) if relative else 1.0
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")
