"""Per-iteration telemetry: Parquet run directories, Weights & Biases, summaries, plots.

Every refocus iteration of the runtime loop logs one row (``log_iteration``) and the
allocator's actions of that iteration (``log_actions``). Rows are buffered and written
as Parquet parts under a run directory::

    run_dir/
      meta.json                      config, tags, start time, versions (atomic)
      iterations/part-00000.parquet  one row per (iteration, session)
      iterations/part-00001.parquet
      actions/part-00000.parquet     the allocator action trace
      wandb/                         only when W&B is enabled

Each ``flush`` writes the buffered rows as a *new* part: temp file, ``fsync``,
``os.replace``, ``fsync`` of the directory. A crash loses at most the rows logged
since the last flush and never leaves a half-written part under a ``part-`` name.
Readers (:func:`read_run`) concatenate the parts in numeric order. Re-opening an
existing run directory appends parts after the last one. One writer per run
directory at a time.

Iteration columns (fixed schema, :data:`ITERATION_SCHEMA`): ``iteration`` (required),
``session`` (default 0), ``step``, ``loss_at_h``, ``swap_rate`` (actions / blocks),
``mean_residency`` (steps), ``latency_ms`` and its phases ``latency_{gist,lens,
allocator,cache,decode}_ms``, ``token_budget_utilization`` (``wc_cost / w_max``),
``wc_cost``, ``w_max``, ``num_tokens``, ``n_expand``, ``n_collapse``, and
``wall_time`` (Unix seconds, filled in at log time). Any other keyword is an *extra*
column: its values must be numbers (``bool``, ``int``, ``float``, NumPy scalars or
0-d tensors) or ``None``; extras are stored as ``float64`` and rows without them
read back as null.

Action columns (:data:`ACTION_SCHEMA`): ``iteration``, ``session``, ``step``,
``kind`` (``"expand"`` | ``"collapse"``), ``level``, ``node``, ``score``,
``cost_delta``, and the optional ``residency`` (steps the node spent at its previous
level of detail before this action), from which :func:`summarize` builds a residency
histogram.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import importlib.metadata
import json
import math
import numbers
import os
import platform
import re
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ._atomic import atomic_write, atomic_write_bytes
from ._version import __version__
from .errors import BackendUnavailableError, ConfigError, InputError, InvariantError, StorageError

__all__ = [
    "ACTION_SCHEMA",
    "ITERATION_SCHEMA",
    "SwapCounts",
    "Telemetry",
    "budget_floor",
    "pingpong_count",
    "pingpongs",
    "plot_run",
    "read_run",
    "summarize",
    "swap_counts",
]

PHASES = ("gist", "lens", "allocator", "cache", "decode")
PHASE_COLUMNS = tuple(f"latency_{p}_ms" for p in PHASES)

ITERATION_SCHEMA = pa.schema(
    [
        pa.field("iteration", pa.int64(), nullable=False),
        pa.field("session", pa.int64(), nullable=False),
        pa.field("step", pa.int64()),
        pa.field("loss_at_h", pa.float64()),
        pa.field("swap_rate", pa.float64()),
        pa.field("mean_residency", pa.float64()),
        pa.field("latency_ms", pa.float64()),
        *(pa.field(name, pa.float64()) for name in PHASE_COLUMNS),
        pa.field("token_budget_utilization", pa.float64()),
        pa.field("wc_cost", pa.int64()),
        pa.field("w_max", pa.int64()),
        pa.field("num_tokens", pa.int64()),
        pa.field("n_expand", pa.int64()),
        pa.field("n_collapse", pa.int64()),
        pa.field("wall_time", pa.float64(), nullable=False),
    ]
)

ACTION_SCHEMA = pa.schema(
    [
        pa.field("iteration", pa.int64(), nullable=False),
        pa.field("session", pa.int64(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("level", pa.int64(), nullable=False),
        pa.field("node", pa.int64(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("cost_delta", pa.int64(), nullable=False),
        pa.field("residency", pa.int64()),
    ]
)

ACTION_KINDS = ("expand", "collapse")
_DEFAULTS = {"session": 0}  # filled in when a row leaves the field out
_PART = re.compile(r"^part-(\d{5,})\.parquet$")
_TABLES = ("iterations", "actions")
META = "meta.json"


# --------------------------------------------------------------------------- values


def _scalar(value: Any) -> Any:
    """NumPy scalars and 0-d / one-element tensors -> Python numbers; others unchanged."""
    if isinstance(value, np.generic):
        return value.item()
    if not isinstance(value, (bool, int, float, str, bytes)) and hasattr(value, "item"):
        shape = getattr(value, "shape", ())
        if math.prod(shape) == 1:
            return value.item()
    return value


def _kind(dtype: pa.DataType) -> str:
    if pa.types.is_integer(dtype):
        return "int"
    if pa.types.is_floating(dtype):
        return "float"
    return "str"


# (name, kind, nullable) per fixed column, resolved once: log_iteration is on the hot path
_ITERATION_SPEC = [(f.name, _kind(f.type), f.nullable) for f in ITERATION_SCHEMA]
_ACTION_SPEC = [(f.name, _kind(f.type), f.nullable) for f in ACTION_SCHEMA]
_EXPECTS = {"int": "an integer", "float": "a float", "str": "a string"}


def _coerce(table: str, name: str, value: Any, kind: str, nullable: bool) -> Any:
    """Validate one value of a fixed column; returns the Python value to store."""
    cls = type(value)
    if (cls is float and kind == "float") or (cls is str and kind == "str"):
        return value  # the common case, checked first
    if cls is int and kind == "int" and -(2**63) <= value < 2**63:
        return value
    value = _scalar(value)
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"telemetry {table}: field {name!r} is required", field=name)
    # a bool in a numeric column is almost always a bug at the call site: rejected
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "int" and (
        (number and isinstance(value, numbers.Integral))
        or (isinstance(value, float) and value.is_integer())
    ):
        value = int(value)
        if -(2**63) <= value < 2**63:
            return value
        raise ConfigError(
            f"telemetry {table}: field {name!r} = {value} does not fit in int64",
            field=name,
            value=value,
        )
    if kind == "float" and number:
        return float(value)
    raise ConfigError(
        f"telemetry {table}: field {name!r} expects {_EXPECTS[kind]}, got {value!r} "
        f"({type(value).__name__})",
        field=name,
        value=value,
    )


def _coerce_extra(name: str, value: Any) -> float | None:
    value = _scalar(value)
    if value is None:
        return None
    if isinstance(value, numbers.Real):  # bool, int, float (and their NumPy kin)
        return float(value)
    raise ConfigError(
        f"telemetry iterations: extra field {name!r} must be a number or None "
        f"(extra columns are stored as float64), got {type(value).__name__}",
        field=name,
        value=value,
    )


def _validate_action(row: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(row) - set(ACTION_SCHEMA.names)
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(
            f"telemetry actions: unknown field {name!r} (fields: {', '.join(ACTION_SCHEMA.names)})",
            field=name,
        )
    out = {}
    for name, kind, nullable in _ACTION_SPEC:
        value = row.get(name)
        if value is None:
            value = defaults.get(name)
        if value is None:
            value = _DEFAULTS.get(name)
        out[name] = _coerce("actions", name, value, kind, nullable)
    if out["kind"] not in ACTION_KINDS:
        raise ConfigError(
            f"telemetry actions: field 'kind' must be 'expand' or 'collapse', got {out['kind']!r}",
            field="kind",
            value=out["kind"],
        )
    return out


# ------------------------------------------------------------------------- files


def _parts(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        m = _PART.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry))
    return sorted(found)


def _versions() -> dict[str, str]:
    out = {"megacontext": __version__, "python": platform.python_version()}
    for dist in ("pyarrow", "torch", "transformers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def _wandb_requested(wandb: bool | None) -> bool:
    if wandb is not None:
        return bool(wandb)
    flag = os.environ.get("MEGACONTEXT_WANDB", "").strip().lower()
    return flag in ("1", "true", "yes", "on")


def _import_wandb() -> Any:
    try:
        return importlib.import_module("wandb")
    except ImportError as exc:
        raise BackendUnavailableError(
            "Weights & Biases logging was requested (wandb=True or MEGACONTEXT_WANDB=1) but "
            "the 'wandb' package is not installed: run `uv sync --extra wandb` "
            "(or `pip install wandb`), or pass wandb=False"
        ) from exc


# ---------------------------------------------------------------------- the writer


class Telemetry:
    """Writes one run directory of per-iteration metrics and allocator actions.

    ``Telemetry(run_dir, config=..., tags=..., wandb=None, flush_every=64,
    flush_seconds=30.0)`` creates ``run_dir`` (and ``meta.json``) or re-opens an
    existing run to append to it. ``log_iteration(**fields)`` buffers one row; the
    buffers are written as new Parquet parts every ``flush_every`` iteration rows, or
    at the first row logged ``flush_seconds`` after the last write (so a slow run, a
    CPU step every 45 s, shows its progress while it runs; ``None``: by count only),
    and on :meth:`flush` and :meth:`close`. Use it as a context manager to close it on
    exit.

    W&B: with ``wandb=True`` (or ``wandb=None`` and ``MEGACONTEXT_WANDB=1``) each
    iteration's numeric fields also go to ``run.log``; ``WANDB_MODE=offline`` works
    without a network. Values are validated at the call, so a rejected row changes
    nothing.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        config: dict | None = None,
        wandb: bool | None = None,
        tags: list[str] | None = None,
        flush_every: int = 64,
        flush_seconds: float | None = 30.0,
    ):
        if not isinstance(flush_every, int) or flush_every < 1:
            raise ConfigError(
                f"flush_every must be a positive integer, got {flush_every!r}",
                field="flush_every",
                value=flush_every,
            )
        if flush_seconds is not None and not (
            isinstance(flush_seconds, (int, float)) and flush_seconds > 0
        ):
            raise ConfigError(
                f"flush_seconds must be a positive number or None, got {flush_seconds!r}",
                field="flush_seconds",
                value=flush_seconds,
            )
        self.run_dir = Path(run_dir)
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._last_flush = time.monotonic()
        self._closed = False
        self._iterations: list[dict[str, Any]] = []
        self._actions: list[dict[str, Any]] = []
        self._extras: list[str] = []  # extra iteration columns, in order of appearance
        want_wandb = _wandb_requested(wandb)
        wandb_mod = _import_wandb() if want_wandb else None  # fail before touching disk

        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise StorageError(
                f"telemetry run directory {self.run_dir} exists and is not a directory",
                path=str(self.run_dir),
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for entry in self.run_dir.glob(f".{META}.*.tmp"):  # a crash while writing meta.json
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        self._next_part: dict[str, int] = {}
        for name in _TABLES:
            sub = self.run_dir / name
            sub.mkdir(exist_ok=True)
            for entry in sub.iterdir():  # temp files of a writer that crashed mid-flush
                if entry.name.startswith(".part-") and entry.name.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        entry.unlink()
            parts = _parts(sub)
            self._next_part[name] = parts[-1][0] + 1 if parts else 0

        meta_path = self.run_dir / META
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        if meta_path.exists():
            self.meta = _read_meta(self.run_dir)
            self.meta.setdefault("reopened", []).append(now)
        else:
            self.meta = {
                "format": 1,
                "created": now,
                "config": config or {},
                "tags": list(tags or []),
                "versions": _versions(),
                "argv": list(sys.argv),
            }
        text = json.dumps(self.meta, indent=2, default=str).encode("utf-8") + b"\n"
        atomic_write_bytes(meta_path, text)

        self._wandb_run = None
        if wandb_mod is not None:
            self._wandb_run = wandb_mod.init(
                dir=str(self.run_dir),
                config=config or {},
                tags=list(tags or []),
                name=self.run_dir.name,
                mode=os.environ.get("WANDB_MODE"),
            )

    # ------------------------------------------------------------------ logging

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(
                f"telemetry run {self.run_dir} is closed", path=str(self.run_dir), field="closed"
            )

    def log_iteration(self, **fields: Any) -> None:
        """Buffer one row: ``iteration=`` is required, the other known fields are
        optional (null), unknown keywords become float64 extra columns."""
        self._check_open()
        row: dict[str, Any] = {}
        for name, kind, nullable in _ITERATION_SPEC:
            value = fields.get(name)
            if value is None:
                value = _DEFAULTS.get(name)
                if name == "wall_time":
                    value = time.time()
            row[name] = _coerce("iterations", name, value, kind, nullable)
        new_extras = []
        for name, value in fields.items():
            if name in row:
                continue
            row[name] = _coerce_extra(name, value)
            if name not in self._extras:
                new_extras.append(name)
        self._extras.extend(new_extras)
        self._iterations.append(row)
        if self._wandb_run is not None:
            numeric = {
                k: v
                for k, v in row.items()
                if v is not None and k != "wall_time" and not isinstance(v, str)
            }
            self._wandb_run.log(numeric)
        late = (
            self.flush_seconds is not None
            and time.monotonic() - self._last_flush >= self.flush_seconds
        )
        if len(self._iterations) >= self.flush_every or late:
            self.flush()

    def log_actions(
        self,
        rows: Iterable[Mapping[str, Any] | Any] | pa.Table,
        *,
        iteration: int | None = None,
        session: int | None = None,
    ) -> None:
        """Buffer allocator actions: dicts, ``megacontext.allocator.Action`` tuples
        (anything with ``_asdict``) or a ``pyarrow.Table`` with the action columns.
        ``iteration`` / ``session`` fill those fields where a row leaves them out.
        All rows are validated before any is buffered."""
        self._check_open()
        if isinstance(rows, pa.Table):
            rows = rows.to_pylist()
        defaults = {"iteration": iteration, "session": session}
        checked = []
        for i, row in enumerate(rows):
            if hasattr(row, "_asdict"):
                row = row._asdict()
            if not isinstance(row, Mapping):
                raise ConfigError(
                    f"telemetry actions: row {i} is a {type(row).__name__}, expected a dict, "
                    "an Action or a pyarrow.Table",
                    field="rows",
                )
            try:
                checked.append(_validate_action(row, defaults))
            except ConfigError as exc:
                raise ConfigError(f"{exc} (row {i})", field=exc.field, value=exc.value) from None
        self._actions.extend(checked)

    # ------------------------------------------------------------------ writing

    def _write_part(self, name: str, table: pa.Table) -> None:
        number = self._next_part[name]
        path = self.run_dir / name / f"part-{number:05d}.parquet"
        try:
            atomic_write(path, lambda p: pq.write_table(table, p))
        except OSError as exc:
            raise StorageError(f"telemetry: could not write {path}: {exc}", path=str(path)) from exc
        self._next_part[name] = number + 1

    def flush(self) -> None:
        """Write the buffered rows as new parts (one per table with rows).

        If a write fails, the rows of that table stay buffered (a later flush retries)
        and the parts already on disk are untouched.
        """
        self._last_flush = time.monotonic()
        if self._iterations:
            fields = list(ITERATION_SCHEMA) + [pa.field(n, pa.float64()) for n in self._extras]
            table = pa.Table.from_pylist(self._iterations, schema=pa.schema(fields))
            self._write_part("iterations", table)
            self._iterations = []
        if self._actions:
            table = pa.Table.from_pylist(self._actions, schema=ACTION_SCHEMA)
            self._write_part("actions", table)
            self._actions = []

    def close(self) -> None:
        """Flush and finish the W&B run. Idempotent."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._iterations)} buffered"
        return f"Telemetry({str(self.run_dir)!r}, {state})"


# ---------------------------------------------------------------------- reading


def _read_meta(run_dir: Path) -> dict[str, Any]:
    path = run_dir / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StorageError(f"telemetry: cannot read {path}: {exc}", path=str(path)) from exc
    if not isinstance(meta, dict):
        raise StorageError(f"telemetry: {path} is not a JSON object", path=str(path))
    return meta


def read_run(run_dir: str | os.PathLike[str]) -> tuple[pa.Table, pa.Table]:
    """``(iterations, actions)``: every part of each table concatenated in order.

    Extra iteration columns missing from older parts read back as null. A run with
    ``meta.json`` but no parts gives empty tables with the fixed schemas. Raises
    :class:`~megacontext.errors.StorageError` (naming the path) when ``run_dir`` is
    not a telemetry run directory or a part is unreadable.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StorageError(f"telemetry run directory {run_dir} does not exist", path=str(run_dir))
    found = {name: _parts(run_dir / name) for name in _TABLES}
    if not (run_dir / META).exists() and not any(found.values()):
        raise StorageError(
            f"{run_dir} is not a telemetry run directory (no {META}, no iterations/ or "
            "actions/ parts)",
            path=str(run_dir),
        )
    out = []
    for name, schema in zip(_TABLES, (ITERATION_SCHEMA, ACTION_SCHEMA), strict=True):
        tables = []
        for _, path in found[name]:
            try:
                tables.append(pq.read_table(path))
            except (OSError, pa.ArrowException) as exc:
                raise StorageError(f"telemetry: cannot read {path}: {exc}", path=str(path)) from exc
        if not tables:
            out.append(schema.empty_table())
        else:
            out.append(pa.concat_tables(tables, promote_options="default"))
    return out[0], out[1]


def _values(table: pa.Table, name: str) -> np.ndarray:
    """Non-null, non-NaN values of a column as float64 (empty when the column is absent).

    NaN counts as missing so that one undefined value (e.g. a mean over no entries)
    does not turn a whole aggregate into NaN, and summaries stay valid JSON."""
    if name not in table.column_names:
        return np.empty(0)
    values = np.asarray(table.column(name).drop_null().to_numpy(), dtype=np.float64)
    return values[~np.isnan(values)]


def _stat(values: np.ndarray, how: str) -> float | None:
    if values.size == 0:
        return None
    if how == "mean":
        return float(values.mean())
    if how == "max":
        return float(values.max())
    # numpy's default (linear interpolation between the closest ranks)
    return float(np.percentile(values, {"p50": 50, "p95": 95}[how]))


def residency_histogram(residency: Iterable[int]) -> dict[str, int]:
    """Counts in power-of-two bins: ``"0"``, ``"1"``, ``"2-3"``, ``"4-7"``, ... up to
    the bin of the largest value (empty bins in between are kept, at 0)."""
    values = [int(v) for v in residency]
    if not values:
        return {}
    top = max(values).bit_length()  # bin index: 0 -> 0, 1 -> 1, 2..3 -> 2, 4..7 -> 3
    counts = [0] * (top + 1)
    for v in values:
        if v < 0:
            raise ConfigError(f"residency must be >= 0, got {v}", field="residency", value=v)
        counts[v.bit_length()] += 1
    labels = ["0", "1"] + [f"{2 ** (b - 1)}-{2**b - 1}" for b in range(2, top + 1)]
    return dict(zip(labels[: top + 1], counts, strict=True))


# --------------------------------------------------------------------------- swap rate


def budget_floor(cost_before: int, w_max: int, block_size: int) -> int:
    """The fewest collapses that bring a WC of ``cost_before`` entries back within
    ``w_max``: ``ceil(max(cost_before - w_max, 0) / (block_size - 1))``.

    ``cost_before`` is the WC's cost at the start of a refocus step, i.e. after the
    entries of the blocks decoded since the previous step were appended. Every
    collapse frees exactly ``block_size - 1`` entries (``block_size`` children become
    one parent), so no policy can take fewer. Once the WC is full a decoded block of
    ``K`` tokens adds ``K`` entries and the floor is 1 collapse per block.
    """
    if block_size < 2:
        raise InputError(f"block_size must be >= 2, got {block_size}")
    over = max(int(cost_before) - int(w_max), 0)
    return -(-over // (block_size - 1))


class SwapCounts(NamedTuple):
    """One refocus step's actions split by cause: ``total = forced + discretionary``;
    ``rebuild``: the allocator left the WC over budget, so it was rebuilt by
    recency (every action of such a step is forced)."""

    total: int
    forced: int
    discretionary: int
    rebuild: bool


def _kind(a: Any) -> str:
    return str(a["kind"] if isinstance(a, Mapping) else a.kind)


def _delta(a: Any) -> int:
    return int(a["cost_delta"] if isinstance(a, Mapping) else a.cost_delta)


def swap_counts(
    actions: Iterable[Any],
    *,
    cost_before: int,
    cost_after: int,
    w_max: int,
    block_size: int,
) -> SwapCounts:
    """Split one refocus step's ``actions`` (``Action`` tuples or dicts with ``kind``
    and ``cost_delta``) into forced and discretionary ones.

    ``cost_before``: the WC's cost at the step's start (the decoded block's entries
    already appended); ``cost_after``: its cost when the step ended (after a recency
    rebuild, if one ran). With ``c = cost_before + sum(cost_delta)`` the cost the
    actions alone reached:

    - ``c > w_max``: hysteresis held back collapses the budget needed and the WC was
      rebuilt by recency (``rebuild``); every action was the over-budget phase's, so
      ``forced = total``, ``discretionary = 0``;
    - otherwise ``forced = min(budget_floor(cost_before, w_max, block_size),
      collapses)`` (the budget floor, :func:`budget_floor`) and ``discretionary =
      total - forced``: the expands, the collapses that made room for them and those
      taken on score alone.

    Raises :class:`InvariantError` when the costs disagree with the trace (a step
    without a rebuild must end at ``c``; any step must end within ``w_max``).
    """
    acts = list(actions)
    for a in acts:
        if _kind(a) not in ACTION_KINDS:
            raise InputError(f"unknown action kind {_kind(a)!r}; expected one of {ACTION_KINDS}")
    reached = int(cost_before) + sum(_delta(a) for a in acts)
    if cost_after > w_max:
        raise InvariantError(f"a refocus step ended at cost {cost_after} > w_max={w_max}")
    total = len(acts)
    if reached > w_max:
        return SwapCounts(total, total, 0, True)
    if cost_after != reached:
        raise InvariantError(
            f"cost_after={cost_after} but the actions take cost {cost_before} to {reached} "
            "and no rebuild was needed"
        )
    collapses = sum(_kind(a) == "collapse" for a in acts)
    forced = min(budget_floor(cost_before, w_max, block_size), collapses)
    return SwapCounts(total, forced, total - forced, False)


def _action_fields(a: Any) -> tuple[int, str, int, int]:
    if isinstance(a, Mapping):
        return int(a["step"]), str(a["kind"]), int(a["level"]), int(a["node"])
    return int(a.step), str(a.kind), int(a.level), int(a.node)


def pingpong_count(actions: Iterable[Any], window: int) -> dict[str, Any]:
    """Flip-backs in an allocator action trace (``Action`` tuples or dicts with
    ``step``, ``kind``, ``level``, ``node``, in the order taken).

    ``(level, node)`` names the gist whose representation changed (the expanded
    gist, or the parent collapsed into), so "expanded then collapsed back" and
    "collapsed then expanded back" are two consecutive actions of opposite kinds on
    the same key. Returns ``flip_backs`` (all such pairs), ``pingpong`` (those at
    most ``window`` steps apart) and ``min_flip_gap`` (the smallest gap in steps,
    ``None`` without flip-backs)."""
    if window < 0:
        raise InputError(f"ping-pong window must be >= 0 steps, got {window}")
    last: dict[tuple[int, int], tuple[int, str]] = {}
    flips = pp = 0
    gap_min: int | None = None
    for a in actions:
        step, kind, level, node = _action_fields(a)
        if kind not in ACTION_KINDS:
            raise InputError(f"unknown action kind {kind!r} at step {step}")
        prev = last.get((level, node))
        if prev is not None and prev[1] != kind:
            gap = step - prev[0]
            flips += 1
            pp += gap <= window
            gap_min = gap if gap_min is None else min(gap_min, gap)
        last[(level, node)] = (step, kind)
    return {"flip_backs": flips, "pingpong": pp, "min_flip_gap": gap_min}


def pingpongs(actions: Iterable[Any], cooldown_steps: int, min_residency: int) -> int:
    """Flip-backs faster than the allocator's hysteresis allows: a node whose LOD
    flips back fewer than ``max(cooldown_steps, min_residency, 1)`` allocator steps
    after its previous change (the expanded gist collapsed again, or a collapsed-into
    parent expanded again). The allocator masks both (docs/allocator.md), so this is
    0 by construction; a positive count is a hysteresis bug, never a policy choice."""
    if cooldown_steps < 0 or min_residency < 0:
        raise InputError(
            f"cooldown_steps={cooldown_steps} and min_residency={min_residency} must be >= 0"
        )
    gap = max(cooldown_steps, min_residency, 1)
    return int(pingpong_count(actions, gap - 1)["pingpong"])


def summarize(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Aggregate numbers of a run (nulls and NaNs ignored; ``None`` where a metric has
    no values).

    Keys: ``iterations`` (rows), ``sessions``, ``duration_s``; ``latency_ms_{mean,p50,
    p95}`` and the same for each phase ``latency_<phase>_ms_*`` (p50/p95: linear
    interpolation, NumPy's default); ``swap_rate_mean``, ``mean_residency_mean``,
    ``token_budget_utilization_{mean,max}``, ``loss_at_h_mean`` and ``loss_at_h_count``;
    from the action trace: ``actions``, ``expand_count``, ``collapse_count``,
    ``expand_cost`` (sum of ``cost_delta`` over expands) and ``collapse_cost`` (sum of
    ``-cost_delta`` over collapses, so both are positive masses); ``<extra>_mean`` for
    each extra column; ``residency_histogram`` when actions carry ``residency``.
    Raises :class:`~megacontext.errors.StorageError` when no iteration was logged.
    """
    iterations, actions = read_run(run_dir)
    if iterations.num_rows == 0:
        raise StorageError(
            f"telemetry run {run_dir} has no iterations logged",
            path=str(run_dir),
            field="iterations",
        )
    out: dict[str, Any] = {
        "iterations": iterations.num_rows,
        "sessions": len(set(iterations.column("session").to_pylist())),
    }
    wall = _values(iterations, "wall_time")
    out["duration_s"] = float(wall.max() - wall.min()) if wall.size else None
    for name in ("latency_ms", *PHASE_COLUMNS):
        values = _values(iterations, name)
        for how in ("mean", "p50", "p95"):
            out[f"{name}_{how}"] = _stat(values, how)
    out["swap_rate_mean"] = _stat(_values(iterations, "swap_rate"), "mean")
    out["mean_residency_mean"] = _stat(_values(iterations, "mean_residency"), "mean")
    util = _values(iterations, "token_budget_utilization")
    out["token_budget_utilization_mean"] = _stat(util, "mean")
    out["token_budget_utilization_max"] = _stat(util, "max")
    loss = _values(iterations, "loss_at_h")
    out["loss_at_h_mean"] = _stat(loss, "mean")
    out["loss_at_h_count"] = int(loss.size)

    kind = actions.column("kind").to_pylist()
    delta = actions.column("cost_delta").to_pylist()
    out["actions"] = actions.num_rows
    out["expand_count"] = sum(k == "expand" for k in kind)
    out["collapse_count"] = sum(k == "collapse" for k in kind)
    out["expand_cost"] = sum(d for k, d in zip(kind, delta, strict=True) if k == "expand")
    out["collapse_cost"] = -sum(d for k, d in zip(kind, delta, strict=True) if k == "collapse")

    for name in iterations.column_names:
        if name in ITERATION_SCHEMA.names:
            continue
        out[f"{name}_mean"] = _stat(_values(iterations, name), "mean")
    if "residency" in actions.column_names:
        residency = actions.column("residency").drop_null().to_pylist()
        if residency:
            out["residency_histogram"] = residency_histogram(residency)
    return out


# ---------------------------------------------------------------------- plotting


def _by_iteration(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(iterations, mean over sessions of ``name``) over the rows where it is not
    null or NaN."""
    it = np.asarray(table.column("iteration").to_numpy(), dtype=np.int64)
    col = table.column(name)
    valid = np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    vals = np.asarray(col.fill_null(0).to_numpy(), dtype=np.float64)
    valid &= ~np.isnan(vals)
    if not valid.any():
        return np.empty(0, dtype=np.int64), np.empty(0)
    it, vals = it[valid], vals[valid]
    keys, inverse = np.unique(it, return_inverse=True)
    sums = np.bincount(inverse, weights=vals)
    counts = np.bincount(inverse)
    return keys, sums / counts


def plot_run(run_dir: str | os.PathLike[str], out_png: str | os.PathLike[str]) -> Path:
    """Plot a run's series against the iteration and save a PNG (Agg, no display).

    Panels: Loss@H, swap rate (guide at 0.25 actions/block), mean residency (guide at
    3 steps), latency per phase (stacked; the total as a line), token budget
    utilisation (guide at 1.0). With several sessions each point is the mean over the
    sessions of that iteration. The PNG is written atomically; returns its path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    iterations, _ = read_run(run_dir)
    if iterations.num_rows == 0:
        raise StorageError(
            f"telemetry run {run_dir} has no iterations to plot",
            path=str(run_dir),
            field="iterations",
        )
    out_png = Path(out_png)
    fig = Figure(figsize=(9, 11), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(5, 1, sharex=True)
    fig.suptitle(f"megacontext telemetry: {Path(run_dir).name}")

    def line(ax: Any, name: str, label: str, guide: float | None, guide_label: str) -> None:
        x, y = _by_iteration(iterations, name)
        if x.size:
            ax.plot(x, y, marker="." if x.size < 50 else None, lw=1.2, color="C0")
        else:
            ax.text(
                0.5,
                0.5,
                f"no {name} logged",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="0.5",
            )
        if guide is not None and x.size:
            ax.axhline(guide, color="C3", ls="--", lw=0.8, label=guide_label)
            ax.legend(loc="upper right", fontsize=8, frameon=False)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)

    line(axes[0], "loss_at_h", "Loss@H (nats)", None, "")
    line(axes[1], "swap_rate", "swap rate\n(actions / block)", 0.25, "0.25 (thrashing guide)")
    line(axes[2], "mean_residency", "mean residency\n(steps)", 3.0, "3 steps (guide)")

    ax = axes[3]
    series = []
    for phase, name in zip(PHASES, PHASE_COLUMNS, strict=True):
        x, y = _by_iteration(iterations, name)
        if x.size:
            series.append((phase, x, y))
    if series:
        # a phase missing at an iteration adds 0 there (no interpolation across gaps)
        grid = np.unique(np.concatenate([x for _, x, _ in series]))
        stack = []
        for _, x, y in series:
            full = np.zeros(grid.size)
            full[np.searchsorted(grid, x)] = y
            stack.append(full)
        labels = [p for p, _, _ in series]
        if grid.size > 1:
            ax.stackplot(grid, stack, labels=labels, alpha=0.85)
        else:  # one iteration: an area plot has no width, stack bars instead
            bottom = np.zeros(1)
            for label, height in zip(labels, stack, strict=True):
                ax.bar(grid, height, bottom=bottom, width=0.6, label=label, alpha=0.85)
                bottom = bottom + height
    x, y = _by_iteration(iterations, "latency_ms")
    if x.size:
        ax.plot(x, y, color="k", lw=1.0, marker="o" if x.size == 1 else None, ms=4, label="total")
    if series or x.size:
        ax.set_ylim(0, ax.get_ylim()[1] * 1.25)  # headroom for the legend row
        ax.legend(loc="upper left", fontsize=8, ncol=6, frameon=False)
    else:
        ax.text(
            0.5,
            0.5,
            "no latency logged",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="0.5",
        )
    ax.set_ylabel("latency (ms)\nby phase")
    ax.grid(alpha=0.3)

    line(axes[4], "token_budget_utilization", "utilisation\n(cost / W_max)", 1.0, "budget")
    axes[4].set_xlabel("iteration")
    axes[4].xaxis.set_major_locator(MaxNLocator(integer=True))
    steps = iterations.column("iteration").to_numpy()
    if steps.min() == steps.max():  # one iteration: give the lone points some room
        axes[4].set_xlim(int(steps.min()) - 1, int(steps.max()) + 1)

    out_png.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_png, lambda p: fig.savefig(p, format="png", dpi=100))
    return out_png
