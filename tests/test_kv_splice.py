"""The fused KV splice kernel against its PyTorch reference (and the reference against a loop).

Without CUDA the Triton kernel runs on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest.py before this module imports the kernel).
With CUDA it runs on the GPU.

The op copies rows, so every comparison is exact: ``torch.equal`` on the raw bits
(tensors viewed as integers). Inputs are random bit patterns with NaNs replaced,
because Triton's interpreter and some PyTorch CPU gathers canonicalise NaN payloads
(every other value, -0.0, infinities and subnormals included, must survive).
"""

from __future__ import annotations

import itertools
import os
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_checks import assert_close

from megacontext.errors import BackendUnavailableError, ConfigError
from megacontext.kernels import kv_splice as ks
from megacontext.kernels._dispatch import FLOAT_DTYPES, is_interpreted
from megacontext.kernels.kv_splice import kv_splice, kv_splice_reference, rope_rotate

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = list(FLOAT_DTYPES)
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def rand_bits(shape, dtype, g: torch.Generator) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (every exponent, sign and subnormal), NaNs zeroed."""
    ib = _BITS[dtype]
    info = torch.iinfo(ib)
    x = torch.randint(info.min, info.max, shape, dtype=ib, generator=g).view(dtype)
    return torch.where(torch.isnan(x), torch.zeros((), dtype=dtype), x).to(DEVICE)


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    a, e = actual.contiguous().view(_BITS[actual.dtype]), expected.contiguous().view(
        _BITS[expected.dtype]
    )
    n = int((a != e).sum())
    assert n == 0, f"{what}: {n} of {a.numel()} elements differ"


def loop_oracle(src, dst, index, fresh=None, fresh_slots=None) -> torch.Tensor:
    """The formula, literally: one row at a time."""
    out = dst.clone()
    B, C = index.shape
    for b in range(B):
        for j in range(C):
            if index[b, j] >= 0:
                out[:, :, b, :, j] = src[:, :, b, :, int(index[b, j])]
        if fresh is not None:
            for f in range(fresh_slots.shape[1]):
                if fresh_slots[b, f] >= 0:
                    out[:, :, b, :, int(fresh_slots[b, f])] = fresh[:, :, b, :, f]
    return out


# ----------------------------------------------------------------------------------------
# splice plans


def plan_from_entries(
    olds: list[list[int]], news: list[list[int]], C: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``index [B, C]`` and ``fresh_slots [B, F]`` turning each old entry list into the new one.

    An entry id present in both keeps its row (moved to its new position); an id only
    in the new list is fresh. Rows are padded with -1 to a common F.
    """
    B = len(olds)
    index = torch.full((B, C), -1, dtype=torch.int64)
    fresh = []
    for b, (old, new) in enumerate(zip(olds, news, strict=True)):
        assert len(old) <= C and len(new) <= C
        where = {e: i for i, e in enumerate(old)}
        fresh.append([j for j, e in enumerate(new) if e not in where])
        for j, e in enumerate(new):
            if e in where:
                index[b, j] = where[e]
    F = max(len(f) for f in fresh)
    slots = torch.full((B, F), -1, dtype=torch.int64)
    for b, f in enumerate(fresh):
        slots[b, : len(f)] = torch.tensor(f, dtype=torch.int64)
    return index, slots


class _Ids:
    def __init__(self, start: int):
        self.next = start

    def take(self, n: int) -> list[int]:
        self.next += n
        return list(range(self.next - n, self.next))


def expand(entries: list[int], p: int, ids: _Ids) -> list[int]:
    """Entry ``p`` (a gist) becomes 32 new token entries: later rows shift right by 31."""
    return entries[:p] + ids.take(32) + entries[p + 1 :]


def collapse(entries: list[int], p: int, ids: _Ids) -> list[int]:
    """Entries ``p .. p+31`` become one new gist: later rows shift left by 31."""
    return entries[:p] + ids.take(1) + entries[p + 32 :]


def random_plan(B: int, C: int, g: torch.Generator, with_fresh: bool):
    """Permutation-like index with about a quarter -1 holes; fresh rows fill some holes."""
    index = torch.empty(B, C, dtype=torch.int64)
    rows = []
    for b in range(B):
        index[b] = torch.randperm(C, generator=g)
        holes = torch.rand(C, generator=g) < 0.25
        index[b, holes] = -1
        rows.append(holes.nonzero().flatten())
    if not with_fresh:
        return index, None
    F = max(1, min(len(r) for r in rows) + 1)  # +1: at least one -1 (skipped) fresh row
    slots = torch.full((B, F), -1, dtype=torch.int64)
    for b, r in enumerate(rows):
        take = r[torch.randperm(len(r), generator=g)][: F - 1]
        slots[b, : len(take)] = take
        slots[b] = slots[b, torch.randperm(F, generator=g)]
    return index, slots


def make_case(L, B, H, C, D, dtype, index, slots, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = rand_bits((L, 2, B, H, C, D), dtype, g)
    dst = rand_bits((L, 2, B, H, C, D), dtype, g)
    fresh = None
    if slots is not None:
        fresh = rand_bits((L, 2, B, H, slots.shape[1], D), dtype, g)
        slots = slots.to(DEVICE)
    return src, dst, index.to(DEVICE), fresh, slots


def run_both(src, dst, index, fresh, slots, what):
    out = dst.clone()
    kv_splice(src, out, index, fresh, slots)
    ref = dst.clone()
    kv_splice_reference(src, ref, index, fresh, slots)
    assert_bits_equal(out, ref, what)
    return out


# ----------------------------------------------------------------------------------------
# kernel vs reference


# A covering grid rather than the full product (432 cases at ~0.3 s each in the
# interpreter): every C x D pair with every dtype (27 cases), and L, B, H, fresh on/off
# and the index dtype drawn from a seeded RNG; test_grid_covers_all_pairs checks that
# every value of every factor meets every value of every other factor.
def _grid() -> list[tuple]:
    rng = random.Random(0)
    rows = []
    for C, D in itertools.product((5, 33, 70), (8, 24, 64)):
        for dtype in DTYPES:
            L, B, H = rng.choice((1, 3)), rng.choice((1, 2)), rng.choice((1, 3))
            fresh, idx = rng.choice((False, True)), rng.choice((torch.int64, torch.int32))
            rows.append((L, B, H, C, D, dtype, fresh, idx))
    return rows


_GRID = _grid()


def _grid_id(row: tuple) -> str:
    L, B, H, C, D, dtype, fresh, idx = row
    name = f"L{L}-B{B}-H{H}-C{C}-D{D}-{str(dtype).split('.')[-1]}-{str(idx).split('.')[-1]}"
    return name + ("-fresh" if fresh else "")


def test_grid_covers_all_pairs():
    for a, b in itertools.combinations(range(8), 2):
        seen = {(row[a], row[b]) for row in _GRID}
        va, vb = {row[a] for row in _GRID}, {row[b] for row in _GRID}
        assert seen == set(itertools.product(va, vb)), (a, b)
    assert {row[0] for row in _GRID} == {1, 3} and {row[6] for row in _GRID} == {False, True}


@pytest.mark.parametrize(
    "L, B, H, C, D, dtype, with_fresh, index_dtype", _GRID, ids=[_grid_id(r) for r in _GRID]
)
def test_kernel_matches_reference(force_triton, L, B, H, C, D, dtype, with_fresh, index_dtype):
    g = torch.Generator().manual_seed(C * 1000 + D)
    index, slots = random_plan(B, C, g, with_fresh)
    index = index.to(index_dtype)
    slots = None if slots is None else slots.to(index_dtype)
    src, dst, index, fresh, slots = make_case(L, B, H, C, D, dtype, index, slots)
    out = run_both(src, dst, index, fresh, slots, "splice")
    untouched = index < 0
    if slots is not None:
        for b in range(B):
            s = slots[b][slots[b] >= 0]
            untouched[b, s.long()] = False
    keep = untouched.view(1, 1, B, 1, C, 1).expand_as(dst)
    assert_bits_equal(out[keep], dst[keep], "holes without a fresh row are untouched")


def test_reference_matches_loop():
    g = torch.Generator().manual_seed(3)
    for with_fresh in (False, True):
        for dtype in DTYPES:
            index, slots = random_plan(2, 33, g, with_fresh)
            src, dst, index, fresh, slots = make_case(3, 2, 3, 33, 24, dtype, index, slots)
            ref = dst.clone()
            kv_splice_reference(src, ref, index, fresh, slots)
            assert_bits_equal(ref, loop_oracle(src, dst, index, fresh, slots), "reference")


def _patterns():
    ids = _Ids(1000)
    base = list(range(60))
    # expand: entry 10 (a gist) -> 32 tokens; rows 11.. shift right by 31
    yield "expand", [list(range(30))], [expand(list(range(30)), 10, ids)]
    # collapse: entries 20..51 -> one gist; rows 52.. shift left by 31
    yield "collapse", [list(range(65))], [collapse(list(range(65)), 20, ids)]
    # several at once, different per batch row (and a row whose WC is unchanged)
    both = expand(collapse(base, 0, ids), 20, ids)
    two = expand(expand(list(range(8)), 5, ids), 1, ids)
    yield "several", [base, list(range(8)), base], [both, two, base]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_realistic_patterns(force_triton, dtype):
    C = 70
    for name, olds, news in _patterns():
        index, slots = plan_from_entries(olds, news, C)
        B = len(olds)
        src, dst, index, fresh, slots = make_case(2, B, 3, C, 64, dtype, index, slots)
        out = run_both(src, dst, index, fresh, slots, name)
        assert_bits_equal(out, loop_oracle(src, dst, index, fresh, slots), name)
        if name == "expand":
            # the shift itself: old row 11 is now at slot 42, the 32 fresh rows at 10..41
            assert_bits_equal(out[..., 42, :], src[..., 11, :], "expand shift")
            assert_bits_equal(out[..., 10:42, :], fresh[..., :32, :], "expand fresh")
            assert index[0, 61:].lt(0).all()
        if name == "collapse":
            assert_bits_equal(out[..., 21, :], src[..., 52, :], "collapse shift")
            assert_bits_equal(out[..., 20, :], fresh[..., 0, :], "collapse gist")


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_refocus_sequences(force_triton, data):
    # random WC lengths and up to three expands/collapses per batch row (including a
    # row with no change and an empty WC), through all three implementations
    C = data.draw(st.integers(33, 130), label="C")
    B = data.draw(st.integers(1, 3), label="B")
    ids = _Ids(10_000)
    olds, news = [], []
    for _ in range(B):
        old = list(range(data.draw(st.integers(0, C), label="live")))
        new = old
        for kind in data.draw(st.lists(st.sampled_from(["expand", "collapse"]), max_size=3)):
            if kind == "expand" and new and len(new) + 31 <= C:
                new = expand(new, data.draw(st.integers(0, len(new) - 1)), ids)
            elif kind == "collapse" and len(new) >= 32:
                new = collapse(new, data.draw(st.integers(0, len(new) - 32)), ids)
        olds.append(old)
        news.append(new)
    index, slots = plan_from_entries(olds, news, C)
    D = data.draw(st.sampled_from([1, 3, 16, 40]), label="D")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    src, dst, index, fresh, slots = make_case(1, B, 2, C, D, dtype, index, slots)
    expected = loop_oracle(src, dst, index, fresh, slots)
    out = dst.clone()
    kv_splice(src, out, index, fresh, slots)
    assert_bits_equal(out, expected, "kernel")
    out = dst.clone()
    kv_splice_reference(src, out, index, fresh, slots)
    assert_bits_equal(out, expected, "reference")
    out, cpu = dst.cpu(), [t.cpu() for t in (src, index, fresh, slots)]
    ks._kv_splice_runs(cpu[0], out, cpu[1], cpu[2], cpu[3])
    assert_bits_equal(out.to(DEVICE), expected, "runs")


def test_several_blocks_per_plane(force_triton):
    # block_c=16 splits each plane into several kept and fresh programs, so the row
    # masks at block edges (C=70 -> 5 blocks, F=33 -> 3 blocks) are exercised
    g = torch.Generator().manual_seed(5)
    index, _ = random_plan(2, 70, g, False)
    index[:, 30:63] = -1
    slots = torch.arange(30, 63).expand(2, 33).clone()
    slots[1, 5] = -1
    src, dst, index, fresh, slots = make_case(1, 2, 3, 70, 24, torch.float16, index, slots)
    out = dst.clone()
    ks._kv_splice_launch(src, out, index, fresh, slots, block_c=16)
    assert_bits_equal(out, loop_oracle(src, dst, index, fresh, slots), "block_c=16")


def test_empty_fresh_and_all_holes(force_triton):
    index = torch.full((1, 33), -1)
    src, dst, index, _, _ = make_case(1, 1, 1, 33, 8, torch.float32, index, None, seed=6)
    fresh = torch.empty(1, 2, 1, 1, 0, 8, device=DEVICE)
    out = dst.clone()
    kv_splice(src, out, index, fresh, torch.empty(1, 0, dtype=torch.long, device=DEVICE))
    assert_bits_equal(out, dst, "nothing moved")
    index = torch.arange(33, device=DEVICE).view(1, 33)
    out = run_both(src, dst, index, None, None, "identity")
    assert_bits_equal(out, src, "identity")


def test_strided_views(force_triton):
    # ping-pong halves of one allocation, padded in C and D: only the views change
    L, B, H, C, D = 2, 2, 3, 33, 24
    g = torch.Generator().manual_seed(7)
    big = rand_bits((2, L, 2, B, H, C + 3, D + 8), torch.bfloat16, g)
    before = big.clone()
    src, dst = big[0, ..., :C, :D], big[1, ..., 1 : C + 1, 8:]
    index, slots = random_plan(B, C, g, True)
    index, slots = index.to(DEVICE), slots.to(DEVICE)
    fresh_big = rand_bits((L, 2, B, H, slots.shape[1], 2 * D), torch.bfloat16, g)
    fresh = fresh_big[..., ::2]  # head-dim stride 2
    expected = loop_oracle(src, dst, index, fresh, slots)
    kv_splice(src, dst, index, fresh, slots)
    assert_bits_equal(dst, expected, "strided dst")
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[1, ..., 1 : C + 1, 8:] = False
    assert_bits_equal(big[outside], before[outside], "bytes outside dst")
    # a transposed index (column stride != 1) and a src with head-dim stride 2
    src2 = rand_bits((L, 2, B, H, C, 2 * D), torch.bfloat16, g)[..., 1::2]
    idx_t = index.t().contiguous().t()
    out = torch.zeros_like(src)
    kv_splice(src2, out, idx_t)
    assert_bits_equal(out, loop_oracle(src2, torch.zeros_like(src), index), "strided src")


def test_kernel_is_really_used(force_triton, monkeypatch):
    # guard against a dispatch bug silently comparing the reference with itself
    calls = []
    real = ks._kv_splice_launch
    monkeypatch.setattr(ks, "_kv_splice_launch", lambda *a: calls.append(1) or real(*a))
    src, dst, index, _, _ = make_case(1, 1, 1, 5, 8, torch.float32, torch.arange(5)[None], None)
    kv_splice(src, dst, index)
    assert calls == [1]
    assert_bits_equal(dst, src, "identity")


@pytest.mark.parametrize("mode", ["", "reference"])
def test_cpu_paths_by_default(monkeypatch, mode):
    # CPU tensors: the run-copy path by default, the reference when forced; never the kernel
    monkeypatch.setenv("MEGACONTEXT_KERNELS", mode)
    monkeypatch.setattr(ks, "_kv_splice_launch", lambda *a: pytest.fail("kernel called on CPU"))
    used = []
    for name in ("_kv_splice_runs", "kv_splice_reference"):
        real = getattr(ks, name)
        monkeypatch.setattr(
            ks, name, lambda *a, _r=real, _n=name, **k: used.append(_n) or _r(*a, **k)
        )
    g = torch.Generator().manual_seed(8)
    src = rand_bits((1, 2, 1, 1, 5, 8), torch.float32, g).cpu()
    dst = torch.zeros_like(src)
    kv_splice(src, dst, torch.tensor([[4, 3, -1, 1, 0]]))
    assert used == ["kv_splice_reference" if mode else "_kv_splice_runs"]
    assert torch.equal(dst[..., 0, :], src[..., 4, :]) and (dst[..., 2, :] == 0).all()
    # the CPU paths always check values (free on the CPU): typed error
    with pytest.raises(ConfigError, match=r"index\[0, 1\] = 5"):
        kv_splice(src, dst, torch.tensor([[4, 5, -1, 1, 0]]))


def test_runs():
    starts, targets, lengths = ks._runs(torch.tensor([-1, 3, 4, 5, 9, -1, 10, 11, 0, 0, 1]))
    assert (starts, targets, lengths) == ([1, 4, 6, 8, 9], [3, 9, 10, 0, 0], [3, 1, 2, 1, 2])
    assert ks._runs(torch.full((4,), -1)) == ([], [], [])
    assert ks._runs(torch.arange(6, dtype=torch.int32)) == ([0], [0], [6])


@pytest.mark.parametrize("max_runs", [256, 2], ids=["runs", "index-fallback"])
def test_cpu_runs_path_matches_reference(monkeypatch, max_runs):
    # the CPU path over the whole grid and the realistic patterns; max_runs=2 sends
    # every batch row with more than two runs to the index_select/index_copy_ fallback
    monkeypatch.setattr(ks, "_MAX_RUNS", max_runs)
    for L, B, H, C, D, dtype, with_fresh, index_dtype in _GRID:
        g = torch.Generator().manual_seed(C * 1000 + D)
        index, slots = random_plan(B, C, g, with_fresh)
        index = index.to(index_dtype)
        slots = None if slots is None else slots.to(index_dtype)
        src, dst, index, fresh, slots = (
            t if t is None else t.cpu() for t in make_case(L, B, H, C, D, dtype, index, slots)
        )
        out, ref = dst.clone(), dst.clone()
        ks._kv_splice_runs(src, out, index, fresh, slots)
        kv_splice_reference(src, ref, index, fresh, slots)
        assert_bits_equal(out, ref, f"runs L{L} B{B} H{H} C{C} D{D} {dtype}")
    for name, olds, news in _patterns():
        index, slots = plan_from_entries(olds, news, 70)
        src, dst, index, fresh, slots = (
            t.cpu() for t in make_case(2, len(olds), 3, 70, 24, torch.bfloat16, index, slots)
        )
        out = dst.clone()
        ks._kv_splice_runs(src, out, index, fresh, slots)
        assert_bits_equal(out, loop_oracle(src, dst, index, fresh, slots), f"runs {name}")


# ----------------------------------------------------------------------------------------
# bad inputs


def _ok(L=1, B=2, H=1, C=5, D=8, F=2):
    src = torch.zeros(L, 2, B, H, C, D, device=DEVICE)
    index = torch.full((B, C), -1, dtype=torch.long, device=DEVICE)
    fresh = torch.zeros(L, 2, B, H, F, D, device=DEVICE)
    slots = torch.full((B, F), -1, dtype=torch.long, device=DEVICE)
    return dict(src=src, dst=torch.zeros_like(src), index=index, fresh=fresh, fresh_slots=slots)


@pytest.mark.parametrize(
    "change, field, message",
    [
        (dict(src=torch.zeros(1, 2, 2, 1, 5)), "src", r"src must be a \[L, 2, B, H, C, D\]"),
        (dict(src=torch.zeros(1, 3, 2, 1, 5, 8)), "src", "got shape \\(1, 3, 2, 1, 5, 8\\)"),
        (dict(dst=torch.zeros(1, 2, 2, 1, 6, 8)), "dst", r"dst must have src's shape"),
        (dict(dst=torch.zeros(1, 2, 2, 1, 5, 8).half()), "dst", "dst must have src's dtype"),
        (dict(dst=torch.zeros(1, 2, 2, 1, 5, 8, device="meta")), "dst", "dst is on meta"),
        (dict(index=torch.zeros(2, 4, dtype=torch.long)), "index", r"\[B, C\] = \[2, 5\]"),
        (dict(index=torch.zeros(2, 5)), "index", "index must be int32 or int64"),
        (dict(fresh=None), "fresh", "fresh and fresh_slots must be given together"),
        (dict(fresh_slots=None), "fresh_slots", "fresh and fresh_slots must be given"),
        (dict(fresh=torch.zeros(1, 2, 2, 1, 2, 9)), "fresh", r"\[1, 2, 2, 1, F, 8\]"),
        (dict(fresh=torch.zeros(1, 2, 2, 1, 2, 8).half()), "fresh", "fresh must have src's"),
        (dict(fresh_slots=torch.zeros(2, 3, dtype=torch.long)), "fresh_slots", r"\[2, 2\]"),
        (dict(fresh_slots=torch.zeros(2, 2, dtype=torch.int16)), "fresh_slots", "int32 or"),
    ],
)
def test_bad_inputs(force_triton, change, field, message):
    args = _ok()
    args.update({k: v if v is None or v.is_meta else v.to(DEVICE) for k, v in change.items()})
    with pytest.raises(ConfigError, match=message) as info:
        kv_splice(**args)
    assert info.value.field == field


def test_bad_dtype():
    args = _ok()
    args["src"], args["dst"] = args["src"].double(), args["dst"].double()
    with pytest.raises(ConfigError, match=r"float32, float16 or bfloat16, got torch\.float64"):
        kv_splice(**args)


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_value_checks(monkeypatch, path):
    monkeypatch.setenv("MEGACONTEXT_KERNELS", path)
    args = _ok()
    args["index"][1, 3] = 5
    with pytest.raises(ConfigError, match=r"index\[1, 3\] = 5 is out of range.*C = 5"):
        kv_splice(**args, check=True)
    args = _ok()
    args["fresh_slots"][0, 1] = 7
    with pytest.raises(ConfigError, match=r"fresh_slots\[0, 1\] = 7 is out of range"):
        kv_splice(**args, check=True)
    args = _ok()
    args["fresh_slots"][1] = torch.tensor([2, 2])
    with pytest.raises(ConfigError, match=r"fresh_slots\[1\] names destination slot 2 2 times"):
        kv_splice(**args, check=True)
    args = _ok()
    args["fresh_slots"][0, 0] = 3
    args["index"][0, 3] = 1
    with pytest.raises(ConfigError, match=r"slot 3 of batch row 0 is both a fresh slot"):
        kv_splice(**args, check=True)


def test_out_of_range_without_check_stays_in_bounds(force_triton):
    # without check=True nothing synchronises; the kernel's masks skip the bad slots
    src = torch.arange(2 * 5 * 8, dtype=torch.float32, device=DEVICE).view(1, 2, 1, 1, 5, 8)
    dst = torch.full_like(src, -1.0)
    index = torch.tensor([[0, 99, 2, -1, 4]], device=DEVICE)
    fresh = torch.zeros(1, 2, 1, 1, 1, 8, device=DEVICE)
    kv_splice(src, dst, index, fresh, torch.tensor([[1000]], device=DEVICE))
    assert torch.equal(dst[..., [0, 2, 4], :], src[..., [0, 2, 4], :])
    assert (dst[..., [1, 3], :] == -1).all()


def test_overlapping_memory_is_refused(force_triton):
    buf = torch.zeros(1, 2, 1, 1, 9, 8, device=DEVICE)
    index = torch.full((1, 5), -1, device=DEVICE)
    with pytest.raises(ConfigError, match="src and dst overlap in memory"):
        kv_splice(buf[..., :5, :], buf[..., 4:, :], index)
    with pytest.raises(ConfigError, match="src and dst overlap"):
        kv_splice(buf, buf, torch.full((1, 9), -1, device=DEVICE))
    fresh = buf[..., 4:6, :]
    with pytest.raises(ConfigError, match="fresh and dst overlap"):
        kv_splice(
            torch.zeros(1, 2, 1, 1, 5, 8, device=DEVICE),
            buf[..., :5, :],
            index,
            fresh,
            torch.full((1, 2), -1, device=DEVICE),
        )
    with pytest.raises(ConfigError, match="zero stride"):
        kv_splice(
            torch.zeros(1, 2, 1, 1, 5, 8, device=DEVICE),
            torch.zeros(1, 2, 1, 1, 1, 8, device=DEVICE).expand(1, 2, 1, 1, 5, 8),
            index,
        )
    # interleaved views are refused even when their elements are disjoint (the check
    # compares byte ranges, it does not solve the general strided-overlap problem) ...
    with pytest.raises(ConfigError, match="src and dst overlap"):
        kv_splice(buf[..., :4, :], buf[..., 4:8, :], torch.arange(4, device=DEVICE).view(1, 4))
    # ... while the ping-pong halves of one allocation are fine
    pair = torch.arange(2 * 2 * 5 * 8, dtype=torch.float32, device=DEVICE).view(2, 1, 2, 1, 1, 5, 8)
    kv_splice(pair[0], pair[1], torch.arange(5, device=DEVICE).view(1, 5))
    assert torch.equal(pair[1], pair[0])


def test_launcher_refuses_unrunnable_devices(force_triton):
    args = _ok()
    meta = {k: v.to("meta") for k, v in args.items()}
    # meta tensors go through the op's fake implementation (checks only) ...
    kv_splice(**meta)
    # ... but the launcher itself refuses devices Triton cannot run on
    with pytest.raises(BackendUnavailableError, match="meta"):
        ks._kv_splice_launch(*meta.values())


# ----------------------------------------------------------------------------------------
# torch.library / torch.compile


def test_opcheck():
    g = torch.Generator().manual_seed(9)
    index, slots = random_plan(2, 5, g, True)
    src, dst, index, fresh, slots = make_case(1, 2, 1, 5, 8, torch.bfloat16, index, slots)
    torch.library.opcheck(torch.ops.megacontext.kv_splice.default, (src, dst, index, fresh, slots))
    torch.library.opcheck(torch.ops.megacontext.kv_splice.default, (src, dst, index, None, None))


def test_torch_compile(force_triton):
    g = torch.Generator().manual_seed(10)
    index, slots = random_plan(2, 33, g, True)
    src, dst, index, fresh, slots = make_case(2, 2, 1, 33, 8, torch.float32, index, slots)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def refocus(src, dst, index, fresh, slots):
        kv_splice(src, dst, index, fresh * 2, slots)
        return dst[0, 0].sum()

    out = dst.clone()
    total = refocus(src, out, index, fresh, slots)
    expected = loop_oracle(src, dst, index, fresh * 2, slots)
    assert_bits_equal(out, expected, "compiled splice mutates dst")
    torch.testing.assert_close(total, expected[0, 0].sum())


# ----------------------------------------------------------------------------------------
# code generation (no GPU needed: Triton compiles for an sm_90 target on the CPU)

_PTX_SCRIPT = r"""
import inspect, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megacontext.kernels.kv_splice import _kv_splice_kernel as k

names = list(inspect.signature(k.fn).parameters)
ptrs = {"SRC": "*bf16", "DST": "*bf16", "INDEX": "*i32", "FRESH": "*bf16", "SLOTS": "*i32",
        "DELTA": "*i32", "INV_FREQ": "*fp32"}
rotate = len(sys.argv) > 1 and sys.argv[1] == "rotate"
# what the launcher passes for a contiguous [L, 2, 1, H, 8224, 128] bf16 cache: unit
# strides become constexpr 1, the rest are multiples of 16 (Triton's runtime hints)
const = {"BLOCK_C": 32, "BLOCK_D": 128, "BLOCK_H": 64, "HAS_FRESH": True, "ROTATE": rotate}
const.update({n: 1 for n in ("s_d", "d_d", "f_d", "i_c", "sl_f", "dl_c")})
sig = {n: ptrs.get(n, "constexpr" if n in const else "i32") for n in names}
div16 = [n for n in names if n not in const and n not in ("F", "H", "n_kept_blocks")]
attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
ptx = triton.compile(
    ASTSource(fn=k, signature=sig, constexprs=const, attrs=attrs),
    target=GPUTarget("cuda", 90, 32),
).asm["ptx"]
print({op: len(re.findall(op + r"\b", ptx)) for op in ("ld.global.v4", "st.global.v4",
       "ld.global.b16", "st.global.b16", "ld.global.v2", "st.global.v2", "sin.approx",
       "cos.approx")})
"""


def test_ptx_uses_16_byte_accesses():
    # the design claim "16-byte vector accesses for a contiguous head dim", checked on
    # the generated PTX: each thread moves its 32 bf16 values as 4 loads + 4 stores of
    # 16 bytes in each branch (kept rows, fresh rows), and no 2-byte accesses remain
    import ast
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _PTX_SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert {k: counts[k] for k in list(counts)[:4]} == {
        "ld.global.v4": 8,
        "st.global.v4": 8,
        "ld.global.b16": 0,
        "st.global.b16": 0,
    }, counts
    # the re-rotating variant: the key halves are moved with 16-byte accesses too (no
    # 2- or 8-byte row accesses; the counts are pinned so that a change in code
    # generation is noticed), and cos/sin are the precise libdevice functions, not the
    # approximate instructions (whose error grows with the angle)
    proc = subprocess.run(
        [sys.executable, "-c", _PTX_SCRIPT, "rotate"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert counts == {
        "ld.global.v4": 14,
        "st.global.v4": 12,
        "ld.global.b16": 0,
        "st.global.b16": 0,
        "ld.global.v2": 0,
        "st.global.v2": 0,
        "sin.approx": 0,
        "cos.approx": 0,
    }, counts


# ----------------------------------------------------------------------------------------
# re-rotating splice (keys turned by each kept row's position delta)

# Tolerances of the rotating kernel against the reference. Both compute the angle as
# the same fp32 product delta * inv_freq and rotate in fp32; they differ only in the
# cos/sin implementations (libdevice or NumPy vs PyTorch: a few fp32 ulps) and in
# fused multiply-adds, so fp32 agrees to a few ulps of the row's magnitude, and
# fp16/bf16 to one ulp of the stored dtype (a last-bit difference in fp32 can round
# the other way): fp16 2^-10, bf16 2^-7, relative to max(1, max|x|).
ROT_TOL = {torch.float32: 4e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def _inv_freq(D: int, theta: float = 10000.0) -> torch.Tensor:
    return (1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)).to(DEVICE)


def rotation_case(L, B, H, C, D, dtype, moved, seed, with_fresh=False, index_dtype=torch.int64):
    """Random rows (normal, so rotations stay finite), a permutation index keeping
    ``moved`` of every ``C`` slots, deltas in [-5000, 5000] with a tenth of them 0."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(L, 2, B, H, C, D, generator=g).to(dtype).to(DEVICE)
    dst = torch.randn(L, 2, B, H, C, D, generator=g).to(dtype).to(DEVICE)
    index = torch.full((B, C), -1, dtype=torch.int64)
    for b in range(B):
        index[b, torch.randperm(C, generator=g)[:moved]] = torch.randperm(C, generator=g)[:moved]
    delta = torch.randint(-5000, 5001, (B, C), generator=g)
    delta[torch.rand(B, C, generator=g) < 0.1] = 0
    fresh = slots = None
    if with_fresh:
        holes = [(index[b] < 0).nonzero().flatten() for b in range(B)]
        F = max(1, min(len(h) for h in holes))
        slots = torch.full((B, F), -1, dtype=torch.int64)
        for b, h in enumerate(holes):
            slots[b, : min(F, len(h))] = h[:F]
        fresh = torch.randn(L, 2, B, H, F, D, generator=g).to(dtype).to(DEVICE)
        slots = slots.to(index_dtype).to(DEVICE)
    return (
        src,
        dst,
        index.to(index_dtype).to(DEVICE),
        fresh,
        slots,
        delta.to(index_dtype).to(DEVICE),
        _inv_freq(D),
    )


def _check_rotated(out, ref, src, dst, index, delta, dtype, what):
    """``out`` against the reference: values and zero-delta keys bit-exact, rotated
    keys to ``ROT_TOL``, holes untouched."""
    assert_bits_equal(out[:, 1], ref[:, 1], f"{what}: values are moved, never rotated")
    B, C = index.shape
    still = ((index < 0) | (delta == 0)).view(1, B, 1, C, 1).expand_as(out[:, 0])
    assert_bits_equal(out[:, 0][still], ref[:, 0][still], f"{what}: zero-delta keys and holes")
    assert_close(out, ref, ROT_TOL[dtype], what)


# every dtype against odd shapes: L, B, H (GQA kv heads), D (even, a power of two or
# not), C and the number of kept rows (none, some, all), fresh rows on and off
_ROT_GRID = [
    (1, 1, 1, 5, 2, 3, False),
    (2, 2, 3, 33, 24, 20, True),
    (3, 1, 5, 70, 64, 70, False),
    (1, 3, 2, 17, 6, 0, True),
    (2, 2, 1, 40, 200, 31, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize(
    "L, B, H, C, D, moved, with_fresh",
    _ROT_GRID,
    ids=[f"L{r[0]}-B{r[1]}-H{r[2]}-C{r[3]}-D{r[4]}-m{r[5]}" for r in _ROT_GRID],
)
def test_rotating_kernel_matches_reference(force_triton, dtype, L, B, H, C, D, moved, with_fresh):
    idx_dtype = torch.int32 if C % 2 else torch.int64
    src, dst, index, fresh, slots, delta, inv = rotation_case(
        L, B, H, C, D, dtype, moved, seed=C + D, with_fresh=with_fresh, index_dtype=idx_dtype
    )
    out, ref = dst.clone(), dst.clone()
    kv_splice(src, out, index, fresh, slots, delta, inv)
    kv_splice_reference(src, ref, index, fresh, slots, delta, inv)
    _check_rotated(out, ref, src, dst, index, delta, dtype, "kernel")
    # the rotation happened: a kept key with a non-zero delta is not its source row
    kept = (index >= 0) & (delta != 0)
    if bool(kept.any()):
        b, j = (int(v) for v in kept.nonzero()[0])
        assert not torch.equal(out[:, 0, b, :, j], src[:, 0, b, :, int(index[b, j])])
    # the CPU path (runs + in-place rotation of the moved keys) agrees as well
    cpu = [None if t is None else t.cpu() for t in (src, dst, index, fresh, slots, delta, inv)]
    runs = cpu[1].clone()
    ks._kv_splice_runs(cpu[0], runs, cpu[2], cpu[3], cpu[4], cpu[5], cpu[6])
    _check_rotated(runs.to(DEVICE), ref, src, dst, index, delta, dtype, "runs")


def test_rotating_several_blocks_per_plane(force_triton):
    # block_c=16: kept blocks' row masks at the edges, rotated and plain tiles mixed
    src, dst, index, fresh, slots, delta, inv = rotation_case(
        2, 2, 3, 70, 24, torch.float32, 50, seed=11, with_fresh=True
    )
    out, ref = dst.clone(), dst.clone()
    ks._kv_splice_launch(src, out, index, fresh, slots, delta, inv, block_c=16)
    kv_splice_reference(src, ref, index, fresh, slots, delta, inv)
    _check_rotated(out, ref, src, dst, index, delta, torch.float32, "block_c=16")


def test_rope_rotate_formula():
    # rotate_half layout, literally: pairs (i, i + D/2) turn by delta * inv_freq[i]
    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)
    delta = torch.tensor([0, 7, -300])
    inv = _inv_freq(8).cpu()
    y = rope_rotate(x.float(), delta, inv).double()
    for r in range(3):
        for i in range(4):
            t = float(delta[r]) * float(inv[i])
            c, s_ = (f(torch.tensor(t, dtype=torch.float64)) for f in (torch.cos, torch.sin))
            a, b = x[r, i], x[r, i + 4]
            torch.testing.assert_close(y[r, i], a * c - b * s_, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(y[r, i + 4], b * c + a * s_, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[0], x[0].float().double()), "delta 0 keeps the bits"
    # composition: by a then by b equals by a + b (fp32 angles, small positions)
    ab = rope_rotate(rope_rotate(x.float(), delta, inv), -2 * delta, inv)
    torch.testing.assert_close(ab, rope_rotate(x.float(), -delta, inv), rtol=1e-5, atol=1e-5)


def _tiny_rope_model(rope_parameters: dict | None):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
    )
    if rope_parameters:
        kw["rope_parameters"] = rope_parameters
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**kw)).eval()


ROPES = {
    "default": None,
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    },
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    # yarn's attention_scaling (~1.14) multiplies cos and sin: the re-rotation must not
    # apply it a second time
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 1024,
    },
}


@pytest.mark.parametrize("rope", list(ROPES))
def test_rerotation_equals_models_own_rope(rope):
    # a key rotated by the model for p, turned by delta with the frequencies read from
    # the model, equals the key the model rotates for p + delta
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from megacontext.cache import rope_inv_freq

    model = _tiny_rope_model(ROPES[rope])
    rotary = model.model.rotary_emb
    inv = rope_inv_freq(model)
    assert inv.dtype == torch.float32 and inv.shape == (8,)
    if rope != "default":
        # not recomputable from rope_theta alone: the scaling changed the frequencies
        theta = ROPES[rope]["rope_theta"]
        plain = 1.0 / theta ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
        assert not torch.allclose(inv, plain)
    if rope == "yarn":
        assert rotary.attention_scaling > 1.05
    g = torch.Generator().manual_seed(13)
    k = torch.randn(1, 2, 64, 16, generator=g)  # [B, Hkv, n, D]
    p = torch.randint(0, 4096, (1, 64), generator=g)
    delta = torch.randint(-4000, 4001, (1, 64), generator=g).clamp(min=-p)
    delta[0, :4] = 0

    def rope_at(pos):
        cos, sin = rotary(k, pos)
        return apply_rotary_pos_emb(k, k, cos, sin)[1]

    turned = rope_rotate(rope_at(p), delta[0], inv)
    expected = rope_at(p + delta)
    # fp32 angles: each of p * f, delta * f and (p + delta) * f is rounded to fp32
    # (|error| <= ulp(8192) / 2 ~ 5e-4 rad at f <= 1), so the keys agree to ~1e-3 of
    # their magnitude; with the wrong frequencies they are off by O(1)
    scale = expected.abs().max()
    torch.testing.assert_close(turned, expected, rtol=0, atol=2e-3 * scale)
    assert torch.equal(turned[:, :, :4], rope_at(p)[:, :, :4])
    if rope != "default":
        wrong = rope_rotate(rope_at(p), delta[0], plain)
        assert (wrong - expected).abs().max() > 0.05 * scale


@pytest.mark.parametrize(
    "change, field, message",
    [
        (dict(inv_freq=None), "inv_freq", "position_delta and inv_freq must be given together"),
        (dict(position_delta=None), "position_delta", "must be given together"),
        (dict(position_delta=torch.zeros(2, 4, dtype=torch.long)), "position_delta", r"\[2, 5\]"),
        (dict(position_delta=torch.zeros(2, 5)), "position_delta", "int32 or int64"),
        (dict(inv_freq=torch.ones(3)), "inv_freq", r"float32 \[D/2\] = \[4\]"),
        (dict(inv_freq=torch.ones(4, dtype=torch.float64)), "inv_freq", "float32"),
        (
            dict(
                src=torch.zeros(1, 2, 2, 1, 5, 7),
                dst=torch.zeros(1, 2, 2, 1, 5, 7),
                fresh=torch.zeros(1, 2, 2, 1, 2, 7),
            ),
            "src",
            "even head dim.*D = 7",
        ),
    ],
)
def test_bad_rotation_inputs(force_triton, change, field, message):
    args = _ok()
    args["position_delta"] = torch.zeros(2, 5, dtype=torch.long, device=DEVICE)
    args["inv_freq"] = torch.ones(4, device=DEVICE)
    args.update({k: v if v is None else v.to(DEVICE) for k, v in change.items()})
    with pytest.raises(ConfigError, match=message) as info:
        kv_splice(**args)
    assert info.value.field == field


def test_rotating_opcheck_and_compile(force_triton):
    src, dst, index, fresh, slots, delta, inv = rotation_case(
        1, 2, 1, 5, 8, torch.bfloat16, 4, seed=14, with_fresh=True
    )
    op = torch.ops.megacontext.kv_splice.default
    torch.library.opcheck(op, (src, dst, index, fresh, slots, delta, inv))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def refocus(src, dst, index, delta, inv):
        kv_splice(src, dst, index, None, None, delta, inv)
        return dst[0, 0].float().sum()

    out, ref = dst.clone(), dst.clone()
    refocus(src, out, index, delta, inv)
    kv_splice_reference(src, ref, index, None, None, delta, inv)
    _check_rotated(out, ref, src, dst, index, delta, torch.bfloat16, "compiled")


# ----------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("L, H, D", [(30, 3, 64), (32, 8, 128), (2, 3, 200)])
def test_gpu_compiled_kernel(monkeypatch, L, H, D):
    monkeypatch.delenv("MEGACONTEXT_KERNELS", raising=False)
    assert not is_interpreted(ks._kv_splice_kernel), "compiled, not interpreted"
    C, B = 8192 + 32, 2
    ids = _Ids(100_000)
    old = list(range(8068))
    new = old
    for p in (100, 2000, 5000, 7000):
        new = expand(new, p, ids)
    old2 = list(range(8192))
    new2 = collapse(collapse(old2, 64, ids), 4000, ids)
    index, slots = plan_from_entries([old, old2], [new, new2], C)
    index, slots = index.cuda(), slots.cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    src, dst = (
        torch.randn(L, 2, B, H, C, D, device="cuda", dtype=torch.bfloat16, generator=g)
        for _ in range(2)
    )
    fresh = torch.randn(L, 2, B, H, slots.shape[1], D, device="cuda", generator=g).bfloat16()
    out = dst.clone()
    kv_splice(src, out, index.int(), fresh, slots.int(), check=True)
    torch.cuda.synchronize()
    ref = dst.clone()
    kv_splice_reference(src, ref, index, fresh, slots)
    assert_bits_equal(out, ref, "cuda kernel")
    # views of one ping-pong allocation, the way the cache holds them
    buf = torch.zeros(2, L, 2, B, H, C, D, device="cuda", dtype=torch.bfloat16)
    buf[0] = src
    kv_splice(buf[0], buf[1], index, fresh, slots)
    ref0 = torch.zeros_like(src)
    kv_splice_reference(src, ref0, index, fresh, slots)
    assert_bits_equal(buf[1], ref0, "ping-pong views")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_gpu_rotating_kernel(monkeypatch, dtype):
    # the compiled kernel (libdevice cos/sin, fused multiply-adds) on a Llama-8B-shaped
    # cache with a realistic refocus: four expands shift runs of rows, every kept row
    # moves by its own delta (positions re-packed after each expand)
    monkeypatch.delenv("MEGACONTEXT_KERNELS", raising=False)
    assert not is_interpreted(ks._kv_splice_kernel), "compiled, not interpreted"
    L, H, D, C = 32, 8, 128, 8192 + 32
    ids = _Ids(100_000)
    old = list(range(8068))
    new = old
    for p in (100, 2000, 5000, 7000):
        new = expand(new, p, ids)
    index, slots = plan_from_entries([old], [new], C)
    index, slots = index.cuda(), slots.cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    src, dst = (
        torch.randn(L, 2, 1, H, C, D, device="cuda", generator=g).to(dtype) for _ in range(2)
    )
    fresh = torch.randn(L, 2, 1, H, slots.shape[1], D, device="cuda", generator=g).to(dtype)
    delta = torch.randint(-8192, 8193, (1, C), device="cuda", generator=g)
    delta[:, ::7] = 0
    inv = _inv_freq(D, 500000.0)
    out = dst.clone()
    kv_splice(src, out, index.int(), fresh, slots.int(), delta.int(), inv, check=True)
    torch.cuda.synchronize()
    ref = dst.clone()
    kv_splice_reference(src, ref, index, fresh, slots, delta, inv)
    _check_rotated(out, ref, src, dst, index, delta, dtype, "cuda rotating kernel")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_rotating_splice_in_a_cuda_graph(monkeypatch):
    # the splice is one kernel launch with no host work on device values, so a refocus
    # can be captured once and replayed with new index / delta contents
    monkeypatch.delenv("MEGACONTEXT_KERNELS", raising=False)
    src, dst, index, fresh, slots, delta, inv = rotation_case(
        4, 1, 8, 1024, 128, torch.bfloat16, 900, seed=15, with_fresh=True
    )
    out = dst.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture
        kv_splice(src, out, index, fresh, slots, delta, inv)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kv_splice(src, out, index, fresh, slots, delta, inv)
    delta.copy_(torch.randint(-100, 100, delta.shape, dtype=delta.dtype, device=delta.device))
    out.copy_(dst)
    graph.replay()
    torch.cuda.synchronize()
    ref = dst.clone()
    kv_splice_reference(src, ref, index, fresh, slots, delta, inv)
    _check_rotated(out, ref, src, dst, index, delta, torch.bfloat16, "graph replay")
