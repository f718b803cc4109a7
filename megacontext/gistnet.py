"""GistNet: the 32→1 compressor that writes gists in the base model's embedding space.

``gist = GistNet(dim)``; ``gist(blocks)`` maps ``[B, bs, d]`` (``bs = block_size``,
default 32) to ``[B, d]``: a LOD1 gist per block of token embeddings, or with
``level=2`` a LOD2 gist per 32 LOD1 gists ("two levels"). Architecture, per call::

    h0  = x @ W_in + b_in (+ level_embedding[level])     [B, bs, w]   (w = width)
    h   = depth × pre-norm block(h)                       [B, S, w]   S = bs (+1 with cls)
          block: h += Attn(LN(h)) with RoPE on positions 0..S-1 (non-causal, H heads)
                 h += W2 GELU(W1 LN(h))
    r   = readout(LN(h))                                  [B, w]
          mean:  mean over the bs rows
          query: learned-query attention pooling (kernels.gist_pool, H heads)
          cls:   the output row of a learned CLS token prepended at position 0
    out = mean_k x[:, k] + r @ W_out + b_out              [B, d]

``W_out`` and ``b_out`` start at zero, so an untrained GistNet returns exactly the
mean of its inputs (mean pooling, the warm start of the training guide); the
transformer branch learns a correction on top of it.

Weights are shared between levels (plus a learned per-level embedding, zero at
init) or separate per level (``shared_levels=False``). ``GistNet.save(path)`` /
``GistNet.load(path)`` use one safetensors file with the config in its metadata.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from ._weights import load_weights, require_materialised, save_weights
from .config import config_error
from .errors import ConfigError
from .kernels.gist_pool import gist_pool

__all__ = ["GistNet", "GistNetConfig"]

_FORMAT = "megacontext.gistnet"
_FORMAT_VERSION = "1"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class GistNetConfig(BaseModel):
    """Hyper-parameters of a :class:`GistNet` (validated; bad values raise ConfigError)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: int = Field(gt=0, description="d: the base model's embedding width (input and output)")
    block_size: int = Field(32, gt=0, description="entries per block (32 tokens or 32 gists)")
    width: int = Field(512, gt=0, description="internal width w of the transformer")
    depth: int = Field(2, ge=0, description="number of transformer blocks")
    heads: int = Field(8, gt=0, description="attention heads (blocks and query read-out)")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width = mlp_ratio * width")
    readout: Literal["mean", "query", "cls"] = "query"
    levels: int = Field(2, ge=1, description="gist levels served (level 1 .. levels)")
    shared_levels: bool = Field(True, description="one set of weights for every level")
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)

    @model_validator(mode="after")
    def _check(self) -> GistNetConfig:
        if self.width % self.heads:
            raise ValueError(f"width: {self.width} is not divisible by heads={self.heads}")
        if (self.width // self.heads) % 2:
            raise ValueError(
                f"width: head width {self.width // self.heads} (width/heads) must be even for RoPE"
            )
        if self.mlp_hidden < 1:
            raise ValueError(f"mlp_ratio: gives an MLP width of {self.mlp_hidden}")
        return self

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc, data, "GistNetConfig") from None

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def cores(self) -> int:
        """Number of weight sets: 1 when shared, else one per level."""
        return 1 if self.shared_levels else self.levels

    # Costs ------------------------------------------------------------------------

    def num_parameters(self) -> int:
        """Parameter count, from the formula (tests check it against the module)."""
        d, w, m = self.dim, self.width, self.mlp_hidden
        block = 2 * w + (w * 3 * w + 3 * w) + (w * w + w) + 2 * w + (w * m + m) + (m * w + w)
        readout = {"mean": 0, "query": w, "cls": w}[self.readout]
        core = (d * w + w) + self.depth * block + 2 * w + readout + (w * d + d)
        level_embed = self.levels * w if self.shared_levels and self.levels > 1 else 0
        return self.cores * core + level_embed

    def flops(self, batch: int) -> int:
        """Matmul FLOPs (2 per multiply-add) of one forward call on ``[batch, bs, d]``.

        Counts every matmul, attention (``QK^T`` and ``PV``) included: equal to what
        ``torch.utils.flop_counter.FlopCounterMode`` counts on the reference path with
        attention written as two matmuls (the tests check this);
        leaves out element-wise work (norms, softmax, GELU, RoPE, the mean residual:
        O(batch·S·w) each, under 1% here).
        """
        B, N, d, w, m = batch, self.block_size, self.dim, self.width, self.mlp_hidden
        S = N + 1 if self.readout == "cls" else N
        per_block = 2 * B * S * w * (3 * w) + 4 * B * S * S * w + 2 * B * S * w * w
        per_block += 2 * 2 * B * S * w * m
        readout = 4 * B * N * w if self.readout == "query" else 0  # scores + weighted sum
        return 2 * B * N * d * w + self.depth * per_block + readout + 2 * B * w * d


def _rope(n: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )
    angles = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)  # [n, head_dim], rotate_half layout
    return angles.cos(), angles.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class _Block(nn.Module):
    """Pre-norm transformer block: non-causal self-attention with RoPE, GELU MLP."""

    def __init__(self, cfg: GistNetConfig):
        super().__init__()
        w = cfg.width
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.qkv = nn.Linear(w, 3 * w)
        self.proj = nn.Linear(w, w)
        self.norm2 = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(w, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, w)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, w = h.shape
        qkv = self.qkv(self.norm1(h)).view(B, S, 3, self.heads, w // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, S, hd]
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v)
        h = h + self.proj(a.transpose(1, 2).reshape(B, S, w))
        return h + self.fc2(F.gelu(self.fc1(self.norm2(h))))


class _Core(nn.Module):
    """One weight set: input projection, blocks, read-out, output projection."""

    def __init__(self, cfg: GistNetConfig):
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.dim, cfg.width)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        if cfg.readout == "query":
            self.query = nn.Parameter(torch.empty(cfg.heads, cfg.head_dim))
        elif cfg.readout == "cls":
            self.cls = nn.Parameter(torch.empty(cfg.width))
        self.out_proj = nn.Linear(cfg.width, cfg.dim)

    def forward(self, x: torch.Tensor, level_embed: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        h = self.in_proj(x)
        if level_embed is not None:
            h = h + level_embed.to(h.dtype)
        if cfg.readout == "cls":
            h = torch.cat([self.cls.to(h.dtype).expand(h.shape[0], 1, -1), h], dim=1)
        cos, sin = _rope(h.shape[1], cfg.head_dim, cfg.rope_theta, h.device)
        for block in self.blocks:
            h = block(h, cos, sin)
        h = self.norm(h)
        w_o = self.out_proj.weight.t().to(h.dtype)
        if cfg.readout == "query":
            return gist_pool(h, self.query.to(h.dtype), w_o) + self.out_proj.bias.to(h.dtype)
        r = h[:, 0] if cfg.readout == "cls" else h.mean(dim=1)
        return r @ w_o + self.out_proj.bias.to(h.dtype)


class GistNet(nn.Module):
    """32→1 gist compressor ``[B, bs, d] -> [B, d]`` (see the module docstring).

    Args:
        dim: the base model's embedding width ``d``.
        seed: if given, parameters are initialised from ``torch.Generator().manual_seed(seed)``
            (independent of the global RNG); otherwise from the global RNG.
        config: a full :class:`GistNetConfig` instead of ``dim`` and ``**overrides``.
        **overrides: any other :class:`GistNetConfig` field (``width``, ``depth``,
            ``heads``, ``readout``, ``levels``, ``shared_levels``, ...).

    ``gist(x, level=1)``: ``x`` fp32, fp16 or bf16 ``[B, block_size, dim]``; returns the
    same dtype. Compute runs in the parameters' dtype (``gist.to(torch.bfloat16)`` for
    bf16 compute); the mean residual is accumulated in fp32.
    """

    def __init__(
        self,
        dim: int | None = None,
        *,
        seed: int | None = None,
        config: GistNetConfig | None = None,
        **overrides: Any,
    ):
        super().__init__()
        if config is None:
            if dim is None:
                raise ConfigError("GistNet: pass dim (or config=)", field="dim", value=None)
            config = GistNetConfig(dim=dim, **overrides)
        elif dim is not None or overrides:
            raise ConfigError(
                "GistNet: pass either config= or dim and keyword overrides, not both",
                field="config",
            )
        self.config = config
        self.cores = nn.ModuleList(_Core(config) for _ in range(config.cores))
        if config.shared_levels and config.levels > 1:
            self.level_embed = nn.Parameter(torch.zeros(config.levels, config.width))
        else:
            self.register_parameter("level_embed", None)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Initialise: N(0, 0.02) matmul weights and queries, zero biases, unit norms,
        zero output projection and level embeddings (so the output is the input mean)."""
        g = None if seed is None else torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight") or name.endswith("bias") or name == "level_embed":
                p.zero_()
            elif ".norm" in name:
                p.fill_(1.0)
            else:
                init = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=g)
                p.copy_(init)

    # Calling -------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, level: int = 1) -> torch.Tensor:
        cfg = self.config
        if (
            not isinstance(x, torch.Tensor)
            or x.dim() != 3
            or tuple(x.shape[1:])
            != (
                cfg.block_size,
                cfg.dim,
            )
        ):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(
                f"GistNet: x must be [B, {cfg.block_size}, {cfg.dim}] (block_size, dim), "
                f"got {shape}",
                field="x",
                value=shape,
            )
        if x.dtype not in _DTYPES:
            raise ConfigError(
                f"GistNet: x must be float32, float16 or bfloat16, got {x.dtype}",
                field="x",
                value=str(x.dtype),
            )
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= cfg.levels:
            raise ConfigError(
                f"GistNet: level must be an int in 1..{cfg.levels}, got {level!r}",
                field="level",
                value=level,
            )
        require_materialised(self, "GistNet.forward")
        param = self.cores[0].in_proj.weight
        core = self.cores[0 if cfg.shared_levels else level - 1]
        level_embed = None if self.level_embed is None else self.level_embed[level - 1]
        residual = x.float().mean(dim=1)
        branch = core(x.to(device=param.device, dtype=param.dtype), level_embed)
        return (residual.to(branch.device) + branch.float()).to(x.dtype)

    def at_level(self, level: int):
        """A ``[B, bs, d] -> [B, d]`` callable for ``level`` (what ``MegaContextTree`` calls)."""
        if (
            isinstance(level, bool)
            or not isinstance(level, int)
            or not 1 <= level <= self.config.levels
        ):
            raise ConfigError(
                f"GistNet: level must be an int in 1..{self.config.levels}, got {level!r}",
                field="level",
                value=level,
            )
        return lambda x: self(x, level=level)

    def flops(self, batch: int) -> int:
        """Matmul FLOPs of one call on ``batch`` blocks (see GistNetConfig.flops)."""
        return self.config.flops(batch)

    # Persistence ---------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write weights and config to one safetensors file, atomically (temp + rename)."""
        require_materialised(self, "GistNet.save")
        return save_weights(self, path, _FORMAT, _FORMAT_VERSION, self.config.model_dump_json())

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> GistNet:
        """Read a file written by :meth:`save`. Raises StorageError naming the path."""
        model = load_weights(
            path, _FORMAT, _FORMAT_VERSION, "GistNet", lambda c: cls(config=GistNetConfig(**c))
        )
        if device is not None and torch.device(device).type == "meta":
            raise ConfigError(
                f"GistNet.load: device='meta' would drop the weights just read from {path}",
                field="device",
                value="meta",
            )
        return model.to(device=device, dtype=dtype)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dim={c.dim}, block_size={c.block_size}, width={c.width}, depth={c.depth}, "
            f"heads={c.heads}, readout={c.readout!r}, levels={c.levels}, "
            f"shared_levels={c.shared_levels}"
        )


def cost_table(dims: tuple[int, ...] = (576, 4096), blocks: int = 4096) -> str:
    """Markdown table of parameters and matmul FLOPs per call at the default config
    (``megacontext costs gistnet`` prints it; docs/gistnet.md quotes it)."""
    rows = [
        "| d | readout | parameters (shared levels) | parameters (per-level) "
        f"| FLOPs per block | FLOPs per call of {blocks:,} blocks |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for d in dims:
        for readout in ("mean", "query", "cls"):
            shared = GistNetConfig(dim=d, readout=readout)
            per_level = GistNetConfig(dim=d, readout=readout, shared_levels=False)
            rows.append(
                f"| {d} | {readout} | {shared.num_parameters():,} | "
                f"{per_level.num_parameters():,} | {shared.flops(1) / 1e6:,.1f} M | "
                f"{shared.flops(blocks) / 1e12:,.3f} T |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    print(cost_table())
