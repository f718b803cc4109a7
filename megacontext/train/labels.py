"""Counterfactual focus labels: ΔNLL@H and ΔKL of expand / collapse candidates, and
of block *reads* (a retrieval LensNet's labels).

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

Reads (:func:`label_reads`, ``labels.kind: reads``): one LOD change cannot value a
far block under an LOD2 gist (opening the LOD2 gist into 32 LOD1 gists brings back
none of the block's tokens), so a read candidate is a complete LOD1 block ``b``
before the protected tail that a gist covers, and its WC reads ``b`` as its ``bs``
tokens with the covering gist opened in place (:func:`read_block`: an LOD2 gist
becomes its other LOD1 children and ``b``'s tokens). ``dnll`` is as above, the label
applies to the covering gist (``kind = 'read'``, ``node = b``), and an entry with
several read labels takes the *largest* utility (it is worth opening when any block
under it pays). Candidates per snapshot: the ``top_blocks`` best by the lexical
signal (:func:`~megacontext.lexical_scorer.block_scores` of the newest tokens) and
``random_blocks`` others drawn uniformly, so the cheap signal's picks and a fair
sample of the rest are both labelled.

Candidates are evaluated *batched*: ``batch`` candidate WCs (plus the snapshot in the
first chunk) per forward of the base model (:func:`~megacontext.train.forward.forward_rows`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_write
from ..config import MegaContextConfig
from ..errors import StorageError
from ..lexical_scorer import block_scores
from .forward import forward_rows, kl_per_position, wc_embeddings, wc_row
from .rollout import Snapshot, snapshot_wc

__all__ = [
    "LABEL_COLUMNS",
    "Candidate",
    "apply_candidate",
    "candidates",
    "entry_targets",
    "label_reads",
    "label_snapshot",
    "module_hash",
    "open_reads",
    "read_block",
    "read_candidates",
    "read_labels",
    "snapshot_nll",
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
    "kind": "string: 'expand', 'collapse' or 'read' (node = the LOD1 block read as tokens)",
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

    wcs = [apply_candidate(snap.levels, snap.nodes, c, bs) for c in cands]
    out = []
    got = _evaluate(base, tree, tokens, snap, cfg, wcs, batch)
    for cand, (nll_s, dnll, dkl) in zip(cands, got, strict=True):
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
                "nll_snapshot": nll_s,
                "dnll": dnll,
                "dkl": dkl,
                "utility": utility(cand.kind, dnll, bs, temperature, token_cost),
            }
        )
    return out


def _row(base, tree, tokens, cfg: MegaContextConfig, levels: torch.Tensor, nodes: torch.Tensor):
    emb = wc_embeddings(base, tokens, levels, nodes, cfg.block_size, gists="tree", tree=tree)
    return wc_row(base, emb, levels, nodes, cfg)


@torch.no_grad()
def snapshot_nll(
    base: Any, tree: Any, tokens: torch.Tensor, snap: Snapshot, cfg: MegaContextConfig
):
    """Loss@H of the snapshot's own WC (the labels' ``nll_snapshot``): one forward."""
    r, start = _row(base, tree, tokens, cfg, snap.levels, snap.nodes)
    logp = forward_rows(base, [r], [snap.targets], [start])[0]
    return float(-logp.gather(-1, snap.targets.to(logp.device)[:, None]).mean())


@torch.no_grad()
def _evaluate(base, tree, tokens, snap: Snapshot, cfg: MegaContextConfig, wcs, batch: int):
    """``(NLL@H(snapshot), NLL@H(c) - NLL@H(snapshot), mean KL(p_s || p_c))`` per
    candidate WC ``c = (levels, nodes)`` of ``wcs``, ``batch`` WCs per base forward
    (the snapshot itself in the first chunk)."""
    tgt = snap.targets
    pending: list[Any] = [None, *wcs]  # None = the snapshot itself, in the first chunk
    nll_s = logp_s = None
    out: list[tuple[float, float, float]] = []
    for c0 in range(0, len(pending), batch):
        chunk = pending[c0 : c0 + batch]
        rows, starts = [], []
        for c in chunk:
            r, start = _row(
                base, tree, tokens, cfg, *((snap.levels, snap.nodes) if c is None else c)
            )
            rows.append(r)
            starts.append(start)
        logp = forward_rows(base, rows, [tgt] * len(rows), starts)
        nll = -logp.gather(-1, tgt.to(logp.device)[None, :, None].expand(len(rows), -1, 1))[..., 0]
        if logp_s is None:
            logp_s, nll_s = logp[0], nll[0].mean()
        kl = kl_per_position(logp_s[None], logp).mean(-1)
        for k, c in enumerate(chunk):
            if c is not None:
                out.append((float(nll_s), float(nll[k].mean() - nll_s), float(kl[k])))
    return out


def read_block(levels: torch.Tensor, nodes: torch.Tensor, b: int, bs: int):
    """``(levels, nodes)`` (int64) with LOD1 block ``b`` read as its ``bs`` tokens and
    its covering gist opened in place (an LOD2 gist into its other LOD1 children, and
    so on down), and the index of that covering entry; ``None`` when ``b`` is tokens
    already or not covered."""
    lv = levels.cpu().to(torch.int64).tolist()
    nd = nodes.cpu().to(torch.int64).tolist()
    for k, (level, node) in enumerate(zip(lv, nd, strict=True)):
        if level == 0 or not node * bs**level <= b * bs < (node + 1) * bs**level:
            continue
        out_l, out_n = _read_layout(level, node, b, bs)
        return (
            torch.tensor(lv[:k] + out_l + lv[k + 1 :], dtype=torch.int64),
            torch.tensor(nd[:k] + out_n + nd[k + 1 :], dtype=torch.int64),
            k,
        )
    return None


def _read_layout(level: int, node: int, b: int, bs: int) -> tuple[list[int], list[int]]:
    """The entries that tile gist ``(level, node)`` with LOD1 block ``b`` as tokens and
    every other part at the coarsest level that avoids ``b`` (oldest first)."""
    if level == 1:
        return [0] * bs, list(range(b * bs, b * bs + bs))
    out_l: list[int] = []
    out_n: list[int] = []
    for c in range(node * bs, node * bs + bs):
        if c * bs ** (level - 1) <= b * bs < (c + 1) * bs ** (level - 1):
            sub_l, sub_n = _read_layout(level - 1, c, b, bs)
            out_l += sub_l
            out_n += sub_n
        else:
            out_l.append(level - 1)
            out_n.append(c)
    return out_l, out_n


def read_candidates(
    tree: Any, snap: Snapshot, cfg: MegaContextConfig, top: int, rand: int, seed: int
) -> list[int]:
    """The LOD1 blocks to label for ``snap``: the ``top`` best by the lexical signal of
    the newest tokens (query ending at the cursor), then ``rand`` of the rest drawn
    uniformly (seeded by ``seed``, the snapshot's doc and step); blocks that are
    tokens in the WC already are skipped."""
    wc = snapshot_wc(snap, cfg)
    s = block_scores(tree, wc, cfg, query_end=snap.cursor)
    bs = cfg.block_size
    covered = torch.zeros(s.numel(), dtype=torch.bool)
    for level, node in zip(wc.levels.tolist(), wc.nodes.tolist(), strict=True):
        if level > 0:
            a, e = node * bs ** (level - 1), (node + 1) * bs ** (level - 1)
            covered[a : min(e, s.numel())] = True
    ok = torch.nonzero(covered).flatten()
    if ok.numel() == 0:
        return []
    order = ok[torch.argsort(s[ok], descending=True, stable=True)]
    picks = order[:top].tolist()
    rest = order[top:]
    if rand and rest.numel():
        g = torch.Generator().manual_seed(seed * 1_000_003 + snap.doc * 1009 + snap.step)
        picks += rest[torch.randperm(rest.numel(), generator=g)[:rand]].sort().values.tolist()
    return picks


@torch.no_grad()
def label_reads(
    base: Any,
    tree: Any,
    tokens: torch.Tensor,
    snap: Snapshot,
    cfg: MegaContextConfig,
    *,
    batch: int = 8,
    top_blocks: int = 4,
    random_blocks: int = 4,
    temperature: float = 0.05,
    token_cost: float = 0.0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Label the snapshot's read candidates (module doc), ``batch`` WCs per forward;
    one dict per block with the :data:`LABEL_COLUMNS` fields that depend on the
    snapshot (``entry``: the covering gist in the snapshot's WC)."""
    bs = cfg.block_size
    blocks = read_candidates(tree, snap, cfg, top_blocks, random_blocks, seed)
    reads = [(b, read_block(snap.levels, snap.nodes, b, bs)) for b in blocks]
    reads = [(b, r) for b, r in reads if r is not None]
    if not reads:
        return []
    got = _evaluate(base, tree, tokens, snap, cfg, [(r[0], r[1]) for _, r in reads], batch)
    lv = snap.levels.cpu().tolist()
    out = []
    for (b, (_, _, k)), (nll_s, dnll, dkl) in zip(reads, got, strict=True):
        out.append(
            {
                "doc": snap.doc,
                "snapshot_step": snap.step,
                "cursor": snap.cursor,
                "entry": k,
                "n_entries": 1,
                "level": int(lv[k]),
                "node": b,
                "kind": "read",
                "nll_snapshot": nll_s,
                "dnll": dnll,
                "dkl": dkl,
                "utility": utility("expand", dnll, bs, temperature, token_cost),
            }
        )
    return out


def open_reads(
    snap: Snapshot, rows: Sequence[dict[str, Any]], cfg: MegaContextConfig
) -> tuple[Snapshot, list[dict[str, Any]]] | None:
    """The WC a retrieval policy reaches after its first refocus: every gist above
    LOD1 that covers a read whose utility passes ``cfg.tau_expand`` opened one level,
    and ``rows`` re-pointed at the entries that now cover their blocks (``None`` when
    no such gist). The same labels then teach the second step (open the LOD1 gist)."""
    bs = cfg.block_size
    lv = snap.levels.cpu().tolist()
    nd = snap.nodes.cpu().tolist()
    hot = {int(r["entry"]) for r in rows if r["kind"] == "read" and r["utility"] > cfg.tau_expand}
    hot = {k for k in hot if lv[k] >= 2}
    if not hot:
        return None
    new_l: list[int] = []
    new_n: list[int] = []
    for k, (level, node) in enumerate(zip(lv, nd, strict=True)):
        if k in hot:
            new_l += [level - 1] * bs
            new_n += list(range(node * bs, node * bs + bs))
        else:
            new_l.append(level)
            new_n.append(node)
    where: dict[int, int] = {}
    starts = [n * bs**level for level, n in zip(new_l, new_n, strict=True)]
    for i, (level, start) in enumerate(zip(new_l, starts, strict=True)):
        if level > 0:
            for b in range(start // bs, (start + bs**level) // bs):
                where[b] = i
    moved = []
    for r in rows:
        i = where.get(int(r["node"]))
        if r["kind"] == "read" and i is not None:
            moved.append({**r, "entry": i, "level": new_l[i]})
    out = Snapshot(
        doc=snap.doc,
        step=snap.step,
        cursor=snap.cursor,
        levels=torch.tensor(new_l, dtype=snap.levels.dtype),
        nodes=torch.tensor(new_n, dtype=snap.nodes.dtype),
        targets=snap.targets,
    )
    return out, moved


def entry_targets(rows: Sequence[dict[str, Any]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-entry LensNet targets of one snapshot: ``(target [n] float32, labelled [n] bool)``;
    an entry with several expand / collapse labels takes their mean, one with read
    labels the largest (module doc)."""
    total = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    best = torch.full((n,), -math.inf, dtype=torch.float64)
    for r in rows:
        e0, k = int(r["entry"]), int(r["n_entries"])
        if r.get("kind") == "read":
            best[e0] = max(float(best[e0]), float(r["utility"]))
            continue
        total[e0 : e0 + k] += float(r["utility"])
        count[e0 : e0 + k] += 1
    read = best > -math.inf
    labelled = (count > 0) | read
    target = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    target = torch.where(read, best, target)
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
