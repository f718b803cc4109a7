"""The trainer's configuration (YAML), with the guide's names and defaults.

One YAML file holds everything a run needs; ``--set key.sub=value`` overrides any
field (the value is parsed as YAML). Every field is documented in docs/training.md.
The guide's defaults (3-5 cycles, 2-4k steps per phase, r = 4-16, H = 64, K = 32)
are the defaults here; ``configs/train-tiny.yaml`` shrinks them for CPU demos.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .._atomic import atomic_write_text
from ..config import MegaContextConfig, read_yaml_mapping
from ..data import TAGS
from ..errors import ConfigError
from ..lora import LoraConfig

__all__ = ["PHASE_NAMES", "TrainConfig", "apply_overrides", "load_train_config"]

PHASE_NAMES = ("warm-gist", "warm-lens", "b1", "b2", "b3")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OptimConfig(_Strict):
    """AdamW + cosine schedule with linear warmup, per phase."""

    steps: int = Field(2000, ge=0, description="optimizer steps in the phase")
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor, fraction of lr")
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    max_seconds: float | None = Field(
        None,
        gt=0,
        description="time box: no step after the first starts once this many seconds of the phase have passed "
        "(the schedule is still laid out over `steps`); None: run every step",
    )


class RegionConfig(_Strict):
    """Region snapshots for the GistNet phases (``data.wc: region``).

    Over a window's history ``[0, T)`` (``T = history + blocks * bs``) one aligned region
    ``[a, b)`` is read as gists and the rest as tokens: with probability
    ``lod2_fraction`` the newest LOD2 node that leaves at least ``suffix_blocks[0]``
    blocks of tokens after it (one gist for ``bs^2`` tokens, 1024x), else ``b - a``
    tokens as LOD1 gists (32x) with ``a`` = a uniform number of blocks in
    ``[0, prefix_blocks]`` and ``T - b`` = a uniform number in ``suffix_blocks``. The
    targets are the ``horizon`` tokens after ``T``: what the compression-stress
    evaluation scores, on training-split windows.
    """

    prefix_blocks: int = Field(4, ge=0, description="most blocks of tokens before the region")
    suffix_blocks: tuple[int, int] = Field(
        (0, 8),
        description="fewest and most blocks of tokens between the region and the targets "
        "(0: the gists right before the targets, the compression stress's `near`)",
    )
    lod2_fraction: float = Field(0.25, ge=0, le=1, description="share of 1024x (LOD2) regions")

    @model_validator(mode="after")
    def _check(self) -> RegionConfig:
        lo, hi = self.suffix_blocks
        if not 0 <= lo <= hi:
            raise ValueError(
                f"region.suffix_blocks: need 0 <= low <= high, got {self.suffix_blocks}"
            )
        return self


class CurriculumConfig(_Strict):
    """Long-range task windows mixed into the training windows
    (:mod:`megacontext.train.curriculum`): ``fraction`` of them (in expectation) carry
    a needle of one of ``kinds`` at one of ``placements`` relative to the block size,
    written over real training-split text."""

    fraction: float = Field(0.5, ge=0, le=1, description="share of task windows")
    kinds: list[Literal["passkey", "kv", "identifier"]] = Field(
        default_factory=lambda: ["passkey", "kv", "identifier"], min_length=1
    )
    placements: list[Literal["edge", "straddle", "mid"]] = Field(
        default_factory=lambda: ["edge", "straddle", "mid"], min_length=1
    )

    @model_validator(mode="after")
    def _unique(self) -> CurriculumConfig:
        for name in ("kinds", "placements"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name}: {values} repeats an entry")
        return self


class DataConfig(_Strict):
    """Where token windows come from.

    ``kind``: ``shards`` (a :class:`megacontext.data.ShardDataset` directory ``path``,
    splits ``split``/``val_split``, optional curriculum ``tags``), ``text`` (UTF-8 files
    in ``paths`` tokenized with the base tokenizer, the last ``val_fraction`` of the
    tokens held out) or ``random`` (uniform token ids: smoke tests only).
    A window holds ``history + blocks * block_size + horizon`` tokens. ``curriculum``
    (optional, :class:`CurriculumConfig`): long-range task windows mixed into the
    training windows only (validation windows stay ordinary text).
    """

    kind: Literal["shards", "text", "random"] = "shards"
    path: str | None = None
    paths: list[str] = Field(default_factory=list)
    split: str = "train"
    val_split: str = "validation"
    tags: list[str] | None = None
    val_fraction: float = Field(0.1, gt=0, lt=1)
    history: int = Field(2048, gt=0, description="tokens ingested before the first block")
    blocks: int = Field(4, ge=1, description="blocks of K decoded (snapshots) per window")
    tag_mix: dict[str, float] | None = Field(
        None,
        description="shards only: draw this share of the training windows from each tag "
        "(e.g. {code: 0.5, doc: 0.5}); None: every window of every document equally likely",
    )
    wc: Literal["rollout", "region"] = Field(
        "rollout",
        description="the WCs of the GistNet phases (warm-gist, b1): on-policy rollouts, or "
        "'region' snapshots (one region of the window read as gists, see RegionConfig)",
    )
    region: RegionConfig = Field(default_factory=lambda: RegionConfig())

    curriculum: CurriculumConfig | None = Field(
        None, description="long-range task windows mixed into the training windows"
    )

    @model_validator(mode="after")
    def _check_mix(self) -> DataConfig:
        if self.tag_mix is not None:
            bad = sorted(set(self.tag_mix) - set(TAGS))
            if bad or not self.tag_mix:
                raise ValueError(f"data.tag_mix: unknown tags {bad} (known: {list(TAGS)})")
            if any(w < 0 for w in self.tag_mix.values()) or sum(self.tag_mix.values()) <= 0:
                raise ValueError(
                    f"data.tag_mix: weights must be >= 0 with a positive sum, got {self.tag_mix}"
                )
        return self


class GistLossConfig(_Strict):
    loss: Literal["kl", "dnll"] = Field("kl", description="KL(full || replaced) or ΔNLL@H")
    spans: Literal["wc", "inserted"] = Field(
        "wc",
        description="gists computed by GistNet with gradient: every gist of the on-policy WC "
        "('wc') or only those the allocator inserted in this block ('inserted')",
    )
    stability_weight: float = Field(0.0, ge=0, description="L2 to the previous checkpoint's gists")
    boundary_weight: float = Field(0.0, ge=0, description="extra weight of block-edge targets")
    boundary_tokens: int = Field(2, ge=0, description="targets this close to a block edge")


class LensLossConfig(_Strict):
    regression_weight: float = Field(1.0, ge=0)
    ranking_weight: float = Field(0.5, ge=0)
    ranking_margin: float = Field(0.05, ge=0, description="utility gap for a ranked pair")
    budget_weight: float = Field(0.1, ge=0, description="zero-sum (token-cost weighted)")
    legality_weight: float = Field(0.1, ge=0)


class LabelConfig(_Strict):
    kind: Literal["candidates", "reads"] = Field(
        "candidates",
        description="candidates: one-LOD-change expand / collapse labels; reads: a block read as "
        "tokens through its covering gist (a retrieval LensNet's labels, "
        "megacontext.train.labels)",
    )
    top_blocks: int = Field(4, ge=0, description="reads: the best blocks by the lexical signal")
    random_blocks: int = Field(4, ge=0, description="reads: other blocks drawn uniformly")
    reuse: str | None = Field(
        None,
        description="a label Parquet file an earlier run of the same data, seed and GistNet "
        "wrote (artifacts/deltas/<run>/cycle0-warm-lens.parquet): its rows are read instead of "
        "recomputed (checked: GistNet hash, window, snapshot step and cursor)",
    )
    batch: int = Field(8, ge=1, description="candidate WCs per base forward")
    max_candidates: int | None = Field(64, ge=1, description="per snapshot (random subset)")
    temperature: float = Field(0.05, gt=0, description="utility scale (nats)")
    token_cost: float = Field(0.0, ge=0, description="nats per WC entry the finer WC spends")


class EarlyStopConfig(_Strict):
    enabled: bool = True
    budgets: list[int] = Field(default_factory=lambda: [4096, 8192])
    windows: int = Field(8, ge=1, description="validation windows")
    every: Literal["phase", "cycle"] = "cycle"
    patience: int = Field(2, ge=1, description="evaluations without improvement before stop")
    min_delta: float = Field(0.0, ge=0, description="nats of mean Loss@H counted as better")


class TrainConfig(_Strict):
    """A training run (see docs/training.md for every field)."""

    run: str = "run"
    model: str = "smollm2-135m"
    device: str | None = None
    seed: int = 0
    megacontext: dict[str, Any] = Field(default_factory=dict)
    gistnet: dict[str, Any] = Field(default_factory=dict)
    init_gistnet: str | None = Field(
        None,
        description="start the GistNet from these weights (a GistNet safetensors file, e.g. "
        "a shipped memory's gistnet.safetensors) instead of a random init; its architecture "
        "is the file's, so `gistnet:` must then be empty",
    )
    lensnet: dict[str, Any] = Field(default_factory=dict)
    data: DataConfig = Field(default_factory=DataConfig)
    cycles: int = Field(3, ge=0)
    batch_size: int = Field(4, ge=1, description="windows per microbatch")
    grad_accum: int = Field(2, ge=1, description="microbatches per optimizer step")
    clip_norm: float = Field(1.0, gt=0)
    snapshots_per_window: int | None = Field(
        None, ge=1, description="snapshots used per window per step (None: all)"
    )
    warm_gist: OptimConfig = Field(default_factory=lambda: OptimConfig(steps=500, lr=3e-4))
    warm_lens: OptimConfig = Field(default_factory=lambda: OptimConfig(steps=500, lr=3e-4))
    b1: OptimConfig = Field(default_factory=lambda: OptimConfig(steps=2000, lr=1e-4))
    b2: OptimConfig = Field(default_factory=lambda: OptimConfig(steps=2000, lr=1e-4))
    b3: OptimConfig = Field(default_factory=lambda: OptimConfig(steps=1000, lr=2e-5))
    gist_loss: GistLossConfig = Field(default_factory=GistLossConfig)
    lens_loss: LensLossConfig = Field(default_factory=LensLossConfig)
    labels: LabelConfig = Field(default_factory=LabelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    early_stop: EarlyStopConfig = Field(default_factory=EarlyStopConfig)
    label_windows: int = Field(4, ge=1, description="windows labelled after each B1 (and warm)")
    artifacts: str = "artifacts"
    runs_dir: str = "configs/runs"
    allocator_backend: str = "python"

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        mc = self.mc_config()
        if self.data.history % mc.block_size:
            raise ValueError(
                f"data.history: {self.data.history} is not a multiple of block_size {mc.block_size}"
            )
        if self.data.wc == "region":
            bs, r = mc.block_size, self.data.region
            blocks = self.data.history // bs + self.data.blocks
            if blocks < r.prefix_blocks + r.suffix_blocks[1] + 1:
                raise ValueError(
                    f"data.region: a history of {blocks} blocks cannot hold prefix_blocks "
                    f"{r.prefix_blocks} + suffix_blocks {r.suffix_blocks[1]} + a region"
                )
            if r.lod2_fraction > 0 and (mc.levels < 2 or blocks < bs + r.suffix_blocks[0]):
                raise ValueError(
                    f"data.region.lod2_fraction: a LOD2 region needs levels >= 2 and a history "
                    f"of {bs} + {r.suffix_blocks[0]} blocks (have {blocks}, levels {mc.levels})"
                )
        if self.init_gistnet is not None and self.gistnet:
            raise ValueError(
                f"init_gistnet: {self.init_gistnet} fixes the GistNet's architecture; drop the "
                f"gistnet: fields {sorted(self.gistnet)}"
            )
        for b in self.early_stop.budgets:
            if mc.protected_tokens + mc.block_size > b:
                raise ValueError(
                    f"early_stop.budgets: {b} cannot hold the protected tail "
                    f"({mc.protected_tokens} tokens plus a partial block of {mc.block_size})"
                )
        return self

    def mc_config(self) -> MegaContextConfig:
        """The runtime config (``megacontext:`` section, ``model`` filled in)."""
        return MegaContextConfig(**{"model": self.model, **self.megacontext})

    @property
    def window_length(self) -> int:
        mc = self.mc_config()
        return self.data.history + self.data.blocks * mc.block_size + mc.horizon

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self, path: str | os.PathLike[str]) -> Path:
        """Write the resolved config atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, yaml.safe_dump(self.dump(), sort_keys=False))


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (value parsed as YAML) to a nested mapping."""
    out = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value", field="--set", value=item)
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section", field=key)
            node = nxt
        node[parts[-1]] = yaml.safe_load(value)
    return out


def _from_dict(raw: dict[str, Any], where: str) -> TrainConfig:
    try:
        cfg = TrainConfig(**raw)
        cfg.mc_config()
        return cfg
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err.get("loc", ())) or None
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{where}: invalid field {field!r}: {msg}", field=field) from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}", field=exc.field, value=exc.value) from None


def load_train_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """Load a YAML config (``None``: all defaults) and apply ``overrides``."""
    raw: Any = {}
    where = "<defaults>"
    if path is not None:
        where = str(path)
        raw = read_yaml_mapping(path)
    return _from_dict(apply_overrides(raw, list(overrides or [])), where)
