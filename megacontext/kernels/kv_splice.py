"""Fused RoPE-aware KV splice: rebuild a whole multi-layer KV cache in one launch.

The cache of every layer lives in one preallocated tensor per buffer,
``kv [L, 2, B, H, C, D]`` (layers, K/V, batch, kv-heads, capacity slots, head dim),
keys stored *after* RoPE. When the working context changes (a gist expanded into 32
tokens, 32 entries collapsed into one gist) every unchanged entry keeps its K/V but
may move to another slot, and, under a bounded position scheme, to another position.
A row whose position is unchanged is moved bit for bit, not recomputed; a row whose
position moved by ``delta`` has its key turned by ``delta`` in the same pass (RoPE
rotations compose: the key rotated for ``p`` and then by ``delta`` is the key for
``p + delta``). The runtime keeps two buffers (ping-pong) and writes the new cache
into the other one::

    for every l, kv, b, h and slot j < C:
        if index[b, j] >= 0:
            row = src[l, kv, b, h, index[b, j], :]                             # kept row moved
            if kv == 0 and position_delta given and position_delta[b, j] != 0:
                row = rope_rotate(row, position_delta[b, j], inv_freq)         # key re-rotated
            dst[l, kv, b, h, j, :] = row
    for every f < F with fresh_slots[b, f] >= 0:
        dst[l, kv, b, h, fresh_slots[b, f], :] = fresh[l, kv, b, h, f, :]      # fresh row scattered
    every other slot of dst is left untouched.

``rope_rotate`` is Hugging Face's ``rotate_half`` layout: with ``theta_i = delta *
inv_freq[i]`` in fp32 and halves ``x1 = row[:D/2]``, ``x2 = row[D/2:]``,
``(x1 cos - x2 sin, x2 cos + x1 sin)``, computed in fp32 and rounded once to the cache
dtype. ``inv_freq [D/2]`` (float32) is the model's own (``megacontext.cache.
rope_inv_freq``: ``rope_theta`` and the scaling type are in it); the model's
``attention_scaling`` is already in the stored keys and is not applied again. ``D``
must be even to rotate.

Shapes: ``src, dst [L, 2, B, H, C, D]``, ``index [B, C]`` (int32/int64),
``fresh [L, 2, B, H, F, D]``, ``fresh_slots [B, F]`` (int32/int64),
``position_delta [B, C]`` (int32/int64), ``inv_freq [D/2]`` (float32). fp32, fp16 and
bf16; values, unmoved keys and fresh rows are copied, never converted (exact
equality); rotated keys are within a rounding of the dtype of the reference (the
cos/sin implementations differ by ulps). Only NaN payloads are not promised: Triton's
CPU interpreter and some PyTorch CPU gathers canonicalise NaNs (the compiled kernel's
loads and stores are plain bit moves).

Contract (what makes one launch correct without ordering between programs): every
destination slot has at most one writer, i.e. a slot named in ``fresh_slots[b]`` has
``index[b, slot] < 0`` and ``fresh_slots[b]`` has no repeated non-negative value.
``src`` and ``fresh`` must not overlap ``dst`` in memory (ping-pong buffers). Views of
one larger allocation are accepted when their byte *ranges* are disjoint, e.g.
``buffers[0]`` and ``buffers[1]`` of a ``[2, L, 2, B, H, C, D]`` tensor; interleaved
views (say two halves of the C axis) are refused even if no element is shared, since
the launcher compares address ranges rather than solving the strided-overlap problem. ``index`` may repeat a
source row. ``kv_splice(..., check=True)`` verifies the contract and the value ranges
on the host (one device->host synchronisation; a debugging aid, not for the hot path).

Without ``check`` nothing is synchronised: the kernel masks every load and store, so
an out-of-range value (``index >= C`` or ``fresh_slots >= C``) never touches memory
outside the tensors; that slot is simply left untouched instead of raising.

Design (why it looks like this):

- The op moves memory and computes nothing, so the only goal is to read and write
  each live row exactly once with wide, coalesced accesses. One Triton program copies
  a ``[BLOCK_C, BLOCK_D]`` tile: ``BLOCK_C`` consecutive destination slots of one
  ``(l, kv, b, h)`` plane, with ``BLOCK_C * BLOCK_D = 4096`` elements (32 per thread at
  4 warps, i.e. 16-byte vector accesses for a contiguous head dim). Destination
  writes are contiguous; source reads are a row gather whose rows are mostly
  consecutive (an expand or collapse shifts a run of rows), so they coalesce too.
- Grid ``(kept blocks + fresh blocks, L*2*H, B)``: the first ``cdiv(C, BLOCK_C)``
  programs along axis 0 move kept rows, the remaining ``cdiv(F, BLOCK_C)`` scatter
  fresh rows. Both phases share one launch; they never write the same slot (contract
  above), so no ordering between programs is needed.
- Slots with ``index < 0`` (free capacity past the live length, or slots waiting for
  a fresh row) are masked out of both the load and the store: the traffic is
  proportional to the live rows, not to the capacity.
- Re-rotation (``ROTATE``, a compile-time switch, so the plain splice is unchanged):
  key planes load each row as its two halves (``[BLOCK_C, BLOCK_D/2]`` tiles, still
  16-byte accesses), read the row's delta and the ``D/2`` frequencies, and compute
  ``cos``/``sin`` of ``delta * inv_freq`` in fp32 in registers (the precise libdevice
  functions; no table, so nothing but the rows themselves crosses memory). Value
  planes take the plain copy path. Rows with delta 0 are stored from the loaded bits.
  Same launch, same traffic as the plain splice: the rotation is arithmetic on data
  already in registers, far below the memory time of a copy.
- Every stride is passed, so ``src``/``dst``/``fresh`` may be arbitrary views (e.g.
  ``buffers[0]`` and ``buffers[1]`` of one ``[2, L, 2, B, H, C, D]`` allocation, or a
  slice of the head dim). Triton specialises a stride equal to 1, so a contiguous
  head dim gets vectorised accesses without a separate code path. Offsets are
  computed in int64 (a Llama-8B cache at 128k slots exceeds 2^31 elements).

- On the CPU (no Triton kernel) the splice is a few strided ``copy_`` calls, one per
  run of consecutive rows: a refocus shifts runs of rows, so this moves memory at copy
  speed, where PyTorch's CPU gather/index kernels pay a per-element indexing cost
  (``bench/bench_kv_splice.py`` measures both).

Layout of this file: the Triton kernel, the launcher (shape/dtype/device checks),
the ``torch.library`` custom op ``megacontext::kv_splice`` (mutates ``dst``) with its
fake implementation, the CPU run-copy path (then an in-place rotation of the keys
whose delta is non-zero), the public ``kv_splice`` entry point that dispatches,
:func:`rope_rotate` and ``kv_splice_reference`` (plain PyTorch gathers).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ._dispatch import (
    INDEX_DTYPES,
    check_float_dtype,
    check_like,
    device_guard,
    import_triton,
    kernel_mode,
    require_runnable,
    shape_of,
    use_triton,
)

triton, tl = import_triton()  # optional: importing this module must not need it

__all__ = ["kv_splice", "kv_splice_reference", "rope_rotate"]

# elements per program tile: 32 per thread at 4 warps
_TILE = 4096
_MAX_GRID_YZ = 65535

if triton is not None:

    @triton.jit
    def _move_rows(src_plane, dst_plane, idx, rj, keep, rd, mask_d, s_c, s_d, d_c, d_d):
        """Bit-exact row gather of one tile: ``dst[rj] = src[idx]`` where ``keep``."""
        mask = keep[:, None] & mask_d[None, :]
        rows = tl.load(src_plane + idx[:, None] * s_c + rd[None, :] * s_d, mask=mask)
        tl.store(dst_plane + rj[:, None] * d_c + rd[None, :] * d_d, rows, mask=mask)

    @triton.jit
    def _kv_splice_kernel(
        SRC,  # [L, 2, B, H, C, D]
        DST,  # [L, 2, B, H, C, D]
        INDEX,  # [B, C] int32/int64
        FRESH,  # [L, 2, B, H, F, D] (unused when HAS_FRESH is False)
        SLOTS,  # [B, F] int32/int64 (unused when HAS_FRESH is False)
        DELTA,  # [B, C] int32/int64 position deltas (unused when ROTATE is False)
        INV_FREQ,  # [D/2] float32 RoPE inverse frequencies (unused when ROTATE is False)
        C,
        F,
        H,
        D,
        HALF,
        n_kept_blocks,
        s_l,
        s_kv,
        s_b,
        s_h,
        s_c,
        s_d,
        d_l,
        d_kv,
        d_b,
        d_h,
        d_c,
        d_d,
        f_l,
        f_kv,
        f_b,
        f_h,
        f_f,
        f_d,
        i_b,
        i_c,
        sl_b,
        sl_f,
        dl_b,
        dl_c,
        BLOCK_C: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_H: tl.constexpr,
        HAS_FRESH: tl.constexpr,
        ROTATE: tl.constexpr,
    ):
        pid_r = tl.program_id(0)
        plane = tl.program_id(1).to(tl.int64)  # (l * 2 + kv) * H + h
        b = tl.program_id(2).to(tl.int64)
        h = plane % H
        kv = (plane // H) % 2
        layer = plane // (2 * H)

        rd = tl.arange(0, BLOCK_D).to(tl.int64)
        mask_d = rd < D
        dst_plane = DST + layer * d_l + kv * d_kv + b * d_b + h * d_h

        if pid_r < n_kept_blocks:
            rj = (pid_r * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
            in_c = rj < C
            idx = tl.load(INDEX + b * i_b + rj * i_c, mask=in_c, other=-1).to(tl.int64)
            # idx >= C is out of contract (check=True reports it); masking keeps it in bounds
            keep = in_c & (idx >= 0) & (idx < C)
            src_plane = SRC + layer * s_l + kv * s_kv + b * s_b + h * s_h
            if ROTATE:
                if kv == 0:
                    # keys: RoPE rotation by each row's own delta, pairs (i, i + D/2)
                    # (HF's rotate_half layout): y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin
                    rh = tl.arange(0, BLOCK_H).to(tl.int64)
                    mask_h = rh < HALF
                    mask = keep[:, None] & mask_h[None, :]
                    delta = tl.load(DELTA + b * dl_b + rj * dl_c, mask=keep, other=0)
                    freq = tl.load(INV_FREQ + rh, mask=mask_h, other=0.0)
                    angle = delta.to(tl.float32)[:, None] * freq[None, :]
                    cos = tl.cos(angle)
                    sin = tl.sin(angle)
                    row = src_plane + idx[:, None] * s_c
                    x1 = tl.load(row + rh[None, :] * s_d, mask=mask)
                    x2 = tl.load(row + (rh + HALF)[None, :] * s_d, mask=mask)
                    a = x1.to(tl.float32)
                    c = x2.to(tl.float32)
                    y1 = (a * cos - c * sin).to(x1.dtype)
                    y2 = (c * cos + a * sin).to(x2.dtype)
                    # a row that does not move in position keeps its bits
                    moved = (delta != 0)[:, None]
                    y1 = tl.where(moved, y1, x1)
                    y2 = tl.where(moved, y2, x2)
                    out = dst_plane + rj[:, None] * d_c
                    tl.store(out + rh[None, :] * d_d, y1, mask=mask)
                    tl.store(out + (rh + HALF)[None, :] * d_d, y2, mask=mask)
                else:
                    _move_rows(src_plane, dst_plane, idx, rj, keep, rd, mask_d, s_c, s_d, d_c, d_d)
            else:
                _move_rows(src_plane, dst_plane, idx, rj, keep, rd, mask_d, s_c, s_d, d_c, d_d)
        elif HAS_FRESH:
            rf = ((pid_r - n_kept_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
            in_f = rf < F
            slot = tl.load(SLOTS + b * sl_b + rf * sl_f, mask=in_f, other=-1).to(tl.int64)
            ok = in_f & (slot >= 0) & (slot < C)
            mask = ok[:, None] & mask_d[None, :]
            fresh_plane = FRESH + layer * f_l + kv * f_kv + b * f_b + h * f_h
            rows = tl.load(fresh_plane + rf[:, None] * f_f + rd[None, :] * f_d, mask=mask)
            tl.store(dst_plane + slot[:, None] * d_c + rd[None, :] * d_d, rows, mask=mask)

else:  # pragma: no cover - triton is installed wherever tests run
    _kv_splice_kernel = None


# ----------------------------------------------------------------------------------------
# checks and launcher


def _check_inputs(
    src: torch.Tensor,
    dst: torch.Tensor,
    index: torch.Tensor,
    fresh: torch.Tensor | None,
    fresh_slots: torch.Tensor | None,
) -> tuple[int, int, int, int, int, int]:
    """Shape/dtype/device checks (metadata only, no synchronisation). Returns L, B, H, C, D, F."""
    if not isinstance(src, torch.Tensor) or src.dim() != 6 or src.shape[1] != 2:
        raise ConfigError(
            f"kv_splice: src must be a [L, 2, B, H, C, D] tensor, got shape {shape_of(src)}",
            field="src",
            value=shape_of(src),
        )
    L, _, B, H, C, D = src.shape
    if not isinstance(dst, torch.Tensor) or tuple(dst.shape) != tuple(src.shape):
        raise ConfigError(
            f"kv_splice: dst must have src's shape [L, 2, B, H, C, D] = {tuple(src.shape)}, "
            f"got {shape_of(dst)}",
            field="dst",
            value=shape_of(dst),
        )
    check_float_dtype("kv_splice", "src", src)
    check_like("kv_splice", "dst", dst, src, "src")
    _check_int(index, "index", (B, C), "[B, C]", src.device)
    if (fresh is None) != (fresh_slots is None):
        missing = "fresh_slots" if fresh_slots is None else "fresh"
        raise ConfigError(
            "kv_splice: fresh and fresh_slots must be given together "
            f"({'fresh' if missing == 'fresh_slots' else 'fresh_slots'} given, {missing} is None)",
            field=missing,
            value=None,
        )
    F = 0
    if fresh is not None:
        if (
            not isinstance(fresh, torch.Tensor)
            or fresh.dim() != 6
            or tuple(fresh.shape[:4]) != (L, 2, B, H)
            or fresh.shape[5] != D
        ):
            raise ConfigError(
                f"kv_splice: fresh must be [L, 2, B, H, F, D] = [{L}, 2, {B}, {H}, F, {D}], "
                f"got {shape_of(fresh)}",
                field="fresh",
                value=shape_of(fresh),
            )
        check_like("kv_splice", "fresh", fresh, src, "src")
        F = fresh.shape[4]
        _check_int(fresh_slots, "fresh_slots", (B, F), "[B, F]", src.device)
    return L, B, H, C, D, F


def _check_int(
    t: object, name: str, shape: tuple[int, int], dims: str, device: torch.device
) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        raise ConfigError(
            f"kv_splice: {name} must be a {dims} = {list(shape)} integer tensor, got {shape_of(t)}",
            field=name,
            value=shape_of(t),
        )
    if t.dtype not in INDEX_DTYPES:
        raise ConfigError(
            f"kv_splice: {name} must be int32 or int64, got {t.dtype}",
            field=name,
            value=str(t.dtype),
        )
    if t.device != device:
        raise ConfigError(
            f"kv_splice: {name} is on {t.device} but src is on {device}",
            field=name,
            value=str(t.device),
        )


def _check_rotation(
    src: torch.Tensor,
    position_delta: torch.Tensor | None,
    inv_freq: torch.Tensor | None,
) -> bool:
    """Checks of the re-rotation arguments (metadata only). Returns whether to rotate."""
    if (position_delta is None) != (inv_freq is None):
        missing = "inv_freq" if inv_freq is None else "position_delta"
        raise ConfigError(
            "kv_splice: position_delta and inv_freq must be given together " f"({missing} is None)",
            field=missing,
            value=None,
        )
    if position_delta is None:
        return False
    _, _, B, _, C, D = src.shape
    if D % 2:
        raise ConfigError(
            f"kv_splice: re-rotating keys needs an even head dim (RoPE rotates pairs "
            f"(i, i + D/2)), got D = {D}",
            field="src",
            value=D,
        )
    _check_int(position_delta, "position_delta", (B, C), "[B, C]", src.device)
    if (
        not isinstance(inv_freq, torch.Tensor)
        or tuple(inv_freq.shape) != (D // 2,)
        or inv_freq.dtype != torch.float32
    ):
        got = f"{shape_of(inv_freq)} {getattr(inv_freq, 'dtype', '')}".strip()
        raise ConfigError(
            f"kv_splice: inv_freq must be a float32 [D/2] = [{D // 2}] tensor (the model's "
            f"RoPE inverse frequencies), got {got}",
            field="inv_freq",
            value=shape_of(inv_freq),
        )
    if inv_freq.device != src.device:
        raise ConfigError(
            f"kv_splice: inv_freq is on {inv_freq.device} but src is on {src.device}",
            field="inv_freq",
            value=str(inv_freq.device),
        )
    return True


def _check_values(C: int, index: torch.Tensor, fresh_slots: torch.Tensor | None) -> None:
    """Value checks (index < C, fresh_slots < C, one writer per slot). Synchronises on CUDA."""
    bad = index >= C
    if bool(bad.any()):
        b, j = (int(v) for v in bad.nonzero()[0])
        raise ConfigError(
            f"kv_splice: index[{b}, {j}] = {int(index[b, j])} is out of range: source slots "
            f"must be < C = {C} (negative means 'not a kept row')",
            field="index",
            value=int(index[b, j]),
        )
    if fresh_slots is None or fresh_slots.numel() == 0:
        return
    bad = fresh_slots >= C
    if bool(bad.any()):
        b, f = (int(v) for v in bad.nonzero()[0])
        raise ConfigError(
            f"kv_splice: fresh_slots[{b}, {f}] = {int(fresh_slots[b, f])} is out of range: "
            f"destination slots must be < C = {C} (negative means 'skip this fresh row')",
            field="fresh_slots",
            value=int(fresh_slots[b, f]),
        )
    B = index.shape[0]
    live = fresh_slots >= 0
    slot = torch.where(live, fresh_slots, 0).long()
    # writers per destination slot: fresh rows (a dump column C takes the skipped ones)
    count = torch.zeros(B, C + 1, dtype=torch.int64, device=index.device)
    count.scatter_add_(1, torch.where(live, slot, C), torch.ones_like(slot))
    count = count[:, :C]
    if bool((count > 1).any()):
        b, j = (int(v) for v in (count > 1).nonzero()[0])
        raise ConfigError(
            f"kv_splice: fresh_slots[{b}] names destination slot {j} {int(count[b, j])} times; "
            "each slot may receive at most one fresh row",
            field="fresh_slots",
            value=j,
        )
    clash = (count > 0) & (index >= 0)
    if bool(clash.any()):
        b, j = (int(v) for v in clash.nonzero()[0])
        raise ConfigError(
            f"kv_splice: slot {j} of batch row {b} is both a fresh slot and a kept row "
            f"(index[{b}, {j}] = {int(index[b, j])}); fresh slots must have index < 0",
            field="fresh_slots",
            value=j,
        )


def _byte_range(t: torch.Tensor) -> tuple[int, int] | None:
    if t.numel() == 0:
        return None
    span = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    start = t.data_ptr()
    return start, start + (span + 1) * t.element_size()


def _check_memory(
    src: torch.Tensor, dst: torch.Tensor, fresh: torch.Tensor | None
) -> None:  # host metadata only: data_ptr, shapes and strides
    if any(s == 0 and n > 1 for n, s in zip(dst.shape, dst.stride(), strict=True)):
        raise ConfigError(
            f"kv_splice: dst has a zero stride (an expanded view, strides {dst.stride()}); "
            "several slots would alias one memory location",
            field="dst",
            value=tuple(dst.stride()),
        )
    d = _byte_range(dst)
    for name, t in (("src", src), ("fresh", fresh)):
        r = None if t is None else _byte_range(t)
        if d is not None and r is not None and r[0] < d[1] and d[0] < r[1]:
            raise ConfigError(
                f"kv_splice: {name} and dst overlap in memory; the splice reads {name} while "
                "writing dst, so they must be disjoint (use two ping-pong buffers)",
                field=name,
                value=(r, d),
            )


def _block_sizes(D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(D)
    return max(1, _TILE // block_d), block_d


def _kv_splice_launch(
    src: torch.Tensor,
    dst: torch.Tensor,
    index: torch.Tensor,
    fresh: torch.Tensor | None,
    fresh_slots: torch.Tensor | None,
    position_delta: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
    block_c: int | None = None,
) -> None:
    """Launch the kernel (one launch for all layers, K and V, kept and fresh rows,
    keys re-rotated when ``position_delta`` is given)."""
    L, B, H, C, D, F = _check_inputs(src, dst, index, fresh, fresh_slots)
    rotate = _check_rotation(src, position_delta, inv_freq)
    require_runnable("kv_splice", _kv_splice_kernel, src, "src")
    _check_memory(src, dst, fresh)
    if dst.numel() == 0:
        return
    planes = L * 2 * H
    if planes > _MAX_GRID_YZ or B > _MAX_GRID_YZ:
        raise ConfigError(
            f"kv_splice: L*2*H = {planes} and B = {B} must each be <= {_MAX_GRID_YZ} "
            "(CUDA grid limit)",
            field="src",
            value=tuple(src.shape),
        )
    default_c, block_d = _block_sizes(D)
    block_c = block_c or default_c
    n_kept = triton.cdiv(C, block_c)
    has_fresh = fresh is not None and F > 0
    n_fresh = triton.cdiv(F, block_c) if has_fresh else 0
    f, sl = (
        (fresh, fresh_slots) if has_fresh else (dst, index)
    )  # unused by the kernel when there are no fresh rows
    fs = f.stride() if has_fresh else (0,) * 6
    ss = sl.stride() if has_fresh else (0, 0)
    # unused by the kernel when not rotating
    delta, freq = (position_delta, inv_freq) if rotate else (index, dst)
    ds = delta.stride() if rotate else (0, 0)
    with device_guard(src):
        _kv_splice_kernel[(n_kept + n_fresh, planes, B)](
            src,
            dst,
            index,
            f,
            sl,
            delta,
            freq,
            C,
            F,
            H,
            D,
            D // 2,
            n_kept,
            *src.stride(),
            *dst.stride(),
            *fs,
            *index.stride(),
            *ss,
            *ds,
            BLOCK_C=block_c,
            BLOCK_D=block_d,
            BLOCK_H=triton.next_power_of_2(max(D // 2, 1)),
            HAS_FRESH=has_fresh,
            ROTATE=rotate,
            num_warps=4,
        )


# ----------------------------------------------------------------------------------------
# torch.library custom op (opaque to torch.compile, which functionalises the mutation)


@torch.library.custom_op("megacontext::kv_splice", mutates_args=("dst",))
def _kv_splice_op(
    src: torch.Tensor,
    dst: torch.Tensor,
    index: torch.Tensor,
    fresh: torch.Tensor | None,
    fresh_slots: torch.Tensor | None,
    position_delta: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
) -> None:
    """Write the splice of ``src`` (and ``fresh``) into ``dst`` by the Triton kernel."""
    _kv_splice_launch(src, dst, index, fresh, fresh_slots, position_delta, inv_freq)


@_kv_splice_op.register_fake
def _(
    src: torch.Tensor,
    dst: torch.Tensor,
    index: torch.Tensor,
    fresh: torch.Tensor | None,
    fresh_slots: torch.Tensor | None,
    position_delta: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
) -> None:
    _check_inputs(src, dst, index, fresh, fresh_slots)
    _check_rotation(src, position_delta, inv_freq)


# ----------------------------------------------------------------------------------------
# CPU path: strided copies of runs of consecutive rows

# above this many runs in a batch row, one index_select/index_copy_ beats per-run copies
_MAX_RUNS = 256


def _runs(m: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    """Maximal runs of a 1-D map ``i -> m[i]`` with ``m[i + k] = m[i] + k`` (negatives skipped).

    Returns ``(starts, targets, lengths)``: ``m[starts[r] + k] = targets[r] + k`` for
    ``k < lengths[r]``.
    """
    m = m.long()
    valid = m >= 0
    cont = torch.zeros_like(valid)  # i continues the run through i - 1
    cont[1:] = valid[1:] & valid[:-1] & (m[1:] == m[:-1] + 1)
    last = torch.ones_like(valid)  # no run continues past i
    last[:-1] = ~cont[1:]
    starts = (valid & ~cont).nonzero().flatten()
    ends = (valid & last).nonzero().flatten()
    return starts.tolist(), m[starts].tolist(), (ends - starts + 1).tolist()


def _kv_splice_runs(
    src: torch.Tensor,
    dst: torch.Tensor,
    index: torch.Tensor,
    fresh: torch.Tensor | None,
    fresh_slots: torch.Tensor | None,
    position_delta: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
) -> None:
    """``kv_splice`` on the CPU: one strided ``copy_`` per run of consecutive rows.

    A refocus shifts runs of rows (an expand moves everything after the gist right by
    31), so a realistic index is a handful of runs and the splice is a handful of
    memcpy-like copies over all layers at once; PyTorch's CPU gathers instead pay a
    per-element indexing cost. A batch row with more than ``_MAX_RUNS`` runs (an
    arbitrary permutation) falls back to ``index_select`` + ``index_copy_``. Reads the
    index on the host, so on CUDA it would synchronise: used for CPU tensors only.
    With ``position_delta``, the kept keys whose delta is non-zero are then rotated
    in place in ``dst`` (one gather, :func:`rope_rotate`, one scatter per batch row):
    the work is proportional to the rows that moved in position.
    """
    _, B, _, _, _, F = _check_inputs(src, dst, index, fresh, fresh_slots)
    rotate = _check_rotation(src, position_delta, inv_freq)
    _check_memory(src, dst, fresh)
    planes = [(index, src)]
    if fresh is not None and F > 0:
        planes.append((fresh_slots, fresh))
    for b in range(B):
        out = dst[:, :, b]
        for which, (m, rows) in enumerate(planes):
            starts, targets, lengths = _runs(m[b])
            rows_b = rows[:, :, b]
            if len(starts) > _MAX_RUNS:
                at = (m[b] >= 0).nonzero().flatten()
                to = m[b, at].long()
                if which == 0:  # kept: dst[at] = src[index[at]]
                    out.index_copy_(3, at, rows_b.index_select(3, to))
                else:  # fresh: dst[slots[at]] = fresh[at]
                    out.index_copy_(3, to, rows_b.index_select(3, at))
                continue
            for i, t, n in zip(starts, targets, lengths, strict=True):
                if which == 0:
                    out[:, :, :, i : i + n].copy_(rows_b[:, :, :, t : t + n])
                else:
                    out[:, :, :, t : t + n].copy_(rows_b[:, :, :, i : i + n])
        if rotate:
            assert position_delta is not None and inv_freq is not None
            # fresh slots have index < 0 (the contract), so only kept keys turn
            at = ((index[b] >= 0) & (position_delta[b] != 0)).nonzero().flatten()
            if at.numel():
                keys = out[:, 0]  # [L, H, C, D]
                moved = rope_rotate(keys.index_select(2, at), position_delta[b, at], inv_freq)
                keys.index_copy_(2, at, moved)


# ----------------------------------------------------------------------------------------
# public entry point and PyTorch reference


def kv_splice(
    src: torch.Tensor,
    dst: torch.Tensor,
    index: torch.Tensor,
    fresh: torch.Tensor | None = None,
    fresh_slots: torch.Tensor | None = None,
    position_delta: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
    *,
    check: bool = False,
) -> None:
    """Write the new cache into ``dst`` in place (see the module docstring for the formula).

    Args:
        src: ``[L, 2, B, H, C, D]`` old cache (fp32/fp16/bf16; any strides).
        dst: ``[L, 2, B, H, C, D]`` buffer receiving the new cache; must not overlap
            ``src``. Slots that receive no row keep their contents.
        index: ``[B, C]`` int32/int64; ``index[b, j] >= 0`` moves source slot
            ``index[b, j]`` to destination slot ``j``; negative means no kept row.
        fresh: optional ``[L, 2, B, H, F, D]`` newly computed K/V rows.
        fresh_slots: ``[B, F]`` int32/int64 destination slot of each fresh row
            (negative: skip it); required with ``fresh``. Fresh slots must have
            ``index < 0`` and must not repeat.
        position_delta: optional ``[B, C]`` int32/int64: new position minus old
            position of the kept row at destination slot ``j`` (ignored where
            ``index < 0``). The kept *keys* are then rotated by it (values untouched;
            a zero delta moves the row bit for bit). Needs an even ``D``.
        inv_freq: ``[D/2]`` float32 RoPE inverse frequencies (the model's own, see
            :func:`megacontext.cache.rope_inv_freq`); required with ``position_delta``.
        check: verify value ranges and the one-writer-per-slot contract on the host
            (a device->host synchronisation on CUDA; for debugging). Without it the
            CUDA path never synchronises.

    Runs the Triton kernel on CUDA tensors; on CPU tensors, strided copies of runs of
    consecutive rows (``_kv_splice_runs``, always value-checked: the check is free
    there). ``MEGACONTEXT_KERNELS=reference`` forces :func:`kv_splice_reference`,
    ``=triton`` the kernel (see ``megacontext.kernels._dispatch``).
    """
    _, _, _, C, _, _ = _check_inputs(src, dst, index, fresh, fresh_slots)
    _check_rotation(src, position_delta, inv_freq)
    if not use_triton(src, dst, index, op="kv_splice"):
        on_cpu = src.device.type == "cpu"
        if on_cpu and kernel_mode() == "auto":
            _check_values(C, index, fresh_slots)
            _kv_splice_runs(src, dst, index, fresh, fresh_slots, position_delta, inv_freq)
        else:
            kv_splice_reference(
                src,
                dst,
                index,
                fresh,
                fresh_slots,
                position_delta,
                inv_freq,
                check=check or on_cpu,
            )
        return
    if check:
        _check_values(C, index, fresh_slots)
    _kv_splice_op(src, dst, index, fresh, fresh_slots, position_delta, inv_freq)


def rope_rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE-rotate rows ``x [..., n, D]`` by ``delta [..., n]`` positions (broadcast),
    in ``x``'s dtype with fp32 math, in Hugging Face's ``rotate_half`` layout.

    With ``theta_i = delta * inv_freq[i]`` (fp32) and halves ``x1 = x[..., :D/2]``,
    ``x2 = x[..., D/2:]``::

        y1 = x1 cos(theta) - x2 sin(theta),   y2 = x2 cos(theta) + x1 sin(theta)

    Rotations compose: a key rotated for position ``p`` (``k cos + rotate_half(k)
    sin`` at ``p``, times the model's ``attention_scaling``) rotated by ``delta``
    is the key for ``p + delta``; the scaling is already in ``x``, so this applies
    none. Rows with ``delta == 0`` are returned bit for bit.
    """
    half = x.shape[-1] // 2
    angle = delta.to(torch.float32)[..., None] * inv_freq.to(torch.float32)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    y = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return torch.where((delta != 0)[..., None], y, x)


def kv_splice_reference(
    src: torch.Tensor,
    dst: torch.Tensor,
    index: torch.Tensor,
    fresh: torch.Tensor | None = None,
    fresh_slots: torch.Tensor | None = None,
    position_delta: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
    *,
    check: bool = True,
) -> None:
    """Plain PyTorch ``kv_splice`` (gather kept rows, rotate kept keys by their
    ``position_delta`` with :func:`rope_rotate`, then place fresh rows), in place.

    Same contract as :func:`kv_splice`; where fresh slots collide with kept rows the
    fresh row wins (the formula's order). ``check`` (default on) validates the values
    first; it synchronises on CUDA and is a graph break under ``torch.compile``, so a
    compiled caller passes ``check=False``.
    """
    L, B, H, C, D, F = _check_inputs(src, dst, index, fresh, fresh_slots)
    rotate = _check_rotation(src, position_delta, inv_freq)
    if check:
        _check_values(C, index, fresh_slots)
    full = (L, 2, B, H, C, D)
    keep = (index >= 0).view(1, 1, B, 1, C, 1)
    rows = index.clamp(min=0).long().view(1, 1, B, 1, C, 1).expand(full)
    moved = src.gather(4, rows)
    if rotate:
        assert position_delta is not None and inv_freq is not None
        delta = torch.where(index >= 0, position_delta, 0).view(1, B, 1, C)
        moved[:, 0] = rope_rotate(moved[:, 0], delta, inv_freq)
    # torch.where reads src and dst whole: a reference, not a bandwidth-optimal copy
    dst.copy_(torch.where(keep, moved, dst))
    if fresh is None or F == 0:
        return
    # inverse map slot -> fresh row (-1: none); skipped rows land in a dump column C
    live = fresh_slots >= 0
    slot = torch.where(live, fresh_slots, C).long()
    rows_f = torch.arange(F, device=src.device).expand(B, F)
    owner = torch.full((B, C + 1), -1, dtype=torch.int64, device=src.device)
    owner = owner.scatter(1, slot, rows_f)[:, :C]
    placed = (owner >= 0).view(1, 1, B, 1, C, 1)
    frows = owner.clamp(min=0).view(1, 1, B, 1, C, 1).expand(full)
    dst.copy_(torch.where(placed, fresh.gather(4, frows), dst))
