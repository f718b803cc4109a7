"""Telemetry: Parquet run directories, atomic parts, validation, summaries, plots, CLI, W&B."""

from __future__ import annotations

import json
import math
import os
import sys
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

import megacontext as mc
from megacontext import telemetry as tm
from megacontext.cli import app
from megacontext.errors import BackendUnavailableError, ConfigError, StorageError
from megacontext.telemetry import ACTION_SCHEMA, ITERATION_SCHEMA, Telemetry, read_run, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_wandb_env(monkeypatch):
    monkeypatch.delenv("MEGACONTEXT_WANDB", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)


def full_row(i: int, session: int = 0) -> dict:
    phases = [0.5 + i, 1.0, 0.25 * i, 2.0, 3.0 + session]
    return dict(
        iteration=i,
        session=session,
        step=10 * i,
        loss_at_h=2.0 - 0.1 * i if i % 2 == 0 else None,
        swap_rate=0.1 * i,
        mean_residency=1.5 * i,
        latency_ms=sum(phases),
        latency_gist_ms=phases[0],
        latency_lens_ms=phases[1],
        latency_allocator_ms=phases[2],
        latency_cache_ms=phases[3],
        latency_decode_ms=phases[4],
        token_budget_utilization=0.5 + 0.1 * i,
        wc_cost=100 + i,
        w_max=200,
        num_tokens=1000 + 32 * i,
        n_expand=i,
        n_collapse=1,
    )


def action(i: int, kind: str = "expand", **kw) -> dict:
    row = dict(
        iteration=i,
        step=10 * i,
        kind=kind,
        level=1,
        node=7 * i,
        score=0.5,
        cost_delta=31 if kind == "expand" else -31,
    )
    row.update(kw)
    return row


def part_names(run, table="iterations"):
    return sorted(os.listdir(run / table))


# ------------------------------------------------------------------ round trip


def test_round_trip_values_and_types(tmp_path):
    run = tmp_path / "run"
    rows = [full_row(i) for i in range(5)]
    with Telemetry(run, config={"w_max": 200}, tags=["smoke"]) as tel:
        for r in rows:
            tel.log_iteration(**r)
        tel.log_actions([action(1), action(1, "collapse", residency=4)])
    it, ac = read_run(run)
    assert it.schema.equals(ITERATION_SCHEMA)  # no extras: exactly the fixed schema
    assert ac.schema.equals(ACTION_SCHEMA)
    got = it.to_pylist()
    for want, row in zip(rows, got, strict=True):
        for k, v in want.items():
            assert row[k] == v, k
            assert type(row[k]) is type(v), k
        assert isinstance(row["wall_time"], float)
    assert ac.to_pylist() == [
        {**action(1), "session": 0, "residency": None},
        {**action(1, "collapse"), "session": 0, "residency": 4},
    ]
    meta = json.loads((run / "meta.json").read_text())
    assert meta["config"] == {"w_max": 200} and meta["tags"] == ["smoke"]
    assert meta["versions"]["pyarrow"] == pa.__version__
    assert meta["created"].endswith("+00:00")


def test_optional_fields_default_to_null_and_session_to_zero(tmp_path):
    with Telemetry(tmp_path / "r") as tel:
        tel.log_iteration(iteration=3)
    (row,) = read_run(tmp_path / "r")[0].to_pylist()
    assert row["iteration"] == 3 and row["session"] == 0
    assert all(row[k] is None for k in ("loss_at_h", "latency_ms", "wc_cost", "n_expand"))


def test_numpy_and_tensor_scalars_are_accepted(tmp_path):
    with Telemetry(tmp_path / "r") as tel:
        tel.log_iteration(
            iteration=np.int64(2),
            latency_ms=np.float32(1.5),
            wc_cost=torch.tensor(7),
            loss_at_h=torch.tensor([2.25]),
            num_tokens=64.0,  # integral float into an int column
        )
    (row,) = read_run(tmp_path / "r")[0].to_pylist()
    assert (row["iteration"], row["latency_ms"], row["wc_cost"]) == (2, 1.5, 7)
    assert row["loss_at_h"] == 2.25 and row["num_tokens"] == 64


def test_extra_numeric_fields_become_float64_columns(tmp_path):
    run = tmp_path / "r"
    with Telemetry(run, flush_every=2) as tel:
        tel.log_iteration(iteration=0)
        tel.log_iteration(iteration=1)  # flush: part 0 without extras
        tel.log_iteration(iteration=2, gpu_mem_mb=512, cache_hit=True)
        tel.log_iteration(iteration=3, gpu_mem_mb=np.float32(256.5))
    it, _ = read_run(run)
    assert it.schema.field("gpu_mem_mb").type == pa.float64()
    assert it.schema.field("cache_hit").type == pa.float64()
    assert it.column("gpu_mem_mb").to_pylist() == [None, None, 512.0, 256.5]
    assert it.column("cache_hit").to_pylist() == [None, None, 1.0, None]
    assert summarize(run)["gpu_mem_mb_mean"] == pytest.approx((512 + 256.5) / 2)


def test_action_rows_from_allocator_actions_and_arrow_tables(tmp_path):
    from megacontext.allocator import Action

    run = tmp_path / "r"
    with Telemetry(run) as tel:
        tel.log_iteration(iteration=0)
        tel.log_actions(
            [Action(5, "expand", 2, 3, 0.75, 31), Action(5, "collapse", 1, 9, -0.5, -31)],
            iteration=4,
            session=1,
        )
        table = pa.table(
            {
                "iteration": [6],
                "step": [7],
                "kind": ["expand"],
                "level": [1],
                "node": [2],
                "score": [0.125],
                "cost_delta": [31],
            }
        )
        tel.log_actions(table)
    ac = read_run(run)[1].to_pylist()
    assert ac[0] == dict(
        iteration=4, session=1, step=5, kind="expand", level=2, node=3, score=0.75,
        cost_delta=31, residency=None,
    )  # fmt: skip
    assert ac[1]["kind"] == "collapse" and ac[1]["cost_delta"] == -31
    assert ac[2] == {**action(0), **table.to_pylist()[0], "session": 0, "residency": None}


# ---------------------------------------------------------------- parts on disk


def test_several_flushes_make_parts_read_back_in_order(tmp_path):
    run = tmp_path / "r"
    tel = Telemetry(run, flush_every=4)
    for i in range(10):
        tel.log_iteration(iteration=i)
        tel.log_actions([action(i)])
    assert part_names(run) == ["part-00000.parquet", "part-00001.parquet"]
    assert read_run(run)[0].column("iteration").to_pylist() == list(range(8))
    tel.flush()
    tel.flush()  # nothing buffered: no empty part
    assert len(part_names(run)) == 3
    tel.close()
    tel.close()  # idempotent
    assert len(part_names(run)) == 3
    assert [pq.read_table(run / "iterations" / n).num_rows for n in part_names(run)] == [4, 4, 2]
    it, ac = read_run(run)
    assert it.column("iteration").to_pylist() == list(range(10))
    assert ac.column("iteration").to_pylist() == list(range(10))
    with pytest.raises(StorageError, match="closed"):
        tel.log_iteration(iteration=11)


def test_a_slow_run_writes_its_rows_after_flush_seconds(tmp_path, monkeypatch):
    """A CPU training step every 45 s must show in the run directory while the run
    goes on, long before ``flush_every`` rows have been buffered."""
    import megacontext.telemetry as telemetry

    clock = [1000.0]
    monkeypatch.setattr(telemetry.time, "monotonic", lambda: clock[0])
    run = tmp_path / "r"
    tel = Telemetry(run, flush_every=64, flush_seconds=30.0)
    tel.log_iteration(iteration=0)
    clock[0] += 29.0
    tel.log_iteration(iteration=1)
    assert part_names(run) == []  # neither 64 rows nor 30 s yet
    clock[0] += 1.0
    tel.log_iteration(iteration=2)  # 30 s after the start: written
    assert read_run(run)[0].column("iteration").to_pylist() == [0, 1, 2]
    clock[0] += 10.0
    tel.log_iteration(iteration=3)  # the clock restarted at the write
    assert len(part_names(run)) == 1
    tel.close()
    assert read_run(run)[0].column("iteration").to_pylist() == [0, 1, 2, 3]
    # None: by count only
    run2 = tmp_path / "r2"
    tel = Telemetry(run2, flush_every=64, flush_seconds=None)
    clock[0] += 1e6
    tel.log_iteration(iteration=0)
    assert part_names(run2) == []
    tel.close()


def test_parts_sort_numerically_past_five_digits(tmp_path):
    run = tmp_path / "r"
    Telemetry(run).close()
    for number, it in ((100000, 2), (99999, 1), (5, 0)):
        table = pa.Table.from_pylist([{"iteration": it, "session": 0, "wall_time": 0.0}],
                                     schema=ITERATION_SCHEMA)  # fmt: skip
        name = f"part-{number:05d}.parquet"
        pq.write_table(table, run / "iterations" / name)
    assert read_run(run)[0].column("iteration").to_pylist() == [0, 1, 2]
    tel = Telemetry(run)
    tel.log_iteration(iteration=3)
    tel.close()
    assert "part-100001.parquet" in part_names(run)
    assert read_run(run)[0].column("iteration").to_pylist() == [0, 1, 2, 3]


def test_reopen_appends_and_keeps_meta(tmp_path):
    run = tmp_path / "r"
    with Telemetry(run, config={"a": 1}, tags=["first"]) as tel:
        tel.log_iteration(iteration=0, extra_a=1.0)
    created = json.loads((run / "meta.json").read_text())["created"]
    with Telemetry(run, config={"a": 2}, tags=["second"]) as tel:
        tel.log_iteration(iteration=1)
        tel.log_actions([action(1)])
    assert part_names(run) == ["part-00000.parquet", "part-00001.parquet"]
    it, ac = read_run(run)
    assert it.column("iteration").to_pylist() == [0, 1]
    assert it.column("extra_a").to_pylist() == [1.0, None]
    assert ac.num_rows == 1
    meta = json.loads((run / "meta.json").read_text())
    assert meta["config"] == {"a": 1} and meta["tags"] == ["first"]  # the run's identity
    assert meta["created"] == created and len(meta["reopened"]) == 1


def test_atomic_parts_leave_no_temp_files(tmp_path, monkeypatch):
    run = tmp_path / "r"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(tm.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    with Telemetry(run, flush_every=1) as tel:
        assert len(synced) == 2  # meta.json and the run directory
        for i in range(3):
            tel.log_iteration(iteration=i)
            assert len(synced) == 2 + 2 * (i + 1)  # each part: the file, then its directory
    for sub in (run, run / "iterations", run / "actions"):
        assert not [n for n in os.listdir(sub) if n.startswith(".")], sub


def test_failed_flush_keeps_earlier_parts_and_buffer(tmp_path, monkeypatch):
    run = tmp_path / "r"
    tel = Telemetry(run, flush_every=100)
    tel.log_iteration(iteration=0)
    tel.flush()
    before = (run / "iterations" / "part-00000.parquet").read_bytes()
    tel.log_iteration(iteration=1)

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tm.os, "replace", boom)
    with pytest.raises(StorageError, match=r"part-00001\.parquet"):
        tel.flush()
    # the failure left no temp file, no new part, and the old part byte-identical
    assert os.listdir(run / "iterations") == ["part-00000.parquet"]
    assert (run / "iterations" / "part-00000.parquet").read_bytes() == before
    assert read_run(run)[0].column("iteration").to_pylist() == [0]
    monkeypatch.undo()
    tel.close()  # the buffered row was kept: the retry writes it
    assert read_run(run)[0].column("iteration").to_pylist() == [0, 1]


def test_stale_temp_files_are_ignored_and_cleaned(tmp_path):
    run = tmp_path / "r"
    with Telemetry(run) as tel:
        tel.log_iteration(iteration=0)
    junk = run / "iterations" / ".part-00001.parquet.abc123.tmp"
    junk.write_bytes(b"half a parquet file")  # a writer killed mid-flush
    meta_junk = run / ".meta.json.x1y2.tmp"
    meta_junk.write_bytes(b"{")
    assert read_run(run)[0].num_rows == 1
    Telemetry(run).close()
    assert not junk.exists() and not meta_junk.exists()
    assert read_run(run)[0].num_rows == 1


def test_corrupt_part_is_a_storage_error_naming_it(tmp_path):
    run = tmp_path / "r"
    with Telemetry(run) as tel:
        tel.log_iteration(iteration=0)
    (run / "iterations" / "part-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(StorageError, match=r"part-00001\.parquet"):
        read_run(run)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("fields", "name", "match"),
    [
        ({"latency_ms": 1.0}, "iteration", "'iteration' is required"),
        ({"iteration": 1.5}, "iteration", "expects an integer"),
        ({"iteration": "3"}, "iteration", "expects an integer"),
        ({"iteration": 0, "latency_ms": "fast"}, "latency_ms", "expects a float"),
        ({"iteration": 0, "wc_cost": True}, "wc_cost", "expects an integer"),
        ({"iteration": 0, "wc_cost": 2**63}, "wc_cost", "does not fit in int64"),
        ({"iteration": 0, "note": "hello"}, "note", "extra field 'note' must be a number"),
        ({"iteration": 0, "hist": [1, 2]}, "hist", "extra field 'hist'"),
        ({"iteration": 0, "vec": torch.ones(3)}, "vec", "extra field 'vec'"),
    ],
)
def test_iteration_validation(tmp_path, fields, name, match):
    run = tmp_path / "r"
    with Telemetry(run) as tel:
        with pytest.raises(ConfigError, match=match) as info:
            tel.log_iteration(**fields)
        assert isinstance(info.value, ValueError) and info.value.field == name
        tel.log_iteration(iteration=9)  # the rejected row changed nothing
    it = read_run(run)[0]
    assert it.column("iteration").to_pylist() == [9]
    assert it.schema.equals(ITERATION_SCHEMA)


@pytest.mark.parametrize(
    ("row", "name", "match"),
    [
        ({**action(0), "kind": "swap"}, "kind", "'expand' or 'collapse'"),
        ({k: v for k, v in action(0).items() if k != "node"}, "node", "'node' is required"),
        ({**action(0), "colour": 3}, "colour", "unknown field 'colour'"),
        ({**action(0), "score": "high"}, "score", "expects a float"),
    ],
)
def test_action_validation_is_all_or_nothing(tmp_path, row, name, match):
    run = tmp_path / "r"
    with Telemetry(run) as tel:
        with pytest.raises(ConfigError, match=match) as info:
            tel.log_actions([action(0), row])  # the good first row is not buffered either
        assert info.value.field == name and "(row 1)" in str(info.value)
    assert read_run(run)[1].num_rows == 0


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="flush_every"):
        Telemetry(tmp_path / "r", flush_every=0)
    for bad in (0, -1.0, "30"):
        with pytest.raises(ConfigError, match="flush_seconds"):
            Telemetry(tmp_path / "r", flush_seconds=bad)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="not a directory"):
        Telemetry(tmp_path / "file")
    with pytest.raises(StorageError, match="does not exist"):
        read_run(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StorageError, match="not a telemetry run directory"):
        read_run(tmp_path / "plain")
    Telemetry(tmp_path / "empty").close()
    it, ac = read_run(tmp_path / "empty")  # a run that logged nothing reads back empty
    assert it.num_rows == 0 and ac.num_rows == 0 and it.schema.equals(ITERATION_SCHEMA)
    with pytest.raises(StorageError, match="no iterations"):
        summarize(tmp_path / "empty")


# ------------------------------------------------------------------- summaries


def test_summarize_against_hand_computation(tmp_path):
    run = tmp_path / "r"
    with Telemetry(run) as tel:
        for i, (lat, loss) in enumerate([(10.0, 2.0), (20.0, None), (30.0, 3.0), (40.0, None)]):
            tel.log_iteration(
                iteration=i,
                latency_ms=lat,
                latency_gist_ms=1.0 * i,
                latency_decode_ms=5.0 if i < 3 else None,
                loss_at_h=loss,
                swap_rate=[0.0, 0.5, 0.25, 0.25][i],
                mean_residency=[1.0, 2.0, math.nan, 6.0][i],  # NaN: no entries to average
                token_budget_utilization=[0.5, 1.0, 0.75, 0.75][i],
            )
        tel.log_actions(
            [
                action(0, "expand", residency=0),
                action(0, "expand", residency=1, cost_delta=31),
                action(1, "collapse", residency=3),
                action(2, "expand", residency=9, level=2),
                action(3, "collapse", cost_delta=-31),  # no residency logged
            ]
        )
    s = summarize(run)
    assert (s["iterations"], s["sessions"]) == (4, 1)
    assert s["latency_ms_mean"] == 25.0
    # linear interpolation: p50 between 20 and 30; p95 at rank 0.95*3 = 2.85 -> 30 + 0.85*10
    assert s["latency_ms_p50"] == 25.0
    assert s["latency_ms_p95"] == pytest.approx(38.5)
    assert s["latency_gist_ms_mean"] == 1.5 and s["latency_gist_ms_p50"] == 1.5
    assert s["latency_decode_ms_mean"] == 5.0  # the null row is ignored
    assert s["latency_lens_ms_mean"] is None  # never logged
    assert s["swap_rate_mean"] == 0.25 and s["mean_residency_mean"] == 3.0  # NaN skipped
    assert s["token_budget_utilization_mean"] == 0.75
    assert s["token_budget_utilization_max"] == 1.0
    assert s["loss_at_h_mean"] == 2.5 and s["loss_at_h_count"] == 2
    assert (s["actions"], s["expand_count"], s["collapse_count"]) == (5, 3, 2)
    assert (s["expand_cost"], s["collapse_cost"]) == (3 * 31, 2 * 31)
    assert s["residency_histogram"] == {"0": 1, "1": 1, "2-3": 1, "4-7": 0, "8-15": 1}
    json.dumps(s, allow_nan=False)  # strict JSON: the NaN did not leak into the summary
    assert math.isnan(read_run(run)[0].column("mean_residency")[2].as_py())  # stored as given


def test_summarize_counts_sessions_and_omits_histogram_without_residency(tmp_path):
    run = tmp_path / "r"
    with Telemetry(run) as tel:
        for b in range(3):
            tel.log_iteration(**full_row(1, session=b))
        tel.log_actions([action(1, session=2)])
    s = summarize(run)
    assert (s["iterations"], s["sessions"]) == (3, 3)
    assert s["latency_decode_ms_mean"] == 4.0  # 3 + session, mean over sessions 0, 1, 2
    assert "residency_histogram" not in s


def test_residency_histogram_bins():
    assert tm.residency_histogram([]) == {}
    assert tm.residency_histogram([0, 0]) == {"0": 2}
    assert tm.residency_histogram([1, 2, 3, 4, 7, 8, 100]) == {
        "0": 0, "1": 1, "2-3": 2, "4-7": 2, "8-15": 1, "16-31": 0, "32-63": 0, "64-127": 1,
    }  # fmt: skip
    with pytest.raises(ConfigError, match="residency"):
        tm.residency_histogram([3, -1])


# ------------------------------------------------------------------------ plots


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_run_writes_a_png(tmp_path):
    run = tmp_path / "r"
    with Telemetry(run) as tel:
        for i in range(12):
            for b in range(2):
                row = full_row(i, session=b)
                if i == 5:
                    row["latency_lens_ms"] = None  # a gap in one phase
                if i == 6:
                    row["mean_residency"] = math.nan
                tel.log_iteration(**row)
    out = tm.plot_run(run, tmp_path / "plots" / "run.png")
    assert out == tmp_path / "plots" / "run.png"
    assert _png_size(out) == (900, 1100)
    assert not [n for n in os.listdir(out.parent) if n.startswith(".")]


def test_plot_run_with_sparse_series(tmp_path):
    run = tmp_path / "r"
    with Telemetry(run) as tel:
        tel.log_iteration(iteration=0, latency_gist_ms=1.0)  # one point, no loss, no total
    assert _png_size(tm.plot_run(run, tmp_path / "p.png")) == (900, 1100)
    Telemetry(tmp_path / "empty").close()
    with pytest.raises(StorageError, match="no iterations"):
        tm.plot_run(tmp_path / "empty", tmp_path / "q.png")


# -------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_table_json_and_plot(tmp_path):
    run = tmp_path / "r"
    with Telemetry(run) as tel:
        for i in range(4):
            tel.log_iteration(**full_row(i))
        tel.log_actions([action(0, residency=2), action(1, "collapse", residency=5)])
    result = runner.invoke(app, ["telemetry", str(run)])
    assert result.exit_code == 0, result.output
    for text in ("latency_ms_p95", "swap_rate_mean", "expand_cost", "residency", "4-7"):
        assert text in result.output
    result = runner.invoke(app, ["telemetry", str(run), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data == json.loads(json.dumps(summarize(run)))
    png = tmp_path / "out.png"
    result = runner.invoke(app, ["telemetry", str(run), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert _png_size(png)[0] > 0 and "out.png" in "".join(result.output.split())


def _flat(text: str) -> str:
    """rich wraps the error box at the terminal width: unwrap it."""
    return " ".join(text.replace("│", " ").split())


def test_cli_missing_or_empty_run_dir_exits_2(tmp_path):
    result = runner.invoke(app, ["telemetry", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "does not exist" in _flat(result.output)
    Telemetry(tmp_path / "empty").close()
    result = runner.invoke(app, ["telemetry", str(tmp_path / "empty")])
    assert result.exit_code == 2
    assert "has no iterations logged" in _flat(result.output)


# ------------------------------------------------------------------------ W&B


class FakeWandb(types.ModuleType):
    """Records the calls our code makes on the documented API: init, run.log, run.finish."""

    def __init__(self):
        super().__init__("wandb")
        self.calls: list[tuple] = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        fake = self

        class Run:
            def log(self, data, **kw):
                fake.calls.append(("log", data))

            def finish(self):
                fake.calls.append(("finish",))

        return Run()


def test_wandb_receives_init_log_finish(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "r"
    with Telemetry(run, config={"w_max": 8}, tags=["t1"], wandb=True) as tel:
        tel.log_iteration(iteration=0, latency_ms=2.5, loss_at_h=None, gpu_mem_mb=3)
        tel.log_iteration(iteration=1, session=1, swap_rate=0.5)
    kinds = [c[0] for c in fake.calls]
    assert kinds == ["init", "log", "log", "finish"]
    init = fake.calls[0][1]
    assert init["dir"] == str(run) and init["config"] == {"w_max": 8}
    assert init["tags"] == ["t1"] and init["mode"] == "offline"
    # numeric, non-null fields only
    assert fake.calls[1][1] == {"iteration": 0, "session": 0, "latency_ms": 2.5, "gpu_mem_mb": 3.0}
    assert fake.calls[2][1] == {"iteration": 1, "session": 1, "swap_rate": 0.5}
    assert read_run(run)[0].num_rows == 2  # Parquet is written as well


def test_wandb_enabled_by_environment(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("MEGACONTEXT_WANDB", "1")
    Telemetry(tmp_path / "a").close()
    assert [c[0] for c in fake.calls] == ["init", "finish"]
    assert fake.calls[0][1]["mode"] is None
    Telemetry(tmp_path / "b", wandb=False).close()  # an explicit False wins
    assert len(fake.calls) == 2


def test_wandb_disabled_by_default(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with Telemetry(tmp_path / "r") as tel:
        tel.log_iteration(iteration=0)
    assert fake.calls == []
    assert not (tmp_path / "r" / "wandb").exists()


def test_wandb_not_installed_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(BackendUnavailableError, match=r"uv sync --extra wandb"):
        Telemetry(tmp_path / "r", wandb=True)
    assert not (tmp_path / "r").exists()  # failed before touching the disk
    monkeypatch.setenv("MEGACONTEXT_WANDB", "1")
    with pytest.raises(BackendUnavailableError, match="MEGACONTEXT_WANDB"):
        Telemetry(tmp_path / "r")
    Telemetry(tmp_path / "r", wandb=False).close()


def test_public_names():
    assert mc.Telemetry is Telemetry
    assert set(tm.__all__) >= {"Telemetry", "read_run", "summarize", "plot_run"}


def test_allocator_trace_round_trips_and_matches_the_wc(tmp_path):
    """Real FocusAllocator actions: the trace reads back as the same Actions, and its
    net cost equals the working context's change in length."""
    from megacontext.allocator import Action, FocusAllocator
    from megacontext.working_context import WorkingContext

    cfg = mc.MegaContextConfig(block_size=4, levels=2, w_max=1000, recent_tokens=8, n_diff=4)
    # LOD1 gists 0..3, blocks 4..7 as tokens, the protected tail 32..39 (tokens)
    entries = [(1, b) for b in range(4)] + [(0, t) for t in range(16, 40)]
    wc = WorkingContext(
        torch.tensor([e[0] for e in entries], dtype=torch.int32),
        torch.tensor([e[1] for e in entries], dtype=torch.int64),
        block_size=4,
        max_level=2,
        w_max=1000,
        recent_tokens=cfg.protected_tokens,
        num_tokens=40,
    )
    alloc = FocusAllocator(cfg, "python")
    start = len(wc)
    taken = []
    with Telemetry(tmp_path / "r") as tel:
        blocks = [-0.9, -0.8, -0.7, -0.6]
        scores = [0.9, 0.8, 0.7, 0.6] + [s for s in blocks for _ in range(4)] + [0.0] * 8
        acts = alloc.step(wc, torch.tensor(scores, dtype=torch.float32))
        assert acts, "the hand-built case must take actions"
        tel.log_actions(acts, iteration=0)
        tel.log_iteration(iteration=0, n_expand=sum(a.kind == "expand" for a in acts))
        taken += acts
    _, table = read_run(tmp_path / "r")
    back = [Action(r["step"], r["kind"], r["level"], r["node"], r["score"], r["cost_delta"])
            for r in table.to_pylist()]  # fmt: skip
    assert back == taken
    s = summarize(tmp_path / "r")
    assert s["expand_count"] + s["collapse_count"] == len(taken)
    assert s["expand_cost"] - s["collapse_cost"] == len(wc) - start
