"""External peers: task export during run_eval, peer rows folded into the report."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from megacontext.errors import StorageError
from megacontext.eval.external import (
    fold_peers,
    read_tasks,
    record_task,
    recording_tasks,
    write_tasks,
)
from megacontext.eval.report import build_report, load_run, write_run
from megacontext.eval.runner import run_eval
from megacontext.eval.suites import SIZES, add_derived, sweep_documents

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "bench" / "peers" / "kvpress"
PEER_PY = PEER / ".venv" / "bin" / "python"


@pytest.fixture(scope="module")
def tiny_run(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    run_eval(
        ["budget", "needle"],
        size="tiny",
        base=tiny_base,
        out_dir=out,
        methods=["full", "truncation"],
        log=lambda _: None,
    )
    return out


def test_record_task_is_a_noop_outside_recording():
    record_task(torch.arange(5), torch.arange(2), 3, {"suite": "x"})  # must not raise
    with recording_tasks() as tasks:
        record_task(torch.arange(5), torch.arange(2), 3, {"suite": "x", "doc": "d"})
        with recording_tasks() as inner:
            record_task(torch.arange(4), torch.arange(1), 2, None)
    assert [t["budget"] for t in tasks] == [3] and [t["budget"] for t in inner] == [2]
    assert tasks[0]["history"] == [0, 1, 2, 3, 4] and tasks[0]["doc"] == "d"


def test_tasks_round_trip_through_run_eval(tiny_run, tiny_base):
    rows, _, meta = load_run(tiny_run)
    tasks = read_tasks(tiny_run)
    path = tiny_run / "tasks.parquet"
    assert meta["tasks"] == {
        "file": "tasks.parquet",
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "count": len(tasks),
    }
    assert meta["base_model"] == {"name": "tiny-llama", "path": None, "dtype": "float32"}
    schema = pq.read_schema(path)
    assert schema.field("history").type == pa.list_(pa.int32())
    assert schema.field("target").type == pa.list_(pa.int32())
    # one task per (suite, doc, budget) group of the results, same token counts
    groups = {(r["suite"], r["doc"], r["budget"]): r for r in rows if r["method"] == "truncation"}
    assert sorted(groups) == sorted((t["suite"], t["doc"], t["budget"]) for t in tasks)
    for t in tasks:
        r = groups[(t["suite"], t["doc"], t["budget"])]
        assert len(t["history"]) == r["history_tokens"] and len(t["target"]) == r["horizon"]
        assert t["tags"]["suite"] == t["suite"] and t["tags"]["doc"] == t["doc"]
    # the budget suite's tokens are exactly the documents' ids
    cfg = SIZES["tiny"]["budget"]
    docs = {d: ids for d, _, ids in sweep_documents(tiny_base, cfg["docs"], cfg["history"] + 16)}
    for t in (t for t in tasks if t["suite"] == "budget"):
        ids = docs[t["doc"]]
        assert t["history"] == ids[: cfg["history"]].tolist()
        assert t["target"] == ids[cfg["history"] :].tolist()
        assert t["answer"] is None and t["tags"]["kind"] in ("code", "prose")
    needle = [t for t in tasks if t["suite"] == "needle"]
    assert needle and all(t["answer"]["metric"] == "contains" for t in needle)


def _run_with_tasks(tmp_path: Path) -> tuple[Path, str]:
    rows = []
    for doc in ("a", "b"):
        for m, nll in (("full", 2.0), ("truncation", 2.4)):
            rows.append(
                {
                    "suite": "needle",
                    "doc": doc,
                    "budget": 128,
                    "method": m,
                    "entries": 128 if m != "full" else 300,
                    "nll": nll,
                    "token_nll": [nll] * 2,
                    "score": 1.0 if m == "full" else 0.0,
                }
            )
    add_derived(rows, ("suite", "doc", "budget"))
    run = tmp_path / "run"
    with recording_tasks() as tasks:
        for doc in ("a", "b"):
            ans = {"max_new": 4, "references": ["4711"], "metric": "contains"}
            record_task(
                torch.arange(300), torch.arange(2), 128, {"suite": "needle", "doc": doc}, ans
            )
    info = write_tasks(run, tasks)
    write_run(run, rows, [], {"name": "t", "tasks": info})
    return run, info["sha256"]


def _peer_rows(sha: str) -> list[dict]:
    ans = json.dumps({"max_new": 4, "references": ["4711"], "metric": "contains"})
    return [
        {
            "suite": "needle",
            "doc": doc,
            "budget": 128,
            "method": "kvpress_snapkv",
            "entries": 128,
            "nll": nll,
            "token_nll": [nll, nll],
            "history_tokens": 300,
            "horizon": 2,
            "generated": gen,
            "answer": ans,
            "full_nll_peer": 2.0 + 3e-6,
            "tasks_sha256": sha,
            "versions": "kvpress 0.5.5",
        }
        for doc, nll, gen in (("a", 2.1, "it is 4711"), ("b", 2.3, "1234"))
    ]


def _write_peer(run: Path, rows: list[dict], name: str = "kvpress.parquet") -> Path:
    path = run / "peers" / name
    path.parent.mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_peer_rows_are_folded_into_the_report(tmp_path):
    run, sha = _run_with_tasks(tmp_path)
    _write_peer(run, _peer_rows(sha))
    rows, _, meta = load_run(run)
    folded, _ = fold_peers(run, rows, meta)
    peer = {r["doc"]: r for r in folded if r["method"] == "kvpress_snapkv"}
    assert len(folded) == len(rows) + 2
    assert math.isclose(peer["a"]["delta_nll"], 0.1, abs_tol=1e-12)
    assert math.isclose(peer["b"]["delta_nll"], 0.3, abs_tol=1e-12)
    assert math.isclose(peer["a"]["recovered"], 0.75, abs_tol=1e-9)  # (2.4-2.1)/(2.4-2.0)
    assert math.isclose(peer["a"]["delta_trunc"], 0.4, abs_tol=1e-12)
    assert (peer["a"]["score"], peer["b"]["score"]) == (1.0, 0.0)  # the suite's metric
    assert math.isclose(peer["a"]["full_check"], 3e-6, rel_tol=1e-6)
    text = build_report(run).read_text()
    assert "## External peers" in text and "max |Δ| = 3.00e-06" in text
    line = next(x for x in text.splitlines() if x.startswith("| kvpress_snapkv | 128 |"))
    # mean ΔNLL +0.200 over the two documents, recovered of means (2.4-2.2)/0.4 = 0.5, score 0.5
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2:4] == ["128", "2.200"] and cells[4].startswith("+0.200")
    assert cells[5:] == ["0.500", "0.500"]
    assert (run / "needle_delta_nll.png").is_file()


def test_stale_peer_file_is_reported_not_folded(tmp_path):
    run, _ = _run_with_tasks(tmp_path)
    _write_peer(run, _peer_rows("0" * 64))
    text = build_report(run).read_text()
    assert "**not folded**" in text and "kvpress_snapkv |" not in text


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda rows: [{k: v for k, v in r.items() if k != "nll"} for r in rows], "lacks"),
        (lambda rows: [{**r, "method": "truncation"} for r in rows], "one of the run's own"),
        (lambda rows: [{**r, "doc": "zzz"} for r in rows], "not in the run"),
        (lambda rows: [{**r, "nll": float("nan")} for r in rows], "non-finite"),
        (lambda rows: [], "no rows"),
    ],
)
def test_bad_peer_file_raises_naming_it(tmp_path, change, match):
    run, sha = _run_with_tasks(tmp_path)
    rows = change(_peer_rows(sha))
    if rows:
        path = _write_peer(run, rows, "bad.parquet")
    else:
        path = _write_peer(run, _peer_rows(sha), "bad.parquet")
        pq.write_table(pa.table({"method": pa.array([], pa.string())}), path)
    with pytest.raises(StorageError, match=match) as exc:
        build_report(run)
    assert str(path) in str(exc.value)


def test_unreadable_peer_file_raises_naming_it(tmp_path):
    run, _ = _run_with_tasks(tmp_path)
    path = run / "peers" / "junk.parquet"
    path.parent.mkdir()
    path.write_bytes(b"not parquet at all")
    with pytest.raises(StorageError, match="unreadable") as exc:
        build_report(run)
    assert str(path) in str(exc.value)


def test_read_tasks_errors(tmp_path):
    with pytest.raises(StorageError, match="no tasks"):
        read_tasks(tmp_path)
    (tmp_path / "tasks.parquet").write_bytes(b"junk")
    with pytest.raises(StorageError, match="unreadable"):
        read_tasks(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not PEER_PY.is_file(), reason="the kvpress env (run.sh builds it) is absent")
def test_kvpress_peer_end_to_end(smollm2_base, tmp_path):
    """The real peer in its own environment on a tiny run of the embedded model:
    exactly W entries per layer, its uncompressed NLL equals our `full` row."""
    out = tmp_path / "run"
    run_eval(
        ["needle"],
        size="tiny",
        base=smollm2_base,
        out_dir=out,
        methods=["full", "truncation"],
        log=lambda _: None,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        ["bash", str(PEER / "run.sh"), str(out), "--presses", "snapkv,expected_attention"],
        check=True,
        env=env,
    )
    rows, _, meta = load_run(out)
    folded, _ = fold_peers(out, rows, meta)
    peer = [r for r in folded if r["method"].startswith("kvpress_")]
    assert {r["method"] for r in peer} == {"kvpress_snapkv", "kvpress_expected_attention"}
    for r in peer:
        assert r["entries"] == r["budget"]
        assert r["full_check"] < 1e-4  # fp32, same tokens and positions (measured ~3e-6)
        assert math.isfinite(r["delta_nll"]) and r["score"] in (0.0, 1.0)
    # the compression ratio keeps exactly `keep` pairs over a grid of lengths
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from kvpress_peer import ratio_for\n"
        "from kvpress.utils import compute_n_kept\n"
        "for L in range(2, 700, 7):\n"
        "    for k in range(1, L + 1, 3):\n"
        "        assert compute_n_kept(L, ratio_for(L, k)) == k, (L, k)\n"
    )
    subprocess.run([str(PEER_PY), "-c", code, str(PEER)], check=True)
