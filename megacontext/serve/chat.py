"""A chat turn into memory: which messages are new, and the text that carries them.

A conversation's memory is append-only: it holds every token ingested or generated
so far. Each turn ingests only what is new, formatted as the tokenizer's chat
template would format it *in context*:

- **Which messages are new** (:func:`new_messages`). When the request's messages
  begin with the conversation's stored transcript (the OpenAI habit: resend the whole
  conversation each turn), the new ones are those after it. Otherwise every message
  of the request is new (a client that sends only the new turn). A request that
  starts like the transcript (same first message, at least as long) but differs
  later would rewrite history the memory already holds: it is refused.
- **The text of the turn** (:func:`turn_text`) = *closing* + *opening*. *opening* is
  what the template appends for the new messages and the assistant prompt:
  ``render(transcript + new, add_generation_prompt=True)`` minus
  ``render(transcript)``. *closing* ends the previous assistant reply the way the
  template does (e.g. ``<|im_end|>\\n``), less the EOS token when the reply's
  generated tokens already end with it. For the first turn it is
  ``render(new, add_generation_prompt=True)``.

So after ``n`` turns the memory reads ``render(transcript, ...)`` token for token
(up to the tokenizer's merges at turn boundaries), whatever the client resends.
"""

from __future__ import annotations

from typing import Any

from .protocol import ApiError

__all__ = ["new_messages", "render", "turn_text"]

# Stands in for the reply when measuring what the template puts after a reply.
_SENTINEL = "\x00megacontext-reply\x00"


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """``messages`` in the tokenizer's chat template (``role: content`` lines for a
    tokenizer without one)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def new_messages(
    transcript: list[dict[str, str]], messages: list[dict[str, str]]
) -> list[dict[str, str]]:
    """The messages of a request that the memory does not hold yet (see the module
    docstring). Raises :class:`ApiError` (``param="messages"``) when there are none,
    when they rewrite the transcript, or when the last one is the assistant's."""
    n = len(transcript)
    new = messages
    if n and len(messages) >= n and messages[0] == transcript[0]:
        for i in range(n):
            if messages[i] != transcript[i]:
                raise ApiError(
                    409,
                    f"messages[{i}] differs from message {i} of the conversation's memory; "
                    "a conversation's memory is append-only: send only the new messages, "
                    "or the transcript unchanged followed by them, or start a new "
                    "conversation",
                    param=f"messages[{i}]",
                    code="conversation_conflict",
                )
        new = messages[n:]
    if not new:
        raise ApiError(
            400,
            "messages: nothing new; the conversation's memory already holds all "
            f"{len(messages)} messages",
            param="messages",
            code="no_new_messages",
        )
    if new[-1]["role"] == "assistant":
        raise ApiError(
            400,
            f"messages[{len(messages) - 1}]: the last message is the assistant's; "
            "end with a user or system message",
            param=f"messages[{len(messages) - 1}].role",
        )
    return new


def _after_reply(tokenizer: Any, transcript: list[dict[str, str]]) -> str:
    """What the template writes after the last assistant reply's content."""
    probe = [*transcript[:-1], {"role": "assistant", "content": _SENTINEL}]
    text = render(tokenizer, probe, add_generation_prompt=False)
    at = text.rfind(_SENTINEL)
    return "" if at < 0 else text[at + len(_SENTINEL) :]


def turn_text(
    tokenizer: Any,
    transcript: list[dict[str, str]],
    new: list[dict[str, str]],
    reply_ended_with_eos: bool,
) -> str:
    """The text a turn ingests: *closing* + *opening* (module docstring).
    ``reply_ended_with_eos``: the previous turn's generated tokens end with EOS."""
    if not transcript:
        return render(tokenizer, new, add_generation_prompt=True)
    before = render(tokenizer, transcript, add_generation_prompt=False)
    full = render(tokenizer, transcript + new, add_generation_prompt=True)
    if full.startswith(before):
        opening = full[len(before) :]
    else:
        # A template that renders earlier messages differently once more follow.
        opening = render(tokenizer, new, add_generation_prompt=True)
    closing = ""
    if transcript[-1]["role"] == "assistant":
        closing = _after_reply(tokenizer, transcript)
        eos = getattr(tokenizer, "eos_token", None) or ""
        if reply_ended_with_eos and eos and closing.startswith(eos):
            closing = closing[len(eos) :]
    return closing + opening
