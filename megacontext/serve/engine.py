"""The serving engine: conversations on disk, one scheduler thread, batched decoding.

Threads:

- **the scheduler** owns every :class:`~megacontext.runtime.Session` and is the only
  thread that runs the base model. Each pass it drops cancelled turns, admits queued
  ones (open or create the conversation's session, work out the new messages, ingest
  them), then runs **one batched forward** that appends one token to every active
  turn (:meth:`Session.begin_decode` per session, one forward over the rows of
  their stacked caches, :meth:`Session.finish_decode` per session). Turns join and
  leave the batch between steps.
- **the persister** (one worker) saves a finished turn: the session atomically
  (:meth:`Session.save`) and the conversation's record, then reports the turn done.
- the web server's event loop only submits turns and reads their events.

Per conversation, turns run one at a time in arrival order: a turn is admitted only
when no other turn of its conversation is decoding or being saved.

On disk, ``<state_dir>/conversations/<id>/`` holds ``session/`` (a saved session)
and ``conversation.json``: the transcript and one record per turn. A turn commits in
three atomic steps — the record with the new state as ``pending``, the session, the
record with it ``committed`` — and a reopened conversation takes whichever of the two
states matches the saved session's token count, so a crash at any point leaves the
conversation at its last completed turn.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_write_text
from ..errors import ConfigError, InputError, MegaContextError, StorageError
from ..runtime import MegaContext, Session, SessionBatch, sample_token
from .chat import new_messages, turn_text
from .protocol import ApiError

__all__ = ["Engine", "ServeLimits", "TurnRequest"]

log = logging.getLogger("megacontext.serve")
_RECORD_FORMAT = 1


@dataclass(frozen=True)
class ServeLimits:
    """What one server accepts.

    Attributes:
        max_prompt_tokens: tokens one turn may ingest (its new messages, formatted).
        max_tokens: the largest ``max_tokens`` a request may ask for.
        default_max_tokens: ``max_tokens`` when a request gives none.
        max_open: conversations held in memory at once; all of them busy (a turn
            queued, decoding or saving) and a request for another one gets a 429.
        idle_timeout_s: a conversation unused this long leaves memory (it is on disk).
        max_batch: turns decoding together in one forward; more wait in the queue.
    """

    max_prompt_tokens: int = 8192
    max_tokens: int = 1024
    default_max_tokens: int = 256
    max_open: int = 8
    idle_timeout_s: float = 600.0
    max_batch: int = 8

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_tokens", "default_max_tokens", "max_open"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}", field=name)
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {self.max_batch!r}", field="max_batch")
        if not self.idle_timeout_s > 0:
            raise ConfigError(
                f"idle_timeout_s must be > 0, got {self.idle_timeout_s!r}", field="idle_timeout_s"
            )
        if self.default_max_tokens > self.max_tokens:
            raise ConfigError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens "
                f"({self.max_tokens})",
                field="default_max_tokens",
            )


@dataclass
class TurnRequest:
    """One turn of a conversation: the request's messages (``{"role", "content"}``)
    and the decoding parameters (``temperature`` 0 = greedy)."""

    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False


@dataclass
class _Conversation:
    id: str
    dir: Path
    session: Session | None
    transcript: list[dict[str, str]]
    turns: list[dict[str, Any]]
    last_used: float = field(default_factory=time.monotonic)
    saving: Future | None = None

    def state(self) -> dict[str, Any]:
        """The last completed turn's state (a decoding turn's tokens not counted)."""
        n = sum(r["prompt_tokens"] + r["completion_tokens"] for r in self.turns)
        return {"num_tokens": n, "transcript": self.transcript, "turns": self.turns}


class Turn:
    """A submitted turn. Its events arrive through ``sink(kind, payload)`` from the
    engine's threads: ``("started", {"prompt_tokens"})``, ``("delta", text)`` (only
    when streaming), then ``("done", result)`` or ``("error", exception)``."""

    def __init__(self, conv_id: str, request: TurnRequest, sink: Callable[[str, Any], None]):
        self.conv_id = conv_id
        self.request = request
        self.sink = sink
        self.cancelled = threading.Event()
        self.conv: _Conversation | None = None
        self.session: Session | None = None
        self.new: list[dict[str, str]] = []
        self.prompt_tokens = 0
        self.tokens: list[int] = []
        self.emitted = ""
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Stop the turn (the client went away). A queued turn is dropped; a decoding
        one is abandoned and its conversation reverts to the last completed turn."""
        self.cancelled.set()

    def emit(self, kind: str, payload: Any) -> None:
        try:
            self.sink(kind, payload)
        except Exception:  # a sink whose loop has closed: nobody is listening
            log.debug("dropped %s event of %s", kind, self.conv_id, exc_info=True)


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` not yet safe to stream: a possible start of
    a stop sequence, or an incomplete UTF-8 character (decoded as U+FFFD)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    n = len(text)
    while n - hold > 0 and text[n - hold - 1] == "\ufffd":
        hold += 1
    return hold


class Engine:
    """Conversations of ``system`` (a :class:`MegaContext`) kept under ``state_dir``;
    ``threads``: torch intra-op threads for the model (default: torch's).

    ``submit`` is thread-safe; ``close`` stops the threads (queued and decoding turns
    fail; saves in progress finish)."""

    def __init__(
        self,
        system: MegaContext,
        state_dir: str | Path,
        limits: ServeLimits | None = None,
        threads: int | None = None,
    ):
        if threads is not None and threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}", field="threads")
        self.threads = threads
        self.system = system
        self.base = system.base
        self.limits = limits or ServeLimits()
        self.state_dir = Path(state_dir)
        self.conversations_dir = self.state_dir / "conversations"
        try:
            self.conversations_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"{self.conversations_dir}: cannot create the state directory ({exc})",
                path=str(self.conversations_dir),
            ) from None
        self._eos = self.base.tokenizer.eos_token_id
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._queue: deque[Turn] = deque()
        self._open: dict[str, _Conversation] = {}
        self._busy: Counter[str] = Counter()
        self._stopping = False
        self._broken: BaseException | None = None
        self._active: list[Turn] = []
        # how often idle conversations are looked for
        self._sweep_s = min(self.limits.idle_timeout_s / 2, 5.0)
        self.stats: dict[str, Any] = {"decode_steps": 0, "tokens": 0, "batch_sizes": Counter()}
        self._persister = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megacontext-save")
        self._thread = threading.Thread(
            target=self._main, name="megacontext-scheduler", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ public

    def submit(self, conv_id: str, request: TurnRequest, sink: Callable[[str, Any], None]) -> Turn:
        """Queue a turn of conversation ``conv_id``. Raises :class:`ApiError` 429 when
        ``max_open`` other conversations are busy, 503 when the engine is stopping."""
        turn = Turn(conv_id, request, sink)
        with self._cv:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if self._broken is not None:
                raise ApiError(503, f"the scheduler stopped: {self._broken!r}", code="broken")
            if conv_id not in self._busy and len(self._busy) >= self.limits.max_open:
                raise ApiError(
                    429,
                    f"{len(self._busy)} conversations are busy, the most this server holds "
                    f"open (--max-open {self.limits.max_open}); retry later",
                    code="too_many_open_conversations",
                    type="rate_limit_error",
                )
            self._busy[conv_id] += 1
            self._queue.append(turn)
            self._cv.notify_all()
        return turn

    def describe(self, conv_id: str) -> dict[str, Any] | None:
        """What the server knows of a conversation (``None``: no such conversation):
        its turns, the messages it holds and the tokens in its memory."""
        with self._lock:
            conv = self._open.get(conv_id)
            if conv is not None:
                state, in_memory = conv.state(), True
            else:
                in_memory = False
                state = self._read_record(conv_id)
        if state is None:
            return None
        return {
            "id": conv_id,
            "object": "conversation",
            "in_memory": in_memory,
            "busy": self._busy.get(conv_id, 0) > 0,
            "messages": len(state["transcript"]),
            "num_tokens": state["num_tokens"],
            "turns": state["turns"],
        }

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {
                "status": ("stopping" if self._stopping else "broken" if self._broken else "ok"),
                "model": self.base.name,
                "w_max": self.system.config.w_max,
                "open_conversations": len(self._open),
                "busy_conversations": len(self._busy),
                "queued_turns": len(self._queue),
                "decode_steps": self.stats["decode_steps"],
                "decoded_tokens": self.stats["tokens"],
                "batch_sizes": {str(k): v for k, v in sorted(self.stats["batch_sizes"].items())},
            }

    def close(self, timeout: float = 30.0) -> None:
        """Stop the scheduler (queued and decoding turns get a 503), wait for saves."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)
        self._persister.shutdown(wait=True)

    # ------------------------------------------------------------------ disk

    def _dir(self, conv_id: str) -> Path:
        return self.conversations_dir / conv_id

    def _read_record(self, conv_id: str) -> dict[str, Any] | None:
        """The committed state of a conversation on disk (``None``: none there)."""
        path = self._dir(conv_id) / "conversation.json"
        if not path.is_file():
            return None
        record = self._load_json(path)
        return record["committed"]

    @staticmethod
    def _load_json(path: Path) -> dict[str, Any]:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StorageError(f"{path}: unreadable ({exc})", path=str(path)) from None
        if not isinstance(record, dict) or record.get("format") != _RECORD_FORMAT:
            raise StorageError(f"{path}: not a conversation record", path=str(path), field="format")
        for key in ("committed", "pending"):
            state = record.get(key)
            if state is not None and not (
                isinstance(state, dict)
                and isinstance(state.get("num_tokens"), int)
                and isinstance(state.get("transcript"), list)
                and isinstance(state.get("turns"), list)
            ):
                raise StorageError(f"{path}: field {key} is malformed", path=str(path), field=key)
        if record.get("committed") is None:
            raise StorageError(f"{path}: no committed state", path=str(path), field="committed")
        return record

    def _write_record(self, conv: _Conversation, committed: dict, pending: dict | None) -> None:
        record = {
            "format": _RECORD_FORMAT,
            "id": conv.id,
            "model": self.base.name,
            "committed": committed,
            "pending": pending,
        }
        atomic_write_text(conv.dir / "conversation.json", json.dumps(record, ensure_ascii=False))

    def _open_conversation(self, conv_id: str) -> _Conversation:
        """The conversation in memory, or loaded from disk (scheduler thread)."""
        with self._lock:
            conv = self._open.get(conv_id)
            if conv is not None:
                return conv
            self._make_room()
        path = self._dir(conv_id)
        record_path = path / "conversation.json"
        session_path = path / "session"
        empty = {"num_tokens": 0, "transcript": [], "turns": []}
        session = None
        if not record_path.exists():
            if session_path.exists():
                raise StorageError(
                    f"{path}: a saved session without conversation.json", path=str(path)
                )
            state = empty
        else:
            record = self._load_json(record_path)
            if not session_path.exists():
                state = empty
                if record["committed"]["num_tokens"]:
                    raise StorageError(
                        f"{session_path}: missing, but {record_path} records "
                        f"{record['committed']['num_tokens']} tokens",
                        path=str(session_path),
                    )
            else:
                session = MegaContext.open(
                    session_path,
                    base=self.base,
                    gistnet=self.system.gistnet,
                    lensnet=self.system.lensnet,
                )
                self._check_config(session, session_path)
                n = session.num_tokens
                candidates = [record["committed"], record.get("pending")]
                matches = [s for s in candidates if s is not None and s["num_tokens"] == n]
                if not matches:
                    raise StorageError(
                        f"{record_path}: no recorded state matches the saved session's "
                        f"{n} tokens",
                        path=str(record_path),
                        field="num_tokens",
                    )
                state = matches[0]
        conv = _Conversation(
            id=conv_id,
            dir=path,
            session=session,
            transcript=[dict(m) for m in state["transcript"]],
            turns=list(state["turns"]),
        )
        with self._lock:
            self._open[conv_id] = conv
        return conv

    def _check_config(self, session: Session, path: Path) -> None:
        mine, theirs = self.system.config, session.config
        for name in ("w_max", "block_size", "levels"):
            if getattr(mine, name) != getattr(theirs, name):
                raise ApiError(
                    409,
                    f"this conversation was saved with {name}={getattr(theirs, name)} "
                    f"({path}); this server runs {name}={getattr(mine, name)}",
                    param="conversation_id",
                    code="conversation_config_mismatch",
                )

    def _make_room(self) -> None:
        """Evict the least recently used idle conversations until one more fits under
        ``max_open`` (called with the lock held). Evicted ones are on disk."""
        while len(self._open) >= self.limits.max_open:
            idle = [c for c in self._open.values() if self._idle(c)]
            if not idle:
                return
            victim = min(idle, key=lambda c: c.last_used)
            del self._open[victim.id]
            log.info("conversation %s left memory (max_open)", victim.id)

    def _idle(self, conv: _Conversation) -> bool:
        return self._busy.get(conv.id, 0) == 0 and (conv.saving is None or conv.saving.done())

    def _evict_idle_locked(self) -> None:
        """Drop idle conversations unused for ``idle_timeout_s`` (lock held)."""
        cutoff = time.monotonic() - self.limits.idle_timeout_s
        for conv in [c for c in self._open.values() if self._idle(c)]:
            if conv.last_used < cutoff:
                del self._open[conv.id]
                log.info("conversation %s left memory (idle)", conv.id)

    # ------------------------------------------------------------------ scheduler

    def _release(self, turn: Turn) -> None:
        with self._cv:
            self._busy[turn.conv_id] -= 1
            if self._busy[turn.conv_id] <= 0:
                del self._busy[turn.conv_id]
            if turn.conv is not None:
                turn.conv.last_used = time.monotonic()
            self._cv.notify_all()

    def _drop(self, conv_id: str) -> None:
        """Forget the in-memory state of a conversation; it reopens from disk."""
        with self._lock:
            self._open.pop(conv_id, None)

    def _fail(self, turn: Turn, exc: BaseException, touched: bool) -> None:
        if touched:
            self._drop(turn.conv_id)
        turn.emit("error", exc)
        self._release(turn)

    def _take(self, active: list[Turn]) -> tuple[list[Turn], list[Turn], bool]:
        """Cancelled turns to drop and queued turns to admit; with neither and no
        active turn, sleep until a submit, a finished save or the idle sweep."""
        with self._cv:
            while True:
                if self._stopping:
                    return [], [], True
                cancelled, admit = self._select(active)
                if cancelled or admit or active:
                    return cancelled, admit, False
                self._cv.wait(timeout=self._sweep_s)
                self._evict_idle_locked()

    def _select(self, active: list[Turn]) -> tuple[list[Turn], list[Turn]]:
        """(lock held) Queued turns in arrival order, at most ``max_batch`` decoding,
        one turn per conversation, none while its conversation's last turn saves."""
        cancelled = [t for t in active if t.cancelled.is_set()]
        room = self.limits.max_batch - (len(active) - len(cancelled))
        busy = {t.conv_id for t in active if t not in cancelled}
        admit: list[Turn] = []
        keep: deque[Turn] = deque()
        for t in self._queue:
            if t.cancelled.is_set():
                cancelled.append(t)
                continue
            conv = self._open.get(t.conv_id)
            saving = conv is not None and conv.saving is not None and not conv.saving.done()
            if room > 0 and t.conv_id not in busy and not saving:
                admit.append(t)
                room -= 1
            else:
                keep.append(t)
            # later turns of this conversation wait for this one
            busy.add(t.conv_id)
        self._queue = keep
        return cancelled, admit

    def _wake(self, _future: Future | None = None) -> None:
        with self._cv:
            self._cv.notify_all()

    def _main(self) -> None:
        if self.threads is not None:
            # intra-op threads of the thread that runs the model (OpenMP's setting is
            # per thread)
            torch.set_num_threads(self.threads)
        try:
            self._run()
        except BaseException as exc:  # a bug: refuse new turns rather than hang them
            log.exception("the scheduler stopped")
            with self._cv:
                self._broken = exc
                leftovers = [*self._active, *self._queue]
                self._queue.clear()
            for t in leftovers:
                self._fail(t, ApiError(500, f"the scheduler stopped: {exc!r}"), touched=True)

    def _run(self) -> None:
        self._active = active = []
        batch = None
        last_sweep = time.monotonic()
        while True:
            cancelled, admit, stop = self._take(active)
            if stop:
                break
            changed = False
            for t in cancelled:
                if t in active:
                    active.remove(t)
                    self._drop(t.conv_id)
                    changed = True
                self._release(t)
            for t in admit:
                try:
                    self._begin(t)
                except Exception as exc:
                    if not isinstance(exc, ApiError):
                        log.exception("starting a turn of %s failed", t.conv_id)
                    self._fail(t, exc, touched=t.session is not None)
                    continue
                active.append(t)
                changed = True
            if time.monotonic() - last_sweep > self._sweep_s:
                with self._lock:
                    self._evict_idle_locked()
                last_sweep = time.monotonic()
            if not active:
                batch = None
                continue
            try:
                if changed or batch is None:
                    batch = self.system.batch([t.session for t in active])
                tokens = [self._next_token(t) for t in active]
                self._step(batch, active, tokens)
            except Exception as exc:
                log.exception("decode step failed; %d turns abandoned", len(active))
                for t in active:
                    self._fail(t, exc, touched=True)
                active.clear()
                batch = None
                continue
            done = [t for t in active if t.finish_reason is not None]
            for t in active:
                if t.request.stream:
                    self._stream(t)
            for t in done:
                active.remove(t)
                batch = None
                try:
                    self._finish(t)
                except Exception as exc:
                    log.exception("finishing a turn of %s failed", t.conv_id)
                    self._fail(t, exc, touched=True)
        with self._cv:
            leftovers = [*active, *self._queue]
            self._queue.clear()
        for t in leftovers:
            self._fail(t, ApiError(503, "the server is shutting down", code="shutting_down"), True)

    def _begin(self, t: Turn) -> None:
        """Admit a turn: open its conversation, ingest the new messages (scheduler)."""
        req = t.request
        conv = self._open_conversation(t.conv_id)
        t.conv = conv
        conv.last_used = time.monotonic()
        t.new = new_messages(conv.transcript, req.messages)
        ended_with_eos = bool(conv.turns and conv.turns[-1].get("eos"))
        text = turn_text(self.base.tokenizer, conv.transcript, t.new, ended_with_eos)
        ids = self.base.encode(text)
        if ids.numel() > self.limits.max_prompt_tokens:
            raise ApiError(
                400,
                f"messages: the new messages are {ids.numel()} tokens, more than this "
                f"server takes in one turn (--max-prompt-tokens "
                f"{self.limits.max_prompt_tokens})",
                param="messages",
                code="context_length_exceeded",
            )
        if ids.numel() == 0:
            raise ApiError(400, "messages: the new messages are empty", param="messages")
        if conv.session is None:
            conv.session = self.system.session()
        t.session = conv.session
        # Session.ingest is all or nothing: on an error the session is unchanged.
        try:
            conv.session.ingest(ids)
        except InputError as exc:
            t.session = None
            raise ApiError(400, f"messages: {exc}", param="messages") from None
        t.prompt_tokens = int(ids.numel())
        if req.temperature > 0 and req.seed is not None:
            t.generator = torch.Generator().manual_seed(req.seed)
        t.emit("started", {"prompt_tokens": t.prompt_tokens})

    def _next_token(self, t: Turn) -> int:
        assert t.session is not None
        req = t.request
        return sample_token(t.session.next_token_logits(), req.temperature, req.top_p, t.generator)

    def _step(self, batch: SessionBatch, active: list[Turn], tokens: list[int]) -> None:
        """Append ``tokens[b]`` to ``active[b]``'s session with one batched forward
        (:meth:`SessionBatch.step`), then decide which turns are finished."""
        batch.step(tokens)
        with self._lock:
            self.stats["decode_steps"] += 1
            self.stats["tokens"] += len(tokens)
            self.stats["batch_sizes"][len(tokens)] += 1
        for t, tok in zip(active, tokens, strict=True):
            t.tokens.append(tok)
            req = t.request
            if (self._eos is not None and tok == self._eos) or (
                req.stop and any(s in self._reply_text(t, cut=False) for s in req.stop)
            ):
                t.finish_reason = "stop"
            elif len(t.tokens) >= req.max_tokens:
                t.finish_reason = "length"

    def _reply_text(self, t: Turn, cut: bool = True) -> str:
        """The reply so far: the generated tokens (less a final EOS), decoded; with
        ``cut``, ended before the first stop sequence."""
        ids = t.tokens
        if ids and self._eos is not None and ids[-1] == self._eos:
            ids = ids[:-1]
        text = self.base.decode(ids)
        if cut and t.request.stop:
            at = min((i for s in t.request.stop if (i := text.find(s)) >= 0), default=-1)
            if at >= 0:
                text = text[:at]
        return text

    def _stream(self, t: Turn) -> None:
        if t.finish_reason is not None:
            return  # the rest goes out with "done", after the save
        text = self._reply_text(t)
        safe = text[: len(text) - _held_back(text, t.request.stop)]
        if len(safe) > len(t.emitted) and safe.startswith(t.emitted):
            t.emit("delta", safe[len(t.emitted) :])
            t.emitted = safe

    # ------------------------------------------------------------------ commit

    def _finish(self, t: Turn) -> None:
        """A turn decoded its last token: detach its cache from the batch buffers and
        hand it to the persister."""
        conv, session = t.conv, t.session
        assert conv is not None and session is not None
        # After stacking, the session's cache is a view of the batch's buffers; a
        # cache of its own lets those buffers go once the batch changes.
        session.cache = session.cache.detached()
        if session.attention_scorer is not None:
            session.attention_scorer.cache = session.cache  # it reads the keys there
        text = self._reply_text(t)
        ended_with_eos = bool(t.tokens) and t.tokens[-1] == self._eos
        record = {
            "prompt_tokens": t.prompt_tokens,
            "completion_tokens": len(t.tokens),
            "finish_reason": t.finish_reason,
            "eos": ended_with_eos,
        }
        state = {
            "num_tokens": session.num_tokens,
            "transcript": [*conv.transcript, *t.new, {"role": "assistant", "content": text}],
            "turns": [*conv.turns, record],
        }
        with self._lock:
            conv.saving = self._persister.submit(self._save, t, conv, session, state, text)
        # a turn of this conversation queued meanwhile is admitted once the save is done
        conv.saving.add_done_callback(self._wake)

    def _save(self, t: Turn, conv: _Conversation, session: Session, state: dict, text: str) -> None:
        """Persister thread: pending record, session, committed record; then done."""
        try:
            conv.dir.mkdir(parents=True, exist_ok=True)
            self._write_record(conv, committed=conv.state(), pending=state)
            session.save(conv.dir / "session")
            self._write_record(conv, committed=state, pending=None)
        except BaseException as exc:
            log.exception("saving conversation %s failed", conv.id)
            err = exc if isinstance(exc, MegaContextError) else StorageError(str(exc))
            self._fail(
                t,
                ApiError(
                    500,
                    f"the reply was generated but could not be saved: {type(err).__name__}: "
                    f"{err}; the conversation stays at its previous turn",
                    code="save_failed",
                ),
                touched=True,
            )
            return
        conv.transcript = state["transcript"]
        conv.turns = state["turns"]
        t.emit(
            "done",
            {
                "text": text,
                "finish_reason": t.finish_reason,
                "prompt_tokens": t.prompt_tokens,
                "completion_tokens": len(t.tokens),
                "memory": {
                    "num_tokens": session.num_tokens,
                    "turns": len(conv.turns),
                    "wc_entries": 0 if session.wc is None else len(session.wc),
                    "w_max": session.config.w_max,
                },
            },
        )
        self._release(t)
