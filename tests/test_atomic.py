"""The one atomic-write helper: whole or untouched, nothing left behind."""

from __future__ import annotations

import os
import stat

import pytest

from megacontext import _atomic
from megacontext._atomic import (
    atomic_replace_dir,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
)


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_write_replaces_whole_and_is_shared_readable(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")
    atomic_write_bytes(path, b"new bytes")
    assert path.read_bytes() == b"new bytes"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert _leftovers(tmp_path) == []


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write_bytes(path, b"old")

    def broken(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_write_fsyncs_the_file_and_its_directory(tmp_path, monkeypatch):
    synced: list[bool] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(_atomic.os, "fsync", spy)
    atomic_write_text(tmp_path / "x", "y")
    assert synced == [False, True]


def test_replace_dir_swaps_and_restores(tmp_path):
    target = tmp_path / "d"

    def fill(text: str):
        def f(tmp) -> None:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f.txt").write_text(text)

        return f

    atomic_replace_dir(target, fill("one"))
    assert (target / "sub" / "f.txt").read_text() == "one"
    atomic_replace_dir(target, fill("two"))
    assert (target / "sub" / "f.txt").read_text() == "two"
    assert _leftovers(tmp_path) == []

    def broken(tmp) -> None:
        (tmp / "partial").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_replace_dir(target, broken)
    assert sorted(p.name for p in target.iterdir()) == ["sub"]
    assert _leftovers(tmp_path) == []


def test_replace_dir_without_overwrite_refuses_a_full_target(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "keep").write_text("mine")
    with pytest.raises(OSError):
        atomic_replace_dir(target, lambda tmp: (tmp / "new").write_text("x"), overwrite=False)
    assert sorted(p.name for p in target.iterdir()) == ["keep"]
    assert _leftovers(tmp_path) == []
