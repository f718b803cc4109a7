"""The MegaContext tree: LOD0 token ids and LOD1..LODL gist vectors of the whole history.

Addressing is arithmetic, with no Python object per node. With block size ``bs``
(32 by default), node ``b`` at level ``l`` covers the tokens
``[b * bs**l, (b + 1) * bs**l)``:

* LOD0 holds token ids, one per token (``num_tokens`` of them);
* LOD1 holds one gist per complete block of ``bs`` tokens:
  ``g1[b] = gistnet(embed(ids[b*bs : (b+1)*bs]))``, ``[d]``;
* LOD(l+1) holds one gist per complete group of ``bs`` LOD(l) gists:
  ``g(l+1)[b] = gistnet(g(l)[b*bs : (b+1)*bs])``.

Only complete nodes exist at levels >= 1 (``num_nodes(l) = num_tokens // bs**l``);
the partial tail stays LOD0 until it completes. Gists are stored data in the tree's
``dtype`` (fp16 or bf16; fp32 in RAM only): they are computed under ``torch.no_grad()``
in batches of many blocks per ``gistnet`` call, and LOD(l+1) is computed from the
*stored* (cast) LOD(l) gists, so a tree's content does not depend on how its tokens
were chunked into ``append`` calls.

A tree lives in RAM (``MegaContextTree(dim, ...)``) or on disk
(``MegaContextTree.open(path)``, memory-mapped, see :mod:`megacontext.storage` and
``docs/storage.md``). Both append the same way: new rows are written past the
committed end of every level first, then the new counts are committed in one step,
so a call that fails part-way leaves the tree as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, InvariantError, StorageError
from .storage import TreeFiles, open_tree, save_tree

__all__ = ["MegaContextTree", "mean_pool"]

Embed = Callable[[torch.Tensor], torch.Tensor]
GistFn = Callable[[torch.Tensor], torch.Tensor]

# Nodes per gistnet call (``tree.gist_batch``): 256 blocks of 32 tokens at d=576 are
# 4.7 MB of fp16 embeddings. Enough to amortise the call; on the CPU, much larger
# batches run slower per token (fresh large temporaries cost page faults: see
# bench/bench_tree.py::test_append_gist_batch). A GPU gistnet may want more.
DEFAULT_GIST_BATCH = 256

_NP_DTYPE: dict[torch.dtype, type] = {
    torch.float16: np.float16,
    torch.bfloat16: np.uint16,  # numpy has no bf16: stored as raw bits, viewed by torch
    torch.float32: np.float32,
}
_MAX_TOKEN_ID = 2**32  # LOD0 stores uint32


def mean_pool(blocks: torch.Tensor) -> torch.Tensor:
    """The default gistnet: ``[B, bs, d] -> [B, d]``, ``out[b] = mean_k blocks[b, k]``.

    Accumulates in fp32 (fp16 sums of 32 embeddings lose bits) and returns fp32.
    """
    if blocks.dim() != 3:
        raise ConfigError(
            f"mean_pool expects blocks [B, bs, d], got shape {tuple(blocks.shape)}",
            field="blocks",
            value=tuple(blocks.shape),
        )
    return blocks.mean(dim=1, dtype=torch.float32)


def _to_numpy(x: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A CPU tensor cast to ``dtype`` as the numpy array the level buffers store."""
    x = x.detach().to(device="cpu", dtype=dtype).contiguous()
    if dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16)
    return x.numpy()


def _to_torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A zero-copy torch view of a level buffer (``a`` may be a memmap)."""
    if a.size == 0:
        return torch.empty(a.shape, dtype=dtype)
    t = torch.from_numpy(a)
    if dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t


def _as_ids(token_ids: Any) -> np.ndarray:
    """Validate token ids (1-D integers in ``[0, 2**32)``) and return them as int64."""
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dtype == torch.bool or token_ids.is_floating_point() or token_ids.is_complex():
            raise ConfigError(
                f"token_ids must be an integer tensor, got dtype {token_ids.dtype}",
                field="token_ids",
                value=str(token_ids.dtype),
            )
        arr = token_ids.detach().to("cpu", torch.int64).numpy()
    else:
        arr = np.asarray(token_ids)
        if arr.size == 0 and arr.ndim == 1:
            return np.zeros(0, dtype=np.int64)
        if arr.dtype.kind not in "iu":
            raise ConfigError(
                f"token_ids must be integers, got numpy dtype {arr.dtype}",
                field="token_ids",
                value=str(arr.dtype),
            )
        if arr.dtype == np.uint64 and arr.size and arr.max() >= _MAX_TOKEN_ID:
            raise ConfigError(
                f"token_ids must be < 2**32, got max {int(arr.max())}",
                field="token_ids",
                value=int(arr.max()),
            )
        arr = arr.astype(np.int64, copy=False)
    if arr.ndim != 1:
        raise ConfigError(
            f"token_ids must be 1-D, got shape {tuple(arr.shape)}",
            field="token_ids",
            value=tuple(arr.shape),
        )
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= _MAX_TOKEN_ID:
            bad = lo if lo < 0 else hi
            raise ConfigError(
                f"token_ids must lie in [0, 2**32), got {bad}", field="token_ids", value=bad
            )
    return arr


def _gist_device(gistnet: GistFn, x: torch.Tensor) -> torch.device:
    """Where to run ``gistnet``: a module's parameter device, else where ``x`` is."""
    params = getattr(gistnet, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return x.device


class _RamLevel:
    """One level held in RAM: a numpy buffer with geometric capacity growth.

    Rows ``[0, count)`` are committed; rows past ``count`` may hold an append in
    progress (written first, committed by the tree afterwards).
    """

    def __init__(self, row_shape: tuple[int, ...], np_dtype: type):
        self.row_shape = row_shape
        self.count = 0
        self._buf = np.zeros((0, *row_shape), dtype=np_dtype)

    def view(self) -> np.ndarray:
        return self._buf[: self.count]

    def rows(self, start: int, end: int) -> np.ndarray:
        return self._buf[start:end]

    def write(self, start: int, data: np.ndarray) -> None:
        end = start + len(data)
        if end > len(self._buf):
            grown = np.zeros((max(end, 2 * len(self._buf), 64), *self.row_shape), self._buf.dtype)
            # rows past count may hold the append in progress: keep them too
            grown[: len(self._buf)] = self._buf
            self._buf = grown
        self._buf[start:end] = data

    def commit(self, count: int) -> None:
        self.count = count


class MegaContextTree:
    """The whole history as LOD0 token ids plus ``levels`` levels of gists.

    Args:
        dim: gist width ``d`` (the base model's embedding width), 1..65535.
        block_size: children per node (32 in the design), 2..65535.
        levels: gist levels above LOD0 (2 in the design: LOD1 and LOD2).
        dtype: storage dtype of the gists: ``torch.float16`` or ``torch.bfloat16``
            (both storable); ``torch.float32`` is accepted in RAM but cannot be saved.
        model_name: the base model the gists belong to (<= 31 UTF-8 bytes), recorded
            in the file headers.

    Example::

        table = torch.randn(49152, 576)
        tree = MegaContextTree(576)
        tree.append(torch.randint(0, 49152, (100,)), lambda ids: table[ids])
        tree.num_nodes(1)         # 3 complete blocks; 4 tokens wait in the tail
        tree.gists(1).shape       # torch.Size([3, 576])
    """

    def __init__(
        self,
        dim: int,
        block_size: int = 32,
        levels: int = 2,
        dtype: torch.dtype = torch.float16,
        model_name: str = "",
    ):
        _check_params(dim, block_size, levels, dtype, model_name)
        self.dim = int(dim)
        self.block_size = int(block_size)
        self.levels = int(levels)
        self.dtype = dtype
        self.model_name = model_name
        self.gist_batch = DEFAULT_GIST_BATCH
        self._files: TreeFiles | None = None
        self._embed: Embed | None = None
        self._levels: list[Any] = [_RamLevel((), np.uint32)]
        self._levels += [_RamLevel((self.dim,), _NP_DTYPE[dtype]) for _ in range(self.levels)]

    # ------------------------------------------------------------------ properties

    @property
    def num_tokens(self) -> int:
        """LOD0 tokens held (committed)."""
        return self._levels[0].count

    @property
    def path(self) -> str | None:
        """The directory of an on-disk tree, ``None`` for a tree in RAM."""
        return None if self._files is None else self._files.path

    @property
    def writable(self) -> bool:
        return self._files is None or self._files.writable

    def num_nodes(self, level: int) -> int:
        """Nodes at ``level``: ``num_tokens`` for 0, complete nodes ``T // bs**l`` above."""
        self._check_level(level, allow_zero=True)
        return self._levels[level].count

    def _check_level(self, level: int, allow_zero: bool) -> None:
        lo = 0 if allow_zero else 1
        if not isinstance(level, (int, np.integer)) or not lo <= level <= self.levels:
            raise ConfigError(
                f"level must be an integer in [{lo}, {self.levels}], got {level!r}",
                field="level",
                value=level,
            )

    # ---------------------------------------------------------------------- reads

    def tokens(self, start: int, end: int) -> torch.Tensor:
        """Token ids ``[start, end)`` as a CPU int64 tensor ``[end - start]`` (a copy)."""
        if not 0 <= start <= end <= self.num_tokens:
            raise ConfigError(
                f"tokens({start}, {end}) out of range [0, {self.num_tokens}]",
                field="range",
                value=(start, end),
            )
        return torch.from_numpy(self._levels[0].view()[start:end].astype(np.int64))

    def gists(self, level: int) -> torch.Tensor:
        """All gists of ``level`` >= 1: ``[num_nodes(level), dim]`` in ``dtype``.

        A view of the storage, not a copy (a memmap for an on-disk tree: reading
        one row touches one page). It shows the nodes committed when it was taken;
        call again after ``append``. Do not write to it.
        """
        self._check_level(level, allow_zero=False)
        return _to_torch(self._levels[level].view(), self.dtype)

    # --------------------------------------------------------------------- writes

    def _check_writable(self, op: str) -> None:
        if self.writable:
            return
        assert self._files is not None
        if self._files.mode == "r":
            why = "was opened read-only (mode='r'); open it with mode='r+' to modify it"
        else:
            why = "is closed"
        raise StorageError(f"{op}: tree at {self.path} {why}", path=self.path, field="mode")

    # -------------------------------------------------------------------- storage

    def save(self, path: str | os.PathLike[str], overwrite: bool = False) -> None:
        """Write the tree to a new directory ``path`` (``LOD<l>.ctx`` + ``metadata.json``).

        Atomic: written into a temporary directory next to ``path``, then renamed.
        An existing non-empty ``path`` is a :class:`StorageError` unless
        ``overwrite=True``. A float32 tree cannot be saved (:class:`ConfigError`:
        the format stores fp16 or bf16). The tree itself stays where it was (RAM or
        its own directory); ``MegaContextTree.open(path)`` opens the copy.
        """
        save_tree(self, path, overwrite=overwrite)

    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: str = "r+") -> MegaContextTree:
        """Open a saved tree, memory-mapped: O(1) in its size (no payload is read).

        ``mode='r+'`` allows :meth:`append` and :meth:`refresh` (crash-safe appends,
        one writer at a time: a second ``r+`` open raises :class:`StorageError`);
        ``mode='r'`` refuses them. A corrupted or inconsistent directory raises
        :class:`StorageError` naming the file and the field.
        """
        files = open_tree(path, mode)
        meta = files.meta
        tree = cls.__new__(cls)
        tree.dim = meta["dim"]
        tree.block_size = meta["block_size"]
        tree.levels = meta["levels"]
        tree.dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[meta["dtype"]]
        tree.model_name = meta["model_name"]
        tree.gist_batch = DEFAULT_GIST_BATCH
        tree._files = files
        tree._embed = None
        tree._levels = list(files.levels)
        return tree

    def close(self) -> None:
        """Release the files of an on-disk tree (and its writer lock). Views already
        taken stay readable; further appends raise :class:`StorageError`."""
        if self._files is not None:
            self._files.close()

    def to_ram(self) -> MegaContextTree:
        """An independent in-RAM copy of this tree (committed rows only, bit for bit)."""
        ram = MegaContextTree(
            self.dim, self.block_size, self.levels, dtype=self.dtype, model_name=self.model_name
        )
        for src, dst in zip(self._levels, ram._levels, strict=True):
            rows = np.array(src.view())
            dst.write(0, rows)
            dst.commit(len(rows))
        ram._embed = self._embed
        return ram

    def __enter__(self) -> MegaContextTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @torch.no_grad()
    def append(self, token_ids: Any, embed: Embed, gistnet: GistFn | None = None) -> None:
        """Append tokens and gist every node they complete.

        Args:
            token_ids: 1-D integer ids in ``[0, 2**32)`` (tensor, array or sequence).
            embed: maps CPU int64 ids ``[n]`` to embeddings ``[n, dim]`` (e.g.
                ``Base.embed``). Remembered for :meth:`refresh` of level 1.
            gistnet: ``[B, bs, d] -> [B, d]``; default :func:`mean_pool`. One callable
                serves every level; if it has ``at_level(level)`` (as ``mc.GistNet``
                does), level ``l`` is gisted by ``gistnet.at_level(l)``.

        New LOD1 gists come from the embeddings of each newly completed block (the
        old partial tail included); new LOD(l+1) gists from each newly completed
        group of stored LOD(l) gists. Rows are written past the committed end of
        every level, then the new counts are committed (on disk: files fsynced,
        then ``metadata.json`` replaced atomically), so an exception or a crash
        part-way leaves the tree as it was before the call.
        """
        self._check_writable("append")
        ids = _as_ids(token_ids)
        if ids.size == 0:
            return
        gistnet = mean_pool if gistnet is None else gistnet
        bs = self.block_size
        old = [lvl.count for lvl in self._levels]
        total = old[0] + len(ids)
        new = [total // bs**lvl for lvl in range(self.levels + 1)]

        self._levels[0].write(old[0], ids.astype(np.uint32))
        for level in range(1, self.levels + 1):
            if new[level] > old[level]:
                self._write_gists(level, old[level], new[level], embed, gistnet)
        self._commit(new)
        self._embed = embed

    def truncate(self, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` tokens: drop the rest and every node that
        covers any of them (``num_nodes(l)`` becomes ``num_tokens // bs**l``).

        Cheap (no gist is recomputed) and, on disk, one atomic ``metadata.json``
        commit: the dropped rows stay in the files as an ignored tail until the next
        append overwrites them. Views taken before may show new data past the
        truncation point after a later append.
        """
        self._check_writable("truncate")
        if isinstance(num_tokens, bool) or not 0 <= num_tokens <= self.num_tokens:
            raise ConfigError(
                f"truncate({num_tokens!r}): must be in [0, {self.num_tokens}]",
                field="num_tokens",
                value=num_tokens,
            )
        counts = [int(num_tokens) // self.block_size**lvl for lvl in range(self.levels + 1)]
        if counts != [lvl.count for lvl in self._levels]:
            self._commit(counts)

    @torch.no_grad()
    def refresh(
        self,
        level: int,
        start: int,
        end: int,
        gistnet: GistFn,
        embed: Embed | None = None,
    ) -> None:
        """Recompute the gists ``[start, end)`` of ``level`` with ``gistnet``.

        Level 1 reads token embeddings through ``embed`` (default: the ``embed``
        of the last :meth:`append` on this object); level l >= 2 reads the stored
        LOD(l-1) gists, so refresh levels bottom-up after a GistNet update. Upper
        levels are not refreshed implicitly. All new gists are computed before any
        is written, so a failing ``gistnet`` leaves the tree unchanged. On disk the
        rows are overwritten in place and fsynced (not crash-atomic: after a crash,
        run the same refresh again).
        """
        self._check_writable("refresh")
        self._check_level(level, allow_zero=False)
        n = self.num_nodes(level)
        if not 0 <= start <= end <= n:
            raise ConfigError(
                f"refresh range [{start}, {end}) out of range [0, {n}] at level {level}",
                field="range",
                value=(start, end),
            )
        if start == end:
            return
        if level == 1:
            embed = embed if embed is not None else self._embed
            if embed is None:
                raise ConfigError(
                    "refresh(level=1) needs token embeddings: pass embed= (no append "
                    "on this tree object supplied one)",
                    field="embed",
                )
        new = np.concatenate(list(self._compute_gists(level, start, end, embed, gistnet)))
        self._levels[level].write(start, new)
        if self._files is not None:
            self._files.sync(level)

    # ---------------------------------------------------------------- internals

    def _compute_gists(
        self, level: int, start: int, end: int, embed: Embed | None, gistnet: GistFn
    ):
        """Yield the gists of nodes ``[start, end)`` of ``level`` in batches (numpy).

        Reads children from the level below, including rows written by the append
        in progress past the committed count.
        """
        bs, d = self.block_size, self.dim
        below = self._levels[level - 1]
        # a level-aware gistnet (mc.GistNet) serves each level with its own weights
        at_level = getattr(gistnet, "at_level", None)
        fn = at_level(level) if callable(at_level) else gistnet
        for b0 in range(start, end, self.gist_batch):
            b1 = min(b0 + self.gist_batch, end)
            nb = b1 - b0
            if level == 1:
                ids = torch.from_numpy(below.rows(b0 * bs, b1 * bs).astype(np.int64))
                x = embed(ids)
                if not isinstance(x, torch.Tensor) or tuple(x.shape) != (nb * bs, d):
                    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                    raise ConfigError(
                        f"embed returned {shape} for {nb * bs} ids; expected [{nb * bs}, {d}]",
                        field="embed",
                        value=shape,
                    )
            else:
                x = _to_torch(np.ascontiguousarray(below.rows(b0 * bs, b1 * bs)), self.dtype)
            x = x.reshape(nb, bs, d)
            x = x.to(_gist_device(gistnet, x))
            g = fn(x)
            if not isinstance(g, torch.Tensor) or tuple(g.shape) != (nb, d):
                shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise ConfigError(
                    f"gistnet returned {shape} for blocks [{nb}, {bs}, {d}]; expected [{nb}, {d}]",
                    field="gistnet",
                    value=shape,
                )
            yield _to_numpy(g, self.dtype)

    def _write_gists(
        self, level: int, start: int, end: int, embed: Embed | None, gistnet: GistFn
    ) -> None:
        row = start
        for g in self._compute_gists(level, start, end, embed, gistnet):
            self._levels[level].write(row, g)
            row += len(g)

    def _commit(self, counts: list[int]) -> None:
        bs = self.block_size
        if any(counts[lvl] != counts[0] // bs**lvl for lvl in range(len(counts))):
            raise InvariantError(f"inconsistent level counts {counts} for block_size {bs}")
        if self._files is not None:
            self._files.commit(counts)
        else:
            for lvl, c in zip(self._levels, counts, strict=True):
                lvl.commit(c)

    def __repr__(self) -> str:
        where = "RAM" if self._files is None else repr(self.path)
        nodes = ", ".join(f"LOD{lvl}={self.num_nodes(lvl)}" for lvl in range(self.levels + 1))
        return (
            f"MegaContextTree(dim={self.dim}, block_size={self.block_size}, "
            f"levels={self.levels}, dtype={self.dtype}, {nodes}, {where})"
        )


def _check_params(
    dim: int, block_size: int, levels: int, dtype: torch.dtype, model_name: str
) -> None:
    for name, value, lo, hi in (
        ("dim", dim, 1, 65535),
        ("block_size", block_size, 2, 65535),
        ("levels", levels, 1, 16),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{name} must be an int, got {value!r}", field=name, value=value)
        if not lo <= value <= hi:
            raise ConfigError(
                f"{name} must be in [{lo}, {hi}], got {value}", field=name, value=value
            )
    if dtype not in _NP_DTYPE:
        raise ConfigError(
            f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}",
            field="dtype",
            value=dtype,
        )
    if not isinstance(model_name, str) or len(model_name.encode("utf-8")) > 31:
        raise ConfigError(
            f"model_name must be a str of at most 31 UTF-8 bytes, got {model_name!r}",
            field="model_name",
            value=model_name,
        )
