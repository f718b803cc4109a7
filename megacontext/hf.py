"""transformers-native generation with the memory: keep ``generate()``, pipelines,
streamers and chat templates, and get the working-context budget.

:class:`MegaContextForCausalLM` is a ``PreTrainedModel`` + ``GenerationMixin`` that
wraps a :class:`~megacontext.runtime.MegaContext` (base model, GistNet, LensNet,
config). Its ``forward`` is the memory's, not the base model's:

- **prefill** (no ``cache``): each prompt row (left padding removed with
  ``attention_mask``) is ingested into a :class:`~megacontext.runtime.Session`
  (the gist tree; the WC rebuilt within ``W_max``); the output is each row's
  next-token logits ``[B, 1, V]`` and the rows' decoding state as ``cache``;
- **decode** (``cache`` from the previous step, ``input_ids [B, 1]``): the new
  token of every row still running is appended to its session with one batched
  forward of the base model over the working context
  (:meth:`~megacontext.runtime.SessionBatch.step`); every K tokens a session
  gists its block, scores and refocuses, exactly as
  :meth:`~megacontext.runtime.Session.generate`.

So transformers' own loop does the rest (logits processors, greedy or sampling,
``max_new_tokens``, EOS, stop strings, ``stopping_criteria``, streamers,
``return_dict_in_generate``), while the KV cache of each row is the session's
preallocated :class:`~megacontext.cache.MegaContextCache` of ``W_max + K`` slots
(plus the one attention-sink slot under ``attention_sink``): it never holds more
rows, however long the prompt.

The memory outlives a call: :attr:`MegaContextForCausalLM.sessions` holds one
session per row of the last call, each holding that row's prompt and every token
generated for it (up to the token that stopped the row). The next call reuses a
session whose history is a prefix of a new prompt row and ingests only the rest,
so a conversation re-sent with one more turn reads only the new turn.
:class:`Chat` builds such prompts from a chat template (multi-turn).

Beam search and assisted decoding are not supported (a session cannot fork): they
raise :class:`~megacontext.errors.InputError`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    StoppingCriteriaList,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from .base import Base, load_base, load_tokenizer
from .config import MegaContextConfig
from .errors import InputError
from .runtime import MegaContext, Session, SessionBatch

__all__ = ["Chat", "MegaContextForCausalLM", "MegaContextLMConfig"]

# base-model config fields the wrapper's config repeats (what generation utilities read)
_BASE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


class MegaContextLMConfig(PretrainedConfig):
    """The wrapper's transformers config (``model_type="megacontext"``).

    ``megacontext``: the :class:`~megacontext.config.MegaContextConfig` as a dict;
    ``base_model``: the base model's name; plus the base model's vocabulary, width,
    depth, head counts, position limit and special token ids.
    """

    model_type = "megacontext"

    def __init__(
        self,
        megacontext: dict[str, Any] | None = None,
        base_model: str | None = None,
        **kwargs: Any,
    ):
        self.megacontext = dict(megacontext or {})
        self.base_model = base_model
        super().__init__(**kwargs)

    @classmethod
    def from_system(cls, system: MegaContext) -> MegaContextLMConfig:
        base = system.base.config
        fields = {k: getattr(base, k) for k in _BASE_FIELDS if getattr(base, k, None) is not None}
        config = cls(megacontext=system.config.model_dump(), base_model=system.base.name, **fields)
        config._name_or_path = system.base.name
        return config


class _StopWatch(StoppingCriteriaList):
    """The stopping criteria of one ``generate()`` call, remembering which rows they
    stopped (``done`` ``[B]`` bool, cumulative): a stopped row's later tokens are
    padding and must not reach its memory."""

    def __init__(self, criteria: StoppingCriteriaList):
        super().__init__(criteria)
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        is_done = super().__call__(input_ids, scores, **kwargs)
        self.done = is_done.clone() if self.done is None else self.done | is_done
        return is_done


class _Decoding:
    """The rows of one ``generate()`` call: a session per row, decoded together.

    A row is *open* until the stopping criteria stop it and its last token has been
    appended; open rows decode with one batched forward per step
    (:class:`~megacontext.runtime.SessionBatch`, rebuilt when a row closes), a lone
    open row with :meth:`Session.feed` (the exact path of :meth:`Session.generate`).
    """

    def __init__(self, sessions: list[Session]):
        self.sessions = sessions
        self.closed = [False] * len(sessions)
        self._batch: SessionBatch | None = None
        self._batch_rows: list[int] = []

    def logits(self) -> torch.Tensor:
        """float32 ``[B, V]``: every row's next-token logits (a closed row's last)."""
        return torch.stack([s.next_token_logits() for s in self.sessions])

    def step(self, tokens: Sequence[int], done: Sequence[bool] | None = None) -> torch.Tensor:
        """Append ``tokens[b]`` to every open row ``b``; then close the rows ``done``
        marks. Returns :meth:`logits`."""
        rows = [b for b, shut in enumerate(self.closed) if not shut]
        if len(rows) == 1:
            self._batch = None
            self.sessions[rows[0]].feed([int(tokens[rows[0]])])
        elif rows:
            if self._batch is None or self._batch_rows != rows:
                self._batch = SessionBatch([self.sessions[b] for b in rows])
                self._batch_rows = rows
            self._batch.step([int(tokens[b]) for b in rows])
        if done is not None:
            self.closed = [shut or bool(d) for shut, d in zip(self.closed, done, strict=True)]
        return self.logits()

    def finish(self, tokens: Sequence[int]) -> None:
        """Append each open row's final token (sampled, never fed back) and close all."""
        if not all(self.closed):
            self.step(tokens, [True] * len(self.sessions))


def _rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """The prompt rows (int64 ``[n_b]`` on the CPU) with their left padding removed."""
    ids = torch.as_tensor(input_ids).detach().cpu()
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise InputError(f"input_ids must be [batch, length >= 1], got {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise InputError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    ids = ids.to(torch.long)
    if attention_mask is None:
        return list(ids)
    mask = torch.as_tensor(attention_mask).detach().cpu()
    if mask.ndim == 1:
        mask = mask[None]
    if tuple(mask.shape) != tuple(ids.shape):
        raise InputError(
            f"attention_mask {tuple(mask.shape)} must have the shape of input_ids "
            f"{tuple(ids.shape)}"
        )
    if ((mask != 0) & (mask != 1)).any():
        raise InputError("attention_mask must hold only 0 (padding) and 1 (token)")
    rows = []
    for b in range(ids.shape[0]):
        keep = mask[b].bool()
        if not keep.any():
            raise InputError(f"attention_mask row {b} masks every token: an empty prompt")
        first = int(keep.to(torch.uint8).argmax())
        if not keep[first:].all():
            raise InputError(
                f"attention_mask row {b} is not left padding (a 0 after a 1): pad on the "
                "left (tokenizer.padding_side = 'left'), as for any decoder-only model"
            )
        rows.append(ids[b, first:])
    return rows


class MegaContextForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM whose every prompt is read through the memory's budget.

    Build it with :meth:`from_base` (a base model name, hub id, folder, loaded
    ``Base`` or transformers model) or :meth:`from_checkpoint` (a trained system), or
    directly from a :class:`~megacontext.runtime.MegaContext`. Then use it as any
    transformers causal LM: ``generate()`` (greedy or sampling, ``temperature``,
    ``top_p``, ``top_k``, ``max_new_tokens``, ``eos_token_id``, ``stop_strings``,
    ``stopping_criteria``, ``streamer``, ``return_dict_in_generate`` with
    ``output_scores``/``output_logits``, a left-padded batch with
    ``attention_mask``) or ``pipeline("text-generation", model=..., tokenizer=...)``.

    Attributes:
        system: the :class:`~megacontext.runtime.MegaContext` (base, GistNet,
            LensNet, config).
        model: the base model (a submodule: ``device``/``dtype`` are its own).
        tokenizer: the base model's tokenizer.
        ingested: tokens each row of the last call read into its memory (the
            prompt minus the history its session already held).
    """

    config_class = MegaContextLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, system: MegaContext, tokenizer: Any | None = None):
        if not isinstance(system, MegaContext):
            raise InputError(
                f"MegaContextForCausalLM wraps a megacontext.MegaContext, got "
                f"{type(system).__name__}; build it with MegaContextForCausalLM.from_base(...)"
            )
        super().__init__(MegaContextLMConfig.from_system(system))
        self.system = system
        self.model = system.base.model
        self.tokenizer = tokenizer if tokenizer is not None else system.base.tokenizer
        gen = copy.deepcopy(system.base.model.generation_config)
        if gen.pad_token_id is None:
            pad = getattr(self.tokenizer, "pad_token_id", None)
            gen.pad_token_id = pad if pad is not None else gen.eos_token_id
        self.generation_config = gen
        self._sessions: list[Session] = []
        self.ingested: list[int] = []
        self._decoding: _Decoding | None = None
        self._watch: _StopWatch | None = None
        self.post_init()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_base(
        cls,
        base: str | os.PathLike[str] | Base | PreTrainedModel,
        *,
        tokenizer: Any | None = None,
        gistnet: Any | None = None,
        lensnet: Any | None = None,
        config: MegaContextConfig | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **config_fields: Any,
    ) -> MegaContextForCausalLM:
        """Wrap a base model in a memory.

        Args:
            base: a name (``"smollm2-135m"``, ``"tiny-llama"``), hub id or folder
                (loaded with :func:`megacontext.load_base` on ``device``/``dtype``), a
                loaded :class:`~megacontext.base.Base`, or a transformers Llama-family
                ``*ForCausalLM`` (then ``tokenizer`` or its ``name_or_path`` gives
                the tokenizer).
            gistnet, lensnet: trained modules (``None``: mean pooling, recency-only).
            config: the :class:`~megacontext.config.MegaContextConfig` (default: the
                design defaults); ``config_fields`` (e.g. ``w_max=4096``) replace
                fields of it.
        """
        if isinstance(base, (str, os.PathLike)):
            base = load_base(str(base), device=device, dtype=dtype)
        elif isinstance(base, PreTrainedModel):
            name = str(getattr(base, "name_or_path", "") or base.config.model_type)
            if tokenizer is None:
                tokenizer = load_tokenizer(name)
            base.requires_grad_(False)
            base = Base(model=base, tokenizer=tokenizer, name=name)
        elif not isinstance(base, Base):
            raise InputError(
                "base must be a model name, hub id or folder, a megacontext Base or a "
                f"transformers causal LM, got {type(base).__name__}"
            )
        if tokenizer is not None and tokenizer is not base.tokenizer:
            base = Base(model=base.model, tokenizer=tokenizer, name=base.name)
        if config is None:
            config = MegaContextConfig(model=base.name, **config_fields)
        elif config_fields:
            config = config.replace(**config_fields)
        return cls(MegaContext(base, gistnet, lensnet, config))

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        base: Base | None = None,
        device: str | None = None,
    ) -> MegaContextForCausalLM:
        """The system of a trainer checkpoint (:meth:`MegaContext.from_checkpoint`)."""
        return cls(MegaContext.from_checkpoint(path, base=base, device=device))

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> MegaContextForCausalLM:
        raise InputError(
            "MegaContextForCausalLM has no weights of its own: build it with "
            "MegaContextForCausalLM.from_base(name_or_model, ...) or .from_checkpoint(path)"
        )

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        raise InputError(
            "MegaContextForCausalLM has no weights of its own: save the base model itself, "
            "and a memory with model.sessions[i].save(path) (reopen: MegaContext.open)"
        )

    # ------------------------------------------------------------------ the memory

    @property
    def sessions(self) -> list[Session]:
        """The memory: after a call, one session per row holding its prompt and its
        generated tokens. The next call continues a session whose history is a
        prefix of a prompt row (the longest such; each session serves one row), and
        starts a new session for any other row. Assign a list of sessions on this
        model's base (e.g. reopened with :meth:`MegaContext.open`) to continue them;
        ``[]`` (or :meth:`reset`) forgets."""
        return self._sessions

    @sessions.setter
    def sessions(self, sessions: Sequence[Session]) -> None:
        sessions = list(sessions)
        for i, s in enumerate(sessions):
            if not isinstance(s, Session):
                raise InputError(f"sessions[{i}] is a {type(s).__name__}, not a Session")
            if s.base is not self.system.base:
                raise InputError(
                    f"sessions[{i}] runs on another base model object ({s.base.name}); "
                    "a session must share this model's base to be decoded with it"
                )
        if len({id(s) for s in sessions}) != len(sessions):
            raise InputError("a session appears twice in sessions")
        self._sessions = sessions

    def reset(self) -> None:
        """Forget the memory: the next call starts new sessions."""
        self._sessions = []

    def _claim(self, pool: list[Session], ids: torch.Tensor) -> tuple[Session, int]:
        """The pooled session with the longest history that is a prefix of ``ids``
        (removed from ``pool``) and its length; a new session and 0 when none is."""
        best, best_n = None, -1
        for s in pool:
            n = s.num_tokens
            if best_n < n <= ids.numel() and (n == 0 or torch.equal(s.tree.tokens(0, n), ids[:n])):
                best, best_n = s, n
        if best is None:
            return self.system.session(), 0
        pool.remove(best)
        return best, best_n

    def _start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> _Decoding:
        rows = _rows(input_ids, attention_mask)
        pool = list(self._sessions)
        sessions, ingested = [], []
        for ids in rows:
            s, known = self._claim(pool, ids)
            if known < ids.numel():
                s.ingest(ids[known:])
            sessions.append(s)
            ingested.append(int(ids.numel()) - known)
        self._sessions = sessions
        self.ingested = ingested
        return _Decoding(sessions)

    # ------------------------------------------------------------------ transformers API

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The sessions keep their own caches (as Mamba keeps its state): generate()
        # must not allocate a DynamicCache for the prompt.
        return False

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Any | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Prefill: the whole prompt and its mask; decode: the newest token and the
        rows' state (``cache``)."""
        if inputs_embeds is not None:
            raise InputError("inputs_embeds is not supported: the memory stores token ids")
        if cache is None:
            return {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        if is_first_iteration and not isinstance(cache, _Decoding):
            raise InputError(
                "pass no cache to generate(): the memory keeps its own KV cache "
                "(continue a conversation through model.sessions)"
            )
        return {"input_ids": input_ids[:, -1:], "cache": cache, **kwargs}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Prefill (``cache=None``): ingest each row of ``input_ids [B, T]`` (left
        padding given by ``attention_mask``) into its session. Decode (``cache`` =
        the previous output's): append ``input_ids[:, -1]`` to every open row.
        Returns ``logits`` float32 ``[B, 1, V]`` (the next-token logits only) and
        the rows' state as ``cache``."""
        if input_ids is None or inputs_embeds is not None:
            raise InputError("forward() needs input_ids (the memory stores token ids)")
        if output_attentions or output_hidden_states:
            raise InputError(
                "output_attentions / output_hidden_states are not available: the base model "
                "attends over the working context, not over the prompt"
            )
        if use_cache is False:
            raise InputError("use_cache=False is not supported: the memory is the KV cache")
        with torch.no_grad():
            if cache is None:
                state = self._start(input_ids, attention_mask)
                logits = state.logits()
            elif isinstance(cache, _Decoding):
                state = cache
                tokens = torch.as_tensor(input_ids).reshape(len(state.sessions), -1)[:, -1]
                done = None
                if self._watch is not None and self._watch.done is not None:
                    done = self._watch.done.tolist()
                logits = state.step(tokens.tolist(), done)
            else:
                raise InputError(
                    f"cache must be None or this model's own state, got {type(cache).__name__}"
                )
        self._decoding = state
        return CausalLMOutputWithPast(logits=logits[:, None, :].to(self.device), cache=state)

    def generate(self, inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate()``; ``tokenizer`` (needed by ``stop_strings``)
        defaults to the model's."""
        kwargs.setdefault("tokenizer", self.tokenizer)
        return super().generate(inputs, *args, **kwargs)

    def _sample(
        self,
        input_ids: torch.LongTensor,
        logits_processor: Any,
        stopping_criteria: StoppingCriteriaList,
        generation_config: Any,
        **kwargs: Any,
    ) -> Any:
        # Greedy and sampling: transformers' loop, with the stopping criteria watched
        # so a stopped row's padding never reaches its memory, and the final tokens
        # (sampled, never fed back by the loop) appended afterwards.
        self._watch = _StopWatch(stopping_criteria)
        self._decoding = None
        try:
            out = super()._sample(
                input_ids, logits_processor, self._watch, generation_config, **kwargs
            )
        finally:
            self._watch = None
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        if self._decoding is not None:
            with torch.no_grad():
                self._decoding.finish(sequences[:, -1].tolist())
        return out

    def _beam_search(self, *args: Any, **kwargs: Any) -> Any:
        raise InputError(
            "num_beams > 1 is not supported: a session's memory cannot fork into beams "
            "(use greedy or sampling, num_beams=1)"
        )

    def _assisted_decoding(self, *args: Any, **kwargs: Any) -> Any:
        raise InputError(
            "assisted decoding (assistant_model, prompt_lookup_num_tokens) is not supported "
            "with the memory"
        )


class Chat:
    """A multi-turn conversation on one memory: each :meth:`send` appends only the
    new turn to the session, never re-reading the transcript.

    The prompt of a turn is the chat template's rendering of :attr:`messages` plus
    the new message (``add_generation_prompt=True``). The memory stands for the text
    of the previous rendering followed by the reply as generated; when the new
    rendering extends that text (any append-only template), only the extension is
    tokenized and ingested. When it does not (a template that rewrites earlier
    turns), the conversation is re-read into a new session. Each turn runs
    ``model.generate`` with :attr:`MegaContextForCausalLM.sessions` set to this
    conversation's session, so several chats can share one model, one turn at a time.

    Args:
        model: the :class:`MegaContextForCausalLM`.
        tokenizer: a tokenizer with a chat template (default: the model's).
        messages: earlier turns (``[{"role": ..., "content": ...}]``), read on the
            first :meth:`send`.

    Attributes:
        messages: the transcript, the assistant's replies included.
        session: the conversation's :class:`~megacontext.runtime.Session` (``None``
            before the first turn).
        ingested: tokens the last :meth:`send` read into the memory.
    """

    def __init__(
        self,
        model: MegaContextForCausalLM,
        tokenizer: Any | None = None,
        messages: Sequence[dict[str, str]] | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise InputError("the tokenizer has no chat template (tokenizer.chat_template)")
        self.messages: list[dict[str, str]] = list(messages or [])
        self.session: Session | None = None
        self.ingested = 0
        self._text = ""  # what the session's tokens stand for

    def _encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)

    def send(self, content: str, role: str = "user", **generate_kwargs: Any) -> str:
        """Add a message, generate the reply (``generate_kwargs`` go to
        ``model.generate``: ``max_new_tokens``, ``do_sample``, ``streamer``, ...),
        record it in :attr:`messages` and return its text."""
        if not isinstance(content, str) or not isinstance(role, str):
            raise InputError("content and role must be strings")
        messages = [*self.messages, {"role": role, "content": content}]
        rendered = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        if self.session is not None and rendered.startswith(self._text):
            held = self.session.tree.tokens(0, self.session.num_tokens)
            ids = torch.cat([held, self._encode(rendered[len(self._text) :])])
            self.model.sessions = [self.session]
        else:
            ids = self._encode(rendered)
            self.model.sessions = []
        if ids.numel() == 0:
            raise InputError("the chat template rendered an empty prompt")
        out = self.model.generate(
            ids[None].to(self.model.device),
            attention_mask=torch.ones(1, ids.numel(), dtype=torch.long, device=self.model.device),
            **generate_kwargs,
        )
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        new = sequences[0, ids.numel() :].cpu()
        self.session = self.model.sessions[0]
        self.ingested = self.model.ingested[0]
        self._text = rendered + self.tokenizer.decode(new, skip_special_tokens=False)
        reply = self.tokenizer.decode(new, skip_special_tokens=True)
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        return reply


AutoConfig.register(MegaContextLMConfig.model_type, MegaContextLMConfig, exist_ok=True)
AutoModelForCausalLM.register(MegaContextLMConfig, MegaContextForCausalLM, exist_ok=True)
