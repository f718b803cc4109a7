"""On-disk MegaContext trees: one memory-mapped file per level plus ``metadata.json``.

Layout of a tree directory (``docs/storage.md`` has the full description)::

    LOD0.ctx       64-byte header + packed uint32 token ids
    LOD1.ctx       64-byte header + packed [n1, d] gists (fp16 or bf16)
    ...            one file per level up to ``levels``
    metadata.json  format_version, levels, block_size, dim, dtype, model_name,
                   counts (the committed node count of every level)

Header (little-endian, 64 bytes)::

    off  size  field
    0    4     magic          uint32  0x4D434354 ("MCCT")
    4    2     version        uint16  1
    6    2     level          uint16
    8    2     block_size     uint16
    10   2     embedding_dim  uint16
    12   2     dtype_code     uint16  0 uint32 (LOD0), 1 fp16, 2 bf16
    14   32    model_name     char[32], NUL-terminated UTF-8
    46   18    reserved       zero

Row ``i`` of level ``l`` lies at ``64 + i * rowbytes``. The committed count of every
level lives in ``metadata.json`` only; bytes past it (a crashed append) are ignored
and overwritten by the next append. Appends write rows past the committed end
(``pwrite``), ``fsync`` each written file, then commit the counts by replacing
``metadata.json`` atomically (temp file, fsync, ``os.replace``, fsync of the
directory). A crash at any point leaves either the old or the new counts, and the
payload for the committed counts is on disk. Files never shrink.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._atomic import atomic_replace_dir, atomic_write_bytes
from .errors import ConfigError, StorageError

if TYPE_CHECKING:
    from .tree import MegaContextTree

__all__ = [
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "Header",
    "TreeFiles",
    "check_member",
    "open_tree",
    "read_header",
    "read_metadata",
    "save_tree",
]

MAGIC = 0x4D434354  # "MCCT" as a little-endian uint32
FORMAT_VERSION = 1
HEADER_SIZE = 64
METADATA = "metadata.json"
FORMAT_NAME = "megacontext-tree"
_MAX_LEVELS = 16  # the most gist levels metadata.json may declare
_HEADER = struct.Struct("<IHHHHH32s18s")
assert _HEADER.size == HEADER_SIZE

# dtype_code -> (name in metadata.json, numpy storage dtype, torch dtype)
DTYPE_CODES: dict[int, tuple[str, type, torch.dtype | None]] = {
    0: ("uint32", np.uint32, None),
    1: ("float16", np.float16, torch.float16),
    2: ("bfloat16", np.uint16, torch.bfloat16),  # raw bf16 bits, viewed by torch
}
_CODE_OF_TORCH = {torch.float16: 1, torch.bfloat16: 2}
_CODE_OF_NAME = {"float16": 1, "bfloat16": 2}


def level_file(level: int) -> str:
    return f"LOD{level}.ctx"


@dataclass(frozen=True)
class Header:
    """The 64-byte header of one ``LOD<l>.ctx`` file."""

    level: int
    block_size: int
    embedding_dim: int
    dtype_code: int
    model_name: str = ""
    version: int = FORMAT_VERSION
    magic: int = MAGIC

    def pack(self) -> bytes:
        name = self.model_name.encode("utf-8")
        if len(name) > 31:
            raise ConfigError(
                f"model_name {self.model_name!r} is {len(name)} UTF-8 bytes; at most 31 fit",
                field="model_name",
                value=self.model_name,
            )
        return _HEADER.pack(
            self.magic,
            self.version,
            self.level,
            self.block_size,
            self.embedding_dim,
            self.dtype_code,
            name,
            b"\0" * 18,
        )


def _err(path: str, field: str, message: str) -> StorageError:
    return StorageError(f"{path}: {field}: {message}", path=path, field=field)


def read_header(path: str) -> Header:
    """Read and check the header of ``path`` on its own (magic, version, dtype code,
    model name encoding, reserved bytes). Agreement with ``metadata.json`` is
    checked by :func:`open_tree`."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
    except FileNotFoundError:
        raise _err(path, "file", "level file is missing") from None
    return _parse_header(path, raw)


def _parse_header(path: str, raw: bytes) -> Header:
    if len(raw) < HEADER_SIZE:
        raise _err(path, "header", f"truncated: {len(raw)} of {HEADER_SIZE} header bytes")
    magic, version, level, bs, dim, code, name, reserved = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise _err(path, "magic", f"0x{magic:08X} is not 0x{MAGIC:08X} ('MCCT')")
    if version != FORMAT_VERSION:
        raise _err(path, "version", f"unknown format version {version} (this build reads 1)")
    if code not in DTYPE_CODES:
        raise _err(path, "dtype_code", f"unknown dtype code {code} (0 uint32, 1 fp16, 2 bf16)")
    if b"\0" not in name:
        raise _err(path, "model_name", "not NUL-terminated within 32 bytes")
    try:
        model_name = name.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        raise _err(path, "model_name", f"not valid UTF-8: {name!r}") from None
    if reserved != b"\0" * 18:
        raise _err(path, "reserved", "reserved header bytes 46..63 are not zero")
    return Header(level, bs, dim, code, model_name, version, magic)


def check_member(directory: str, file: str, writable: bool = False) -> None:
    """Refuse a tree file that leads out of ``directory``.

    A symbolic link whose target resolves outside the tree directory is a
    :class:`StorageError` (``field="link"``): reading it would read a foreign file, and
    an append would grow it. With ``writable`` (an ``r+`` open), a file with more than
    one hard link is refused too: an append through it would change the other name's
    content as well. A link that stays inside the directory is followed.
    """
    try:
        st = os.lstat(file)
    except FileNotFoundError:
        return  # the caller reports the missing file with its own words
    if os.path.islink(file):
        root = os.path.realpath(directory)
        target = os.path.realpath(file)
        if os.path.commonpath([root, target]) != root:
            raise _err(
                file, "link", f"symbolic link to {target}, outside the tree directory {root}"
            )
        st = os.stat(file)
    if writable and st.st_nlink > 1:
        raise _err(
            file,
            "link",
            f"has {st.st_nlink} hard links: an append would also change the other names; "
            "copy the tree (MegaContextTree.save) to append to it",
        )


def read_metadata(directory: str) -> dict[str, Any]:
    """Read and check ``metadata.json`` of a tree directory on its own."""
    path = os.path.join(directory, METADATA)
    check_member(directory, path)
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise _err(path, "file", "metadata.json is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _err(path, "json", f"not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise _err(path, "json", f"top level is {type(meta).__name__}, not an object")

    def need(field: str, kind: type | tuple[type, ...]) -> Any:
        if field not in meta:
            raise _err(path, field, "missing")
        value = meta[field]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise _err(path, field, f"{value!r} is not {getattr(kind, '__name__', kind)}")
        return value

    if need("format", str) != FORMAT_NAME:
        raise _err(path, "format", f"{meta['format']!r} is not {FORMAT_NAME!r}")
    if need("format_version", int) != FORMAT_VERSION:
        raise _err(path, "format_version", f"unknown format version {meta['format_version']}")
    levels = need("levels", int)
    bs = need("block_size", int)
    dim = need("dim", int)
    for field, value, lo, hi in (
        ("levels", levels, 1, _MAX_LEVELS),
        ("block_size", bs, 2, 65535),
        ("dim", dim, 1, 65535),
    ):
        if not lo <= value <= hi:
            raise _err(path, field, f"{value} is outside [{lo}, {hi}]")
    if need("dtype", str) not in _CODE_OF_NAME:
        raise _err(path, "dtype", f"unknown dtype {meta['dtype']!r} (float16 or bfloat16)")
    need("model_name", str)
    counts = need("counts", list)
    if len(counts) != levels + 1 or not all(
        isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts
    ):
        raise _err(path, "counts", f"{counts!r} is not {levels + 1} non-negative integers")
    expect = [counts[0] // bs**lvl for lvl in range(levels + 1)]
    if counts != expect:
        raise _err(path, "counts", f"{counts} disagree with {counts[0]} tokens: expected {expect}")
    return meta


def _write_metadata(directory: str, meta: dict[str, Any]) -> None:
    """Replace ``metadata.json`` atomically: temp file, fsync, rename, fsync dir."""
    atomic_write_bytes(
        os.path.join(directory, METADATA), json.dumps(meta, indent=2).encode("utf-8") + b"\n"
    )


class _FileLevel:
    """One level file: reads through a memmap, writes through ``pwrite``.

    ``count`` rows are committed. The memmap covers ``mapped`` rows (>= count once
    remapped); an append in progress writes rows past ``count`` and remaps lazily so
    the level above can read them back.
    """

    def __init__(
        self,
        path: str,
        level: int,
        dim: int,
        np_dtype: type,
        count: int,
        mode: str,
        fd: int | None = None,
    ):
        self.path = path
        self.row_shape: tuple[int, ...] = () if level == 0 else (dim,)
        self.np_dtype = np.dtype(np_dtype)
        self.rowbytes = self.np_dtype.itemsize * (1 if level == 0 else dim)
        self.count = count
        self.mode = mode
        self.fd: int | None = None
        self._mm: np.ndarray | None = None
        self._mapped = 0
        self.dirty = False
        if mode == "r+":
            self.fd = fd if fd is not None else os.open(path, os.O_RDWR)
        self._remap(count)

    def _remap(self, rows: int) -> None:
        if rows == 0:
            self._mm = np.zeros((0, *self.row_shape), self.np_dtype)
        else:
            # 'c' (private copy-on-write) for read-only trees: a stray write through a
            # torch view then changes a private page instead of faulting.
            self._mm = np.memmap(
                self.path,
                dtype=self.np_dtype,
                mode="r+" if self.mode == "r+" else "c",
                offset=HEADER_SIZE,
                shape=(rows, *self.row_shape),
            )
        self._mapped = rows

    def view(self) -> np.ndarray:
        if self._mapped < self.count:
            self._remap(self.count)
        assert self._mm is not None
        return self._mm[: self.count]

    def rows(self, start: int, end: int) -> np.ndarray:
        if end > self._mapped:
            self._remap(max(end, self.count))
        assert self._mm is not None
        return self._mm[start:end]

    def write(self, start: int, data: np.ndarray) -> None:
        assert self.fd is not None
        data = np.ascontiguousarray(data, dtype=self.np_dtype)
        buf = memoryview(data).cast("B")
        offset = HEADER_SIZE + start * self.rowbytes
        done = 0
        while done < len(buf):
            done += os.pwrite(self.fd, buf[done:], offset + done)
        if start + len(data) > self.count:
            self.dirty = True

    def prepare(self, count: int) -> None:
        """Before committing ``count`` rows: make the rows written so far durable.

        Files never shrink: a stale tail (a crashed or failed append, rows dropped by
        ``truncate``) stays past the committed count, ignored, until an append
        overwrites it. Never cutting a file keeps every page that any process has
        mapped (a reader, a view handed out earlier) backed by the file: reading a
        mapped page past the end of a file is SIGBUS.
        """
        assert self.fd is not None
        os.fsync(self.fd)

    def commit(self, count: int) -> None:
        self.count = count
        self.dirty = False

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class TreeFiles:
    """The open files of an on-disk tree and its commit protocol."""

    def __init__(self, path: str, meta: dict[str, Any], levels: list[_FileLevel], mode: str):
        self.path = path
        self.meta = meta
        self.levels = levels
        self.mode = mode

    @property
    def writable(self) -> bool:
        return self.mode == "r+" and self.levels[0].fd is not None

    def commit(self, counts: list[int]) -> None:
        """Make the rows written past the old counts durable, then publish ``counts``.

        A level that shrinks (``truncate``) only changes ``metadata.json``: its file
        keeps the old rows as an ignored tail, so a crash on either side of the
        commit finds every committed row on disk.
        """
        for lvl, count in zip(self.levels, counts, strict=True):
            if lvl.dirty and count > lvl.count:
                lvl.prepare(count)
        meta = dict(self.meta, counts=list(counts))
        _write_metadata(self.path, meta)
        self.meta = meta
        for lvl, count in zip(self.levels, counts, strict=True):
            lvl.commit(count)

    def sync(self, level: int) -> None:
        fd = self.levels[level].fd
        assert fd is not None
        os.fsync(fd)

    def close(self) -> None:
        # closing LOD0's descriptor releases the writer lock
        for lvl in self.levels:
            lvl.close()


def open_tree(path: str | os.PathLike[str], mode: str = "r+") -> TreeFiles:
    """Open a tree directory: check ``metadata.json`` and every header, map the files.

    O(1) in the tree size: reads the metadata and 64 bytes per level, and maps the
    payloads without reading them. ``mode='r+'`` takes an exclusive ``flock`` on
    ``LOD0.ctx`` (one writer at a time); ``mode='r'`` takes no lock.
    """
    if mode not in ("r", "r+"):
        raise ConfigError(f"mode must be 'r' or 'r+', got {mode!r}", field="mode", value=mode)
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise _err(directory, "path", "not a tree directory (no such directory)")
    for level in range(_MAX_LEVELS + 1):
        # before anything is opened for writing: the lock opens LOD0.ctx read-write
        check_member(directory, os.path.join(directory, level_file(level)), mode == "r+")
    # lock before reading metadata.json, so no other writer commits after we read it
    lock_fd = _lock_writer(directory) if mode == "r+" else None
    opened: list[_FileLevel] = []
    try:
        meta = read_metadata(directory)
        meta_path = os.path.join(directory, METADATA)
        levels, counts = meta["levels"], meta["counts"]
        gist_code = _CODE_OF_NAME[meta["dtype"]]
        for level in range(levels + 1):
            file = os.path.join(directory, level_file(level))
            try:
                fd = os.open(file, os.O_RDONLY)
            except FileNotFoundError:
                raise _err(
                    file, "file", f"level file is missing ({meta_path} has levels={levels})"
                ) from None
            try:
                header = _parse_header(file, os.pread(fd, HEADER_SIZE, 0))
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            code = 0 if level == 0 else gist_code
            for field, got, want in (
                ("level", header.level, level),
                ("block_size", header.block_size, meta["block_size"]),
                ("embedding_dim", header.embedding_dim, meta["dim"]),
                ("dtype_code", header.dtype_code, code),
                ("model_name", header.model_name, meta["model_name"]),
            ):
                if got != want:
                    raise _err(file, field, f"header has {got!r}, {meta_path} says {want!r}")
            name, np_dtype, _ = DTYPE_CODES[code]
            rowbytes = np.dtype(np_dtype).itemsize * (1 if level == 0 else meta["dim"])
            held = (size - HEADER_SIZE) // rowbytes
            if held < counts[level]:
                raise _err(
                    file,
                    "counts",
                    f"truncated: holds {held} complete {name} rows of {rowbytes} bytes, "
                    f"{meta_path} commits {counts[level]}",
                )
            fd_in = lock_fd if level == 0 else None
            opened.append(
                _FileLevel(file, level, meta["dim"], np_dtype, counts[level], mode, fd_in)
            )
            if level == 0:
                lock_fd = None  # closed (and the lock released) by the level from now on
        if mode == "r+":
            # metadata temp files of commits killed before their rename: never data
            for name in os.listdir(directory):
                if name.startswith(".metadata.") and name.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(directory, name))
    except BaseException:
        for lvl in opened:
            lvl.close()
        if lock_fd is not None:
            os.close(lock_fd)
        raise
    return TreeFiles(directory, meta, opened, mode)


def _lock_writer(directory: str) -> int | None:
    """Open ``LOD0.ctx`` read-write and take the exclusive writer ``flock`` on it.

    Returns the descriptor (``None`` when the file is missing: the checks that
    follow report that). The lock lives as long as the descriptor (``close()`` or
    process exit, a SIGKILL included).
    """
    file = os.path.join(directory, level_file(0))
    try:
        fd = os.open(file, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise _err(
            file,
            "lock",
            "another writer (a process or tree object) holds this tree open in mode r+",
        ) from None
    return fd


def _metadata_of(tree: MegaContextTree) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "levels": tree.levels,
        "block_size": tree.block_size,
        "dim": tree.dim,
        "dtype": DTYPE_CODES[_CODE_OF_TORCH[tree.dtype]][0],
        "model_name": tree.model_name,
        "counts": [tree.num_nodes(lvl) for lvl in range(tree.levels + 1)],
    }


# Bytes copied per write when saving, so saving a memory-mapped tree stays bounded.
_COPY_CHUNK = 64 << 20


def save_tree(tree: MegaContextTree, path: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Write ``tree`` as a new directory ``path``, atomically.

    Everything is written and fsynced in a temporary directory next to ``path``,
    which is then renamed to ``path``. An existing non-empty ``path`` is an error
    unless ``overwrite`` (then the old directory is renamed aside, the new one
    renamed in, and the old one removed).
    """
    if tree.dtype not in _CODE_OF_TORCH:
        raise ConfigError(
            f"dtype {tree.dtype} cannot be stored: the format's dtype codes are "
            "0 uint32 (ids), 1 fp16, 2 bf16",
            field="dtype",
            value=tree.dtype,
        )
    target = os.path.abspath(os.fspath(path))
    if tree.path is not None and os.path.exists(target) and os.path.samefile(tree.path, target):
        raise _err(target, "path", "cannot save a tree over its own directory")
    exists = os.path.lexists(target)
    if exists and not (os.path.isdir(target) and not os.listdir(target)) and not overwrite:
        raise _err(target, "path", "already exists (pass overwrite=True to replace it)")
    code = _CODE_OF_TORCH[tree.dtype]

    def fill(tmp: Any) -> None:
        for level in range(tree.levels + 1):
            header = Header(
                level, tree.block_size, tree.dim, 0 if level == 0 else code, tree.model_name
            )
            data = tree._levels[level].view()
            flat = data.reshape(-1).view(np.uint8) if data.size else np.zeros(0, np.uint8)
            with open(os.path.join(tmp, level_file(level)), "wb") as f:
                f.write(header.pack())
                for i in range(0, flat.size, _COPY_CHUNK):
                    f.write(np.ascontiguousarray(flat[i : i + _COPY_CHUNK]).data)
        _write_metadata(str(tmp), _metadata_of(tree))

    # the checks above allow an existing target only when it may be replaced
    atomic_replace_dir(target, fill, overwrite=True)
