"""The on-disk format of a saved session: write a session directory, read and check it.

Layout of a session directory (format 2; ``docs/reliability.md`` states the guarantees)::

    megacontext-session.lock   marker (this folder is a saved session) and lock file
    HEAD.json                  the committed version: format, generation, commit id,
                               version folder, size and CRC-32 of its session.json
    v00000007/                 the committed version
        session.json           config, base name, counters, module record, and the
                               size and CRC-32 of every other file of the version
        state.safetensors      WC levels/nodes, allocator state, KV rows, next logits
        tree/                  the MegaContextTree (docs/storage.md)
        gistnet.safetensors    only when the session ran a GistNet that can save
        lensnet.safetensors    only when the session ran a LensNet that can save

A save writes the new version into ``.v<gen>.tmp-*`` inside the directory, fsyncs it,
renames it to ``v<gen>``, then replaces ``HEAD.json`` atomically (temp file, fsync,
``os.replace``, fsync of the directory) and only then removes the previous version.
A reader therefore sees the old or the new version whatever point a save is killed
at. Leftovers of killed saves (``.v*.tmp-*``, ``.HEAD.json.*.tmp``, version folders
``HEAD.json`` does not name) are removed by the next save or open.

Concurrency: a save holds an exclusive ``flock`` on the lock file for its whole
duration, an open a shared one while it reads; each waits up to ``LOCK_TIMEOUT_S``
seconds, then raises ``StorageError(field="lock")``. Every commit gets a fresh random
id; a session remembers the id it opened or last saved at a path, and a save to that
path whose ``HEAD.json`` names another id (someone else saved there since) is refused
with ``StorageError(field="generation")`` instead of silently dropping their update.

Format 1 (one flat folder with ``session.json`` at the top, no checksums, no lock) is
still read, and a save over a format-1 folder converts it in place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._atomic import atomic_write_bytes, fsync_dir, fsync_tree
from .config import MegaContextConfig
from .errors import ConfigError, StorageError
from .gistnet import GistNet
from .lensnet import LensNet
from .tree import MegaContextTree

__all__ = [
    "FORMAT_VERSION",
    "LOCK_TIMEOUT_S",
    "MARKER",
    "Commit",
    "StoredSession",
    "read_session",
    "session_key",
    "write_session",
]

FORMAT_NAME = "megacontext-session"
FORMAT_VERSION = 2
MARKER = "megacontext-session.lock"
HEAD = "HEAD.json"
META = "session.json"
STATE = "state.safetensors"
MODULES = ("gistnet", "lensnet")
# Seconds a save or an open waits for another process's save (or open) of the same
# directory before raising StorageError(field="lock").
LOCK_TIMEOUT_S = 30.0
# What a format-1 session folder may hold (anything else: not ours to replace).
_LEGACY_NAMES = frozenset({META, STATE, "tree", "gistnet.safetensors", "lensnet.safetensors"})
_VERSION_RE = re.compile(r"^v\d{8,}$")
# temp names of a killed save: the version being written, and HEAD.json's temp file
# (megacontext._atomic names it ".HEAD.json.<random>.tmp")
_TMP_RE = re.compile(r"^\.v\d{8,}\.tmp-[A-Za-z0-9_]+$|^\.HEAD\.json\.[A-Za-z0-9_]+\.tmp$")
_CHUNK = 16 << 20


def _checkpoint(point: str) -> None:
    """Called at the named points of a save: ``locked``, ``written`` (the new version
    is complete in its temp folder), ``renamed`` (it is ``v<gen>``, HEAD not yet
    swapped), ``committed`` (HEAD names it), ``cleaned``. A no-op: the crash tests
    replace it in a child process to stop there and be killed."""


def _err(path: str | os.PathLike[str], field_: str, message: str) -> StorageError:
    return StorageError(f"{path}: {message}", path=os.fspath(path), field=field_)


def session_key(path: str | os.PathLike[str]) -> str:
    """The key a session remembers its commit under: the resolved absolute path."""
    return str(Path(path).resolve())


@dataclass(frozen=True)
class Commit:
    """What one save committed: ``generation`` counts saves into this directory,
    ``commit`` is a random id unique to this save."""

    path: Path
    generation: int
    commit: str


# ------------------------------------------------------------------------ checksums


def file_checksum(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"size": bytes, "crc32": "8 hex digits"}`` of a file, read in 16 MiB chunks.

    CRC-32 (zlib, ~2 GB/s on one core) rather than SHA-256 (~1.2 GB/s): the checksum
    lives next to the data, so it guards against accidents (torn writes, bit rot,
    truncation, a stray edit), not against someone who can rewrite both, and CRC-32
    catches every burst error up to 32 bits and any other with probability
    1 - 2^-32.
    """
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": f"{crc:08x}"}


def _checksums(directory: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            full = Path(root) / name
            out[full.relative_to(directory).as_posix()] = file_checksum(full)
    return out


def _verify(directory: Path, files: dict[str, Any], meta_path: Path) -> None:
    root = directory.resolve()
    for rel, want in files.items():
        full = directory / rel
        if not full.is_file():
            raise _err(full, rel, f"missing: {meta_path} lists it")
        if not full.resolve().is_relative_to(root):
            raise _err(full, rel, f"a link out of the session folder {root}; refusing it")
        got = file_checksum(full)
        if got["size"] != want["size"]:
            raise _err(
                full, rel, f"truncated or grown: {got['size']} bytes, {META} says {want['size']}"
            )
        if got["crc32"] != want["crc32"]:
            raise _err(
                full, rel, f"corrupt: CRC-32 {got['crc32']}, {META} recorded {want['crc32']}"
            )


# ------------------------------------------------------------------------ files


def _read_json(path: Path, field_: str) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise _err(path, field_, "missing") from None
    except OSError as e:
        raise _err(path, field_, f"unreadable ({e.strerror})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _err(path, field_, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise _err(path, field_, f"invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise _err(path, field_, f"top level is a JSON {type(data).__name__}, not an object")
    return data


@contextlib.contextmanager
def _locked(directory: Path, exclusive: bool, timeout: float) -> Iterator[None]:
    """Hold ``flock`` on the directory's lock file (the writer creates it)."""
    lock = directory / MARKER
    flags = os.O_NOFOLLOW | (os.O_RDWR | os.O_CREAT if exclusive else os.O_RDONLY)
    try:
        fd = os.open(lock, flags, 0o644)
    except OSError as e:
        raise _err(lock, "lock", f"cannot open the lock file ({e.strerror})") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    what = "saving or opening" if exclusive else "saving"
                    raise _err(
                        lock,
                        "lock",
                        f"another process (or session) is {what} this session; gave up "
                        f"after {timeout:g} s",
                    ) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # releases the lock


def _is_legacy(directory: Path) -> bool:
    """A format-1 session: ``session.json`` with ``format: 1`` and nothing foreign."""
    meta = directory / META
    if not meta.is_file():
        return False
    try:
        data = json.loads(meta.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(data, dict) or data.get("format") != 1:
        return False
    return all(name in _LEGACY_NAMES for name in os.listdir(directory))


def _classify(path: Path) -> str:
    """``absent``, ``empty``, ``session`` (has the marker), ``legacy``, ``file`` or
    ``other`` (a folder that is not a saved session)."""
    if not os.path.lexists(path):
        return "absent"
    if not path.is_dir():
        return "file"
    if (path / MARKER).is_file() and not (path / MARKER).is_symlink():
        return "session"
    if not os.listdir(path):
        return "empty"
    return "legacy" if _is_legacy(path) else "other"


def _clean(directory: Path, keep: str | None) -> None:
    """Remove what killed saves left behind (only names of this format's own making)."""
    for name in os.listdir(directory):
        full = directory / name
        stale = _TMP_RE.match(name) is not None or (
            _VERSION_RE.match(name) is not None and name != keep
        )
        if keep is not None and name in _LEGACY_NAMES:
            stale = True  # format-1 files of a folder converted by a save
        if not stale:
            continue
        if full.is_dir() and not full.is_symlink():
            shutil.rmtree(full, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                full.unlink()


@dataclass
class _Head:
    generation: int
    commit: str
    version: str
    meta_size: int
    meta_crc32: str


def _read_head(directory: Path) -> _Head | None:
    path = directory / HEAD
    if not os.path.lexists(path):
        return None
    data = _read_json(path, HEAD)
    if data.get("format") != FORMAT_NAME:
        raise _err(path, "format", f"{data.get('format')!r} is not {FORMAT_NAME!r}")
    if data.get("format_version") != FORMAT_VERSION:
        raise _err(
            path,
            "format_version",
            f"session format {data.get('format_version')!r} is not supported "
            f"(this megacontext reads formats 1 and {FORMAT_VERSION})",
        )
    gen, commit, version = data.get("generation"), data.get("commit"), data.get("version")
    meta = data.get(META)
    if not _is_int(gen) or gen < 1:
        raise _err(path, "generation", f"{gen!r} is not a positive integer")
    if not isinstance(commit, str) or not commit:
        raise _err(path, "commit", f"{commit!r} is not a commit id")
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise _err(path, "version", f"{version!r} is not a version folder name")
    if not (isinstance(meta, dict) and _is_int(meta.get("size")) and _is_crc(meta.get("crc32"))):
        raise _err(path, META, f"{meta!r} is not {{size, crc32}}")
    return _Head(gen, commit, version, meta["size"], meta["crc32"])


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_crc(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[0-9a-f]{8}", v) is not None


# ------------------------------------------------------------------------ write


def write_session(
    path: str | os.PathLike[str],
    *,
    tree: MegaContextTree,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    modules: dict[str, Any],
    expect_commit: str | None = None,
    lock_timeout: float | None = None,
) -> Commit:
    """Save a session into directory ``path`` as a new committed version.

    ``path`` must be absent, an empty folder, or a saved session (format 2, or format 1
    which is converted); anything else (a regular file, a folder of other files) is
    refused with ``StorageError(field="path")`` and left untouched. ``expect_commit``:
    the commit id this session last read or wrote at ``path`` (``None``: it has not);
    a different committed id raises ``StorageError(field="generation")``.
    ``modules``: ``{"gistnet": module or None, "lensnet": ...}``; a module with a
    ``save`` method is written, one without is recorded as ``unsaved`` (``open`` then
    asks for it) and ``None`` as ``none``.
    """
    from safetensors.torch import save_file

    timeout = LOCK_TIMEOUT_S if lock_timeout is None else lock_timeout
    target = Path(os.path.abspath(os.fspath(path)))
    kind = _classify(target)
    if kind == "file":
        raise _err(target, "path", "is a file, not a session directory; refusing to replace it")
    if kind == "other":
        if _is_legacy_meta(target):
            foreign = sorted(n for n in os.listdir(target) if n not in _LEGACY_NAMES)
            raise _err(
                target,
                "path",
                f"is a format-1 session folder that also holds {foreign}; refusing to "
                "replace them: save into a new or empty folder",
            )
        raise _err(
            target,
            "path",
            f"is a folder that is not a saved session (no {MARKER}); refusing to "
            "replace what it holds: save into a new or empty folder",
        )
    target.mkdir(parents=True, exist_ok=True)
    with _locked(target, exclusive=True, timeout=timeout):
        _checkpoint("locked")
        # An unreadable HEAD.json (corrupt, or a newer format) raises: a session this
        # version cannot read is not replaced.
        head = _read_head(target)
        # No committed session there (the folder was emptied or removed): nobody's
        # update can be lost.
        if expect_commit is not None and head is not None and head.commit != expect_commit:
            raise _err(
                target / HEAD,
                "generation",
                f"stale save refused: this session was read or last saved at commit "
                f"{expect_commit}, but the directory now holds generation "
                f"{head.generation} (commit {head.commit}: another writer saved since); "
                "open it again, or save to another path",
            )
        _clean(target, keep=head.version if head else None)
        gen = (head.generation if head else 0) + 1
        version = f"v{gen:08d}"
        commit = uuid.uuid4().hex
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=target))
        final = target / version
        committed = False
        try:
            tree.save(tmp / "tree")
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / STATE)
            )
            record = {}
            for name in MODULES:
                module = modules.get(name)
                if module is None:
                    record[name] = "none"
                elif callable(getattr(module, "save", None)):
                    module.save(tmp / f"{name}.safetensors")
                    record[name] = "saved"
                else:
                    record[name] = "unsaved"
            fsync_tree(tmp)
            files = _checksums(tmp)
            full_meta = {"format": FORMAT_VERSION, **meta, "modules": record, "files": files}
            meta_bytes = json.dumps(full_meta, indent=1).encode("utf-8") + b"\n"
            with open(tmp / META, "wb") as f:
                f.write(meta_bytes)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            _checkpoint("written")
            os.rename(tmp, final)
            fsync_dir(target)
            _checkpoint("renamed")
            head_data = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "generation": gen,
                "commit": commit,
                "version": version,
                META: {"size": len(meta_bytes), "crc32": f"{zlib.crc32(meta_bytes):08x}"},
            }
            atomic_write_bytes(target / HEAD, json.dumps(head_data, indent=1).encode() + b"\n")
            committed = True
            _checkpoint("committed")
        finally:
            if not committed:
                shutil.rmtree(tmp, ignore_errors=True)
                # HEAD.json may already name the new version (its replace succeeded,
                # the fsync after it failed): then it is the session, keep it
                with contextlib.suppress(StorageError):
                    now = _read_head(target)
                    committed = now is not None and now.version == version
                if not committed:
                    shutil.rmtree(final, ignore_errors=True)
        _clean(target, keep=version)
        _checkpoint("cleaned")
    return Commit(target, gen, commit)


# ------------------------------------------------------------------------ read


@dataclass
class StoredSession:
    """A saved session read into memory and checked on its own (the checks that need
    the base model are :meth:`check_state`'s).

    ``meta`` is session.json; ``tensors`` state.safetensors; ``modules`` the loaded
    GistNet/LensNet (``None`` when not loaded or not saved); ``module_record``
    ``{"gistnet": "saved" | "none" | "unsaved" | "unknown"}``.
    """

    path: Path
    meta_path: Path
    format_version: int
    commit: Commit | None
    meta: dict[str, Any]
    config: MegaContextConfig
    tree: MegaContextTree
    tensors: dict[str, torch.Tensor]
    modules: dict[str, Any] = field(default_factory=dict)
    module_record: dict[str, str] = field(default_factory=dict)

    @property
    def base_name(self) -> str:
        return self.meta["base"]

    def error(self, field_: str, message: str, file: str = STATE) -> StorageError:
        """A StorageError naming a file of this version (default state.safetensors)."""
        return _err(self.meta_path.parent / file, field_, message)

    def check_state(
        self, *, vocab_size: int, logits_size: int, kv_shape: tuple[int, ...], capacity: int
    ) -> None:
        """Check the state against the base model and the session's cache.

        ``kv_shape``: the cache's ``[L, 2, 1, H, capacity, hd]``; the stored rows must be
        ``[L, 2, 1, H, n, hd]`` with ``n = len(WC) <= capacity`` (``w_max + K``: a live
        session holds up to ``K`` decoded entries past ``w_max`` between refocuses).
        """
        t = self.tensors
        # in chunks: an int64 copy of a long history's ids would double its memory
        step = 1 << 24
        for start in range(0, self.tree.num_tokens, step):
            chunk = self.tree.tokens(start, min(self.tree.num_tokens, start + step))
            if int(chunk.max()) >= vocab_size:
                bad = start + int(torch.nonzero(chunk >= vocab_size)[0])
                raise self.error(
                    "tokens",
                    f"token {bad} has id {int(chunk[bad - start])}, outside the vocabulary "
                    f"(0..{vocab_size - 1})",
                    file="tree/LOD0.ctx",
                )
        n = int(t["wc_levels"].shape[0])
        if n > capacity:
            raise self.error(
                "wc_levels",
                f"the working context has {n} entries, more than the cache's {capacity} "
                "(w_max + block_size) slots",
            )
        want = (*kv_shape[:4], n, kv_shape[5])
        kv = t["kv"]
        if tuple(kv.shape) != want:
            raise self.error(
                "kv", f"shape {tuple(kv.shape)}, expected {want} for this base and WC ({n})"
            )
        if not kv.is_floating_point() or not bool(torch.isfinite(kv).all()):
            raise self.error("kv", f"KV rows must be finite floats, got {kv.dtype} with NaN/inf")
        logits = t["next_logits"]
        if tuple(logits.shape) != (logits_size,) or not logits.is_floating_point():
            raise self.error(
                "next_logits",
                f"{logits.dtype} {tuple(logits.shape)}, expected float [{logits_size}]",
            )
        if not bool(torch.isfinite(logits).all()):
            raise self.error("next_logits", "holds NaN or inf")


_TENSOR_RULES = {
    "wc_levels": 1,
    "wc_nodes": 1,
    "allocator_state": 1,
    "kv": 6,
    "next_logits": 1,
}


def read_session(
    path: str | os.PathLike[str],
    *,
    load_modules: dict[str, bool] | None = None,
    lock_timeout: float | None = None,
) -> StoredSession:
    """Read and check a saved session directory (any format this version knows).

    Checked, each failure a ``StorageError`` naming the file and field: the marker and
    ``HEAD.json`` (format, generation, commit), the size and CRC-32 of session.json
    and of every file it lists (a missing listed file is an error: a module file
    included), session.json's fields and the config, state.safetensors' tensors
    (names, ranks, integer/float kinds), the tree's own checks
    (:func:`megacontext.storage.open_tree`) and the counts against session.json, and
    the allocator state against its caps. ``load_modules``: which of GistNet and
    LensNet to load from their files (default both, when saved).
    """
    timeout = LOCK_TIMEOUT_S if lock_timeout is None else lock_timeout
    want = {name: True for name in MODULES} | dict(load_modules or {})
    target = Path(os.path.abspath(os.fspath(path)))
    kind = _classify(target)
    if kind == "absent":
        raise _err(target, "path", f"no such session directory (no {HEAD} or {META})")
    if kind == "file":
        raise _err(target, "path", "is a file, not a session directory")
    if kind != "session":
        legacy = target / META
        if not legacy.is_file():
            raise _err(target, "path", f"not a saved session (no {MARKER}, {HEAD} or {META})")
        # session.json at the top: format 1 (files a user added beside it are ignored)
        data = _read_json(legacy, META)
        if data.get("format") == 1:
            return _read_version(target, target, 1, None, want)
        if data.get("format") == FORMAT_VERSION and (target.parent / MARKER).is_file():
            raise _err(
                target,
                "path",
                f"is a version folder inside the saved session {target.parent}; open that",
            )
        raise _err(
            legacy,
            "format",
            f"unknown session format {data.get('format')!r} (this megacontext reads "
            f"formats 1 and {FORMAT_VERSION})",
        )
    with _locked(target, exclusive=False, timeout=timeout):
        head = _read_head(target)
        if head is None:
            if _is_legacy_meta(target):
                return _read_version(target, target, 1, None, want)
            raise _err(
                target / HEAD,
                HEAD,
                "missing: no session was ever committed here (the first save into this "
                "folder was interrupted)",
            )
        with contextlib.suppress(OSError):
            _clean(target, keep=head.version)
        version = target / head.version
        meta_path = version / META
        if not version.is_dir():
            raise _err(version, "version", f"missing: {HEAD} names it")
        if not meta_path.is_file():
            raise _err(meta_path, META, "missing")
        got = file_checksum(meta_path)
        if (got["size"], got["crc32"]) != (head.meta_size, head.meta_crc32):
            raise _err(
                meta_path,
                META,
                f"corrupt: {got['size']} bytes, CRC-32 {got['crc32']}; {HEAD} recorded "
                f"{head.meta_size} bytes, CRC-32 {head.meta_crc32}",
            )
        commit = Commit(target, head.generation, head.commit)
        return _read_version(target, version, FORMAT_VERSION, commit, want)


def _is_legacy_meta(directory: Path) -> bool:
    with contextlib.suppress(StorageError):
        return _read_json(directory / META, META).get("format") == 1
    return False


def _read_version(
    target: Path, version: Path, fmt: int, commit: Commit | None, want: dict[str, bool]
) -> StoredSession:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta_path = version / META
    meta = _read_json(meta_path, META)
    if meta.get("format") != fmt:
        raise _err(meta_path, "format", f"{meta.get('format')!r}, {HEAD} says format {fmt}")

    def need(name: str, kind: type | tuple[type, ...], check=None, what: str = "") -> Any:
        if name not in meta:
            raise _err(meta_path, name, "missing")
        value = meta[name]
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if ok and check is not None:
            ok = check(value)
        if not ok:
            raise _err(meta_path, name, f"{value!r} is not {what or kind}")
        return value

    files = meta.get("files") if fmt >= 2 else None
    if fmt >= 2:
        if not isinstance(files, dict) or not all(
            isinstance(k, str)
            and isinstance(v, dict)
            and _is_int(v.get("size"))
            and _is_crc(v.get("crc32"))
            for k, v in files.items()
        ):
            raise _err(meta_path, "files", "is not a map of file -> {size, crc32}")
        for rel in files:
            parts = Path(rel).parts
            if Path(rel).is_absolute() or ".." in parts:
                raise _err(meta_path, "files", f"{rel!r} leaves the version folder")
        _verify(version, files, meta_path)

    need("base", str, lambda v: bool(v), "a model name")
    cfg_data = need("config", dict, what="an object")
    try:
        config = MegaContextConfig(**cfg_data)
    except ConfigError as e:
        raise _err(meta_path, f"config.{e.field}", str(e)) from None
    except TypeError as e:
        raise _err(meta_path, "config", str(e)) from None
    need("allocator_backend", str, lambda v: v in ("auto", "python", "cpp", "cuda"), "a backend")
    nonneg = lambda v: v >= 0  # noqa: E731
    num_tokens = need("num_tokens", int, nonneg, "an integer >= 0")
    need("iteration", int, nonneg, "an integer >= 0")
    need("blocks_since_refocus", int, nonneg, "an integer >= 0")
    if meta.get("query_end") is not None:
        need("query_end", int, nonneg, "an integer >= 0")
    for flag in ("kv_sink", "focus_vetoed"):
        if flag in meta and not isinstance(meta[flag], bool):
            raise _err(meta_path, flag, f"must be true or false, got {meta[flag]!r}")
    if meta.get("kv_sink_position") is not None:
        need("kv_sink_position", int, nonneg, "an integer >= 0 or null")
    if meta.get("focus_feed_check") is not None:
        need("focus_feed_check", int, nonneg, "an integer >= 0 or null")
    if meta.get("focus_held") is not None:
        need(
            "focus_held",
            list,
            lambda v: all(_is_int(b) and 0 <= b * config.block_size < num_tokens for b in v),
            "a list of the history's block indices or null",
        )
    need(
        "residencies",
        list,
        lambda v: all(_is_int(r) and r >= 0 for r in v),
        "a list of integers >= 0",
    )
    caps = need(
        "allocator_caps",
        list,
        lambda v: (
            len(v) == config.levels + 1 and all(_is_int(c) and c >= 0 for c in v) and v[0] == 0
        ),
        f"a list of {config.levels + 1} integers >= 0 starting with 0",
    )
    if fmt >= 2:
        record = need(
            "modules",
            dict,
            lambda v: set(v) == set(MODULES)
            and all(s in ("saved", "none", "unsaved") for s in v.values()),
            "{gistnet, lensnet: saved | none | unsaved}",
        )
    else:
        # format 1 did not record it: a module file present was saved, else unknown
        record = {
            name: "saved" if (version / f"{name}.safetensors").is_file() else "unknown"
            for name in MODULES
        }

    state_path = version / STATE
    try:
        tensors = load_file(str(state_path))
    except FileNotFoundError:
        raise _err(state_path, STATE, "missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _err(state_path, STATE, f"unreadable safetensors ({e})") from None
    for name, rank in _TENSOR_RULES.items():
        if name not in tensors:
            raise _err(state_path, name, "missing tensor")
        if tensors[name].dim() != rank:
            raise _err(
                state_path,
                name,
                f"rank {tensors[name].dim()} (shape "
                f"{tuple(tensors[name].shape)}), expected {rank}",
            )
    for name in ("wc_levels", "wc_nodes", "allocator_state"):
        if tensors[name].is_floating_point() or tensors[name].dtype == torch.bool:
            raise _err(state_path, name, f"dtype {tensors[name].dtype}, expected integers")
    state = tensors["allocator_state"]
    if state.numel() != 1 + sum(caps):
        raise _err(
            meta_path,
            "allocator_caps",
            f"{caps} sum to {sum(caps)} slots, but allocator_state in {STATE} holds "
            f"{state.numel() - 1}",
        )
    state = state.to(torch.int64)
    if int(state[0]) < 0 or (state.numel() > 1 and int(state[1:].min()) < -1):
        raise _err(state_path, "allocator_state", "negative step or last-changed value")
    if state.numel() > 1 and int(state[1:].max()) >= int(state[0]):
        raise _err(state_path, "allocator_state", "a node changed at a step not yet taken")
    if tensors["wc_levels"].shape != tensors["wc_nodes"].shape:
        raise _err(state_path, "wc_nodes", "length differs from wc_levels")

    tree_dir = version / "tree"
    try:
        with MegaContextTree.open(tree_dir, mode="r") as disk:
            tree = disk.to_ram()
    except ConfigError as e:
        raise _err(tree_dir, e.field or "tree", str(e)) from None
    for name, got, exp in (
        ("num_tokens", tree.num_tokens, num_tokens),
        ("block_size", tree.block_size, config.block_size),
        ("levels", tree.levels, config.levels),
    ):
        if got != exp:
            raise _err(tree_dir, name, f"the tree has {got}, {META} says {exp}")
    if (meta.get("query_end") or 0) > num_tokens:
        raise _err(meta_path, "query_end", f"{meta['query_end']} is past the {num_tokens} tokens")

    modules: dict[str, Any] = {}
    for name in MODULES:
        file = version / f"{name}.safetensors"
        if record[name] == "saved" and want.get(name):
            if not file.is_file():
                raise _err(file, name, f"missing: {META} records the session ran a {name}")
            modules[name] = (GistNet if name == "gistnet" else LensNet).load(file)
    return StoredSession(
        path=target,
        meta_path=meta_path,
        format_version=fmt,
        commit=commit,
        meta=meta,
        config=config,
        tree=tree,
        tensors=tensors,
        modules=modules,
        module_record=record,
    )
