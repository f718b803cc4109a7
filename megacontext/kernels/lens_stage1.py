"""LensNet stage 1: a few queries attend over many entries (split-N, flash-decoding style).

For every batch ``b`` and query row ``m`` (``M`` rows; LensNet uses one row per
(head, tail gist) pair, ``M = heads * 6``), with keys = values = ``x[b]``::

    s[b, m, i] = <q[b, m], x[b, i]>                  i < N, mask[b, i] true
    lse[b, m]  = log sum_i exp(s[b, m, i])           (-inf when no i is visible)
    out[b, m]  = sum_i softmax_i(s[b, m, :]) x[b, i] (0 when no i is visible)

Shapes: ``q [B, M, D]``, ``x [B, N, D]``, optional ``mask [B, N]`` (bool, True =
visible), ``out [B, M, D]`` in ``x.dtype``, ``lse [B, M]`` fp32. No 1/sqrt(d) scale is
applied: LensNet folds it (and the key projection) into ``q``.

Why keys = values = x: LensNet "absorbs" the key projection into the queries
(``q_h . (W_k x)_h = (W_k,h^T q_h) . x``) and applies the value projection after the
weighted sum (``sum_i p_i W_v x_i = W_v sum_i p_i x_i``), so the ``[N, d_lens]`` keys
and values are never formed: stage 1 reads the normalised entries once.

Design:

- Forward: kernel 1 runs one program per (split of ``split_size`` entries, block of
  ``BLOCK_M`` query rows, batch) and keeps an online softmax (running max, running
  sum of exponentials, running weighted sum) over its split; it writes those three
  partials. Kernel 2 merges the splits of each (batch, row) stably: global max
  first, then every split rescaled by ``exp(m_s - max)``. This is flash-decoding:
  M is tiny (48), so parallelism has to come from splitting N.
- Backward: PyTorch, recomputing the probabilities from the saved ``lse``
  (``p = exp(q x^T - lse)``), then two small-M GEMMs. Only ``[B, M, N]`` fp32
  temporaries appear (M = 48: 12.6 MB at N = 65,536), the work is three GEMMs with
  one tiny dimension that cuBLAS runs near bandwidth, and the kernel has one path
  to test instead of two. docs/lensnet.md explains the choice.

Layout of this file: Triton kernels, launcher (shape/dtype/device checks), the
``torch.library`` custom op ``megacontext::lens_stage1`` with its fake
implementation and autograd formula, the public ``lens_stage1`` that dispatches,
and ``lens_stage1_reference``.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ._dispatch import (
    check_float_dtype,
    check_like,
    device_guard,
    dot_dtype,
    import_triton,
    require_runnable,
    shape_of,
    tl_dtype,
    use_triton,
)

triton, tl = import_triton()  # optional: importing this module must not need it

__all__ = ["lens_stage1", "lens_stage1_reference"]

# Widest rows the kernel takes: a program holds a [BLOCK_M, next_pow2(D)] fp32
# accumulator and stages [BLOCK_N, D] tiles in shared memory. Compiled for sm_80/sm_90
# (tests/test_lens_aot.py) it needs 160 KiB of shared memory at fp32 D = 512 and 112 KiB
# at 16-bit D = 1024, within the A100's 163 KiB per block; fp32 D = 1024 would not fit.
MAX_D = {torch.float32: 512, torch.float16: 1024, torch.bfloat16: 1024}

if triton is not None:

    @triton.jit
    def _lens_stage1_split_kernel(
        Q,  # [B, M, D]
        X,  # [B, N, D]
        MASK,  # [B, N] uint8 (only read when HAS_MASK)
        PART_M,  # [B, S, M] fp32 running max per split
        PART_L,  # [B, S, M] fp32 sum of exp(s - max) per split
        PART_ACC,  # [B, S, M, D] fp32 sum of exp(s - max) * x per split
        N,
        M,
        D,
        S,
        split_size,
        stride_qb,
        stride_qm,
        stride_xb,
        stride_xn,
        stride_mb,
        HAS_MASK: tl.constexpr,
        IN_DTYPE: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_s = tl.program_id(0)
        pid_m = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rd = tl.arange(0, BLOCK_D)
        mask_m = rm < M
        mask_d = rd < D

        q = tl.load(
            Q + b * stride_qb + rm[:, None] * stride_qm + rd[None, :],
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )
        # DOT_DTYPE differs from IN_DTYPE only under the interpreter with bf16, whose
        # tl.dot is wrong for bf16: the operands are then rounded to bf16 and multiplied
        # in fp32, which gives the same products a bf16 tensor-core dot would.
        q = q.to(DOT_DTYPE)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        start = pid_s * split_size
        end = tl.minimum(start + split_size, N)
        for n0 in range(start, end, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            valid = rn < end
            x = tl.load(
                X + b * stride_xb + rn[:, None].to(tl.int64) * stride_xn + rd[None, :],
                mask=valid[:, None] & mask_d[None, :],
                other=0.0,
            ).to(DOT_DTYPE)
            if HAS_MASK:
                keep = tl.load(MASK + b * stride_mb + rn, mask=valid, other=0) != 0
                valid = valid & keep
            s = tl.dot(q, tl.trans(x))  # [BLOCK_M, BLOCK_N] fp32
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # rows that have seen no visible entry yet keep m = -inf; exp(-inf - 0) = 0
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(IN_DTYPE).to(DOT_DTYPE), x)
            m_i = m_new

        base = (b * S + pid_s) * M + rm
        tl.store(PART_M + base, m_i, mask=mask_m)
        tl.store(PART_L + base, l_i, mask=mask_m)
        tl.store(
            PART_ACC + base[:, None].to(tl.int64) * D + rd[None, :],
            acc,
            mask=mask_m[:, None] & mask_d[None, :],
        )

    @triton.jit
    def _lens_stage1_combine_kernel(
        PART_M,  # [B, S, M] fp32
        PART_L,  # [B, S, M] fp32
        PART_ACC,  # [B, S, M, D] fp32
        OUT,  # [B, M, D] contiguous, x.dtype
        LSE,  # [B, M] fp32
        M,
        D,
        S,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        m_row = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        rd = tl.arange(0, BLOCK_D)
        mask_d = rd < D

        # pass 1: the global max over the splits
        g_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
        for s0 in range(0, S, BLOCK_S):
            rs = s0 + tl.arange(0, BLOCK_S)
            ms = tl.load(PART_M + (b * S + rs) * M + m_row, mask=rs < S, other=float("-inf"))
            g_max = tl.maximum(g_max, ms)
        mx = tl.max(g_max, axis=0)
        mx_safe = tl.where(mx == float("-inf"), 0.0, mx)

        # pass 2: rescale every split to the global max and sum
        l_sum = tl.zeros([BLOCK_S], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, S, BLOCK_S):
            rs = s0 + tl.arange(0, BLOCK_S)
            mask_s = rs < S
            row = (b * S + rs) * M + m_row
            ms = tl.load(PART_M + row, mask=mask_s, other=float("-inf"))
            ls = tl.load(PART_L + row, mask=mask_s, other=0.0)
            w = tl.exp(ms - mx_safe)  # 0 for empty splits (ms = -inf)
            l_sum += ls * w
            part = tl.load(
                PART_ACC + row[:, None].to(tl.int64) * D + rd[None, :],
                mask=mask_s[:, None] & mask_d[None, :],
                other=0.0,
            )
            acc += tl.sum(part * w[:, None], axis=0)
        l_tot = tl.sum(l_sum, axis=0)
        seen = l_tot > 0.0
        l_safe = tl.where(seen, l_tot, 1.0)
        out = tl.where(seen, acc / l_safe, 0.0)
        lse = tl.where(seen, mx_safe + tl.log(l_safe), float("-inf"))
        tl.store(OUT + (b * M + m_row) * D + rd, out.to(OUT.dtype.element_ty), mask=mask_d)
        tl.store(LSE + b * M + m_row, lse)

else:  # pragma: no cover - triton is installed wherever tests run
    _lens_stage1_split_kernel = _lens_stage1_combine_kernel = None


# ----------------------------------------------------------------------------------------
# launcher


def _check_inputs(
    q: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None
) -> tuple[int, int, int, int]:
    """Validate ``q [B, M, D]``, ``x [B, N, D]``, ``mask [B, N]``; return ``B, M, N, D``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ConfigError(
            f"lens_stage1: x must be a [B, N, D] tensor, got {shape_of(x)}",
            field="x",
            value=shape_of(x),
        )
    B, N, D = x.shape
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.shape[0] != B or q.shape[2] != D:
        raise ConfigError(
            f"lens_stage1: q must be [B, M, D] = [{B}, M, {D}] (x is {tuple(x.shape)}), "
            f"got {shape_of(q)}",
            field="q",
            value=shape_of(q),
        )
    M = q.shape[1]
    if N < 1 or M < 1 or D < 1:
        raise ConfigError(
            f"lens_stage1: need N, M, D >= 1, got x {tuple(x.shape)} and q {tuple(q.shape)}",
            field="x",
            value=tuple(x.shape),
        )
    for name, t in (("q", q), ("x", x)):
        check_float_dtype("lens_stage1", name, t)
    check_like("lens_stage1", "q", q, x, "x")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, N):
            raise ConfigError(
                f"lens_stage1: mask must be [B, N] = [{B}, {N}], got {shape_of(mask)}",
                field="mask",
                value=shape_of(mask),
            )
        if mask.dtype != torch.bool or mask.device != x.device:
            raise ConfigError(
                f"lens_stage1: mask must be a bool tensor on {x.device}, "
                f"got {mask.dtype} on {mask.device}",
                field="mask",
                value=(str(mask.dtype), str(mask.device)),
            )
    return B, M, N, D


def launch_meta(D: int) -> dict[str, int]:
    """Tile sizes and warps of the split kernel for rows of width ``D``."""
    block_d = max(16, triton.next_power_of_2(D))
    return {
        "BLOCK_M": 16,
        "BLOCK_N": 32,
        "BLOCK_D": block_d,
        "num_warps": 4 if block_d <= 256 else 8,
    }


def _default_split(N: int, block_n: int) -> int:
    # ~256 entries per program at long N (128 splits at N = 32k: enough programs for
    # 132 SMs x 3 row blocks); short N still gets >= 8 splits when it has the rows.
    split = 256 if N >= 8 * 256 else max(block_n, -(-N // 8))
    return -(-split // block_n) * block_n


def _lens_stage1_fwd(
    q: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None, split_size: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch both kernels. ``split_size`` 0 picks one; otherwise a multiple of 32 is used."""
    B, M, N, D = _check_inputs(q, x, mask)
    require_runnable("lens_stage1", _lens_stage1_split_kernel, x)
    max_d = MAX_D[x.dtype]
    if x.shape[2] > max_d:
        raise ConfigError(
            f"lens_stage1: the Triton kernel supports D <= {max_d} for {x.dtype}, "
            f"got x {tuple(x.shape)}",
            field="x",
            value=tuple(x.shape),
        )
    if x.stride(2) != 1:
        x = x.contiguous()
    if q.stride(2) != 1:
        q = q.contiguous()
    meta = launch_meta(D)
    block_m, block_n, block_d = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_D"]
    split = _default_split(N, block_n) if split_size <= 0 else split_size
    split = -(-split // block_n) * block_n
    S = -(-N // split)
    dev = x.device
    part_m = torch.empty(B, S, M, device=dev, dtype=torch.float32)
    part_l = torch.empty(B, S, M, device=dev, dtype=torch.float32)
    part_acc = torch.empty(B, S, M, D, device=dev, dtype=torch.float32)
    out = torch.empty(B, M, D, device=dev, dtype=x.dtype)
    lse = torch.empty(B, M, device=dev, dtype=torch.float32)
    if B == 0:  # an empty grid: nothing to launch
        return out, lse
    if mask is not None:
        mask_u8 = mask.to(torch.uint8)
        stride_mb = mask_u8.stride(0)
    else:
        mask_u8, stride_mb = x, 0  # never read
    num_warps = meta["num_warps"]
    with device_guard(x):
        _lens_stage1_split_kernel[(S, triton.cdiv(M, block_m), B)](
            q,
            x,
            mask_u8,
            part_m,
            part_l,
            part_acc,
            N,
            M,
            D,
            S,
            split,
            q.stride(0),
            q.stride(1),
            x.stride(0),
            x.stride(1),
            stride_mb,
            HAS_MASK=mask is not None,
            IN_DTYPE=tl_dtype(x.dtype),
            DOT_DTYPE=dot_dtype(x),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )
        _lens_stage1_combine_kernel[(M, B)](
            part_m,
            part_l,
            part_acc,
            out,
            lse,
            M,
            D,
            S,
            BLOCK_S=min(16, triton.next_power_of_2(S)),
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out, lse


# ----------------------------------------------------------------------------------------
# torch.library custom op (opaque to torch.compile, differentiable through register_autograd)


@torch.library.custom_op("megacontext::lens_stage1", mutates_args=())
def _lens_stage1_op(
    q: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None, split_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, M, D], lse [B, M])`` by the Triton kernels."""
    return _lens_stage1_fwd(q, x, mask, split_size)


@_lens_stage1_op.register_fake
def _(
    q: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None, split_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    B, M, _, D = _check_inputs(q, x, mask)
    return x.new_empty(B, M, D), x.new_empty(B, M, dtype=torch.float32)


def lens_stage1_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dq, dx)`` from the saved log-sum-exp, in PyTorch (fp32 math).

    ``p = exp(q x^T - lse)`` (0 where masked or where the row saw nothing),
    ``dp = dout x^T``, ``ds = p (dp - rowsum(p dp))``, ``dq = ds x``,
    ``dx = p^T dout + ds^T q`` (x is both key and value).
    """
    qf, xf, do = q.float(), x.float(), dout.float()
    s = torch.bmm(qf, xf.transpose(1, 2))  # [B, M, N]
    empty = torch.isneginf(lse)
    p = torch.exp(s - lse.masked_fill(empty, 0.0).unsqueeze(-1))
    p = p.masked_fill(empty.unsqueeze(-1), 0.0)
    if mask is not None:
        p = p.masked_fill(~mask.unsqueeze(1), 0.0)
    dp = torch.bmm(do, xf.transpose(1, 2))
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = torch.bmm(ds, xf)
    dx = torch.bmm(p.transpose(1, 2), do) + torch.bmm(ds.transpose(1, 2), qf)
    return dq.to(q.dtype), dx.to(x.dtype)


def _setup_context(ctx, inputs, output) -> None:
    q, x, mask, _ = inputs
    _, lse = output
    ctx.has_mask = mask is not None
    ctx.save_for_backward(q, x, lse, *((mask,) if mask is not None else ()))
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout: torch.Tensor | None, _dlse: torch.Tensor | None):
    q, x, lse, *rest = ctx.saved_tensors
    if dout is None:
        return None, None, None, None
    dq, dx = lens_stage1_backward(dout, q, x, rest[0] if ctx.has_mask else None, lse)
    return dq, dx, None, None


_lens_stage1_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# public entry point and PyTorch reference


def lens_stage1(
    q: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    split_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Few-query attention of ``q [B, M, D]`` over ``x [B, N, D]`` (keys = values = x).

    Returns ``(out [B, M, D] in x.dtype, lse [B, M] fp32)``; see the module docstring
    for the formula. ``mask [B, N]`` (bool, True = visible) hides entries. Gradients
    flow to ``q`` and ``x`` (not through ``lse``). Runs the Triton kernels on CUDA
    tensors and :func:`lens_stage1_reference` on the CPU, unless ``MEGACONTEXT_KERNELS``
    forces a path. ``split_size`` (kernel only): entries per program, 0 = automatic.
    """
    _check_inputs(q, x, mask)
    if not use_triton(q, x, op="lens_stage1"):
        return lens_stage1_reference(q, x, mask)
    return _lens_stage1_op(q, x, mask, int(split_size))


def lens_stage1_reference(
    q: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch ``lens_stage1`` (fp32 math, ``out`` in ``x.dtype``, ``lse`` fp32)."""
    _check_inputs(q, x, mask)
    xf = x.float()
    s = torch.bmm(q.float(), xf.transpose(1, 2))  # [B, M, N]
    if mask is None:
        lse = torch.logsumexp(s, dim=-1)
        out = torch.bmm(torch.softmax(s, dim=-1), xf)
        return out.to(x.dtype), lse
    s = s.masked_fill(~mask.unsqueeze(1), float("-inf"))
    # a batch row with nothing visible would give 0/0: score it 0, then zero it out
    empty = ~mask.any(dim=-1)
    s = s.masked_fill(empty[:, None, None], 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(empty[:, None, None], 0.0)
    lse = torch.logsumexp(s, dim=-1).masked_fill(empty[:, None], float("-inf"))
    return torch.bmm(p, xf).to(x.dtype), lse
