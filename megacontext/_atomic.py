"""Atomic file and directory writes: write beside, fsync, rename into place.

A reader (or a crash) sees either the old file or the new one, never a torn one:

- :func:`atomic_write` / :func:`atomic_write_bytes` / :func:`atomic_write_text`: the
  new contents go to a temporary file in the target's directory (same file system,
  so the rename is atomic), which is fsynced, renamed over the target with
  ``os.replace``, and the directory fsynced so the rename itself survives a crash.
- :func:`atomic_replace_dir`: a whole directory is filled in a temporary sibling,
  every file in it fsynced, then renamed into place; an existing target is moved
  aside first and put back if the swap fails.

On any failure the temporary file or directory is removed and the target is left as
it was. New files get mode ``0o644`` and new directories ``0o777 & ~umask`` (the
temporary ones ``tempfile`` makes are private to the owner; these are meant to be
shared like any file the process writes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "atomic_replace_dir",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_dir",
    "fsync_tree",
]

FILE_MODE = 0o644


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file and directory under ``root`` (``root`` included)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(dirpath)


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], object]) -> Path:
    """Replace ``path`` by what ``write(tmp)`` writes to the temporary path ``tmp``
    (any writer that takes a file name: ``pq.write_table(t, tmp)``,
    ``fig.savefig(tmp)``, ``safetensors.torch.save_file(d, tmp)``, ...). The parent
    directory must exist. Returns ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replace ``path`` by ``data`` atomically (see :func:`atomic_write`)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Replace ``path`` by ``text`` (encoded with ``encoding``) atomically."""
    return atomic_write_bytes(path, text.encode(encoding))


def _dir_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def atomic_replace_dir(
    target: str | os.PathLike[str], fill: Callable[[Path], object], *, overwrite: bool = True
) -> Path:
    """Create directory ``target`` atomically: ``fill(tmp)`` writes its contents into
    an empty temporary sibling ``tmp``, every file is fsynced, then ``tmp`` is renamed
    to ``target`` and the parent fsynced.

    ``overwrite``: an existing ``target`` is renamed aside, the new one renamed in
    (the old one is put back if that fails) and the old one removed. Without it the
    final rename fails with ``OSError`` when ``target`` exists and is not empty (the
    caller decides what that means, e.g. another process won a race)."""
    target = Path(os.path.abspath(os.fspath(target)))
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        fill(tmp)
        os.chmod(tmp, _dir_mode())
        fsync_tree(tmp)
        if overwrite and os.path.lexists(target):
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            os.rename(target, aside / target.name)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(aside / target.name, target)  # put the old one back
                os.rmdir(aside)
                raise
            fsync_dir(parent)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, target)
            fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
