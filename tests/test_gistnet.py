"""GistNet: shapes, read-outs, levels, warm start, gradients, persistence, costs."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import megacontext as mc
from megacontext.errors import ConfigError, StorageError
from megacontext.gistnet import GistNet, GistNetConfig

READOUTS = ("mean", "query", "cls")
# small enough for a 2-core CPU, with every structural feature (heads, depth, levels)
SMALL = {"width": 32, "heads": 4, "depth": 2}


def small(dim: int = 24, seed: int = 0, **kw) -> GistNet:
    return GistNet(dim, seed=seed, **{**SMALL, **kw})


def perturb(g: GistNet, seed: int = 1) -> GistNet:
    """Move every parameter away from its init (a 'trained' GistNet)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return g


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("B", [1, 5])
def test_shapes(readout, B):
    g = perturb(small(readout=readout))
    y = g(torch.randn(B, 32, 24))
    assert y.shape == (B, 24) and y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_empty_batch_and_other_block_size():
    assert small()(torch.randn(0, 32, 24)).shape == (0, 24)
    g = perturb(small(block_size=16))
    assert g(torch.randn(3, 16, 24)).shape == (3, 24)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    g = perturb(small())
    x = torch.randn(3, 32, 24)
    y = g(x.to(dtype))
    assert y.dtype == dtype
    # fp32 compute on rounded inputs: differs from the fp32 call by input/output rounding
    torch.testing.assert_close(y.float(), g(x.to(dtype).float()), atol=1e-2, rtol=1e-2)
    g16 = g.to(dtype)  # low-precision compute
    y16 = g16(x.to(dtype))
    assert y16.dtype == dtype and torch.isfinite(y16.float()).all()


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("shared", [True, False])
def test_untrained_is_mean_pooling(readout, shared):
    # zero-initialised output projection: the transformer branch adds exactly 0, so an
    # untrained GistNet equals mean pooling bit for bit (fp32 mean of the inputs)
    g = small(readout=readout, shared_levels=shared)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 32, 24).to(dtype)
        for level in (1, 2):
            assert torch.equal(g(x, level=level), x.float().mean(1).to(dtype))


def test_readouts_differ_after_training():
    x = torch.randn(3, 32, 24)
    ys = [perturb(small(readout=r))(x) for r in READOUTS]
    assert not torch.allclose(ys[0], ys[1]) and not torch.allclose(ys[1], ys[2])


def test_query_readout_is_attention_pooling():
    g = perturb(small(readout="query", depth=0))
    core = g.cores[0]
    x = torch.randn(3, 32, 24)
    h = core.norm(core.in_proj(x) + g.level_embed[0])
    hh = h.view(3, 32, 4, 8)
    p = torch.softmax(torch.einsum("bnhd,hd->bhn", hh, core.query) / 8**0.5, dim=-1)
    pooled = torch.einsum("bhn,bnhd->bhd", p, hh).reshape(3, 32)
    torch.testing.assert_close(g(x), x.mean(1) + core.out_proj(pooled))


def test_query_readout_through_the_triton_kernel(monkeypatch):
    # the module's query read-out runs the Triton kernel (interpreter on CPU) and matches
    # the reference path, forward and gradients
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = perturb(small(readout="query")).to(device)
    x = torch.randn(3, 32, 24, device=device, requires_grad=True)
    monkeypatch.setenv("MEGACONTEXT_KERNELS", "reference")
    ref = g(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *g.parameters()])
    monkeypatch.setenv("MEGACONTEXT_KERNELS", "triton")
    out = g(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *g.parameters()])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, e in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


def test_levels_shared_and_separate():
    x = torch.randn(3, 32, 24)
    shared = perturb(small(shared_levels=True))
    assert len(shared.cores) == 1 and shared.level_embed.shape == (2, 32)
    # shared weights still tell the levels apart through the level embedding
    assert not torch.allclose(shared(x, level=1), shared(x, level=2))

    sep = perturb(small(shared_levels=False))
    assert len(sep.cores) == 2 and sep.level_embed is None
    before = sep(x, level=1)
    with torch.no_grad():
        for p in sep.cores[1].parameters():
            p.add_(1.0)
    assert torch.equal(sep(x, level=1), before)  # level 1 does not read level 2's weights
    assert not torch.allclose(sep(x, level=2), before)
    assert sep.config.num_parameters() > shared.config.num_parameters()
    assert torch.equal(sep.at_level(2)(x), sep(x, level=2))


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("shared", [True, False])
def test_gradients_reach_every_parameter(readout, shared):
    g = small(readout=readout, shared_levels=shared)
    opt = torch.optim.SGD(g.parameters(), lr=0.1)
    x, target = torch.randn(4, 32, 24), torch.randn(4, 24)
    level = 2
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.mse_loss(g(x, level=level), target)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    # at init only out_proj gets a gradient (zero-initialised branch); after one step
    # the gradient reaches every parameter used at this level
    for name, p in g.named_parameters():
        if name.startswith("cores.0.") and not shared:
            continue  # level 1's weights are not used by a level-2 call
        grad = p.grad[level - 1] if name == "level_embed" else p.grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert losses[-1] < losses[0]


def test_seed_determinism():
    a, b, c = small(seed=3), small(seed=3), small(seed=4)
    torch.manual_seed(123)
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), na
    assert not torch.equal(a.cores[0].in_proj.weight, c.cores[0].in_proj.weight)
    x = torch.randn(3, 32, 24)
    pa, pb = perturb(a), perturb(b)
    assert torch.equal(pa(x), pb(x))
    # the global RNG still drives initialisation when no seed is given
    torch.manual_seed(7)
    d = GistNet(24, **SMALL)
    torch.manual_seed(7)
    e = GistNet(24, **SMALL)
    assert torch.equal(d.cores[0].in_proj.weight, e.cores[0].in_proj.weight)


@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("shared", [True, False])
def test_save_load_round_trip(tmp_path, readout, shared):
    g = perturb(small(readout=readout, shared_levels=shared, levels=3))
    path = g.save(tmp_path / "ckpt" / "gist.safetensors")
    h = GistNet.load(path)
    assert h.config == g.config
    x = torch.randn(3, 32, 24)
    for level in (1, 2, 3):
        assert torch.equal(h(x, level=level), g(x, level=level))
    assert [p.name for p in tmp_path.joinpath("ckpt").iterdir()] == ["gist.safetensors"]
    assert GistNet.load(path, dtype=torch.bfloat16).cores[0].in_proj.weight.dtype == torch.bfloat16


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "gist.safetensors"
    small(seed=1).save(path)
    before = path.read_bytes()

    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        small(seed=2).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["gist.safetensors"]


def test_load_errors(tmp_path):
    with pytest.raises(StorageError, match="not found"):
        GistNet.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(StorageError, match=r"garbage\.safetensors"):
        GistNet.load(bad)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(StorageError, match="format") as info:
        GistNet.load(other)
    assert info.value.path == str(other)
    # config says width 32, weights are from width 16
    wrong = tmp_path / "wrong.safetensors"
    tensors = {k: v.contiguous() for k, v in small(width=16).state_dict().items()}
    meta = {
        "format": "megacontext.gistnet",
        "format_version": "1",
        "config": small().config.model_dump_json(),
    }
    save_file(tensors, str(wrong), metadata=meta)
    with pytest.raises(StorageError, match="do not match"):
        GistNet.load(wrong)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"width": 30, "heads": 4}, "width"),  # not divisible
        ({"width": 12, "heads": 4}, "width"),  # odd head width: no RoPE
        ({"readout": "max"}, "readout"),
        ({"levels": 0}, "levels"),
        ({"block_size": 0}, "block_size"),
        ({"depth": -1}, "depth"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_config_errors(kwargs, field):
    with pytest.raises(ConfigError) as info:
        GistNet(24, **kwargs)
    assert info.value.field == field
    assert field in str(info.value)


def test_call_errors():
    g = small()
    for x in (torch.randn(3, 16, 24), torch.randn(3, 32, 25), torch.randn(32, 24)):
        with pytest.raises(ConfigError, match=r"\[B, 32, 24\]") as info:
            g(x)
        assert info.value.field == "x"
    with pytest.raises(ConfigError, match="float32, float16 or bfloat16"):
        g(torch.randn(3, 32, 24, dtype=torch.float64))
    for level in (0, 3, True, 1.0):
        with pytest.raises(ConfigError, match="level") as info:
            g(torch.randn(1, 32, 24), level=level)
        assert info.value.field == "level"
    with pytest.raises(ConfigError, match="dim"):
        GistNet()
    with pytest.raises(ConfigError, match="not both"):
        GistNet(24, config=GistNetConfig(dim=24))


@pytest.mark.parametrize(
    "cfg",
    [
        {"dim": 24, **SMALL},
        {"dim": 40, "width": 48, "heads": 3, "depth": 1, "readout": "cls", "levels": 3},
        {"dim": 24, "width": 16, "heads": 2, "depth": 0, "readout": "mean", "levels": 1},
        {"dim": 24, **SMALL, "shared_levels": False, "mlp_ratio": 2.5},
    ],
)
def test_parameter_count_and_flops(cfg, monkeypatch):
    config = GistNetConfig(**cfg)
    g = GistNet(config=config, seed=0)
    assert config.num_parameters() == sum(p.numel() for p in g.parameters())

    # FlopCounterMode does not count CPU fused attention: spell it as two matmuls
    def sdpa(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    monkeypatch.setenv("MEGACONTEXT_KERNELS", "reference")
    x = torch.randn(3, config.block_size, config.dim)
    with FlopCounterMode(display=False) as counter:
        g(x, level=config.levels)
    assert g.flops(3) == counter.get_total_flops() > 0


def test_default_config_costs():
    # the defaults documented in docs/gistnet.md (d=576, SmolLM2-135M)
    cfg = GistNetConfig(dim=576)
    assert (cfg.width, cfg.depth, cfg.heads, cfg.block_size) == (512, 2, 8, 32)
    assert cfg.readout == "query" and cfg.levels == 2 and cfg.shared_levels
    g = GistNet(576)
    assert cfg.num_parameters() == sum(p.numel() for p in g.parameters())


def test_exported_and_usable_as_tree_gistnet():
    assert mc.GistNet is GistNet
    assert "GistNet" in mc.__all__
    from megacontext.tree import MegaContextTree, mean_pool

    g = small(dim=16)
    table = torch.randn(100, 16)
    embed = table.__getitem__
    ids = torch.randint(0, 100, (32 * 33 + 5,))
    a = MegaContextTree(16, dtype=torch.float32)
    a.append(ids, embed, g)
    b = MegaContextTree(16, dtype=torch.float32)
    b.append(ids, embed, mean_pool)
    # untrained GistNet == mean pooling, so the trees agree at both levels
    for level in (1, 2):
        torch.testing.assert_close(a.gists(level), b.gists(level))


def test_cost_table_matches_modules():
    # docs/gistnet.md quotes `megacontext costs gistnet`; its parameter counts must be
    # those of the real modules at the defaults
    from megacontext.gistnet import cost_table

    table = cost_table()
    for d in (576, 4096):
        for readout in READOUTS:
            n = sum(p.numel() for p in GistNet(d, readout=readout).parameters())
            assert f"| {d} | {readout} | {n:,} |" in table


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_path_matches_reference(monkeypatch, dtype):
    # default dispatch on CUDA runs the Triton read-out; compare with the reference path
    g = perturb(GistNet(576, seed=0)).to("cuda", dtype)
    x = torch.randn(256, 32, 576, device="cuda", dtype=dtype)
    monkeypatch.delenv("MEGACONTEXT_KERNELS", raising=False)
    out = g(x)
    monkeypatch.setenv("MEGACONTEXT_KERNELS", "reference")
    ref = g(x)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_levels_above_those_served_are_mean_pooled_in_the_tree():
    """A two-level GistNet under ``levels: 3``: the tree gists levels 1-2 with the
    GistNet's own level paths and level 3 by mean pooling of the LOD2 gists."""
    from megacontext.focus import gist_fn
    from megacontext.tree import MegaContextTree, mean_pool

    g = perturb(small(dim=16, levels=2, block_size=4))
    fn = gist_fn(g)
    x = torch.randn(3, 4, 16)
    torch.testing.assert_close(fn.at_level(2)(x), g(x, level=2))
    torch.testing.assert_close(fn.at_level(3)(x), mean_pool(x))
    emb = torch.nn.Embedding(100, 16)
    tree = MegaContextTree(16, block_size=4, levels=3, dtype=torch.float32)
    ids = torch.randint(0, 100, (4**3 * 2,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tree.append(ids, lambda t: emb(t), fn)
        lod2 = tree.gists(2).float()
        torch.testing.assert_close(tree.gists(3).float(), lod2.reshape(2, 4, 16).mean(1))
        want = g(tree.gists(1).float().reshape(-1, 4, 16), level=2)
        torch.testing.assert_close(lod2, want, rtol=1e-5, atol=1e-5)
