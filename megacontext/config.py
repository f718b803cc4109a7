"""Run configuration, validated with pydantic.

``MegaContextConfig`` holds the knobs of the tree, the working context, the focus
allocator and the KV cache (the design brief's defaults). A bad value raises
:class:`megacontext.ConfigError` naming the field and the value.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ._atomic import atomic_write_text
from .errors import ConfigError

__all__ = ["MegaContextConfig", "read_yaml_mapping"]


# A gist averages at least two children (a block of one token is no summary, and the
# working context's collapse frees block_size - 1 entries); the on-disk tree stores
# block_size as a uint16, and 2**15 is the largest power of two that fits.
MAX_BLOCK_SIZE = 2**15
# RoPE positions are computed in float32, exact for integers only up to 2**24; and
# 2**24 entries of SmolLM2-135M's bf16 KV cache (23 KB each) are 386 GB, beyond any
# single device. The CLI also checks the KV cache against the device's free memory.
MAX_W_MAX = 2**24


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def read_yaml_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The YAML mapping in the text file ``path`` (empty file: ``{}``). A missing file,
    a directory, bytes that are not UTF-8, invalid YAML or a top level that is not a
    mapping raise :class:`ConfigError` naming the file (``field="config"``)."""
    path = Path(path)

    def fail(why: str) -> ConfigError:
        return ConfigError(f"{path}: {why}", field="config", value=str(path))

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise fail("config file not found") from None
    except IsADirectoryError:
        raise fail("is a directory, not a config file") from None
    except UnicodeDecodeError as exc:
        raise fail(
            f"not a UTF-8 text file (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}); a config is YAML text"
        ) from None
    except OSError as exc:
        raise fail(f"cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise fail(f"not valid YAML ({exc})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise fail(f"expected a mapping of fields, got {type(raw).__name__}")
    return raw


class MegaContextConfig(BaseModel):
    """Configuration of a MegaContext run.

    Tree: ``block_size`` tokens make one LOD1 gist, ``block_size`` LOD(l) gists one
    LOD(l+1) gist, up to ``levels`` gist levels. Working context: at most ``w_max``
    entries; the newest ``recent_tokens`` tokens (plus the partial block) stay LOD0.
    Allocator: at most ``n_diff`` actions per step, expand when a candidate's mean
    score exceeds ``tau_expand``, collapse below ``-tau_collapse``; a node changed
    less than ``cooldown_steps`` steps ago, or resident at its LOD for fewer than
    ``min_residency`` steps, is not flipped. ``horizon`` is H of Loss@H.
    Positions: ``positions`` names the RoPE scheme of the WC entries
    (:func:`megacontext.working_context.entry_positions`); a bounded scheme keeps
    every position below ``max_position`` (default: the base model's trained context).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    model: str = Field(
        "smollm2-135m", min_length=1, description="base model name, HF id or local path"
    )
    block_size: int = Field(
        32, ge=2, le=MAX_BLOCK_SIZE, description="tokens per LOD1 gist; a power of two"
    )
    levels: int = Field(
        2,
        ge=1,
        le=6,
        description="number of gist levels above LOD0 (the design's 2; the shipped memory "
        "runs 3, so a history far past 32k tokens keeps few far gists: docs/positions.md)",
    )
    w_max: int = Field(8192, gt=0, le=MAX_W_MAX, description="working-context budget (entries)")
    horizon: int = Field(64, gt=0, description="H of Loss@H (tokens)")
    n_diff: int = Field(4, ge=0, description="max allocator actions per step")
    tau_expand: float = Field(0.2, ge=0.0, le=1.0)
    tau_collapse: float = Field(0.2, ge=0.0, le=1.0)
    cooldown_steps: int = Field(2, ge=0)
    min_residency: int = Field(3, ge=0)
    recent_tokens: int | None = Field(
        None,
        ge=0,
        description="protected LOD0 tail; None = 2 blocks (the partial block is always kept)",
    )
    kv_mode: Literal["splice", "exact"] = "splice"
    kv_after_expand: Literal["exact", "splice"] = Field(
        "exact",
        description="under kv_mode splice, how the cache follows a refocus that expanded "
        "a gist: exact (recompute from the first changed entry, so the entries after a "
        "retrieved span read it) or splice (insert the span's rows only; the kept "
        "entries keep K/V computed without it)",
    )
    attention_sink: bool = Field(
        True,
        description="when the working context starts with a gist, the base model first "
        "reads one sink token (the tokenizer's BOS, else EOS) first, as the first "
        "token of every sequence it was trained on; gists in the first slot make a poor "
        "sink (docs/positions.md)",
    )
    sink_at: Literal["window", "start"] = Field(
        "window",
        description="the attention sink's RoPE position: window (right before the first "
        "token entry, so the recent window starts after its sink as a text does, however "
        "far back the gists sit) or start (position 0, the ablation; docs/positions.md)",
    )
    positions: Literal["nearby", "hybrid", "compact", "global"] = Field(
        "nearby",
        description="RoPE positions of WC entries: nearby (hybrid, with expanded far "
        "spans moved next to the recent window, gists far back), hybrid (recent tokens "
        "at true distances, older entries compacted and pushed back within "
        "max_position), compact (entry i at i) or global (token index / gist span "
        "centre, unbounded)",
    )
    max_position: int | None = Field(
        None,
        gt=0,
        description="bound on RoPE positions; None = the base model's "
        "max_position_embeddings (checked against the model when the system is built)",
    )
    far_gap: int | None = Field(
        None,
        ge=0,
        description="under nearby/hybrid, the most positions the far memory (the gists) "
        "is pushed back from the recent window; None = as far as max_position allows, "
        "0 = right before it. With the shipped GistNet, 0 reads long plain text better "
        "and retrieved spans worse (docs/positions.md)",
    )
    lens: Literal["lensnet", "attention", "lexical", "recency"] = Field(
        "lensnet",
        description="focus scorer: lensnet (the given LensNet; recency when none is "
        "given), attention (the training-free scorer: the base model's query-key "
        "affinity between the newest tokens and each entry, even when a LensNet is "
        "given), lexical (training-free retrieval: BM25 of the newest tokens against "
        "each block's tokens, with room made by collapsing the least relevant token "
        "blocks) or recency (no scorer: only budget-forced collapses)",
    )
    lens_plan: Literal["auto", "scores", "retrieval"] = Field(
        "auto",
        description="how a LensNet's or the attention scorer's scores act: scores "
        "(straight to the allocator), retrieval (the gists it scores above tau_expand "
        "are opened, at most retrieval_share of w_max, and the swap plan makes their "
        "room from the token blocks the lexical scorer, or for lens attention the "
        "attention scorer, rates lowest; nothing else moves) or auto (retrieval for the "
        "attention scorer and for a LensNet with the relevance input, else scores)",
    )
    decode_focus: Literal["auto", "rescore", "hold"] = Field(
        "auto",
        description="what the scorer does while the session decodes after an ingest: "
        "rescore (every block, as at the ingest), hold (the blocks the ingest opened "
        "stay as tokens, and every collapse the budget forces takes the oldest other "
        "block, as recency's would) or auto (hold for lens lexical, whose query stays "
        "the ingest's, so rescoring re-applies it to a moving window: the blocks it "
        "wants are kept and the budget's collapses cut holes in the recent window; "
        "rescore for a LensNet and the attention scorer, which read the newest tokens)",
    )
    lexical_query: int = Field(
        64, ge=1, description="newest tokens the lexical scorer reads as its query"
    )
    lexical_half_life: float = Field(
        8.0,
        gt=0.0,
        description="a query token's weight halves every this many tokens back from "
        "the newest (the question is the newest tokens; older ones are its context)",
    )
    lexical_z: float = Field(
        4.0,
        gt=0.0,
        description="the lexical scorer retrieves a block whose BM25 score lies this "
        "many robust standard deviations (1.4826 MAD) above the median block's",
    )
    lexical_seen_weight: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="a query token that also occurs in the w_max - lexical_query tokens "
        "before the query counts this much in the lexical scorer's BM25: what the recent "
        "window already holds needs no far block (1.0: off)",
    )
    lexical_max_overlap: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="a block more than this share of whose token bigrams occur in the "
        "lexical query is a far copy of the text before the question, already in the "
        "recent window: the lexical scorer retrieves the first block after it that is no "
        "copy instead, after every other wanted block (1.0: off)",
    )
    lexical_induction: int = Field(
        8,
        ge=0,
        description="k > 0: the lexical scorer first wants the blocks holding what "
        "followed each earlier occurrence of the query's last k tokens (the newest "
        "first, at most half its slots; an induction step); 0: off",
    )
    lexical_follow: int = Field(
        8,
        ge=0,
        description="r > 0: a block the lexical scorer wants whose last key term (the "
        "query tokens of the largest weight x idf) lies in its last r tokens brings the "
        "block after it, right after it: what follows the match (a record's value after "
        "its key) is there; 0: off (docs/runtime.md)",
    )
    room_from: Literal["least_relevant", "oldest"] = Field(
        "least_relevant",
        description="which token blocks a retrieval's swap plan collapses to make room "
        "for the blocks it opens: least_relevant (the lowest BM25, or attention, score "
        "first; the oldest on ties) or oldest (the oldest first: the recent window "
        "shrinks from its far end, as truncation's would)",
    )
    retrieval_share: float = Field(
        0.125,
        gt=0.0,
        le=1.0,
        description="the most of w_max the lexical scorer fills with retrieved blocks "
        "(every retrieved block displaces a recent one; docs/runtime.md)",
    )
    verify_tokens: int = Field(
        32,
        ge=0,
        description="v > 0: after an ingest's refocuses the base model reads the last v "
        "tokens of the history under the focused working context and under the recency "
        "one (one forward, two rows); the focus is kept only when it predicts them at "
        "least verify_margin nats per token better, else the working context goes back "
        "to recency (the last block: a focus that reads the question worse is dropped). "
        "0: off (docs/runtime.md)",
    )
    verify_query: Literal["same", "before"] = Field(
        "same",
        description="which focus verify_tokens judges: same (the focus itself, whose "
        "query holds the tokens it is judged on, so a block sharing their words is "
        "favoured) or before (lens lexical only: the focus the scorer reaches with its "
        "query ending verify_tokens earlier, judged on tokens it did not read; nothing "
        "retrieved there keeps the focus)",
    )
    verify_margin: float = Field(
        0.0,
        description="nats per token the focused working context must beat the recency one "
        "by on the last verify_tokens tokens to be kept (negative: a focus a little worse "
        "is still kept)",
    )
    verify_unmatched: float | None = Field(
        None,
        description="u: the check also drops the focus when, on the judged tokens whose "
        "ids occur nowhere in the spans it opened (tokens no retrieved block can be "
        "copied from, so the selection does not favour it there), it reads them more "
        "than u nats per token worse than recency does (negative: it must read them "
        "better). None: off",
    )
    verify_peak: float | None = Field(
        1.0,
        allow_inf_nan=False,
        description="c: the check also drops the focus unless at least one judged token "
        "reads at least c nats better under it than under recency: evidence that the "
        "text refers to something an opened span holds (a needle's question, a repeated "
        "identifier), where a topical match spreads small gains over many tokens and "
        "costs what follows (docs/runtime.md; 1.0 chosen on training-split text). None: off",
    )
    verify_feed: bool = Field(
        False,
        description="also judge the focus on tokens fed after an ingest (Session.feed: "
        "observed text the scorer's query never held, so the judgement does not favour "
        "the focus): once verify_tokens tokens were fed and, at a block boundary, the "
        "working context differs from the recency one (the ingest's retrieval, or blocks "
        "the scorer kept while fed blocks forced collapses), the base model reads the "
        "newest verify_tokens tokens under both, and a focus that reads them worse goes "
        "back to recency until the next ingest. Once per ingest; generated tokens cancel "
        "it (the model's own text favours the context that wrote it)",
    )
    attention_layers: list[int] | None = Field(
        None,
        description="layers whose queries the attention scorer reads; None = every "
        "4th layer from the middle up (range(L // 2, L, 4))",
    )
    attention_queries: int = Field(
        32, ge=1, description="newest query rows the attention scorer reads (per layer)"
    )
    attention_share: Literal["entry", "block"] = Field(
        "entry",
        description="the attention scorer's share of a token: entry (its own, the "
        "design's formula) or block (its block's total, as the gist it would collapse "
        "into; see megacontext.attention_scorer)",
    )
    refocus_iterations: int = Field(
        1,
        ge=1,
        description="refocus iterations after an ingest (with a scorer); stops after "
        "cooldown_steps + 1 iterations in a row that take no action",
    )
    seed: int = 0

    @field_validator("attention_layers")
    @classmethod
    def _layers_listed(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v or any(i < 0 for i in v) or len(set(v)) != len(v):
            raise ValueError("must be a non-empty list of distinct layer indices >= 0")
        return sorted(v)

    @field_validator("block_size")
    @classmethod
    def _block_size_power_of_two(cls, v: int) -> int:
        if not _is_power_of_two(v):
            raise ValueError("must be a power of two")
        return v

    @field_validator("model")
    @classmethod
    def _model_named(cls, v: str) -> str:
        if not v.strip() or any(c in v for c in "\0\n\r"):
            raise ValueError("must name a model (non-blank, one line)")
        return v

    @model_validator(mode="after")
    def _check(self) -> MegaContextConfig:
        if self.protected_tokens + self.block_size > self.w_max:
            # "field: message" lets config_error name the field of a cross-field check.
            raise ValueError(
                f"w_max: {self.w_max} cannot hold the protected tail "
                f"(recent_tokens={self.protected_tokens} plus a partial block of "
                f"{self.block_size})"
            )
        return self

    @property
    def protected_tokens(self) -> int:
        """Tokens always kept at LOD0 besides the partial block."""
        return 2 * self.block_size if self.recent_tokens is None else self.recent_tokens

    # Construction with typed errors -------------------------------------------------

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc, data) from None

    def __setattr__(self, name: str, value: Any) -> None:
        # A refused assignment leaves the config as it was: pydantic has already stored
        # the value when a cross-field (model) check fails, so restore the old one.
        had = name in self.__dict__
        old = self.__dict__.get(name)
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            if had:
                self.__dict__[name] = old
            raise config_error(exc, {name: value}) from None

    def replace(self, **changes: Any) -> MegaContextConfig:
        """A validated copy with ``changes`` applied."""
        return MegaContextConfig(**{**self.model_dump(), **changes})

    # YAML -----------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> MegaContextConfig:
        """Load a config; unknown keys and bad values raise ConfigError naming the file."""
        path = Path(path)
        raw = read_yaml_mapping(path)
        try:
            return cls(**raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}", field=exc.field, value=exc.value) from None

    def to_yaml(self, path: str | os.PathLike[str]) -> Path:
        """Write the config atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, yaml.safe_dump(self.model_dump(), sort_keys=False))


def config_error(exc: ValidationError, data: dict[str, Any], owner: str = "") -> ConfigError:
    """The :class:`ConfigError` for a pydantic ``ValidationError`` raised while building a
    config from ``data``: it names the field and the value. A cross-field check names
    its field by starting its message with ``"field: "``. ``owner`` prefixes the message
    (e.g. ``"GistNetConfig"``)."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    text = err["msg"].removeprefix("Value error, ")
    if loc:
        field = ".".join(loc)
        value = data.get(loc[0], err.get("input"))
    else:
        m = re.match(r"^(\w+): (.*)$", text, re.S)
        field, text = (m.group(1), m.group(2)) if m else (None, text)
        value = data.get(field) if field else None
    msg = (
        f"invalid value for field '{field}': {value!r} ({text})"
        if field
        else f"invalid configuration: {text}"
    )
    return ConfigError(f"{owner}: {msg}" if owner else msg, field=field, value=value)
