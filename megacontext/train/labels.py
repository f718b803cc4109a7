"""Counterfactual focus labels: ΔNLL@H and ΔKL of expand / collapse candidates.

For an on-policy snapshot (:class:`~megacontext.train.rollout.Snapshot`) every legal
candidate is one LOD change of the snapshot's WC:

- ``expand``: a gist entry ``i`` at level ``l >= 1`` whose span ends before the
  protected tail, replaced by its ``bs`` children (cost ``+(bs-1)``);
- ``collapse``: ``bs`` contiguous entries that are exactly the children of one parent
  at level ``l+1 <= top`` ending before the protected tail, replaced by the parent
  (cost ``-(bs-1)``).

Hysteresis (cooldown, minimum residency) and the budget are *not* applied: a label
measures what the change is worth, the allocator decides whether it may happen.

For each candidate WC ``c`` and the snapshot WC ``s`` (gists read from the tree built
with the current GistNet), over the next ``H`` tokens:

- ``dnll = Loss@H(c) - Loss@H(s)`` (mean NLL, nats; negative = the change helps);
- ``dkl = mean_t KL(p_s || p_c)`` (nats; how much the change moves the predictions).

Signed utility (one formula for both kinds; ``u > 0`` = detail pays, expand / keep
expanded; ``u < 0`` = detail does not pay, collapse / keep collapsed)::

    benefit = NLL(coarse WC) - NLL(fine WC)      # expand: -dnll, collapse: +dnll
    u = tanh((benefit - token_cost * (bs - 1)) / temperature)

``token_cost`` (nats per WC entry) prices the ``bs - 1`` entries the finer WC spends;
``temperature`` (nats) sets the scale. A helpful expand is therefore positive and a
harmless collapse negative. Per-entry targets for LensNet (:func:`entry_targets`):
an expand label applies to its gist entry, a collapse label to each of its ``bs``
entries; an entry with several labels takes their mean.

Candidates are evaluated *batched*: ``batch`` candidate WCs (plus the snapshot in the
first chunk) per forward of the base model (:func:`~megacontext.train.forward.forward_rows`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_write
from ..config import MegaContextConfig
from ..errors import StorageError
from .forward import forward_rows, kl_per_position, wc_embeddings, wc_row
from .rollout import Snapshot

__all__ = [
    "LABEL_COLUMNS",
    "Candidate",
    "apply_candidate",
    "candidates",
    "entry_targets",
    "label_snapshot",
    "module_hash",
    "read_labels",
    "utility",
    "write_labels",
]

# Parquet schema of artifacts/deltas/<run>/*.parquet (one row per candidate).
LABEL_COLUMNS = {
    "run": "string: run name",
    "cycle": "int64: training cycle (0 = warm start / standalone labelling)",
    "gistnet_hash": "string: sha256[:16] of the GistNet weights that built the gists",
    "lensnet_hash": "string: sha256[:16] of the LensNet weights of the policy",
    "lora_hash": "string: sha256[:16] of the LoRA weights ('' without LoRA)",
    "doc": "int64: window index in the labelling batch",
    "snapshot_step": "int64: block index of the snapshot within the window",
    "cursor": "int64: history length at the snapshot (tokens)",
    "entry": "int64: WC index of the candidate's (first) entry",
    "n_entries": "int64: entries the label applies to (1 expand, bs collapse)",
    "level": "int64: LOD of the entry / entries",
    "node": "int64: node index of the (first) entry at that level",
    "kind": "string: 'expand' or 'collapse'",
    "nll_snapshot": "float64: Loss@H of the snapshot WC (nats)",
    "dnll": "float64: Loss@H(candidate) - Loss@H(snapshot) (nats)",
    "dkl": "float64: mean over H of KL(p_snapshot || p_candidate) (nats)",
    "utility": "float64: signed utility in [-1, 1] (see module docstring)",
}


class Candidate(tuple):
    """``(kind, entry, level, node)``: ``expand`` entry ``entry`` (a gist at
    ``level``), or ``collapse`` the ``bs`` entries from ``entry`` (children at
    ``level``, first child ``node``)."""

    __slots__ = ()

    def __new__(cls, kind: str, entry: int, level: int, node: int):
        return super().__new__(cls, (kind, entry, level, node))

    kind = property(lambda self: self[0])
    entry = property(lambda self: self[1])
    level = property(lambda self: self[2])
    node = property(lambda self: self[3])


def candidates(levels: torch.Tensor, nodes: torch.Tensor, cursor: int, cfg: MegaContextConfig):
    """The legal expand and collapse candidates of a WC (see module docstring)."""
    bs, top = cfg.block_size, cfg.levels
    lv = levels.cpu().to(torch.int64).tolist()
    nd = nodes.cpu().to(torch.int64).tolist()
    n = len(lv)
    full = max(cursor - cfg.protected_tokens, 0)
    p0 = full - full % bs  # protected_start
    out: list[Candidate] = []
    for i in range(n):
        level, node = lv[i], nd[i]
        if level >= 1 and (node + 1) * bs**level <= p0:
            out.append(Candidate("expand", i, level, node))
        if (
            level < top
            and node % bs == 0
            and i + bs <= n
            and (node // bs + 1) * bs ** (level + 1) <= p0
            and all(lv[i + j] == level and nd[i + j] == node + j for j in range(bs))
        ):
            out.append(Candidate("collapse", i, level, node))
    return out


def apply_candidate(levels: torch.Tensor, nodes: torch.Tensor, cand: Candidate, bs: int):
    """The candidate WC ``(levels, nodes)``."""
    kind, i, level, node = cand
    lv, nd = levels.cpu().to(torch.int64), nodes.cpu().to(torch.int64)
    if kind == "expand":
        new_l = torch.full((bs,), level - 1, dtype=torch.int64)
        new_n = node * bs + torch.arange(bs, dtype=torch.int64)
        return torch.cat([lv[:i], new_l, lv[i + 1 :]]), torch.cat([nd[:i], new_n, nd[i + 1 :]])
    new_l = torch.tensor([level + 1], dtype=torch.int64)
    new_n = torch.tensor([node // bs], dtype=torch.int64)
    return torch.cat([lv[:i], new_l, lv[i + bs :]]), torch.cat([nd[:i], new_n, nd[i + bs :]])


def utility(kind: str, dnll: float, bs: int, temperature: float, token_cost: float) -> float:
    """Signed utility of a candidate (see module docstring)."""
    benefit = -dnll if kind == "expand" else dnll
    return float(torch.tanh(torch.tensor((benefit - token_cost * (bs - 1)) / temperature)))


@torch.no_grad()
def label_snapshot(
    base: Any,
    tree: Any,
    tokens: torch.Tensor,
    snap: Snapshot,
    cfg: MegaContextConfig,
    *,
    batch: int = 8,
    max_candidates: int | None = None,
    temperature: float = 0.05,
    token_cost: float = 0.0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Evaluate the snapshot's candidates, ``batch`` WCs per base forward; one dict per
    candidate with the :data:`LABEL_COLUMNS` fields that depend on the snapshot."""
    bs = cfg.block_size
    cands = candidates(snap.levels, snap.nodes, snap.cursor, cfg)
    if max_candidates is not None and len(cands) > max_candidates:
        g = torch.Generator().manual_seed(seed * 1_000_003 + snap.doc * 1009 + snap.step)
        keep = torch.randperm(len(cands), generator=g)[:max_candidates].sort().values
        cands = [cands[int(k)] for k in keep]
    if not cands:
        return []

    def row(levels: torch.Tensor, nodes: torch.Tensor):
        emb = wc_embeddings(base, tokens, levels, nodes, bs, gists="tree", tree=tree)
        return wc_row(base, emb, levels, nodes, cfg)

    tgt = snap.targets
    pending: list[Any] = [None, *cands]  # None = the snapshot itself, in the first chunk
    nll_s = logp_s = None
    out: list[dict[str, Any]] = []
    for c0 in range(0, len(pending), batch):
        chunk = pending[c0 : c0 + batch]
        rows = []
        starts: list[int] = []
        for cand in chunk:
            lv, nd = (
                (snap.levels, snap.nodes)
                if cand is None
                else apply_candidate(snap.levels, snap.nodes, cand, bs)
            )
            r, start = row(lv, nd)
            rows.append(r)
            starts.append(start)
        logp = forward_rows(base, rows, [tgt] * len(rows), starts)
        nll = -logp.gather(-1, tgt.to(logp.device)[None, :, None].expand(len(rows), -1, 1))[..., 0]
        if logp_s is None:
            logp_s, nll_s = logp[0], nll[0].mean()
        kl = kl_per_position(logp_s[None], logp).mean(-1)
        for k, cand in enumerate(chunk):
            if cand is None:
                continue
            dnll = float(nll[k].mean() - nll_s)
            out.append(
                {
                    "doc": snap.doc,
                    "snapshot_step": snap.step,
                    "cursor": snap.cursor,
                    "entry": cand.entry,
                    "n_entries": 1 if cand.kind == "expand" else bs,
                    "level": cand.level,
                    "node": cand.node,
                    "kind": cand.kind,
                    "nll_snapshot": float(nll_s),
                    "dnll": dnll,
                    "dkl": float(kl[k]),
                    "utility": utility(cand.kind, dnll, bs, temperature, token_cost),
                }
            )
    return out


def entry_targets(rows: Sequence[dict[str, Any]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-entry LensNet targets of one snapshot: ``(target [n] float32, labelled [n] bool)``;
    an entry with several labels takes their mean."""
    total = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    for r in rows:
        e0, k = int(r["entry"]), int(r["n_entries"])
        total[e0 : e0 + k] += float(r["utility"])
        count[e0 : e0 + k] += 1
    labelled = count > 0
    target = torch.where(labelled, total / count.clamp(min=1), torch.zeros_like(total))
    return target.float(), labelled


def module_hash(module: Any) -> str:
    """sha256[:16] over a module's state dict (names, shapes, bytes); '' for None."""
    if module is None:
        return ""
    h = hashlib.sha256()
    state = module if isinstance(module, dict) else module.state_dict()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


def write_labels(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write label rows (all :data:`LABEL_COLUMNS`) to a Parquet file atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    types = {
        "string": pa.string(),
        "int64": pa.int64(),
        "float64": pa.float64(),
    }
    schema = pa.schema([(k, types[v.split(":")[0]]) for k, v in LABEL_COLUMNS.items()])
    missing = [k for k in LABEL_COLUMNS if rows and k not in rows[0]]
    if missing:
        raise StorageError(f"{path}: label rows lack columns {missing}", path=str(path))
    table = pa.Table.from_pylist([{k: r[k] for k in LABEL_COLUMNS} for r in rows], schema=schema)
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_labels(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a label file or of every ``*.parquet`` in a directory."""
    import pyarrow.parquet as pq

    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise StorageError(f"{path}: no label Parquet files", path=str(path))
    rows: list[dict[str, Any]] = []
    for f in files:
        rows += pq.read_table(f).to_pylist()
    return rows
