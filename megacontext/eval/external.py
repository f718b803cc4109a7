"""External peers: the run's tasks exported for programs outside this environment,
and their result rows folded back into the run's report.

Some peers cannot live in megacontext's environment (kvpress pins an older
transformers). They run from their own environment (``bench/peers/<name>/run.sh
RUN``) on exactly the tokens and budgets of the run:

1. While :func:`megacontext.eval.run_eval` runs, every
   :func:`megacontext.eval.suites.compare_methods` call records its task
   (:func:`record_task`): the row group's tags, the budget ``W``, the history token
   ids ``[T]``, the target token ids ``[H]`` and the answer spec (if the suite decodes
   an answer). ``run_eval`` writes them to ``RUN/tasks.parquet``
   (:func:`write_tasks`) and puts its SHA-256, the task count and the base model's
   local directory (:func:`base_model_source`) into ``meta.json``.
2. A peer reads ``tasks.parquet`` and ``meta.json`` and writes one row per task and
   method to ``RUN/peers/<peer>.parquet`` with the task's tags, ``budget``,
   ``method``, ``entries``, ``nll``, ``token_nll``, ``history_tokens``, ``horizon``,
   ``seconds``, the SHA-256 of the ``tasks.parquet`` it read (``tasks_sha256``),
   optionally ``generated`` (its greedy answer), ``answer`` (the task's answer spec,
   copied) and ``full_nll_peer`` (its own NLL of the targets without compression: a
   cross-check against our ``full`` row).
3. ``megacontext report RUN`` (:func:`fold_peers`, called by
   :func:`megacontext.eval.report.build_report`) appends those rows to the run's rows,
   with the derived columns of :func:`megacontext.eval.suites.add_derived` computed
   against the same group's ``full`` and ``truncation`` rows, the answer ``score``
   computed with the suite's own metric, and ``full_check`` = ``|full_nll_peer −
   nll_full|``. A peer file made from other tasks (its ``tasks_sha256`` differs from
   the run's) is reported as stale and not folded; a malformed one raises
   :class:`~megacontext.errors.StorageError` naming the file.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .._atomic import atomic_write
from ..errors import StorageError
from .common import score_answer
from .metrics import delta_nll, recovered_fraction

__all__ = [
    "PEERS_DIR",
    "TASKS_FILE",
    "base_model_source",
    "fold_peers",
    "read_tasks",
    "record_task",
    "recording_tasks",
    "write_tasks",
]

TASKS_FILE = "tasks.parquet"
PEERS_DIR = "peers"
# what every peer row must carry (types checked when folded)
PEER_COLUMNS = ("suite", "doc", "budget", "method", "entries", "nll", "token_nll", "tasks_sha256")

_TASKS_SCHEMA = pa.schema(
    [
        ("task", pa.int32()),
        ("suite", pa.string()),
        ("doc", pa.string()),
        ("budget", pa.int32()),
        ("tags", pa.string()),  # JSON object: the row group's tags (suite, doc, kind, ...)
        ("history", pa.list_(pa.int32())),
        ("target", pa.list_(pa.int32())),
        ("answer", pa.string()),  # JSON object or null: max_new, references, metric, stop
    ]
)

_recorder: contextvars.ContextVar[list[dict[str, Any]] | None] = contextvars.ContextVar(
    "megacontext_eval_tasks", default=None
)


@contextmanager
def recording_tasks() -> Iterator[list[dict[str, Any]]]:
    """Within the block, :func:`record_task` appends to the yielded list."""
    tasks: list[dict[str, Any]] = []
    token = _recorder.set(tasks)
    try:
        yield tasks
    finally:
        _recorder.reset(token)


def record_task(
    history: torch.Tensor,
    targets: torch.Tensor,
    budget: int,
    tags: dict[str, Any] | None,
    answer: dict[str, Any] | None = None,
) -> None:
    """Record one comparison (history ``[T]``, targets ``[H]`` at budget ``W``) when a
    :func:`recording_tasks` block is active; otherwise do nothing."""
    tasks = _recorder.get()
    if tasks is None:
        return
    tags = dict(tags or {})
    tasks.append(
        {
            "task": len(tasks),
            "suite": str(tags.get("suite", "")),
            "doc": str(tags.get("doc", "")),
            "budget": int(budget),
            "tags": json.dumps(tags, sort_keys=True, default=str),
            "history": torch.as_tensor(history).flatten().tolist(),
            "target": torch.as_tensor(targets).flatten().tolist(),
            "answer": (
                None if answer is None else json.dumps(answer, sort_keys=True, default=list)
            ),
        }
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_tasks(run_dir: str | os.PathLike[str], tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ``tasks`` atomically to ``run_dir/tasks.parquet`` (list<int32> token
    columns). Returns ``{"file", "sha256", "count"}`` for ``meta.json``."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(list(tasks), schema=_TASKS_SCHEMA)
    path = run / TASKS_FILE
    atomic_write(path, lambda p: pq.write_table(table, p))
    return {"file": TASKS_FILE, "sha256": _sha256(path), "count": len(tasks)}


def read_tasks(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The tasks of a run (``tags`` and ``answer`` decoded from JSON)."""
    path = Path(run_dir) / TASKS_FILE
    if not path.is_file():
        raise StorageError(f"{path}: no tasks (run it with run_eval)", path=str(path))
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise StorageError(f"{path}: unreadable Parquet ({exc})", path=str(path)) from None
    missing = [c for c in _TASKS_SCHEMA.names if c not in table.column_names]
    if missing:
        raise StorageError(f"{path}: missing columns {missing}", path=str(path))
    out = []
    for r in table.to_pylist():
        r["tags"] = json.loads(r["tags"])
        r["answer"] = None if r["answer"] is None else json.loads(r["answer"])
        out.append(r)
    return out


def base_model_source(base: Any) -> dict[str, Any]:
    """``{"name", "path", "dtype"}`` of the base model: ``path`` is the local
    transformers directory it was loaded from (config + weights + tokenizer), or the
    Hub id it was loaded by, or ``None`` for a model built in memory (tiny-llama)."""
    src = str(getattr(base.model.config, "name_or_path", "") or "")
    return {"name": base.name, "path": src or None, "dtype": str(base.dtype).replace("torch.", "")}


# ------------------------------------------------------------------ folding


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_row(path: Path, i: int, r: dict[str, Any], ours: set[str]) -> None:
    missing = [c for c in PEER_COLUMNS if r.get(c) is None]
    if missing:
        raise StorageError(f"{path}: row {i} lacks {missing}", path=str(path))
    if r["method"] in ours:
        raise StorageError(
            f"{path}: row {i} has method {r['method']!r}, which is one of the run's own",
            path=str(path),
        )
    if not _finite(r["nll"]) or not isinstance(r["token_nll"], list):
        raise StorageError(
            f"{path}: row {i} has a non-finite nll {r['nll']!r} or no token_nll list",
            path=str(path),
        )
    if not isinstance(r["budget"], int) or not isinstance(r["entries"], int):
        raise StorageError(f"{path}: row {i}: budget and entries must be integers", path=str(path))


def _score(row: dict[str, Any]) -> float | None:
    if row.get("generated") is None or row.get("answer") is None:
        return None
    return score_answer(str(row["generated"]), json.loads(row["answer"]))


def fold_peers(
    run_dir: str | os.PathLike[str], rows: list[dict[str, Any]], meta: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[str]]:
    """``rows`` plus every current ``run_dir/peers/*.parquet`` row (derived columns
    against the same ``(suite, doc, budget)`` group's ``full`` and ``truncation``
    rows), and the report's lines about the peers (empty without peer files)."""
    folder = Path(run_dir) / PEERS_DIR
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        return rows, []
    want = (meta.get("tasks") or {}).get("sha256")
    ours = {r["method"] for r in rows}
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if _finite(r.get("nll")):
            groups.setdefault((r.get("suite"), r.get("doc"), r.get("budget")), {})[r["method"]] = r[
                "nll"
            ]
    lines = ["## External peers", ""]
    added: list[dict[str, Any]] = []
    for path in files:
        try:
            prow = pq.read_table(path).to_pylist()
        except (pa.ArrowInvalid, OSError) as exc:
            raise StorageError(f"{path}: unreadable Parquet ({exc})", path=str(path)) from None
        if not prow:
            raise StorageError(f"{path}: no rows", path=str(path))
        for i, r in enumerate(prow):
            _check_row(path, i, r, ours)
        shas = {r["tasks_sha256"] for r in prow}
        if want is None or shas != {want}:
            lines.append(
                f"- `{PEERS_DIR}/{path.name}`: **not folded**: made from other tasks "
                f"(tasks_sha256 {sorted(shas)} ≠ this run's {want}); rerun the peer."
            )
            continue
        checks = []
        for i, r in enumerate(prow):
            key = (r["suite"], r["doc"], r["budget"])
            if key not in groups:
                raise StorageError(
                    f"{path}: row {i} answers {key}, a (suite, doc, budget) not in the run",
                    path=str(path),
                )
            by = groups[key]
            full, trunc = by.get("full", math.nan), by.get("truncation", math.nan)
            r["nll_full"], r["nll_trunc"] = full, trunc
            r["delta_nll"] = delta_nll(r["nll"], full)
            r["delta_trunc"] = delta_nll(trunc, full)
            r["recovered"] = recovered_fraction(r["nll"], trunc, full)
            score = _score(r)
            if score is not None:
                r["score"] = score
            if _finite(r.get("full_nll_peer")) and math.isfinite(full):
                r["full_check"] = abs(r["full_nll_peer"] - full)
                checks.append(r["full_check"])
            r["peer_file"] = f"{PEERS_DIR}/{path.name}"
        added += prow
        methods = sorted({r["method"] for r in prow})
        versions = sorted({str(r.get("versions")) for r in prow if r.get("versions")})
        line = (
            f"- `{PEERS_DIR}/{path.name}`: {len(prow)} rows, methods "
            f"{', '.join(f'`{m}`' for m in methods)}"
        )
        if versions:
            line += f"; {'; '.join(versions)}"
        if checks:
            line += (
                f". Cross-check, its uncompressed NLL vs our `full` row over "
                f"{len(checks)} rows: max |Δ| = {max(checks):.2e} nats"
            )
        lines.append(line + ".")
    lines.append("")
    return rows + added, lines
