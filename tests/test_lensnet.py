"""LensNet: shapes, range, the folded attention vs plain multi-head attention, the
causal variant's visibility, gradients, save/load, determinism, costs."""

from __future__ import annotations

import json
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.nn.functional as F

import megacontext as mc
from megacontext.errors import ConfigError, StorageError
from megacontext.lensnet import LensNet, LensNetConfig, cost_table

SMALL = dict(d_lens=32, heads=4, head_hidden=16, mlp_ratio=2)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# kernel path vs reference path in fp32: summation order only under the interpreter;
# on a GPU tl.dot rounds fp32 operands to tf32 (10-bit mantissa)
KERNEL_TOL = 5e-3 if DEVICE == "cuda" else 1e-5


@pytest.fixture
def reference(monkeypatch):
    monkeypatch.setenv("MEGACONTEXT_KERNELS", "reference")


def make_inputs(B=2, N=29, d=40, T=6, seed=0, mask=False):
    g = torch.Generator().manual_seed(seed)
    entries = torch.randn(B, N, d, generator=g)
    tail = torch.randn(B, T, d, generator=g)
    levels = torch.randint(0, 3, (B, N), generator=g)
    span = 32**levels
    distance = torch.randint(0, 100_000, (B, N), generator=g)
    m = None
    if mask:
        m = torch.rand(B, N, generator=g) > 0.3
        m[:, 0] = True
    return entries, tail, levels, span, distance, m


def make_lens(seed=0, **kw):
    torch.manual_seed(seed)
    lens = LensNet(40, **{**SMALL, **kw})
    # non-trivial LayerNorm affines and biases, so that folding them is exercised
    with torch.no_grad():
        for name, p in lens.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return lens


# ----------------------------------------------------------------------------------------
# unfolded implementation: standard multi-head attention, written the obvious way


def _mha(q, k, v, heads, key_mask=None):
    B, Lq, D = q.shape
    dh = D // heads
    q = q.view(B, Lq, heads, dh).transpose(1, 2)
    k = k.view(B, k.shape[1], heads, dh).transpose(1, 2)
    v = v.view(B, v.shape[1], heads, dh).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / math.sqrt(dh)
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    out = torch.softmax(s, dim=-1) @ v
    return out.transpose(1, 2).reshape(B, Lq, D)


def _stage1(block, t, x, key_mask=None):
    if x.shape[1] == 0 or (key_mask is not None and not key_mask.any()):
        att = torch.zeros_like(t)  # attention over nothing contributes nothing
    else:
        kv = block.norm_x1(x)
        att = block.o1(
            _mha(block.q1(block.norm_t1(t)), block.k1(kv), block.v1(kv), block.heads, key_mask)
        )
    t = t + att
    return t + block.fc2(F.gelu(block.fc1(block.norm_mlp(t))))


def _stage2(block, x, t):
    tn = block.norm_t2(t)
    return x + block.o2(_mha(block.q2(block.norm_x2(x)), block.k2(tn), block.v2(tn), block.heads))


def _head(lens, x):
    h = F.gelu(lens.head_fc1(lens.head_norm(x)))
    return torch.tanh(lens.head_fc2(h)).squeeze(-1)


def naive_forward(lens, entries, tail, levels, span, distance, mask=None):
    x = lens.embed(entries, levels, span, distance)
    t = lens.proj(tail) + lens.tail_emb
    for block in lens.blocks:
        t = _stage1(block, t, x, mask)
        x = _stage2(block, x, t)
    return _head(lens, x)


def naive_causal_forward(lens, entries, levels, span, distance, mask=None):
    """Chunk by chunk: chunk k's tail state is updated from entries [0, k*C) only."""
    B, N, _ = entries.shape
    C = lens.config.causal_chunk
    S = -(-N // C)
    x = lens.embed(entries, levels, span, distance)
    vis = mask if mask is not None else torch.ones(B, N, dtype=torch.bool)
    tails = [lens.tail_emb.expand(B, -1, -1)] * S
    for block in lens.blocks:
        tails = [
            _stage1(block, tails[k], x[:, : k * C], vis[:, : k * C]) for k in range(S)
        ]  # every chunk from its own previous state
        x = torch.cat(
            [_stage2(block, x[:, k * C : (k + 1) * C], tails[k]) for k in range(S)], dim=1
        )
    return _head(lens, x)


# ----------------------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("n_blocks", [1, 2, 3])
@pytest.mark.parametrize("mask", [False, True])
def test_folded_attention_equals_plain_attention(reference, n_blocks, mask):
    lens = make_lens(n_blocks=n_blocks)
    inputs = make_inputs(mask=mask)
    got = lens(*inputs)
    want = naive_forward(lens, *inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("n_blocks", [1, 2])
def test_causal_equals_chunked_plain_attention(reference, n_blocks):
    lens = make_lens(n_blocks=n_blocks, causal=True, causal_chunk=8)
    entries, tail, levels, span, distance, mask = make_inputs(N=29, mask=True)
    got = lens(entries, tail, levels, span, distance, mask)
    want = naive_causal_forward(lens, entries, levels, span, distance, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_shapes_range_and_dtype(reference):
    lens = make_lens()
    for B, N in [(1, 1), (2, 29), (3, 64)]:
        scores = lens(*make_inputs(B=B, N=N))
        assert scores.shape == (B, N) and scores.dtype == torch.float32
        assert torch.isfinite(scores).all() and (scores.abs() <= 1).all()
    # saturating the head gives exactly +-1, never outside
    with torch.no_grad():
        lens.head_fc2.bias.fill_(40.0)
    assert (lens(*make_inputs()) == 1.0).all()


@pytest.mark.parametrize("n_blocks", [1, 2])
def test_causal_scores_ignore_later_entries_and_the_tail(reference, n_blocks):
    C = 8
    lens = make_lens(n_blocks=n_blocks, causal=True, causal_chunk=C)
    entries, tail, levels, span, distance, mask = make_inputs(N=30, mask=True)
    base = lens(entries, tail, levels, span, distance, mask)
    g = torch.Generator().manual_seed(9)
    for i in [0, 7, 8, 21, 29] if n_blocks == 1 else [5, 8, 29]:
        e2, l2, s2, d2, m2 = (t.clone() for t in (entries, levels, span, distance, mask))
        e2[:, i + 1 :] = torch.randn(e2[:, i + 1 :].shape, generator=g) * 3
        l2[:, i + 1 :] = 2 - l2[:, i + 1 :]
        s2[:, i + 1 :] = 32 ** l2[:, i + 1 :]
        d2[:, i + 1 :] += 777
        m2[:, i + 1 :] = ~m2[:, i + 1 :]
        out = lens(e2, torch.randn_like(tail), l2, s2, d2, m2)
        assert torch.equal(out[:, : i + 1], base[:, : i + 1]), f"entry <= {i} changed"
        if i + 1 < 30:  # later scores do change: the perturbation is visible
            assert not torch.equal(out[:, i + 1 :], base[:, i + 1 :])
    # an entry sees the earlier chunks: perturbing chunk 0 changes the scores of chunk 1
    e2 = entries.clone()
    e2[:, :C] += 1.0
    out = lens(e2, tail, levels, span, distance, mask)
    assert not torch.allclose(out[:, C : 2 * C], base[:, C : 2 * C])


def test_non_causal_scores_see_later_entries_and_the_tail(reference):
    lens = make_lens()
    entries, tail, levels, span, distance, _ = make_inputs()
    base = lens(entries, tail, levels, span, distance)
    e2 = entries.clone()
    e2[:, -1] += 3.0
    assert not torch.allclose(lens(e2, tail, levels, span, distance)[:, 0], base[:, 0])
    assert not torch.allclose(lens(entries, tail + 1, levels, span, distance), base)


def test_masked_entries_do_not_influence_others(reference):
    lens = make_lens(n_blocks=2)
    entries, tail, levels, span, distance, mask = make_inputs(mask=True)
    base = lens(entries, tail, levels, span, distance, mask)
    e2 = torch.where(mask[..., None], entries, torch.randn_like(entries) * 5)
    out = lens(e2, tail, levels, span, distance, mask)
    torch.testing.assert_close(out[mask], base[mask], rtol=0, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_path_matches_reference_path(monkeypatch, causal):
    # the Triton kernels (interpreter on the CPU) inside the whole module
    lens = make_lens(n_blocks=2, causal=causal, causal_chunk=16).to(DEVICE)
    inputs = [t.to(DEVICE) for t in make_inputs(N=37 if causal else 21, mask=True)]
    monkeypatch.setenv("MEGACONTEXT_KERNELS", "reference")
    want = lens(*inputs)
    ref_grads = torch.autograd.grad(want.square().sum(), list(lens.parameters()))
    monkeypatch.setenv("MEGACONTEXT_KERNELS", "triton")
    got = lens(*inputs)
    grads = torch.autograd.grad(got.square().sum(), list(lens.parameters()))
    tol = KERNEL_TOL
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=10 * tol, atol=tol)


@pytest.mark.parametrize("causal", [False, True])
def test_every_parameter_gets_a_gradient(reference, causal):
    lens = make_lens(n_blocks=2, causal=causal, causal_chunk=8)
    entries, tail, levels, span, distance, mask = make_inputs(mask=True)
    entries.requires_grad_()
    scores = lens(entries, tail, levels, span, distance, mask)
    scores.square().sum().backward()
    for name, p in lens.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        # embedding rows of unused buckets stay 0; every tensor has some signal
        assert p.grad.abs().sum() > 0, name
    assert entries.grad.abs().sum() > 0


def test_bf16_model_close_to_fp32(reference):
    lens = make_lens()
    inputs = make_inputs(N=50)
    ref = lens(*inputs)
    out = lens.to(torch.bfloat16)(*inputs)
    assert out.dtype == torch.bfloat16
    # bf16 weights and activations: 2^-8 relative per rounding through ~10 roundings
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=5e-2)


def test_deterministic(reference):
    a, b = make_lens(seed=3), make_lens(seed=3)
    inputs = make_inputs(mask=True)
    assert torch.equal(a(*inputs), a(*inputs))
    assert torch.equal(a(*inputs), b(*inputs))


def test_buckets():
    lens = make_lens()
    span = torch.tensor([[1, 2, 31, 32, 33, 1024, 2**40, 0]])
    dist = torch.tensor([[0, 1, 2, 3, 4, 7, 10**12, -5]])
    lv, sb, db = lens.buckets(torch.tensor([[0, 1, 2, 3, 7, 8, 99, -1]]), span, dist)
    assert lv.tolist() == [[0, 1, 2, 3, 7, 7, 7, 0]]
    assert sb.tolist() == [[0, 1, 4, 5, 5, 10, 31, 0]]
    assert db.tolist() == [[0, 2, 3, 4, 4, 6, 63, 0]]
    # floor(log2 span) is exact next to powers of two, up to 2^53
    wide = LensNet(8, d_lens=16, heads=2, n_span_buckets=64)
    spans = [v for k in range(1, 54) for v in (2**k - 1, 2**k, 2**k + 1) if v < 2**53]
    _, sb, _ = wide.buckets(torch.zeros(1, len(spans)), torch.tensor([spans]), torch.zeros(1, 1))
    assert sb.tolist() == [[v.bit_length() - 1 for v in spans]]


def test_relevance_input(tmp_path, reference):
    lens = make_lens(relevance_buckets=8)
    entries, tail, levels, span, distance, mask = make_inputs(mask=True)
    rel = torch.zeros(levels.shape)
    base = lens(entries, tail, levels, span, distance, mask, relevance=rel)
    # the bucket rule: 0 for z <= 0 (and NaN), else 1 + floor(2 log2(1 + z)), at most R - 1
    z = torch.tensor([-9.0, 0.0, 0.2, 0.42, 1.0, 3.0, 6.9, 7.0, 1e4, float("nan")])
    assert lens.relevance_bucket(z).tolist() == [0, 0, 1, 2, 3, 5, 6, 7, 7, 0]
    # an entry's relevance moves its own score
    hot = rel.clone()
    hot[0, 3] = 9.0
    moved = lens(entries, tail, levels, span, distance, mask, relevance=hot)
    assert not torch.equal(moved[0, 3], base[0, 3])
    assert torch.equal(moved[1], base[1])  # another batch row: untouched
    # z-scores in one bucket give the same scores
    same = lens(entries, tail, levels, span, distance, mask, relevance=rel - 0.5)
    assert torch.equal(same, base)
    # required exactly when the config has buckets; a plain LensNet refuses it
    with pytest.raises(ConfigError) as e:
        lens(entries, tail, levels, span, distance, mask)
    assert e.value.field == "relevance"
    with pytest.raises(ConfigError) as e:
        lens(entries, tail, levels, span, distance, mask, relevance=rel[:, :-1])
    assert e.value.field == "relevance"
    with pytest.raises(ConfigError) as e:
        make_lens()(entries, tail, levels, span, distance, mask, relevance=rel)
    assert e.value.field == "relevance"
    # a causal score may not read what the newest tokens decide
    with pytest.raises(ConfigError) as e:
        LensNet(40, causal=True, relevance_buckets=4)
    assert e.value.field == "relevance_buckets"
    # saved and loaded with its table
    loaded = LensNet.load(lens.save(tmp_path / "rel.safetensors"))
    assert loaded.config.relevance_buckets == 8
    assert torch.equal(loaded(entries, tail, levels, span, distance, mask, relevance=hot), moved)
    # the relevance table gets a gradient
    moved.square().sum().backward()
    assert lens.relevance_emb.weight.grad.abs().sum() > 0


def test_save_load_roundtrip(tmp_path, reference):
    lens = make_lens(n_blocks=2, causal=True, causal_chunk=8)
    path = lens.save(tmp_path / "sub" / "lens.safetensors")
    loaded = LensNet.load(path)
    assert loaded.config == lens.config
    inputs = make_inputs(mask=True)
    assert torch.equal(loaded(*inputs), lens(*inputs))
    half = LensNet.load(path, dtype=torch.bfloat16)
    assert half.proj.weight.dtype == torch.bfloat16


def test_save_is_atomic(tmp_path, monkeypatch):
    path = make_lens(seed=1).save(tmp_path / "lens.safetensors")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        make_lens(seed=2).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens.safetensors"]


def test_load_errors(tmp_path):
    with pytest.raises(StorageError, match="not found"):
        LensNet.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(StorageError) as err:
        LensNet.load(bad)
    assert str(bad) in str(err.value)

    from safetensors.torch import save_file

    lens = make_lens()
    tensors = {k: v.contiguous() for k, v in lens.state_dict().items()}
    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other), metadata={"format": "something.else"})
    with pytest.raises(StorageError) as err:
        LensNet.load(other)
    assert err.value.field == "format"
    meta = {"format": "megacontext.lensnet", "format_version": "1"}
    save_file(tensors, str(other), metadata={**meta, "config": json.dumps({"dim": -1})})
    with pytest.raises(StorageError) as err:
        LensNet.load(other)
    assert err.value.field == "config"
    cfg = lens.config.model_copy(update={"head_hidden": 17}).model_dump_json()
    save_file(tensors, str(other), metadata={**meta, "config": cfg})
    with pytest.raises(StorageError, match="do not match"):
        LensNet.load(other)


def test_config_errors_name_the_field():
    for kw, field in [
        ({"d_lens": 30, "heads": 4}, "d_lens"),
        ({"n_blocks": 4}, "n_blocks"),
        ({"n_blocks": 0}, "n_blocks"),
        ({"head_hidden": 0}, "head_hidden"),
        ({"bogus": 1}, "bogus"),
    ]:
        with pytest.raises(ConfigError) as err:
            LensNetConfig(dim=40, **kw)
        assert err.value.field == field
    with pytest.raises(ConfigError, match="dim"):
        LensNet()
    with pytest.raises(ConfigError):
        LensNet(40, config=LensNetConfig(dim=40))


def test_input_errors_name_the_tensor(reference):
    lens = make_lens()
    entries, tail, levels, span, distance, _ = make_inputs()
    good = dict(entries=entries, tail=tail, levels=levels, span=span, distance=distance)
    bad = {
        "entries": entries[..., :-1],
        "tail": tail[:, :5],
        "levels": levels.float(),
        "span": span[:, :-1],
        "distance": distance[0],
        "mask": torch.ones(2, 29),
    }
    for field, value in bad.items():
        with pytest.raises(ConfigError) as err:
            lens(**{**good, field: value})
        assert err.value.field == field
        assert field in str(err.value)


def test_parameter_count_formula():
    for kw in [
        {},
        {"n_blocks": 3},
        {"d_lens": 96, "heads": 3, "head_hidden": 7, "mlp_ratio": 1},
        {"relevance_buckets": 16},
    ]:
        for dim in (40, 576):
            lens = LensNet(dim, **kw)
            assert (
                lens.config.num_parameters()
                == lens.num_parameters()
                == sum(p.numel() for p in lens.parameters())
            )


def test_flops_formula():
    cfg = LensNetConfig(dim=576)
    f = cfg.flops(8192)
    dl, G, N = 512, 8 * 6, 8192
    assert f["proj"] == 2 * (N + 6) * 576 * dl
    assert f["stage1"] == f["stage2"] == 4 * G * N * dl
    assert f["head"] == 2 * N * (dl * 128 + 128)
    assert f["total"] == sum(v for k, v in f.items() if k != "total")
    f3 = LensNetConfig(dim=576, n_blocks=3).flops(8192, batch=2)
    assert f3["stage1"] == 2 * 3 * f["stage1"]
    assert "| 2048 | 1 |" in cost_table()


def test_exported_from_package():
    assert mc.LensNet is LensNet
    assert mc.LensNetConfig is LensNetConfig


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True], ids=["forward", "forward+backward"])
def test_65536_entries_fit_in_memory(train):
    """N = 65,536, d = 576, B = 1 on the CPU: peak resident memory (printed with -s)."""
    import subprocess
    import sys

    code = (
        "import resource, sys, torch, time\n"
        "from megacontext.lensnet import LensNet\n"
        "train = sys.argv[1] == '1'\n"
        "torch.manual_seed(0)\n"
        "lens = LensNet(576)\n"
        "N = 65536\n"
        "e = torch.randn(1, N, 576); tail = torch.randn(1, 6, 576)\n"
        "lv = torch.randint(0, 3, (1, N)); sp = 32 ** lv; d = torch.arange(N).flip(0)[None]\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "t = time.perf_counter()\n"
        "with torch.set_grad_enabled(train):\n"
        "    s = lens(e, tail, lv, sp, d)\n"
        "    if train:\n"
        "        s.square().mean().backward()\n"
        "dt = time.perf_counter() - t\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "assert s.shape == (1, N) and bool(torch.isfinite(s).all())\n"
        "print(f'{base / 2**20:.3f} {peak / 2**20:.3f} {dt:.2f}')\n"
    )
    env = {**os.environ, "MEGACONTEXT_KERNELS": "reference"}
    res = subprocess.run(
        [sys.executable, "-c", code, "1" if train else "0"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    base_gb, peak_gb, seconds = map(float, res.stdout.split())
    what = "forward+backward" if train else "forward (no grad)"
    print(
        f"LensNet N=65536 d=576 {what}: peak RSS {peak_gb:.2f} GiB (before the call "
        f"{base_gb:.2f} GiB), {seconds:.1f} s"
    )
    assert peak_gb < 12.0, f"peak RSS {peak_gb:.2f} GiB"


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_torch_compile_matches_eager(monkeypatch, kernels):
    # the custom ops are opaque to torch.compile (fake implementations give the shapes)
    monkeypatch.setenv("MEGACONTEXT_KERNELS", kernels)
    lens = make_lens(n_blocks=2).to(DEVICE)
    inputs = [t.to(DEVICE) for t in make_inputs(N=40, mask=True)]
    want = lens(*inputs)
    got = torch.compile(lens, dynamic=False)(*inputs)
    torch.testing.assert_close(got, want, rtol=KERNEL_TOL, atol=KERNEL_TOL)
