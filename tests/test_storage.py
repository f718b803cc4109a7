"""On-disk trees: round trips, append after open, crash safety under SIGKILL, and
every corruption case raising StorageError that names the file and the field."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import megacontext as mc
from megacontext.errors import ConfigError, StorageError
from megacontext.storage import HEADER_SIZE, MAGIC, Header, read_header, read_metadata
from megacontext.tree import MegaContextTree, mean_pool

REPO = Path(__file__).resolve().parents[1]

# The token stream and embedding table shared by the crash worker and the reference.
COMMON = """
import numpy as np, torch
VOCAB, DIM = 5000, 32
def stream(seed, n):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, VOCAB, n))
_table = torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(7)).half()
def embed(ids):
    return _table[ids]
"""
ns: dict = {}
exec(COMMON, ns)
VOCAB, DIM, stream, embed = ns["VOCAB"], ns["DIM"], ns["stream"], ns["embed"]

WORKER = COMMON + """
import sys
from megacontext.tree import MegaContextTree
path, seed, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = stream(seed, total)
tree = MegaContextTree.open(path, mode="r+")
print("ready", tree.num_tokens, flush=True)
rng = np.random.default_rng(tree.num_tokens)
while tree.num_tokens < total:
    start = tree.num_tokens
    tree.append(ids[start : start + int(rng.integers(1, 400))], embed)
    print("committed", tree.num_tokens, flush=True)
print("done", flush=True)
"""


def reference(ids, *, bs=4, levels=2, dtype=torch.float16, model_name=""):
    tree = MegaContextTree(DIM, block_size=bs, levels=levels, dtype=dtype, model_name=model_name)
    tree.append(ids, embed)
    return tree


def assert_same_tree(a: MegaContextTree, b: MegaContextTree) -> None:
    assert (a.dim, a.block_size, a.levels, a.dtype) == (b.dim, b.block_size, b.levels, b.dtype)
    assert a.num_tokens == b.num_tokens
    assert torch.equal(a.tokens(0, a.num_tokens), b.tokens(0, b.num_tokens))
    for level in range(1, a.levels + 1):
        assert torch.equal(a.gists(level), b.gists(level)), f"level {level} differs"


def digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


@pytest.fixture
def saved(tmp_path):
    """A saved 3-level fp16 tree (bs=4) of 333 tokens and its RAM original."""
    tree = reference(stream(0, 333), levels=3, model_name="tiny-llama")
    path = tmp_path / "tree"
    tree.save(path)
    return path, tree


# ----------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [0, 3, 4 * 4 * 4 + 1, 1000])
def test_round_trip(tmp_path, dtype, n):
    tree = reference(stream(1, n), levels=2, dtype=dtype, model_name="smollm2-135m")
    tree.save(tmp_path / "t")
    assert sorted(os.listdir(tmp_path)) == ["t"]  # no temp dir left behind
    assert sorted(os.listdir(tmp_path / "t")) == [
        "LOD0.ctx",
        "LOD1.ctx",
        "LOD2.ctx",
        "metadata.json",
    ]
    for mode in ("r", "r+"):
        with MegaContextTree.open(tmp_path / "t", mode=mode) as opened:
            assert opened.model_name == "smollm2-135m"
            assert opened.path == str(tmp_path / "t")
            assert opened.writable == (mode == "r+")
            assert_same_tree(opened, tree)
            assert opened.gists(1).dtype == dtype
    meta = read_metadata(str(tmp_path / "t"))
    assert meta["counts"] == [n, n // 4, n // 16]
    assert meta["dtype"] == {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    for level in range(3):
        size = (tmp_path / "t" / f"LOD{level}.ctx").stat().st_size
        assert size == HEADER_SIZE + meta["counts"][level] * (4 if level == 0 else DIM * 2)


def test_header_bytes_match_the_format(saved):
    path, _ = saved
    raw = (path / "LOD1.ctx").read_bytes()[:64]
    magic, version, level, bs, dim, code = struct.unpack_from("<IHHHHH", raw)
    assert raw[:4] == b"TCCM"  # 0x4D434354 little-endian
    assert (magic, version, level, bs, dim, code) == (MAGIC, 1, 1, 4, DIM, 1)
    assert raw[14:46] == b"tiny-llama".ljust(32, b"\0")
    assert raw[46:] == b"\0" * 18
    assert read_header(str(path / "LOD0.ctx")) == Header(0, 4, DIM, 0, "tiny-llama")
    ids = np.frombuffer((path / "LOD0.ctx").read_bytes()[64:], dtype="<u4")
    assert ids.tolist() == stream(0, 333).tolist()


def test_float32_cannot_be_saved(tmp_path):
    tree = reference(stream(0, 10), dtype=torch.float32)
    with pytest.raises(ConfigError, match="float32 cannot be stored") as err:
        tree.save(tmp_path / "t")
    assert err.value.field == "dtype"
    assert not os.listdir(tmp_path)


def test_save_refuses_existing_path_unless_overwrite(tmp_path, saved):
    path, tree = saved
    other = reference(stream(5, 99))
    with pytest.raises(StorageError, match="already exists") as err:
        other.save(path)
    assert err.value.field == "path" and err.value.path == str(path)
    assert_same_tree(MegaContextTree.open(path, "r"), tree)
    other.save(path, overwrite=True)
    assert_same_tree(MegaContextTree.open(path, "r"), other)
    assert sorted(os.listdir(path.parent)) == ["tree"]
    empty = tmp_path / "empty"
    empty.mkdir()
    other.save(empty)  # an empty directory is fine
    assert_same_tree(MegaContextTree.open(empty, "r"), other)


def test_save_an_opened_tree_elsewhere_but_not_over_itself(tmp_path, saved):
    path, tree = saved
    with MegaContextTree.open(path) as opened:
        with pytest.raises(StorageError, match="its own directory"):
            opened.save(path, overwrite=True)
        opened.save(tmp_path / "copy")
    assert_same_tree(MegaContextTree.open(tmp_path / "copy", "r"), tree)


# ------------------------------------------------------------- append on disk


def test_append_after_open_then_reopen(tmp_path):
    ids = stream(2, 5000)
    reference(ids[:10], levels=3).save(tmp_path / "t")
    pos = 10
    for chunk in (1, 3, 250, 17, 1024, 1, 2000):
        with MegaContextTree.open(tmp_path / "t") as tree:
            tree.append(ids[pos : pos + chunk], embed)
            pos += chunk
            # the same object reads its own appends
            assert_same_tree(tree, reference(ids[:pos], levels=3))
    with MegaContextTree.open(tmp_path / "t", "r") as tree:
        assert_same_tree(tree, reference(ids[:pos], levels=3))
    assert read_metadata(str(tmp_path / "t"))["counts"] == [pos, pos // 4, pos // 16, pos // 64]


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(0, 200),
    cuts=st.lists(st.integers(0, 200), max_size=6),
    reopen=st.booleans(),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
)
def test_random_chunkings_on_disk(tmp_path_factory, n, cuts, reopen, dtype):
    ids = stream(n, n)
    path = tmp_path_factory.mktemp("prop") / "t"
    MegaContextTree(DIM, block_size=3, levels=3, dtype=dtype).save(path)
    bounds = sorted({min(c, n) for c in cuts} | {0, n})
    tree = MegaContextTree.open(path)
    for a, b in itertools.pairwise(bounds):
        tree.append(ids[a:b], embed)
        if reopen:
            tree.close()
            tree = MegaContextTree.open(path)
    tree.close()
    expect = MegaContextTree(DIM, block_size=3, levels=3, dtype=dtype)
    expect.append(ids, embed)
    with MegaContextTree.open(path, "r") as opened:
        assert_same_tree(opened, expect)
    meta = read_metadata(str(path))
    for level in range(4):
        size = (path / f"LOD{level}.ctx").stat().st_size
        assert size == HEADER_SIZE + meta["counts"][level] * (4 if level == 0 else DIM * 2)


def test_append_from_an_empty_saved_tree(tmp_path):
    MegaContextTree(DIM, block_size=4, levels=2, dtype=torch.bfloat16).save(tmp_path / "t")
    ids = stream(3, 77)
    with MegaContextTree.open(tmp_path / "t") as tree:
        for i in range(77):
            tree.append(ids[i : i + 1], embed)
    assert_same_tree(
        MegaContextTree.open(tmp_path / "t", "r"), reference(ids, dtype=torch.bfloat16)
    )


def test_failed_append_on_disk_commits_nothing(saved):
    path, tree = saved
    before = read_metadata(str(path))
    calls = 0

    def fails_at_lod2(x):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("gistnet crashed")
        return mean_pool(x)

    ids = stream(4, 200)
    with MegaContextTree.open(path) as opened:
        with pytest.raises(RuntimeError, match="gistnet crashed"):
            opened.append(ids, embed, fails_at_lod2)
        assert_same_tree(opened, tree)
        assert read_metadata(str(path)) == before
        opened.append(ids, embed)  # overwrites the uncommitted rows
    expect = reference(torch.cat([stream(0, 333), ids]), levels=3)
    assert_same_tree(MegaContextTree.open(path, "r"), expect)


def test_crashed_tail_is_ignored_then_overwritten(saved):
    path, tree = saved
    sizes = {p.name: p.stat().st_size for p in path.glob("*.ctx")}
    # what an append killed after its payload writes but before the commit leaves
    for name, junk in (("LOD0.ctx", 4 * 7 + 3), ("LOD1.ctx", DIM * 2 * 5 + 1)):
        with open(path / name, "ab") as f:
            f.write(os.urandom(junk))
    (path / ".metadata.crash.tmp").write_text('{"counts": "half-written')
    with MegaContextTree.open(path, "r") as opened:
        assert_same_tree(opened, tree)
    assert (path / ".metadata.crash.tmp").exists()  # a reader touches nothing
    with MegaContextTree.open(path) as opened:
        assert not (path / ".metadata.crash.tmp").exists()  # the writer drops dead temp files
        assert_same_tree(opened, tree)
        opened.append([9, 9, 9], embed)  # 336 tokens: completes block 83
    after = reference(torch.cat([stream(0, 333), torch.tensor([9, 9, 9])]), levels=3)
    with MegaContextTree.open(path, "r") as opened:
        assert_same_tree(opened, after)
    # files never shrink: the rest of the junk is still there, past the new counts
    assert (path / "LOD0.ctx").stat().st_size == sizes["LOD0.ctx"] + 4 * 7 + 3
    assert (path / "LOD1.ctx").stat().st_size == sizes["LOD1.ctx"] + DIM * 2 * 5 + 1


def test_truncate_on_disk(saved):
    path, tree = saved
    ids = stream(0, 333)
    with MegaContextTree.open(path) as opened:
        held = opened.gists(1)  # 83 rows mapped before the file could shrink
        last = held[82].clone()
        opened.truncate(70)
        assert read_metadata(str(path))["counts"] == [70, 17, 4, 1]
        assert (path / "LOD1.ctx").stat().st_size == HEADER_SIZE + 83 * DIM * 2  # a tail
        assert_same_tree(opened, reference(ids[:70], levels=3))
        opened.append(ids[70:75], embed)  # files never shrink: `held` stays backed
        assert torch.equal(held[82], last)  # (a cut file would make this read SIGBUS)
    with MegaContextTree.open(path, "r") as opened:
        assert_same_tree(opened, reference(ids[:75], levels=3))
        with pytest.raises(StorageError, match="read-only"):
            opened.truncate(0)
    with MegaContextTree.open(path) as opened:
        opened.append(ids[75:], embed)
    with MegaContextTree.open(path, "r") as opened:
        assert_same_tree(opened, tree)


def test_to_ram_copies_committed_rows(saved):
    path, tree = saved
    before = digest(path)
    with MegaContextTree.open(path, "r") as opened:
        ram = opened.to_ram()
    assert ram.path is None and ram.writable and ram.model_name == "tiny-llama"
    assert_same_tree(ram, tree)
    ram.append(stream(9, 100), embed)  # independent of the files
    assert_same_tree(ram, reference(torch.cat([stream(0, 333), stream(9, 100)]), levels=3))
    assert digest(path) == before
    bf = reference(stream(1, 50), dtype=torch.bfloat16).to_ram()  # RAM -> RAM, bf16 bits
    assert_same_tree(bf, reference(stream(1, 50), dtype=torch.bfloat16))


def test_refresh_on_disk_persists(saved):
    path, tree = saved
    with MegaContextTree.open(path) as opened:
        opened.refresh(1, 5, 40, lambda x: x.float().amax(1), embed=embed)
        g1 = opened.gists(1).clone()
    with MegaContextTree.open(path, "r") as opened:
        assert torch.equal(opened.gists(1), g1)
        assert torch.equal(opened.gists(1)[:5], tree.gists(1)[:5])
        assert not torch.equal(opened.gists(1)[5:40], tree.gists(1)[5:40])


def test_read_only_and_writer_lock(saved):
    path, _ = saved
    before = digest(path)
    with MegaContextTree.open(path, mode="r") as ro:
        for op in (lambda: ro.append([1], embed), lambda: ro.refresh(1, 0, 1, mean_pool, embed)):
            with pytest.raises(StorageError, match="read-only") as err:
                op()
            assert err.value.field == "mode" and err.value.path == str(path)
        ro.gists(1)[0, 0] = 1.0  # a private copy-on-write page: no fault, file unchanged
        assert ro.gists(1)[0, 0] == 1.0
    assert digest(path) == before
    writer = MegaContextTree.open(path)
    with pytest.raises(StorageError, match="another writer") as err:
        MegaContextTree.open(path)
    assert err.value.field == "lock" and err.value.path.endswith("LOD0.ctx")
    MegaContextTree.open(path, mode="r").close()  # readers take no lock
    writer.close()
    with pytest.raises(StorageError, match="closed"):
        writer.append([1], embed)
    MegaContextTree.open(path).close()  # the lock went with close()
    with pytest.raises(ConfigError, match="mode must be"):
        MegaContextTree.open(path, mode="w")


def test_reader_alongside_a_writer(saved):
    path, _ = saved
    ids = stream(0, 333)
    reader = MegaContextTree.open(path, mode="r")
    held = [reader.gists(level) for level in (1, 2, 3)]
    with MegaContextTree.open(path) as writer:
        writer.append(stream(8, 500), embed)
        writer.truncate(10)  # files keep their length: the reader's pages stay backed
        writer.append(stream(8, 3), embed)
        assert reader.num_tokens == 333  # a reader keeps the counts it opened with
        assert all(h.float().isfinite().all() for h in held)  # no SIGBUS, no NaN bits
        assert torch.equal(reader.tokens(0, 10), ids[:10])
    reader.close()
    with MegaContextTree.open(path, mode="r") as fresh:
        assert_same_tree(fresh, reference(torch.cat([ids[:10], stream(8, 3)]), levels=3))


def test_read_only_open_does_not_modify_files(saved):
    path, _ = saved
    before = digest(path)
    with MegaContextTree.open(path, mode="r") as ro:
        ro.gists(2)[0].fill_(3.0)
    assert digest(path) == before


def test_gists_are_memory_mapped(saved):
    path, tree = saved
    with MegaContextTree.open(path) as opened:
        view = opened.gists(1)
        # rewrite node 7 behind the tree's back: a mapped view sees it, a copy would not
        row = torch.full((DIM,), 0.5, dtype=torch.float16).numpy().tobytes()
        fd = os.open(path / "LOD1.ctx", os.O_WRONLY)
        os.pwrite(fd, row, HEADER_SIZE + 7 * DIM * 2)
        os.close(fd)
        assert torch.equal(view[7], torch.full((DIM,), 0.5, dtype=torch.float16))
        assert torch.equal(view[6], tree.gists(1)[6])


def test_public_names():
    assert issubclass(StorageError, mc.MegaContextError)
    assert mc.MegaContextTree is MegaContextTree


# ------------------------------------------------------------- kill -9 during append


def _run_and_kill(path: Path, seed: int, total: int, rng: random.Random) -> int:
    """Start a worker appending to ``path``, SIGKILL it at a random moment after it
    opened the tree; return the last count it reported as committed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(path), str(seed), str(total)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready"), (line, proc.stderr.read() if proc.stderr else "")
    time.sleep(rng.uniform(0.05, 0.8))
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, out
    # only whole lines are reports: the kill can land while the last one is written
    whole = out.split("\n")[:-1]
    committed = [int(m[1]) for x in whole if (m := re.fullmatch(r"committed (\d+)", x))]
    return committed[-1] if committed else int(line.split()[1])


def _kill_trials(tmp_path: Path, trials: int, seed: int) -> None:
    total = 400_000  # more than a worker can append before it is killed
    path = tmp_path / "t"
    reference(stream(seed, 0), bs=8, levels=3).save(path)
    rng = random.Random(seed)
    ids = stream(seed, total)
    floor = 0
    for _ in range(trials):
        reported = _run_and_kill(path, seed, total, rng)
        with MegaContextTree.open(path, mode="r") as tree:
            n = tree.num_tokens
            assert n >= max(reported, floor), "a committed append was lost"
            assert_same_tree(tree, reference(ids[:n], bs=8, levels=3))
        floor = n
    assert floor > 0, "no append was ever committed: the workers were killed too early"


def test_sigkill_during_append(tmp_path):
    _kill_trials(tmp_path, trials=3, seed=11)


@pytest.mark.slow
def test_sigkill_during_append_many(tmp_path):
    _kill_trials(tmp_path, trials=20, seed=12)


# ------------------------------------------------------------------ corruption


def _patch(file: Path, offset: int, data: bytes) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _edit_meta(path: Path, **changes) -> None:
    meta = json.loads((path / "metadata.json").read_text())
    for k, v in changes.items():
        if v is None:
            del meta[k]
        else:
            meta[k] = v
    (path / "metadata.json").write_text(json.dumps(meta))


CORRUPTIONS = {
    "truncated payload": (
        lambda p: os.truncate(p / "LOD1.ctx", (p / "LOD1.ctx").stat().st_size - 1),
        "LOD1.ctx",
        "counts",
        "truncated",
    ),
    "truncated header": (
        lambda p: os.truncate(p / "LOD2.ctx", 40),
        "LOD2.ctx",
        "header",
        "truncated",
    ),
    "empty file": (lambda p: os.truncate(p / "LOD0.ctx", 0), "LOD0.ctx", "header", "0 of 64"),
    "wrong magic": (lambda p: _patch(p / "LOD0.ctx", 0, b"GGUF"), "LOD0.ctx", "magic", "MCCT"),
    "unknown version": (
        lambda p: _patch(p / "LOD1.ctx", 4, struct.pack("<H", 2)),
        "LOD1.ctx",
        "version",
        "unknown format version 2",
    ),
    "level mismatch": (
        lambda p: _patch(p / "LOD2.ctx", 6, struct.pack("<H", 1)),
        "LOD2.ctx",
        "level",
        "header has 1",
    ),
    "block_size mismatch": (
        lambda p: _patch(p / "LOD1.ctx", 8, struct.pack("<H", 32)),
        "LOD1.ctx",
        "block_size",
        "header has 32",
    ),
    "embedding width mismatch": (
        lambda p: _patch(p / "LOD3.ctx", 10, struct.pack("<H", DIM + 1)),
        "LOD3.ctx",
        "embedding_dim",
        f"header has {DIM + 1}",
    ),
    "unknown dtype code": (
        lambda p: _patch(p / "LOD1.ctx", 12, struct.pack("<H", 9)),
        "LOD1.ctx",
        "dtype_code",
        "unknown dtype code 9",
    ),
    "dtype mismatch": (
        lambda p: _patch(p / "LOD1.ctx", 12, struct.pack("<H", 2)),
        "LOD1.ctx",
        "dtype_code",
        "header has 2",
    ),
    "ids stored as gists": (
        lambda p: _patch(p / "LOD0.ctx", 12, struct.pack("<H", 1)),
        "LOD0.ctx",
        "dtype_code",
        "header has 1",
    ),
    "model name mismatch": (
        lambda p: _patch(p / "LOD2.ctx", 14, b"other\0"),
        "LOD2.ctx",
        "model_name",
        "other",
    ),
    "model name not terminated": (
        lambda p: _patch(p / "LOD0.ctx", 14, b"x" * 32),
        "LOD0.ctx",
        "model_name",
        "NUL",
    ),
    "model name not utf-8": (
        lambda p: _patch(p / "LOD0.ctx", 14, b"\xff\xfe\0"),
        "LOD0.ctx",
        "model_name",
        "UTF-8",
    ),
    "reserved bytes": (
        lambda p: _patch(p / "LOD1.ctx", 63, b"\x01"),
        "LOD1.ctx",
        "reserved",
        "not zero",
    ),
    "level file missing": (lambda p: os.unlink(p / "LOD3.ctx"), "LOD3.ctx", "file", "missing"),
    "metadata missing": (
        lambda p: os.unlink(p / "metadata.json"),
        "metadata.json",
        "file",
        "missing",
    ),
    "metadata not json": (
        lambda p: (p / "metadata.json").write_text("{counts: [1,"),
        "metadata.json",
        "json",
        "not valid JSON",
    ),
    "metadata not an object": (
        lambda p: (p / "metadata.json").write_text("[1, 2]"),
        "metadata.json",
        "json",
        "not an object",
    ),
    "metadata field missing": (
        lambda p: _edit_meta(p, dim=None),
        "metadata.json",
        "dim",
        "missing",
    ),
    "metadata field type": (
        lambda p: _edit_meta(p, block_size="4"),
        "metadata.json",
        "block_size",
        "is not int",
    ),
    "metadata dim out of range": (
        lambda p: _edit_meta(p, dim=0),
        "metadata.json",
        "dim",
        "outside [1, 65535]",
    ),
    "metadata counts negative": (
        lambda p: _edit_meta(p, counts=[-1, 0, 0, 0]),
        "metadata.json",
        "counts",
        "non-negative",
    ),
    "metadata format": (
        lambda p: _edit_meta(p, format="zip"),
        "metadata.json",
        "format",
        "zip",
    ),
    "metadata version": (
        lambda p: _edit_meta(p, format_version=7),
        "metadata.json",
        "format_version",
        "7",
    ),
    "metadata dtype unknown": (
        lambda p: _edit_meta(p, dtype="float32"),
        "metadata.json",
        "dtype",
        "float32",
    ),
    "metadata counts inconsistent": (
        lambda p: _edit_meta(p, counts=[333, 83, 20, 4]),
        "metadata.json",
        "counts",
        "expected",
    ),
    "metadata counts wrong length": (
        lambda p: _edit_meta(p, counts=[333, 83, 20]),
        "metadata.json",
        "counts",
        "4 non-negative",
    ),
    "metadata commits more than the files hold": (
        lambda p: _edit_meta(p, counts=[400, 100, 25, 6]),
        "LOD0.ctx",
        "counts",
        "commits 400",
    ),
    "metadata dim disagrees with headers": (
        lambda p: _edit_meta(p, dim=DIM * 2),
        "LOD0.ctx",
        "embedding_dim",
        "metadata.json says 64",
    ),
    "metadata block_size disagrees with headers": (
        lambda p: _edit_meta(p, block_size=2, counts=[333, 166, 83, 41]),
        "LOD0.ctx",
        "block_size",
        "says 2",
    ),
    "metadata dtype disagrees with headers": (
        lambda p: _edit_meta(p, dtype="bfloat16"),
        "LOD1.ctx",
        "dtype_code",
        "says 2",
    ),
    "metadata levels disagree with files": (
        lambda p: _edit_meta(p, levels=4, counts=[333, 83, 20, 5, 1]),
        "LOD4.ctx",
        "file",
        "missing",
    ),
    "metadata model name disagrees": (
        lambda p: _edit_meta(p, model_name="qwen"),
        "LOD0.ctx",
        "model_name",
        "qwen",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corruption_raises_storage_error(saved, case):
    path, _ = saved
    corrupt, file, field, text = CORRUPTIONS[case]
    corrupt(path)
    before = digest(path)
    for mode in ("r", "r+"):
        with pytest.raises(StorageError) as err:
            MegaContextTree.open(path, mode=mode)
        e = err.value
        assert e.path == str(path / file), case
        assert e.field == field, case
        assert file in str(e) and field in str(e) and text in str(e), str(e)
    assert digest(path) == before, "a failed open changed the files"


def test_not_a_directory(tmp_path):
    with pytest.raises(StorageError, match="no such directory") as err:
        MegaContextTree.open(tmp_path / "nope")
    assert err.value.field == "path"


# ------------------------------------------------------------ lazy, mapped reads


def _mapped_rss_kib(file: Path) -> int:
    """Resident KiB of this process's mappings of ``file`` (from /proc/self/smaps)."""
    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        pytest.skip("no /proc/self/smaps")
    total, inside = 0, False
    for line in smaps.read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line
            inside = len(head) >= 6 and head[5] == str(file)
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


def write_raw_tree(path: Path, num_tokens: int, dim: int, bs: int = 32, levels: int = 2) -> None:
    """Write a valid fp16 tree directory straight from numpy (arbitrary gist values)."""
    path.mkdir()
    counts = [num_tokens // bs**lvl for lvl in range(levels + 1)]
    rng = np.random.default_rng(0)
    for level, n in enumerate(counts):
        with open(path / f"LOD{level}.ctx", "wb") as f:
            f.write(Header(level, bs, dim, 0 if level == 0 else 1).pack())
            if level == 0:
                rows = rng.integers(0, 2**32, 1 << 16, dtype=np.uint32)
            else:
                rows = rng.standard_normal((1 << 16) // dim * dim).astype(np.float16)
            left = n * (1 if level == 0 else dim)
            while left:
                chunk = rows[: min(left, rows.size)]
                f.write(chunk.tobytes())
                left -= chunk.size
    meta = dict(
        format="megacontext-tree",
        format_version=1,
        levels=levels,
        block_size=bs,
        dim=dim,
        dtype="float16",
        model_name="",
        counts=counts,
    )
    (path / "metadata.json").write_text(json.dumps(meta))


def test_open_and_one_gist_read_map_pages_not_the_file(tmp_path):
    # 1.6M tokens at d=576: LOD1 holds 50,000 gists, 57.6 MB of payload
    path = tmp_path / "big"
    write_raw_tree(path, 50_000 * 32, 576)
    lod1 = path / "LOD1.ctx"
    payload_kib = lod1.stat().st_size // 1024
    with MegaContextTree.open(path, mode="r") as tree:
        assert tree.num_nodes(1) == 50_000 and tree.num_nodes(2) == 1562
        assert _mapped_rss_kib(lod1) == 0  # open maps the payload, reads none of it
        g = tree.gists(1)[31_337].float()
        assert torch.isfinite(g).all()
        one = _mapped_rss_kib(lod1)
        tree.gists(1).float().sum()
        whole = _mapped_rss_kib(lod1)
    # one read maps the kernel's fault-around window (64 KiB by default) or, where the
    # page cache holds the file in large folios, one folio (up to 2 MiB; two if the row
    # straddles): pages, not the 57 MB file
    assert 0 < one <= 4096, f"one gist read made {one} KiB of LOD1.ctx resident"
    assert whole > payload_kib // 2  # the measurement does see pages when they are read


# ------------------------------------------------------------------ links (issue 17)


def _move_out(saved_path: Path, name: str, outside: Path) -> Path:
    """Move ``name`` out of the tree and leave a symlink to it in its place."""
    outside.mkdir(exist_ok=True)
    target = outside / name
    os.rename(saved_path / name, target)
    os.symlink(target, saved_path / name)
    return target


@pytest.mark.parametrize("name", ["LOD0.ctx", "LOD1.ctx", "metadata.json"])
@pytest.mark.parametrize("mode", ["r", "r+"])
def test_open_refuses_a_symlink_out_of_the_tree(tmp_path, saved, name, mode):
    path, _ = saved
    target = _move_out(path, name, tmp_path / "elsewhere")
    before = target.read_bytes()
    with pytest.raises(StorageError) as info:
        MegaContextTree.open(path, mode=mode)
    assert info.value.field == "link" and name in str(info.value)
    assert str(path / name) == info.value.path
    assert target.read_bytes() == before


def test_append_never_grows_a_file_outside_the_tree(tmp_path, saved):
    path, _ = saved
    target = _move_out(path, "LOD0.ctx", tmp_path / "elsewhere")
    size = target.stat().st_size
    with pytest.raises(StorageError, match="outside the tree"):
        t = MegaContextTree.open(path)
        t.append(stream(5, 100), embed)  # what grew the foreign file before
    assert target.stat().st_size == size


def test_a_symlink_inside_the_tree_is_followed(saved):
    path, tree = saved
    os.rename(path / "LOD2.ctx", path / "level2.data")
    os.symlink("level2.data", path / "LOD2.ctx")
    with MegaContextTree.open(path, "r") as opened:
        assert_same_tree(opened, tree)


def test_hard_linked_level_files_are_read_but_not_appended(tmp_path, saved):
    path, tree = saved
    os.link(path / "LOD1.ctx", tmp_path / "other-name")
    with MegaContextTree.open(path, "r") as opened:
        assert_same_tree(opened, tree)
    size = (tmp_path / "other-name").stat().st_size
    with pytest.raises(StorageError, match="hard links") as info:
        MegaContextTree.open(path, "r+")
    assert info.value.field == "link"
    assert (tmp_path / "other-name").stat().st_size == size
