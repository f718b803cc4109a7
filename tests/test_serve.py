"""``megacontext serve`` used as a user would: a real server process on 127.0.0.1
(``megacontext serve --model tiny-llama``), driven by the ``openai`` client and, for
malformed requests and raw server-sent events, by httpx.

tiny-llama is random, so "recall" cannot be semantic. The memory check is exact
instead: the session saved on disk holds every turn's tokens (each user message once,
in order, far past the budget), and a fresh in-process :class:`Session` that ingests
the same per-turn prompt tokens and decodes with the same parameters reproduces every
reply token for token, including across a turn that reopened the conversation from
disk. Sampled turns use a seed, so replies are varied text, not greedy tiny-llama's
repeated newlines.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

import megacontext as mc

openai = pytest.importorskip("openai", reason="the dev extra installs openai")

W_MAX = 64
BLOCK = 8
MODEL = "tiny-llama"
START_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command() -> list[str]:
    exe = Path(sys.executable).parent / "megacontext"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("megacontext")
    return [found] if found else [sys.executable, "-m", "megacontext.cli"]


class Server:
    """``megacontext serve`` in a subprocess; ``start`` waits for ``/health``."""

    def __init__(self, state_dir: Path, config: Path, *options: str):
        self.state_dir = state_dir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = state_dir.parent / f"server-{self.port}.log"
        self.args = [
            *_command(),
            "serve",
            "--model",
            MODEL,
            "--port",
            str(self.port),
            "--state-dir",
            str(state_dir),
            "--config",
            str(config),
            "--log-level",
            "warning",
            # one intra-op thread: on a shared CPU, OpenMP workers that wait on each
            # other cost more than a tiny model's parallelism gains
            "--threads",
            "1",
            # the replays run on the CPU: so does the server, for the same numerics
            "--device",
            "cpu",
            *options,
        ]
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.state_dir.parent
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}):\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"server did not answer within {START_TIMEOUT_S}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-5000:] if self.log.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(20)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kw)

    def conversation(self, conv_id: str) -> dict:
        r = httpx.get(f"{self.url}/v1/conversations/{conv_id}", timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=30).json()


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve-config") / "config.yaml"
    path.write_text(f"block_size: {BLOCK}\nw_max: {W_MAX}\n")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, config_file):
    root = tmp_path_factory.mktemp("serve")
    srv = Server(
        root / "state",
        config_file,
        "--max-open",
        "4",
        "--max-batch",
        "4",
        "--max-prompt-tokens",
        "512",
        "--max-tokens",
        "64",
        "--default-max-tokens",
        "8",
    )
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def base():
    return mc.load_base(MODEL, device="cpu")


def _chat(client, conv_id: str, messages, **kw):
    return client.chat.completions.create(
        model=MODEL, messages=messages, extra_headers={"X-Conversation-Id": conv_id}, **kw
    )


def _stream_text(client, conv_id: str, messages, **kw) -> tuple[str, str | None, int]:
    """Concatenated content, finish reason and number of chunks of a streamed turn."""
    text, finish, n = "", None, 0
    with _chat(client, conv_id, messages, stream=True, **kw) as stream:
        for chunk in stream:
            n += 1
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
    return text, finish, n


def _fact(i: int) -> str:
    return (
        f"Note {i}: the vault number {i} opens with the code {1000 + 7919 * i % 9000}, "
        f"and its keeper is called Keeper{i}."
    )


def _check_replay(srv: Server, conv_id: str, base, params: list[dict], replies: list[str]):
    """The saved session holds every turn, and a fresh session fed each turn's prompt
    tokens with the same decoding parameters (``max_tokens``, ``temperature``,
    ``seed``) decodes the server's replies token for token. Returns the saved tokens."""
    info = srv.conversation(conv_id)
    records = info["turns"]
    assert len(records) == len(params) == len(replies)
    saved = mc.MegaContext.open(srv.state_dir / "conversations" / conv_id / "session", base=base)
    tokens = saved.tree.tokens(0, saved.num_tokens)
    assert tokens.numel() == info["num_tokens"]
    assert saved.wc is not None and saved.wc.cost < W_MAX + BLOCK
    config = mc.MegaContextConfig(model=MODEL, block_size=BLOCK, w_max=W_MAX)
    fresh = mc.MegaContext(base, config=config).session()
    eos = base.tokenizer.eos_token_id
    at = 0
    for rec, p, reply in zip(records, params, replies, strict=True):
        prompt, generated = rec["prompt_tokens"], rec["completion_tokens"]
        fresh.ingest(tokens[at : at + prompt])
        fresh.generate(p["max_tokens"], temperature=p["temperature"], seed=p.get("seed"))
        at += prompt
        # the fresh session decoded exactly the server's tokens for this turn
        assert torch.equal(fresh.tree.tokens(at, fresh.num_tokens), tokens[at : at + generated])
        gen = tokens[at : at + generated].tolist()
        if gen and gen[-1] == eos:
            gen = gen[:-1]
        assert base.decode(gen) == reply
        at += generated
    assert at == tokens.numel() == fresh.num_tokens
    return tokens


def test_turn_texts_add_up_to_the_template_rendering_of_the_conversation():
    """Ingesting only each turn's new text (plus the generated replies, with or
    without EOS) gives the chat template's rendering of the whole conversation."""
    from megacontext.base import load_tokenizer
    from megacontext.serve.chat import new_messages, render, turn_text

    tok = load_tokenizer(MODEL)
    eos = tok.eos_token
    system = {"role": "system", "content": "Be brief."}
    transcript: list[dict] = []
    memory, ended = "", False
    # (user message, reply, whether the reply's tokens ended with EOS)
    for i, (text, reply, with_eos) in enumerate(
        [("hi", "hello", True), ("and?", "cut off mid", False), ("more", "ok", True)]
    ):
        user = {"role": "user", "content": text}
        sent = [system, user] if i == 0 else [*transcript, user]
        new = new_messages(transcript, sent)
        memory += turn_text(tok, transcript, new, ended)
        assert memory == render(tok, [*transcript, *new], add_generation_prompt=True)
        memory += reply + (eos if with_eos else "")
        transcript += [*new, {"role": "assistant", "content": reply}]
        ended = with_eos
    last = {"role": "user", "content": "x"}
    assert memory + turn_text(tok, transcript, [last], ended) == render(
        tok, [*transcript, last], add_generation_prompt=True
    )
    assert memory.count("Be brief.") == 1


def test_new_messages_rules():
    from megacontext.serve.chat import new_messages
    from megacontext.serve.protocol import ApiError

    a, b = {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}
    c = {"role": "user", "content": "c"}
    assert new_messages([], [a]) == [a]
    assert new_messages([a, b], [a, b, c]) == [c]  # the transcript resent
    assert new_messages([a, b], [c]) == [c]  # only the new message
    assert new_messages([a, b], [a]) == [a]  # shorter than the transcript: new
    with pytest.raises(ApiError) as info:
        new_messages([a, b], [a, {"role": "assistant", "content": "x"}, c])
    assert (info.value.status, info.value.param) == (409, "messages[1]")
    with pytest.raises(ApiError) as info:
        new_messages([a, b], [a, b])
    assert info.value.code == "no_new_messages"
    with pytest.raises(ApiError) as info:
        new_messages([], [a, b])
    assert info.value.param == "messages[1].role"


def test_streamed_text_holds_back_a_possible_stop_sequence():
    from megacontext.serve.engine import _held_back

    assert _held_back("hello wor", ["world"]) == 3
    assert _held_back("hello", ["world"]) == 0
    assert _held_back("abc\ufffd", []) == 1
    assert _held_back("say EN", ["END", "STOP"]) == 2


def test_models_endpoint(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert server.client().models.retrieve(MODEL).id == MODEL


def test_multi_turn_memory_holds_every_turn_far_past_the_budget(server, base):
    client = server.client()
    conv = "multi-turn"
    transcript: list[dict] = [{"role": "system", "content": "You remember every note."}]
    params, replies = [], []
    turns = 8
    for i in range(turns):
        user = {"role": "user", "content": _fact(i) + " Please keep it in mind."}
        p = {"max_tokens": 6, "temperature": 1.0, "seed": 100 + i}
        if i == 4:
            # Fill memory with other conversations (max_open=4): this one leaves
            # memory and the next turn reopens it from disk.
            for j in range(4):
                _chat(client, f"filler-{j}", [{"role": "user", "content": "hi"}], max_tokens=2)
            assert server.conversation(conv)["in_memory"] is False
        # Even turns resend the whole transcript (the OpenAI habit), odd ones only the
        # new message: either way only the new message is ingested.
        messages = [*transcript, user] if i % 2 == 0 else [user]
        r = _chat(client, conv, messages, **p)
        reply = r.choices[0].message.content
        assert r.usage.completion_tokens <= 6
        assert r.conversation_id == conv
        transcript += [user, {"role": "assistant", "content": reply}]
        params.append(p)
        replies.append(reply)

    info = server.conversation(conv)
    assert info["messages"] == len(transcript)
    assert info["num_tokens"] > 4 * W_MAX  # the budget is far exceeded
    tokens = _check_replay(server, conv, base, params, replies)
    text = base.decode(tokens)
    # every turn's fact is in memory exactly once, in order; the system prompt once
    positions = [text.find(_fact(i)) for i in range(turns)]
    assert all(p >= 0 for p in positions), positions
    assert positions == sorted(positions)
    assert all(text.count(_fact(i)) == 1 for i in range(turns))
    assert text.count("You remember every note.") == 1


def test_streaming_equals_non_streaming(server):
    client = server.client()
    messages = [{"role": "user", "content": "Tell me a story about a lighthouse."}]
    for kw in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 7, "top_p": 0.9}):
        tag = "greedy" if kw["temperature"] == 0 else "sampled"
        full = _chat(client, f"plain-{tag}", messages, max_tokens=24, **kw)
        text, finish, chunks = _stream_text(client, f"stream-{tag}", messages, max_tokens=24, **kw)
        assert text == full.choices[0].message.content
        assert finish == full.choices[0].finish_reason
        assert chunks >= 3  # role chunk, content, finish
    assert text.strip()  # the sampled reply is not empty


def test_stream_is_openai_sse_ending_with_done(server):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count to five."}],
        "max_tokens": 5,
        "temperature": 1.0,
        "seed": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        conv_id = r.headers["x-conversation-id"]
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    # a conversation the server named: its memory holds the reply
    info = server.conversation(conv_id)
    assert info["turns"][0]["completion_tokens"] == 5 and info["messages"] == 2
    assert text


def test_four_concurrent_conversations_equal_each_run_alone(server):
    client = server.client()

    def turns(conv: str, k: int) -> list[str]:
        out = []
        for t in range(2):
            msg = [{"role": "user", "content": f"Conversation {k}, question {t}: " + "why? " * k}]
            r = _chat(client, conv, msg, max_tokens=24 + 4 * k, temperature=1.0, seed=10 * k + t)
            out.append(r.choices[0].message.content)
        return out

    alone = [turns(f"alone-{k}", k) for k in range(4)]
    before = server.health()["batch_sizes"]
    together: list[list[str] | None] = [None] * 4
    gate = threading.Barrier(4)

    def worker(k: int) -> None:
        gate.wait()
        together[k] = turns(f"together-{k}", k)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert together == alone
    after = server.health()["batch_sizes"]
    batched = {int(b): n - before.get(b, 0) for b, n in after.items()}
    # the conversations decoded together: some forwards carried several of them
    assert max(b for b, n in batched.items() if n > 0) >= 2, batched


def test_requests_to_one_conversation_are_serialised(server, base):
    """Two requests to one conversation at once: both turns land, one after the
    other, each decoded from the memory the other left."""
    client = server.client()
    conv = "one-at-a-time"
    p = {"max_tokens": 12, "temperature": 1.0, "seed": 5}
    replies: list[str | None] = [None, None]
    gate = threading.Barrier(2)

    def worker(k: int) -> None:
        gate.wait()
        msg = [{"role": "user", "content": f"Parallel message {k}."}]
        replies[k] = _chat(client, conv, msg, **p).choices[0].message.content

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    info = server.conversation(conv)
    assert len(info["turns"]) == 2 and info["messages"] == 4
    tokens = mc.MegaContext.open(
        server.state_dir / "conversations" / conv / "session", base=base
    ).tree.tokens(0, info["num_tokens"])
    text = base.decode(tokens)
    first = 0 if text.find("Parallel message 0.") < text.find("Parallel message 1.") else 1
    order = [first, 1 - first]
    _check_replay(server, conv, base, [p, p], [replies[k] for k in order])


def _error(r: httpx.Response) -> dict:
    assert "Traceback" not in r.text
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_bad_requests_get_4xx_naming_the_field(server):
    url = f"{server.url}/v1/chat/completions"
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    r = httpx.post(
        url,
        content=b'{"model": "tiny-llama", "messages": [',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400
    assert _error(r)["code"] == "invalid_json"

    cases = [
        ({**ok, "model": "gpt-9"}, 404, "model"),
        ({**ok, "max_tokens": -5}, 400, "max_tokens"),
        ({**ok, "max_tokens": 65}, 400, "max_tokens"),  # above --max-tokens 64
        ({**ok, "temperature": 3}, 400, "temperature"),
        ({**ok, "top_p": 0}, 400, "top_p"),
        ({**ok, "n": 2}, 400, "n"),
        ({**ok, "stop": [""]}, 400, "stop"),
        ({k: v for k, v in ok.items() if k != "messages"}, 400, "messages"),
        ({**ok, "messages": []}, 400, "messages"),
        ({**ok, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
        ({**ok, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ({**ok, "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages[0].role"),
        ({**ok, "conversation_id": "../etc"}, 400, "conversation_id"),
        # --max-prompt-tokens 512
        ({**ok, "messages": [{"role": "user", "content": "word " * 2000}]}, 400, "messages"),
    ]
    for body, status, param in cases:
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code == status, (body, r.text)
        err = _error(r)
        assert err["param"] == param, (body, err)
        assert param.split("[")[0] in err["message"], err
    r = httpx.post(url, json={**ok, "messages": [{"role": "user", "content": "word " * 2000}]})
    assert _error(r)["code"] == "context_length_exceeded"

    r = httpx.post(url, json=ok, headers={"X-Conversation-Id": "bad id!"}, timeout=30)
    assert r.status_code == 400 and _error(r)["param"] == "X-Conversation-Id"
    r = httpx.get(f"{server.url}/v1/nothing-here", timeout=30)
    assert r.status_code == 404 and _error(r)["code"] == "not_found"

    # the openai client sees typed errors with the field
    with pytest.raises(openai.BadRequestError) as info:
        _chat(server.client(), "neg", [{"role": "user", "content": "x"}], max_tokens=-1)
    assert info.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError) as info:
        server.client().chat.completions.create(model="nope", messages=ok["messages"])
    assert info.value.code == "model_not_found"


def test_rewriting_history_is_refused_and_memory_is_kept(server):
    client = server.client()
    conv = "append-only"
    first = [{"role": "user", "content": "first"}]
    r = _chat(client, conv, first, max_tokens=3, temperature=1.0, seed=1)
    reply = {"role": "assistant", "content": r.choices[0].message.content}
    edited = [first[0], {"role": "assistant", "content": "something else"}]
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [*edited, {"role": "user", "content": "next"}]},
        headers={"X-Conversation-Id": conv},
        timeout=30,
    )
    assert r.status_code == 409 and _error(r)["param"] == "messages[1]"
    same = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [*first, reply]},
        headers={"X-Conversation-Id": conv},
        timeout=30,
    )
    assert same.status_code == 400 and _error(same)["code"] == "no_new_messages"
    assert server.conversation(conv)["turns"][0]["completion_tokens"] == 3
    assert len(server.conversation(conv)["turns"]) == 1


def test_kill_9_mid_turn_then_restart_keeps_memory_to_the_last_completed_turn(
    tmp_path, config_file, base
):
    state = tmp_path / "state"
    options = ["--max-tokens", "512", "--idle-timeout", "1"]
    conv = "survivor"
    params, replies = [], []
    srv = Server(state, config_file, *options)
    try:
        srv.start()
        client = srv.client()
        for i in range(2):
            p = {"max_tokens": 10, "temperature": 1.0, "seed": 40 + i}
            r = _chat(client, conv, [{"role": "user", "content": _fact(i)}], **p)
            params.append(p)
            replies.append(r.choices[0].message.content)
        # idle eviction: the conversation leaves memory, and is still there on disk
        deadline = time.monotonic() + 30
        while srv.health()["open_conversations"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert srv.health()["open_conversations"] == 0
        assert srv.conversation(conv)["in_memory"] is False
        p = {"max_tokens": 8, "temperature": 1.0, "seed": 42}
        r = _chat(client, conv, [{"role": "user", "content": _fact(2)}], **p)
        params.append(p)
        replies.append(r.choices[0].message.content)
        done = srv.conversation(conv)
        # a long turn, killed while it streams
        stream = _chat(
            client,
            conv,
            [{"role": "user", "content": _fact(3)}],
            stream=True,
            max_tokens=500,
            temperature=1.0,
            seed=43,
        )
        got = 0
        for chunk in stream:
            got += bool(chunk.choices and chunk.choices[0].delta.content)
            if got >= 3:
                break
        srv.kill9()
        stream.close()
    finally:
        srv.stop()
    assert got >= 3

    srv = Server(state, config_file, *options, "--max-open", "1")
    try:
        srv.start()
        info = srv.conversation(conv)
        assert info["turns"] == done["turns"] and info["num_tokens"] == done["num_tokens"]
        _check_replay(srv, conv, base, params, replies)
        # the conversation goes on where it stopped
        client = srv.client()
        p = {"max_tokens": 6, "temperature": 1.0, "seed": 44}
        r = _chat(client, conv, [{"role": "user", "content": _fact(3)}], **p)
        params.append(p)
        replies.append(r.choices[0].message.content)
        _check_replay(srv, conv, base, params, replies)

        # --max-open 1: while this conversation decodes, another one is refused
        stream = _chat(
            client, conv, [{"role": "user", "content": "more"}], stream=True, max_tokens=500
        )
        next(iter(stream))
        r = httpx.post(
            f"{srv.url}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            headers={"X-Conversation-Id": "other"},
            timeout=30,
        )
        stream.close()
        assert r.status_code == 429, r.text
        assert _error(r)["code"] == "too_many_open_conversations"
        # the abandoned turn left the memory at the last completed turn
        deadline = time.monotonic() + 30
        while srv.health()["busy_conversations"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(srv.conversation(conv)["turns"]) == len(params)
        _check_replay(srv, conv, base, params, replies)
    finally:
        srv.stop()


def test_serve_without_fastapi_says_what_to_install(monkeypatch):
    """Without the serve extra the command exits 2 with the install line, before
    loading any model."""
    import importlib.util

    from typer.testing import CliRunner

    from megacontext.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "fastapi" else real(name, *a),
    )
    result = CliRunner().invoke(app, ["serve", "--model", "no-such-model"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "fastapi" in text and "megacontext[serve]" in text
