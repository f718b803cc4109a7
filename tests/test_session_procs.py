"""Saved sessions across real processes: two writers never lose an update silently, and
a save killed (SIGKILL) at any point leaves the old or the new session at the path.

Children are forked (they inherit the loaded tiny model) and talk over a pipe; a
child stops inside a save by replacing ``session_store._checkpoint``, the no-op the
save calls at each named point.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from session_checks import RuleScorer
from test_session_store import _ids, _open, _session

import megacontext as mc
from megacontext import session_store
from megacontext.session_store import HEAD, MARKER

pytestmark = pytest.mark.skipif(
    "fork" not in mp.get_all_start_methods(), reason="needs fork (POSIX)"
)


class Child:
    """A forked process running ``fn(conn)``; its result (or typed error) comes back."""

    def __init__(self, fn):
        self.conn, child_conn = mp.Pipe()

        def main() -> None:
            torch.set_num_threads(1)
            try:
                out = fn(child_conn)
                child_conn.send(("ok", out))
            except mc.MegaContextError as e:
                child_conn.send(("error", type(e).__name__, e.field, str(e)))
            except BaseException as e:
                child_conn.send(("crash", repr(e)))

        self.proc = mp.get_context("fork").Process(target=main, daemon=True)
        self.proc.start()

    def recv(self, timeout: float = 120.0):
        if not self.conn.poll(timeout):
            raise AssertionError(f"child {self.proc.pid} said nothing for {timeout} s")
        return self.conn.recv()

    def send(self, msg) -> None:
        self.conn.send(msg)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(30)

    def join(self) -> None:
        self.proc.join(60)
        assert self.proc.exitcode == 0, self.proc.exitcode


def _pause_at(conn, point: str):
    """A ``_checkpoint`` that reports reaching ``point``, then waits for the parent."""

    def checkpoint(p: str) -> None:
        if p == point:
            conn.send(("at", p))
            conn.recv()

    return checkpoint


def _logits(path: Path, base) -> torch.Tensor:
    return _open(path, base).next_token_logits()


def test_two_writers_of_one_session_never_lose_an_update(tiny_base, tmp_path):
    s = _session(tiny_base)
    s.ingest(_ids(300))
    path = tmp_path / "sess"
    s.save(path)

    def writer(seed):
        def run(conn):
            r = _open(path, tiny_base)
            r.ingest(_ids(50, seed=seed))
            conn.send(("ready", r.num_tokens))
            conn.recv()
            r.save(path)
            return r.next_token_logits().tolist()

        return run

    a, b = Child(writer(1)), Child(writer(2))
    assert a.recv() == ("ready", 350) and b.recv() == ("ready", 350)
    a.send("go")
    status, a_logits = a.recv()
    assert status == "ok"
    b.send("go")
    kind, name, field, message = b.recv()
    assert (kind, name, field) == ("error", "StorageError", "generation"), message
    assert "stale save" in message
    a.join(), b.join()
    r = _open(path, tiny_base)
    assert r.num_tokens == 350
    assert torch.equal(r.next_token_logits(), torch.tensor(a_logits))
    assert r.tree.tokens(300, 350).tolist() == _ids(50, seed=1).tolist()


def test_concurrent_saves_wait_for_the_lock_then_refuse(tiny_base, tmp_path):
    s = _session(tiny_base)
    s.ingest(_ids(300))
    path = tmp_path / "sess"
    s.save(path)

    def first(conn):
        r = _open(path, tiny_base)
        r.ingest(_ids(40, seed=1))
        conn.send("ready")
        conn.recv()
        session_store._checkpoint = _pause_at(conn, "written")
        r.save(path)
        return r.num_tokens

    def second(conn):
        r = _open(path, tiny_base)
        r.ingest(_ids(60, seed=2))
        conn.send("ready")
        conn.recv()
        session_store.LOCK_TIMEOUT_S = 0.5
        try:
            r.save(path)
        except mc.StorageError as e:
            conn.send(("refused", e.field))
        conn.recv()
        session_store.LOCK_TIMEOUT_S = 30.0
        r.save(path)

    a, b = Child(first), Child(second)
    assert a.recv() == "ready" and b.recv() == "ready"
    a.send("go")
    assert a.recv() == ("at", "written")  # a holds the lock mid-save
    b.send("go")
    assert b.recv() == ("refused", "lock")
    with pytest.raises(mc.StorageError, match="another process") as e:
        session_store.read_session(path, lock_timeout=0.3)  # a reader waits for the writer
    assert e.value.field == "lock"
    a.send("continue")
    assert a.recv() == ("ok", 340)
    b.send("now")  # the lock is free, but a committed since b opened: stale
    kind, _, field, _ = b.recv()
    assert (kind, field) == ("error", "generation")
    a.join(), b.join()
    assert _open(path, tiny_base).num_tokens == 340


POINTS = ["locked", "written", "renamed", "committed", "cleaned"]


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_inside_save_leaves_the_old_or_the_new_session(tiny_base, tmp_path, point):
    s = _session(tiny_base)
    s.ingest(_ids(300))
    s.generate(3)
    path = tmp_path / "sess"
    s.save(path)
    old = s.next_token_logits()
    s.ingest(_ids(70, seed=5))
    new = s.next_token_logits()

    def run(conn):
        session_store._checkpoint = _pause_at(conn, point)
        s.save(path)

    child = Child(run)
    assert child.recv() == ("at", point)
    child.kill()
    assert child.proc.exitcode == -signal.SIGKILL
    committed = POINTS.index(point) >= POINTS.index("committed")
    r = _open(path, tiny_base)
    assert torch.equal(r.next_token_logits(), new if committed else old)
    assert r.num_tokens == (373 if committed else 303)
    # that open removed what the killed save left behind
    version = (path / HEAD).read_text().split('"version": "')[1].split('"')[0]
    assert sorted(p.name for p in path.iterdir()) == [HEAD, MARKER, version]
    if committed:
        # the killed process committed after this one last saved: a save from here
        # would drop its update
        with pytest.raises(mc.StorageError) as e:
            s.save(path)
        assert e.value.field == "generation"
    else:
        s.save(path)
        assert torch.equal(_open(path, tiny_base).next_token_logits(), new)


def test_sigkill_inside_a_first_save(tiny_base, tmp_path):
    s = _session(tiny_base)
    s.ingest(_ids(300))
    path = tmp_path / "fresh"

    def run(conn):
        session_store._checkpoint = _pause_at(conn, "renamed")
        s.save(path)

    child = Child(run)
    assert child.recv() == ("at", "renamed")
    child.kill()
    with pytest.raises(mc.StorageError, match="interrupted") as e:
        _open(path, tiny_base)  # there was no session before, and none committed
    assert e.value.field == HEAD
    s.save(path)  # the folder is recognised as this format's: the save completes
    assert sorted(p.name for p in path.iterdir()) == [HEAD, MARKER, "v00000001"]
    assert torch.equal(_open(path, tiny_base).next_token_logits(), s.next_token_logits())


def test_a_killed_lock_holder_releases_the_lock(tiny_base, tmp_path):
    s = _session(tiny_base, lens=RuleScorer())
    s.ingest(_ids(300))
    path = tmp_path / "sess"
    s.save(path)

    def run(conn):
        session_store._checkpoint = _pause_at(conn, "locked")
        s.save(path)

    child = Child(run)
    assert child.recv() == ("at", "locked")
    t0 = time.monotonic()
    child.kill()
    s.save(path)  # the kernel dropped the dead process's flock
    assert time.monotonic() - t0 < 10
