"""Fused gist pooling: learned-query attention read-out of B blocks in one launch.

For every block ``b`` (``N`` rows, width ``D``) and head ``h`` (``H`` heads of
width ``dh = D // H``; head ``h`` owns columns ``[h*dh, (h+1)*dh)``)::

    s[b, h, j]   = <q[h], x[b, j, h]> / sqrt(dh)            j < N
    p[b, h, :]   = softmax_j(s[b, h, :])
    pooled[b, h] = sum_j p[b, h, j] * x[b, j, h]            -> pooled [B, D]
    out          = pooled @ w_o                             -> [B, d_out]  (optional)

Shapes: ``x [B, N, D]``, ``q [H, dh]``, ``w_o [D, d_out]``. fp32, fp16 and bf16
inputs; every reduction accumulates in fp32; outputs are in ``x.dtype``.

Design (why it looks like this):

- One Triton program per (block, head) reads its ``[N, dh]`` tile once, keeps it
  in registers, and does scores, softmax and weighted sum there: the op reads ``x``
  once and writes ``B*D`` values, so it is bound by memory bandwidth. Heads wider
  than 128 are processed in chunks, in two passes (scores; then outputs), the second
  re-reading the program's own tile, which is still in L1/L2.
- The forward saves only ``x``, ``q`` and the log-sum-exp ``lse [B, H]`` (fp32);
  the backward is a second Triton kernel (same grid) that recomputes the
  probabilities from ``lse`` and writes ``dx`` in one pass, plus per-block partials
  of ``dq`` that are summed over ``B`` on the host side of the launch (no atomics,
  so gradients are deterministic). A PyTorch recomputation instead would
  materialise ``[B, N, D]`` temporaries (``p * dpooled``, ``ds * q``), several times
  the traffic of reading ``x``.
- The output projection is *not* fused into the pooling kernel: ``pooled`` is 1/N
  of ``x`` (N=32), so writing and re-reading it costs ``2·B·D`` elements (≤ 6% of
  reading ``x``). A fused epilogue saves that but makes every program read all of
  ``w_o``: ``(B/BLOCK_B)·D·d_out`` elements, more than it saves unless ``BLOCK_B >
  d_out/2`` (288 blocks per program at d_out=576), far more than fits in registers;
  tiling ``d_out`` over the grid instead re-reads ``x`` once per output tile. ``gist_pool`` therefore calls the kernel
  and then one cuBLAS matmul; autograd differentiates that matmul.

Layout of this file: Triton kernels, launchers (shape/dtype/device checks), the
``torch.library`` custom op ``megacontext::gist_pool`` with its fake (meta)
implementation and autograd formula (so it works under ``torch.compile``), the
public ``gist_pool`` entry point that dispatches, and ``gist_pool_reference``.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ._dispatch import (
    check_float_dtype,
    check_like,
    device_guard,
    import_triton,
    require_runnable,
    shape_of,
    use_triton,
)

triton, tl = import_triton()  # optional: importing this module must not need it

__all__ = ["gist_pool", "gist_pool_reference"]

if triton is not None:

    @triton.jit
    def _gist_pool_fwd_kernel(
        X,  # [B, N, D], last dim contiguous
        Q,  # [H, DH], contiguous
        POOLED,  # [B, D], contiguous
        LSE,  # [B, H] fp32
        N,
        D,
        H,
        DH,
        stride_xb,
        stride_xn,
        scale,
        BLOCK_N: tl.constexpr,
        BLOCK_DH: tl.constexpr,
        ONE_CHUNK: tl.constexpr,  # DH <= BLOCK_DH: keep the whole [N, dh] tile in registers
    ):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        rn = tl.arange(0, BLOCK_N)
        rd = tl.arange(0, BLOCK_DH)
        mask_n = rn < N
        x_row = X + b * stride_xb + rn[:, None] * stride_xn + h * DH

        if ONE_CHUNK:
            mask_d = rd < DH
            x = tl.load(x_row + rd[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            x = x.to(tl.float32)
            q = tl.load(Q + h * DH + rd, mask=mask_d, other=0.0).to(tl.float32)
            s = tl.sum(x * q[None, :], axis=1)
        else:
            # wide heads: scores accumulated over dh chunks (bounded registers)
            s = tl.zeros([BLOCK_N], dtype=tl.float32)
            for d0 in range(0, DH, BLOCK_DH):
                cd = d0 + rd
                mask_d = cd < DH
                x = tl.load(x_row + cd[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                q = tl.load(Q + h * DH + cd, mask=mask_d, other=0.0).to(tl.float32)
                s += tl.sum(x.to(tl.float32) * q[None, :], axis=1)

        s = tl.where(mask_n, s * scale, float("-inf"))
        m = tl.max(s, axis=0)
        e = tl.exp(s - m)
        l_sum = tl.sum(e, axis=0)
        p = e / l_sum

        out_row = POOLED + b * D + h * DH
        if ONE_CHUNK:
            pooled = tl.sum(p[:, None] * x, axis=0)
            tl.store(out_row + rd, pooled.to(POOLED.dtype.element_ty), mask=mask_d)
        else:
            # second pass over the chunks (this program's tile is still in L1/L2)
            for d0 in range(0, DH, BLOCK_DH):
                cd = d0 + rd
                mask_d = cd < DH
                x = tl.load(x_row + cd[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                pooled = tl.sum(p[:, None] * x.to(tl.float32), axis=0)
                tl.store(out_row + cd, pooled.to(POOLED.dtype.element_ty), mask=mask_d)
        tl.store(LSE + b * H + h, m + tl.log(l_sum))

    @triton.jit
    def _gist_pool_bwd_kernel(
        X,  # [B, N, D], last dim contiguous
        Q,  # [H, DH], contiguous
        DPOOLED,  # [B, D], contiguous
        LSE,  # [B, H] fp32
        DX,  # [B, N, D], contiguous
        DQ_PARTIAL,  # [B, H, DH] fp32
        N,
        D,
        H,
        DH,
        stride_xb,
        stride_xn,
        scale,
        BLOCK_N: tl.constexpr,
        BLOCK_DH: tl.constexpr,
        ONE_CHUNK: tl.constexpr,  # DH <= BLOCK_DH: keep the whole [N, dh] tile in registers
    ):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        rn = tl.arange(0, BLOCK_N)
        rd = tl.arange(0, BLOCK_DH)
        mask_n = rn < N
        x_row = X + b * stride_xb + rn[:, None] * stride_xn + h * DH
        dx_row = DX + b * N * D + rn[:, None] * D + h * DH
        dpo_row = DPOOLED + b * D + h * DH
        dq_row = DQ_PARTIAL + (b * H + h) * DH
        lse = tl.load(LSE + b * H + h)

        # pooled = sum_j p_j x_j  =>  dp_j = <dpooled, x_j>,  ds_j = p_j (dp_j - <p, dp>)
        if ONE_CHUNK:
            mask_d = rd < DH
            mask = mask_n[:, None] & mask_d[None, :]
            x = tl.load(x_row + rd[None, :], mask=mask, other=0.0).to(tl.float32)
            q = tl.load(Q + h * DH + rd, mask=mask_d, other=0.0).to(tl.float32)
            dpo = tl.load(dpo_row + rd, mask=mask_d, other=0.0).to(tl.float32)
            s = tl.sum(x * q[None, :], axis=1)
            dp = tl.sum(x * dpo[None, :], axis=1)
        else:
            s = tl.zeros([BLOCK_N], dtype=tl.float32)
            dp = tl.zeros([BLOCK_N], dtype=tl.float32)
            for d0 in range(0, DH, BLOCK_DH):
                cd = d0 + rd
                mask_d = cd < DH
                mask = mask_n[:, None] & mask_d[None, :]
                x = tl.load(x_row + cd[None, :], mask=mask, other=0.0).to(tl.float32)
                q = tl.load(Q + h * DH + cd, mask=mask_d, other=0.0).to(tl.float32)
                dpo = tl.load(dpo_row + cd, mask=mask_d, other=0.0).to(tl.float32)
                s += tl.sum(x * q[None, :], axis=1)
                dp += tl.sum(x * dpo[None, :], axis=1)

        # p recomputed from the saved log-sum-exp (as in FlashAttention's backward)
        p = tl.where(mask_n, tl.exp(s * scale - lse), 0.0)
        delta = tl.sum(p * dp, axis=0)
        ds = p * (dp - delta) * scale

        # x_j is both a value (weight p_j) and a key (score gradient ds_j against q)
        if ONE_CHUNK:
            dx = p[:, None] * dpo[None, :] + ds[:, None] * q[None, :]
            tl.store(dx_row + rd[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            tl.store(dq_row + rd, tl.sum(ds[:, None] * x, axis=0), mask=mask_d)
        else:
            for d0 in range(0, DH, BLOCK_DH):
                cd = d0 + rd
                mask_d = cd < DH
                mask = mask_n[:, None] & mask_d[None, :]
                x = tl.load(x_row + cd[None, :], mask=mask, other=0.0).to(tl.float32)
                q = tl.load(Q + h * DH + cd, mask=mask_d, other=0.0).to(tl.float32)
                dpo = tl.load(dpo_row + cd, mask=mask_d, other=0.0).to(tl.float32)
                dx = p[:, None] * dpo[None, :] + ds[:, None] * q[None, :]
                tl.store(dx_row + cd[None, :], dx.to(DX.dtype.element_ty), mask=mask)
                tl.store(dq_row + cd, tl.sum(ds[:, None] * x, axis=0), mask=mask_d)

else:  # pragma: no cover - triton is installed wherever tests run
    _gist_pool_fwd_kernel = _gist_pool_bwd_kernel = None


# ----------------------------------------------------------------------------------------
# launchers


def _check_inputs(x: torch.Tensor, q: torch.Tensor) -> tuple[int, int, int, int, int]:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = shape_of(x)
        raise ConfigError(
            f"gist_pool: x must be a [B, N, D] tensor, got shape {shape}", field="x", value=shape
        )
    if not isinstance(q, torch.Tensor) or q.dim() != 2:
        shape = shape_of(q)
        raise ConfigError(
            f"gist_pool: q must be a [H, dh] tensor, got shape {shape}", field="q", value=shape
        )
    B, N, D = x.shape
    H, dh = q.shape
    if H * dh != D:
        raise ConfigError(
            f"gist_pool: q must be [H, dh] with H*dh == D={D} (x is {tuple(x.shape)}), "
            f"got q {tuple(q.shape)}",
            field="q",
            value=tuple(q.shape),
        )
    if N < 1 or D < 1:
        raise ConfigError(
            f"gist_pool: x must have N >= 1 rows and D >= 1 columns, got {tuple(x.shape)}",
            field="x",
            value=tuple(x.shape),
        )
    for name, t in (("x", x), ("q", q)):
        check_float_dtype("gist_pool", name, t)
    check_like("gist_pool", "q", q, x, "x")
    return B, N, D, H, dh


# Widest head chunk one program holds in registers. Heads up to 128 wide are one tile
# kept in registers; wider heads loop over chunks in two passes (scores, then
# outputs; the second pass re-reads the program's tile from L1/L2), in chunks of 128
# (forward) or 64 (backward, which holds more per row). Chosen from ptxas register
# and spill counts for sm_90 (no spills; test_gist_pool.py checks), not from timings.
_MAX_BLOCK_DH = 128
_BWD_CHUNK_DH = 64


def _meta(N: int, dh: int, backward: bool = False) -> tuple[int, int, bool, int]:
    """``(BLOCK_N, BLOCK_DH, ONE_CHUNK, num_warps)`` for a launch."""
    block_n = triton.next_power_of_2(N)
    block_dh = triton.next_power_of_2(dh)
    one_chunk = block_dh <= _MAX_BLOCK_DH
    if not one_chunk:
        block_dh = _BWD_CHUNK_DH if backward else _MAX_BLOCK_DH
    # the fp32 [BLOCK_N, BLOCK_DH] tile lives in registers: ~32 of its values per thread
    # in the forward; the backward holds x and dx tiles together, so ~16 per thread
    per_thread = 16 if backward else 32
    num_warps = max(1, min(8, (block_n * block_dh) // (32 * per_thread)))
    return block_n, block_dh, one_chunk, num_warps


def _gist_pool_fwd(x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns ``pooled [B, D]`` (x.dtype) and ``lse [B, H]`` (fp32)."""
    B, N, D, H, dh = _check_inputs(x, q)
    require_runnable("gist_pool", _gist_pool_fwd_kernel, x)
    if x.stride(2) != 1:
        x = x.contiguous()
    q = q.contiguous()
    pooled = torch.empty(B, D, device=x.device, dtype=x.dtype)
    lse = torch.empty(B, H, device=x.device, dtype=torch.float32)
    if B == 0:
        return pooled, lse
    block_n, block_dh, one_chunk, num_warps = _meta(N, dh)
    with device_guard(x):
        _gist_pool_fwd_kernel[(B, H)](
            x,
            q,
            pooled,
            lse,
            N,
            D,
            H,
            dh,
            x.stride(0),
            x.stride(1),
            1.0 / math.sqrt(dh),
            BLOCK_N=block_n,
            BLOCK_DH=block_dh,
            ONE_CHUNK=one_chunk,
            num_warps=num_warps,
        )
    return pooled, lse


def _gist_pool_bwd(
    dpooled: torch.Tensor, x: torch.Tensor, q: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel. Returns ``dx [B, N, D]`` (x.dtype) and ``dq [H, dh]`` (q.dtype)."""
    B, N, D, H, dh = _check_inputs(x, q)
    require_runnable("gist_pool", _gist_pool_bwd_kernel, x)
    if tuple(dpooled.shape) != (B, D):
        raise ConfigError(
            f"gist_pool backward: dpooled must be [B, D] = {(B, D)}, got {tuple(dpooled.shape)}",
            field="dpooled",
            value=tuple(dpooled.shape),
        )
    if x.stride(2) != 1:
        x = x.contiguous()
    q = q.contiguous()
    dpooled = dpooled.contiguous()
    lse = lse.contiguous()
    dx = torch.empty(B, N, D, device=x.device, dtype=x.dtype)
    dq_partial = torch.empty(B, H, dh, device=x.device, dtype=torch.float32)
    if B == 0:
        return dx, torch.zeros_like(q)
    block_n, block_dh, one_chunk, num_warps = _meta(N, dh, backward=True)
    with device_guard(x):
        _gist_pool_bwd_kernel[(B, H)](
            x,
            q,
            dpooled,
            lse,
            dx,
            dq_partial,
            N,
            D,
            H,
            dh,
            x.stride(0),
            x.stride(1),
            1.0 / math.sqrt(dh),
            BLOCK_N=block_n,
            BLOCK_DH=block_dh,
            ONE_CHUNK=one_chunk,
            num_warps=num_warps,
        )
    return dx, dq_partial.sum(0).to(q.dtype)


# ----------------------------------------------------------------------------------------
# torch.library custom op (opaque to torch.compile, differentiable through register_autograd)


@torch.library.custom_op("megacontext::gist_pool", mutates_args=())
def _gist_pool_op(x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pooled [B, D], lse [B, H])`` by the Triton kernel."""
    return _gist_pool_fwd(x, q)


@_gist_pool_op.register_fake
def _(x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, _, D, H, _ = _check_inputs(x, q)
    return x.new_empty(B, D), x.new_empty(B, H, dtype=torch.float32)


@torch.library.custom_op("megacontext::gist_pool_backward", mutates_args=())
def _gist_pool_backward_op(
    dpooled: torch.Tensor, x: torch.Tensor, q: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx [B, N, D], dq [H, dh])`` by the Triton backward kernel."""
    return _gist_pool_bwd(dpooled, x, q, lse)


@_gist_pool_backward_op.register_fake
def _(
    dpooled: torch.Tensor, x: torch.Tensor, q: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(x, q)
    return torch.empty_like(x), torch.empty_like(q)


def _setup_context(ctx, inputs, output) -> None:
    x, q = inputs
    _, lse = output
    ctx.save_for_backward(x, q, lse)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dpooled: torch.Tensor, _dlse: torch.Tensor | None):
    x, q, lse = ctx.saved_tensors
    if dpooled is None:
        return None, None
    dx, dq = _gist_pool_backward_op(dpooled, x, q, lse)
    return dx, dq


_gist_pool_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# public entry point and PyTorch reference


def gist_pool(x: torch.Tensor, q: torch.Tensor, w_o: torch.Tensor | None = None) -> torch.Tensor:
    """Learned-query attention pooling of ``x [B, N, D]`` with ``q [H, dh]``.

    Returns ``pooled [B, D]``, or ``pooled @ w_o`` (``[B, d_out]``) when ``w_o [D,
    d_out]`` is given. Differentiable in ``x``, ``q`` and ``w_o``. Runs the Triton
    kernel on CUDA tensors and :func:`gist_pool_reference` on the CPU, unless
    ``MEGACONTEXT_KERNELS`` forces one path (see ``megacontext.kernels._dispatch``).
    """
    _check_inputs(x, q)
    if w_o is not None:
        _check_proj(x, w_o)
    if not use_triton(x, q, op="gist_pool"):
        return gist_pool_reference(x, q, w_o)
    pooled, _ = _gist_pool_op(x, q)
    return pooled if w_o is None else pooled @ w_o


def _check_proj(x: torch.Tensor, w_o: torch.Tensor) -> None:
    D = x.shape[-1]
    if not isinstance(w_o, torch.Tensor) or w_o.dim() != 2 or w_o.shape[0] != D:
        shape = shape_of(w_o)
        raise ConfigError(
            f"gist_pool: w_o must be a [D, d_out] tensor with D={D}, got {shape}",
            field="w_o",
            value=shape,
        )
    check_like("gist_pool", "w_o", w_o, x, "x")


def gist_pool_reference(
    x: torch.Tensor, q: torch.Tensor, w_o: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain PyTorch ``gist_pool`` (same formula, fp32 internally, output in ``x.dtype``)."""
    B, N, D, H, dh = _check_inputs(x, q)
    xh = x.float().reshape(B, N, H, dh)
    s = torch.einsum("bnhd,hd->bhn", xh, q.float()) * (1.0 / math.sqrt(dh))
    p = torch.softmax(s, dim=-1)
    pooled = torch.einsum("bhn,bnhd->bhd", p, xh).reshape(B, D).to(x.dtype)
    if w_o is None:
        return pooled
    _check_proj(x, w_o)
    return pooled @ w_o
