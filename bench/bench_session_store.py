"""Saved sessions: save and open time of a large session, and what the checksums cost.

tiny-llama (d = 64, fp16 gists), block size 32, 4 gist levels, ``w_max = 1024``; the
tree's levels are written straight with random rows (ids inside the vocabulary), so
building a ~1 GiB tree takes seconds, not an ingest. Prints the session's size, the
save time (CRC-32 read-back included), the open time, and the parts of open: the
checksum pass (``session_store._verify``), the copy of the tree into RAM and the
token-id check.

    .venv/bin/python bench/bench_session_store.py [num_tokens]   # default 125 * 2**20

Result on the project's loaded 2-core CPU box (docs/reliability.md): 0.99 GiB, save
4.7 s, open 12.3 s, of which checksums 1.3 s, tree copy 10.1 s, token ids 0.5 s.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import megacontext as mc
from megacontext import session_store
from megacontext.tree import MegaContextTree
from megacontext.working_context import WorkingContext


def _timed(obj, name: str, label: str, spent: dict[str, float]) -> None:
    fn = getattr(obj, name)

    def run(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0

    setattr(obj, name, run)


def main(num_tokens: int) -> None:
    base = mc.load_base("tiny-llama", device="cpu")
    cfg = mc.MegaContextConfig(model=base.name, w_max=1024, levels=4)
    s = mc.MegaContext(base, None, None, cfg).session()
    rng = np.random.default_rng(0)
    levels = s.tree._levels
    levels[0].write(0, rng.integers(0, base.vocab_size, num_tokens, dtype=np.uint32))
    levels[0].commit(num_tokens)
    for level in range(1, cfg.levels + 1):
        n = num_tokens // cfg.block_size**level
        levels[level].write(0, rng.standard_normal((n, base.dim), dtype=np.float32).astype("f2"))
        levels[level].commit(n)
    s.focus.wc = WorkingContext.from_tree(s.tree, cfg.w_max, cfg.protected_tokens)
    s._prefill(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "session"
        t0 = time.perf_counter()
        s.save(path)
        t_save = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        spent: dict[str, float] = {}
        _timed(session_store, "_verify", "checksums", spent)
        _timed(MegaContextTree, "to_ram", "tree copy", spent)
        _timed(MegaContextTree, "tokens", "token ids", spent)
        t0 = time.perf_counter()
        mc.MegaContext.open(path, base=base)
        t_open = time.perf_counter() - t0
        shutil.rmtree(path)
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in spent.items())
    print(
        f"{num_tokens} tokens, {size / 2**30:.2f} GiB: save {t_save:.2f} s, "
        f"open {t_open:.2f} s ({parts})"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 125 * 2**20)
