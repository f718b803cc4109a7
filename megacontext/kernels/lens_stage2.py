"""LensNet stage 2 fused with the scoring head: every entry attends to the 6 tail gists.

For every batch ``b`` and entry ``i`` (``H`` heads, ``T`` tail gists per head,
``G = H * T`` columns ordered head-major: column ``h*T + t``)::

    xn      = layernorm(x[b, i])                         (no affine; eps)
    s       = xn @ a[b] + a0[b]                          [G]
    p[h, :] = softmax_t(s[h*T : (h+1)*T])                per head, over the T gists
    y       = x[b, i] + p @ c[b]                         [D]   (residual)
    -- with the head (w1 given):
    yn      = layernorm(y)                               (no affine; eps)
    score   = tanh(w2 . gelu(yn @ w1 + b1) + b2)         scalar in [-1, 1]

Shapes: ``x [B, N, D]``, ``a [B, D, G]``, ``a0 [B, G]``, ``c [B, G, D]``, ``w1 [D, Hh]``,
``b1 [Hh]``, ``w2 [Hh]``, ``b2 [1]``; all in ``x.dtype`` (fp32, fp16 or bf16), fp32
accumulation. Output: ``scores [B, N]`` with the head, ``y [B, N, D]`` without it (the
non-final LensNet blocks). gelu is the exact (erf) one.

Why this form: LensNet folds everything that depends only on the 6 tail gists into
``a``, ``a0`` and ``c`` once per call (``a = gamma * W_q,h^T k_{t,h} / sqrt(dh)``,
``c = v_{t,h} W_o,h^T``; LayerNorm affines into ``a``, ``a0``, ``w1``, ``b1``), so per
entry the whole stage is: two LayerNorms, a ``[D] x [D, G]`` and a ``[G] x [G, D]``
product, a 6-way softmax per head, a ``[D] x [D, Hh]`` product and a dot. One program
handles ``BLOCK_N`` entries and walks ``D`` in chunks, re-reading its ``x`` rows from
L1/L2 (four short passes) instead of holding ``[BLOCK_N, D]`` in registers; nothing of
width ``D`` is written to memory except ``y`` in the head-less mode.

Backward: PyTorch, by re-running :func:`lens_stage2_reference` on the saved inputs
under autograd (see docs/lensnet.md for why this op has no fused backward).

Layout of this file: Triton kernel, launcher (shape/dtype/device checks), the
``torch.library`` custom op ``megacontext::lens_stage2`` with its fake
implementation and autograd formula, the public ``lens_stage2`` that dispatches,
and ``lens_stage2_reference``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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

__all__ = ["lens_stage2", "lens_stage2_reference"]

MAX_HIDDEN = 512  # the head's hidden activations [BLOCK_N, next_pow2(Hh)] stay in registers

if triton is not None:

    @triton.jit
    def _lens_stage2_kernel(
        X,  # [B, N, D], last dim contiguous
        A,  # [B, D, G], last dim contiguous
        A0,  # [B, G], last dim contiguous
        C,  # [B, G, D], last dim contiguous
        W1,  # [D, HH], last dim contiguous
        B1,  # [HH]
        W2,  # [HH]
        B2,  # [1]
        OUT,  # scores [B, N] (HEAD) or y [B, N, D]
        N,
        D,
        T,
        H,
        HH,
        eps,
        stride_xb,
        stride_xn,
        stride_ab,
        stride_ad,
        stride_a0b,
        stride_cb,
        stride_cg,
        stride_w1d,
        stride_ob,
        stride_on,
        HEAD: tl.constexpr,
        IN_DTYPE: tl.constexpr,
        DOT_DTYPE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        T_PAD: tl.constexpr,
        H_PAD: tl.constexpr,
        BLOCK_HH: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        x_rows = X + b * stride_xb + rn[:, None].to(tl.int64) * stride_xn

        # Column g of the padded [H_PAD, T_PAD] grid is head g // T_PAD, gist g % T_PAD.
        rg = tl.arange(0, H_PAD * T_PAD)
        g_h = rg // T_PAD
        g_t = rg % T_PAD
        g_ok = (g_h < H) & (g_t < T)
        g_col = g_h * T + g_t

        # pass 1: LayerNorm statistics of x, merging per-chunk (mean, M2) with Chan's
        # formula (as stable as two passes, one read)
        mean = tl.zeros([BLOCK_N], tl.float32)
        m2 = tl.zeros([BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            md = rd < D
            xc = tl.load(x_rows + rd[None, :], mask=mask_n[:, None] & md[None, :], other=0.0)
            xc = xc.to(tl.float32)
            cnt = tl.minimum(D - d0, BLOCK_D).to(tl.float32)
            c_mean = tl.sum(xc, axis=1) / cnt
            dev = tl.where(md[None, :], xc - c_mean[:, None], 0.0)
            n_a = d0 * 1.0  # a Python int under the interpreter, int32 when compiled
            delta = c_mean - mean
            mean += delta * (cnt / (n_a + cnt))
            m2 += tl.sum(dev * dev, axis=1) + delta * delta * (n_a * cnt / (n_a + cnt))
        rstd = 1.0 / tl.sqrt(m2 / D + eps)

        # pass 2: logits against the folded tail keys
        logits = tl.zeros([BLOCK_N, H_PAD * T_PAD], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            md = rd < D
            xc = tl.load(x_rows + rd[None, :], mask=mask_n[:, None] & md[None, :], other=0.0)
            xn = (xc.to(tl.float32) - mean[:, None]) * rstd[:, None]
            ac = tl.load(
                A + b * stride_ab + rd[:, None] * stride_ad + g_col[None, :],
                mask=md[:, None] & g_ok[None, :],
                other=0.0,
            )
            # DOT_DTYPE differs from IN_DTYPE only under the interpreter with bf16, whose
            # tl.dot is wrong for bf16: operands are rounded to bf16, multiplied in fp32.
            logits += tl.dot(xn.to(IN_DTYPE).to(DOT_DTYPE), ac.to(DOT_DTYPE))
        a0 = tl.load(A0 + b * stride_a0b + g_col, mask=g_ok, other=0.0).to(tl.float32)
        logits += a0[None, :]
        # padded gists get -inf; padded heads keep finite zeros (their c rows are 0)
        logits = tl.where((g_t < T)[None, :], logits, float("-inf"))

        # softmax over the T gists of each head
        l3 = tl.reshape(logits, (BLOCK_N, H_PAD, T_PAD))
        e3 = tl.exp(l3 - tl.max(l3, axis=2)[:, :, None])
        p3 = e3 / tl.sum(e3, axis=2)[:, :, None]
        p = tl.reshape(p3, (BLOCK_N, H_PAD * T_PAD))
        p = tl.where(g_ok[None, :], p, 0.0).to(IN_DTYPE).to(DOT_DTYPE)

        if HEAD:
            # pass 3: y = x + p @ c (recomputed per chunk) and its LayerNorm statistics
            y_mean = tl.zeros([BLOCK_N], tl.float32)
            y_m2 = tl.zeros([BLOCK_N], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                rd = d0 + tl.arange(0, BLOCK_D)
                md = rd < D
                xc = tl.load(x_rows + rd[None, :], mask=mask_n[:, None] & md[None, :], other=0.0)
                cc = tl.load(
                    C + b * stride_cb + g_col[:, None] * stride_cg + rd[None, :],
                    mask=g_ok[:, None] & md[None, :],
                    other=0.0,
                )
                yc = xc.to(tl.float32) + tl.dot(p, cc.to(DOT_DTYPE))
                cnt = tl.minimum(D - d0, BLOCK_D).to(tl.float32)
                c_mean = tl.sum(tl.where(md[None, :], yc, 0.0), axis=1) / cnt
                dev = tl.where(md[None, :], yc - c_mean[:, None], 0.0)
                n_a = d0 * 1.0  # a Python int under the interpreter, int32 when compiled
                delta = c_mean - y_mean
                y_mean += delta * (cnt / (n_a + cnt))
                y_m2 += tl.sum(dev * dev, axis=1) + delta * delta * (n_a * cnt / (n_a + cnt))
            y_rstd = 1.0 / tl.sqrt(y_m2 / D + eps)

            # pass 4: the head's first layer on layernorm(y)
            rh = tl.arange(0, BLOCK_HH)
            mh = rh < HH
            hid = tl.zeros([BLOCK_N, BLOCK_HH], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                rd = d0 + tl.arange(0, BLOCK_D)
                md = rd < D
                xc = tl.load(x_rows + rd[None, :], mask=mask_n[:, None] & md[None, :], other=0.0)
                cc = tl.load(
                    C + b * stride_cb + g_col[:, None] * stride_cg + rd[None, :],
                    mask=g_ok[:, None] & md[None, :],
                    other=0.0,
                )
                yc = xc.to(tl.float32) + tl.dot(p, cc.to(DOT_DTYPE))
                yn = (yc - y_mean[:, None]) * y_rstd[:, None]
                w1c = tl.load(
                    W1 + rd[:, None] * stride_w1d + rh[None, :],
                    mask=md[:, None] & mh[None, :],
                    other=0.0,
                )
                hid += tl.dot(yn.to(IN_DTYPE).to(DOT_DTYPE), w1c.to(DOT_DTYPE))
            hid += tl.load(B1 + rh, mask=mh, other=0.0).to(tl.float32)[None, :]
            hid = 0.5 * hid * (1.0 + tl.math.erf(hid * 0.7071067811865476))
            w2 = tl.load(W2 + rh, mask=mh, other=0.0).to(tl.float32)
            z = tl.sum(hid * w2[None, :], axis=1) + tl.load(B2).to(tl.float32)
            # tanh(z) = 1 - 2 / (exp(2z) + 1): saturates cleanly to +-1 (exp -> inf or 0)
            score = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)
            tl.store(
                OUT + b * stride_ob + rn * stride_on,
                score.to(OUT.dtype.element_ty),
                mask=mask_n,
            )
        else:
            o_rows = OUT + b * stride_ob + rn[:, None].to(tl.int64) * stride_on
            for d0 in range(0, D, BLOCK_D):
                rd = d0 + tl.arange(0, BLOCK_D)
                md = rd < D
                xc = tl.load(x_rows + rd[None, :], mask=mask_n[:, None] & md[None, :], other=0.0)
                cc = tl.load(
                    C + b * stride_cb + g_col[:, None] * stride_cg + rd[None, :],
                    mask=g_ok[:, None] & md[None, :],
                    other=0.0,
                )
                yc = xc.to(tl.float32) + tl.dot(p, cc.to(DOT_DTYPE))
                tl.store(
                    o_rows + rd[None, :],
                    yc.to(OUT.dtype.element_ty),
                    mask=mask_n[:, None] & md[None, :],
                )

else:  # pragma: no cover - triton is installed wherever tests run
    _lens_stage2_kernel = None


# ----------------------------------------------------------------------------------------
# launcher


def _check_inputs(
    x: torch.Tensor,
    a: torch.Tensor,
    a0: torch.Tensor,
    c: torch.Tensor,
    w1: torch.Tensor | None,
    b1: torch.Tensor | None,
    w2: torch.Tensor | None,
    b2: torch.Tensor | None,
    n_heads: int,
) -> tuple[int, int, int, int, int]:
    """Validate the inputs; return ``B, N, D, G, Hh`` (``Hh`` 0 without the head)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ConfigError(
            f"lens_stage2: x must be a [B, N, D] tensor, got {shape_of(x)}",
            field="x",
            value=shape_of(x),
        )
    B, N, D = x.shape
    if N < 1 or D < 1:
        raise ConfigError(
            f"lens_stage2: x must have N >= 1 and D >= 1, got {tuple(x.shape)}",
            field="x",
            value=tuple(x.shape),
        )
    check_float_dtype("lens_stage2", "x", x)
    if not isinstance(a, torch.Tensor) or a.dim() != 3 or a.shape[:2] != (B, D):
        raise ConfigError(
            f"lens_stage2: a must be [B, D, G] = [{B}, {D}, G], got {shape_of(a)}",
            field="a",
            value=shape_of(a),
        )
    G = a.shape[2]
    if not isinstance(n_heads, int) or n_heads < 1 or G < 1 or G % n_heads != 0:
        raise ConfigError(
            f"lens_stage2: n_heads={n_heads!r} must be >= 1 and divide G={G} (a is "
            f"{tuple(a.shape)})",
            field="n_heads",
            value=n_heads,
        )
    expected = {"a0": (B, G), "c": (B, G, D)}
    head = (w1, b1, w2, b2)
    if any(t is not None for t in head):
        if w1 is None or w1.dim() != 2 or w1.shape[0] != D:
            raise ConfigError(
                f"lens_stage2: w1 must be [D, Hh] = [{D}, Hh], got {shape_of(w1)}",
                field="w1",
                value=shape_of(w1),
            )
        hh = w1.shape[1]
        expected.update({"b1": (hh,), "w2": (hh,), "b2": (1,)})
    else:
        hh = 0
    tensors = {"a": a, "a0": a0, "c": c, "w1": w1, "b1": b1, "w2": w2, "b2": b2}
    for name, shape in expected.items():
        t = tensors[name]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            want = ", ".join(map(str, shape))
            raise ConfigError(
                f"lens_stage2: {name} must be [{want}], got {shape_of(t)}",
                field=name,
                value=shape_of(t),
            )
    for name, t in tensors.items():
        if t is not None:
            check_like("lens_stage2", name, t, x, "x")
    return B, N, D, G, hh


def launch_meta(D: int, H: int, T: int, hh: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes and warps of the kernel (``hh`` 0: no head)."""
    t_pad = triton.next_power_of_2(T)
    # tl.dot needs every dimension >= 16: pad the head axis until H_PAD * T_PAD >= 16
    h_pad = max(triton.next_power_of_2(H), -(-16 // t_pad))
    return {
        "BLOCK_N": 32,
        "BLOCK_D": min(64, max(16, triton.next_power_of_2(D))),
        "T_PAD": t_pad,
        "H_PAD": h_pad,
        "BLOCK_HH": max(16, triton.next_power_of_2(hh)) if hh else 16,
        # fp32 tiles need twice the registers: with 4 warps ptxas spills (sm_80), with 8 not
        "num_warps": 8 if dtype == torch.float32 else 4,
    }


def _lens_stage2_fwd(
    x: torch.Tensor,
    a: torch.Tensor,
    a0: torch.Tensor,
    c: torch.Tensor,
    w1: torch.Tensor | None,
    b1: torch.Tensor | None,
    w2: torch.Tensor | None,
    b2: torch.Tensor | None,
    n_heads: int,
    eps: float,
) -> torch.Tensor:
    B, N, D, G, hh = _check_inputs(x, a, a0, c, w1, b1, w2, b2, n_heads)
    require_runnable("lens_stage2", _lens_stage2_kernel, x)
    if hh > MAX_HIDDEN:
        raise ConfigError(
            f"lens_stage2: the Triton kernel supports a head width Hh <= {MAX_HIDDEN}, "
            f"got w1 {tuple(w1.shape)}",
            field="w1",
            value=tuple(w1.shape),
        )
    x = x if x.stride(2) == 1 else x.contiguous()
    a = a if a.stride(2) == 1 else a.contiguous()
    a0 = a0 if a0.stride(1) == 1 else a0.contiguous()
    c = c if c.stride(2) == 1 else c.contiguous()
    head = hh > 0
    if head:
        w1 = w1 if w1.stride(1) == 1 else w1.contiguous()
        b1, w2, b2 = b1.contiguous(), w2.contiguous(), b2.contiguous()
        out = torch.empty(B, N, device=x.device, dtype=x.dtype)
        stride_ob, stride_on = out.stride(0), out.stride(1)
    else:
        out = torch.empty(B, N, D, device=x.device, dtype=x.dtype)
        stride_ob, stride_on = out.stride(0), out.stride(1)
        w1 = b1 = w2 = b2 = x  # never read
    if B == 0:  # an empty grid: nothing to launch
        return out
    meta = launch_meta(D, n_heads, G // n_heads, hh, x.dtype)
    with device_guard(x):
        _lens_stage2_kernel[(triton.cdiv(N, meta["BLOCK_N"]), B)](
            x,
            a,
            a0,
            c,
            w1,
            b1,
            w2,
            b2,
            out,
            N,
            D,
            G // n_heads,
            n_heads,
            hh,
            float(eps),
            x.stride(0),
            x.stride(1),
            a.stride(0),
            a.stride(1),
            a0.stride(0),
            c.stride(0),
            c.stride(1),
            w1.stride(0),
            stride_ob,
            stride_on,
            HEAD=head,
            IN_DTYPE=tl_dtype(x.dtype),
            DOT_DTYPE=dot_dtype(x),
            **meta,
        )
    return out


# ----------------------------------------------------------------------------------------
# torch.library custom op (opaque to torch.compile, differentiable through register_autograd)


@torch.library.custom_op("megacontext::lens_stage2", mutates_args=())
def _lens_stage2_op(
    x: torch.Tensor,
    a: torch.Tensor,
    a0: torch.Tensor,
    c: torch.Tensor,
    w1: torch.Tensor | None,
    b1: torch.Tensor | None,
    w2: torch.Tensor | None,
    b2: torch.Tensor | None,
    n_heads: int,
    eps: float,
) -> torch.Tensor:
    """``scores [B, N]`` (with the head) or ``y [B, N, D]`` by the Triton kernel."""
    return _lens_stage2_fwd(x, a, a0, c, w1, b1, w2, b2, n_heads, eps)


@_lens_stage2_op.register_fake
def _(x, a, a0, c, w1, b1, w2, b2, n_heads, eps) -> torch.Tensor:
    B, N, D, _, hh = _check_inputs(x, a, a0, c, w1, b1, w2, b2, n_heads)
    return x.new_empty(B, N) if hh else x.new_empty(B, N, D)


def _setup_context(ctx, inputs, output) -> None:
    x, a, a0, c, w1, b1, w2, b2, n_heads, eps = inputs
    ctx.n_heads, ctx.eps = n_heads, eps
    ctx.head = w1 is not None
    saved = (x, a, a0, c, w1, b1, w2, b2) if ctx.head else (x, a, a0, c)
    ctx.save_for_backward(*saved)


def _backward(ctx, grad: torch.Tensor):
    saved = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in saved]
        args = leaves if ctx.head else [*leaves, None, None, None, None]
        out = lens_stage2_reference(*args, n_heads=ctx.n_heads, eps=ctx.eps)
        grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    grads = list(grads) + [None] * (8 - len(grads))
    return (*grads, None, None)


_lens_stage2_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# public entry point and PyTorch reference


def lens_stage2(
    x: torch.Tensor,
    a: torch.Tensor,
    a0: torch.Tensor,
    c: torch.Tensor,
    w1: torch.Tensor | None = None,
    b1: torch.Tensor | None = None,
    w2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    *,
    n_heads: int,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Entries attend to the folded tail gists, then (with ``w1..b2``) the scoring head.

    See the module docstring for the formula and shapes. Returns ``scores [B, N]``
    when the head is given, else the updated entries ``y [B, N, D]``; both in
    ``x.dtype`` and differentiable in every tensor input. Runs the Triton kernel on
    CUDA tensors and :func:`lens_stage2_reference` on the CPU, unless
    ``MEGACONTEXT_KERNELS`` forces a path.
    """
    _check_inputs(x, a, a0, c, w1, b1, w2, b2, n_heads)
    if not use_triton(x, a, c, op="lens_stage2"):
        return lens_stage2_reference(x, a, a0, c, w1, b1, w2, b2, n_heads=n_heads, eps=eps)
    return _lens_stage2_op(x, a, a0, c, w1, b1, w2, b2, n_heads, float(eps))


def lens_stage2_reference(
    x: torch.Tensor,
    a: torch.Tensor,
    a0: torch.Tensor,
    c: torch.Tensor,
    w1: torch.Tensor | None = None,
    b1: torch.Tensor | None = None,
    w2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    *,
    n_heads: int,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Plain PyTorch ``lens_stage2`` (fp32 math, output in ``x.dtype``)."""
    B, N, D, G, hh = _check_inputs(x, a, a0, c, w1, b1, w2, b2, n_heads)
    xf = x.float()
    xn = F.layer_norm(xf, (D,), eps=eps)
    s = torch.baddbmm(a0.float().unsqueeze(1), xn, a.float())  # [B, N, G]
    p = torch.softmax(s.view(B, N, n_heads, G // n_heads), dim=-1).view(B, N, G)
    y = xf + torch.bmm(p, c.float())
    if not hh:
        return y.to(x.dtype)
    yn = F.layer_norm(y, (D,), eps=eps)
    h = F.gelu(yn @ w1.float() + b1.float())
    return torch.tanh(h @ w2.float() + b2.float()).to(x.dtype)
