"""LongBench / InfiniteBench loaders on fixtures (and the real rows when present)."""

from __future__ import annotations

import json

import pytest
import torch

from megacontext.errors import InputError, StorageError
from megacontext.eval.longbench import (
    LONGBENCH_TASKS,
    build_prompt,
    load_infinitebench,
    load_longbench,
    longbench_dir,
    middle_truncate,
)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_longbench_fixture(tmp_path):
    _write(
        tmp_path / "qasper.jsonl",
        [
            {"input": "What is X?", "context": "Doc one.", "answers": ["X is Y"], "_id": "a"},
            {"input": "Why?", "context": "Doc two.", "answers": ["because"], "_id": "b"},
        ],
    )
    _write(
        tmp_path / "passage_retrieval_en.jsonl",
        [{"input": "abstract", "context": "Paragraph 1: ...", "answers": ["Paragraph 1"]}],
    )
    rows = load_longbench(tmp_path)
    assert [r.task for r in rows] == ["qasper", "qasper", "passage_retrieval_en"]
    assert rows[0].id == "a" and rows[0].answers == ["X is Y"] and rows[0].metric == "f1"
    assert rows[2].metric == "accuracy" and rows[2].id == "1"
    assert len(load_longbench(tmp_path, limit=1)) == 2
    pre, suf = build_prompt(rows[0])
    assert pre.endswith("Article: ") and suf.endswith("Question: What is X?\n\nAnswer:")


def test_longbench_errors(tmp_path):
    with pytest.raises(StorageError, match="not a directory"):
        load_longbench(tmp_path / "missing")
    (tmp_path / "qasper.jsonl").write_text('{"input": "q", "context": "c"}\n')
    with pytest.raises(StorageError, match=r"qasper.jsonl:1: missing keys \['answers'\]"):
        load_longbench(tmp_path)
    (tmp_path / "qasper.jsonl").write_text("{not json\n")
    with pytest.raises(StorageError, match="qasper.jsonl:1: invalid JSON"):
        load_longbench(tmp_path)


def test_longbench_real_rows():
    folder = longbench_dir()
    if folder is None:
        pytest.skip("../shared/data/longbench is absent")
    rows = load_longbench(folder)
    tasks = {r.task for r in rows}
    assert tasks == set(LONGBENCH_TASKS)
    assert len(rows) == 21  # SOURCE.md: 8 + 6 + 3 + 4 rows
    for r in rows:
        assert r.context and r.question and r.answers
        assert r.metric == ("accuracy" if r.task == "passage_retrieval_en" else "f1")


def test_infinitebench_fixture(tmp_path):
    path = tmp_path / "longbook_choice_eng.jsonl"
    _write(
        path,
        [
            {
                "id": 0,
                "context": "A long book.",
                "input": "Who?",
                "answer": ["Alice"],
                "options": ["Alice", "Bob"],
            },
            {"id": 1, "context": "Another.", "input": "Where?", "answer": "Paris", "options": []},
        ],
    )
    rows = load_infinitebench(path)
    assert rows[0].task == "longbook_choice_eng"
    assert rows[0].question == "Who?\nA. Alice\nB. Bob" and rows[0].metric == "em"
    assert rows[1].answers == ["Paris"] and rows[1].metric == "f1"
    _write(path, [{"id": 0, "context": "c", "input": "q"}])
    with pytest.raises(StorageError, match="missing keys"):
        load_infinitebench(path)


def test_middle_truncate():
    ids = torch.arange(10)
    assert torch.equal(middle_truncate(ids, 20), ids)
    assert middle_truncate(ids, 4).tolist() == [0, 1, 8, 9]
    assert middle_truncate(ids, 5).tolist() == [0, 1, 7, 8, 9]
    with pytest.raises(InputError):
        middle_truncate(ids, 1)
