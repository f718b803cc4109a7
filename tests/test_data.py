"""Token shards: sources, tags, split, atomic idempotent writes, the reader."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from megacontext import data
from megacontext.data import ShardDataset, build_shards, read_source, split_of
from megacontext.errors import InputError, StorageError

LONGBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "longbench"

TOPICS = """# -*- coding: utf-8 -*-
topics = {'assert': 'The "assert" statement\\n'
           '**********************\\n'
           '\\n'
           'Assert statements are a convenient way to insert debugging\\n',
 'pass': 'The "pass" statement\\n\\n"pass" is a null operation.\\n',
 'empty': '   '}
"""


@pytest.fixture(scope="module")
def tok(tiny_base):
    return tiny_base.tokenizer


def _corpus(root: Path) -> Path:
    src = root / "corpus"
    (src / "pkg" / "sub").mkdir(parents=True)
    (src / "pydoc_data").mkdir()
    (src / "__pycache__").mkdir()
    (src / "pkg" / "a.py").write_text("def add(a, b):\n    return a + b  # héllo\n")
    (src / "pkg" / "sub" / "c.py").write_text("import os\n\nPATH = os.sep\n" * 20)
    (src / "pkg" / "__init__.py").write_text("")  # empty: skipped, reported
    (src / "guide.md").write_text("# Guide\n\nRead *this* first.\n" * 30)
    (src / "notes.txt").write_text("Once upon a time there was a parser.\n" * 40)
    (src / "table.csv").write_text("name,size\nalpha,1\nbeta,2\n")
    (src / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))  # not UTF-8: skipped
    (src / "pydoc_data" / "topics.py").write_text(TOPICS)
    (src / "__pycache__" / "x.py").write_text("excluded = True\n")
    (src / "image.png").write_bytes(b"\x89PNG")  # unknown suffix inside a folder: ignored
    return src


def _build(srcs, out, tok, **kw):
    kw.setdefault("progress", False)
    return build_shards([str(s) for s in srcs], out, tokenizer=tok, model_name="tiny-llama", **kw)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_folder_tags_round_trip_and_skips(tmp_path, tok):
    src = _corpus(tmp_path)
    out = tmp_path / "shards"
    manifest = _build([src], out, tok, val_fraction=0.3)
    docs, _ = read_source(src)
    by_id = {d.doc_id: d for d in docs}
    assert {d.doc_id: d.tag for d in docs} == {
        "corpus/guide.md": "doc",
        "corpus/notes.txt": "doc",
        "corpus/pkg/a.py": "code",
        "corpus/pkg/sub/c.py": "code",
        "corpus/pydoc_data/topics.py#assert": "doc",
        "corpus/pydoc_data/topics.py#pass": "doc",
        "corpus/table.csv": "list-table",
    }
    assert by_id["corpus/pydoc_data/topics.py#pass"].text.startswith('The "pass" statement')
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert reasons["__init__.py"] == "empty"
    assert reasons["latin.txt"].startswith("not decodable")

    seen = {}
    for split in ("train", "validation"):
        ds = ShardDataset(out, split)
        assert len(ds) == manifest["splits"][split]["documents"]
        assert ds.num_tokens == manifest["splits"][split]["tokens"]
        for ids, info in ds:
            assert ids.dtype == torch.int64
            assert tok.decode(ids.tolist()) == by_id[info["doc_id"]].text  # exact round trip
            assert split_of(info["doc_id"], 0, 0.3) == split
            seen[info["doc_id"]] = info["tag"]
    assert seen == {d.doc_id: d.tag for d in docs}
    tags = {
        t: sum(
            manifest["splits"][s]["tags"].get(t, {"documents": 0})["documents"] for s in data.SPLITS
        )
        for t in ("code", "doc", "list-table")
    }
    assert tags == {"code": 2, "doc": 4, "list-table": 1}
    assert manifest["tokenizer"]["vocab_size"] == len(tok)


def test_tag_override_and_curriculum_filter(tmp_path, tok):
    src = _corpus(tmp_path)
    out = tmp_path / "shards"
    _build(
        [src / "notes.txt", f"{src / 'guide.md'}=narrative", src / "pkg"], out, tok, val_fraction=0
    )
    ds = ShardDataset(out)
    assert sorted(info["tag"] for _, info in ds) == ["code", "code", "doc", "narrative"]
    stage0 = ds.with_tags(data.CURRICULUM[0])
    assert sorted(stage0.info(i)["doc_id"] for i in range(len(stage0))) == ["guide.md", "notes.txt"]
    assert len(ShardDataset(out, tags=["code"])) == 2
    with pytest.raises(InputError, match="unknown tag 'prose'"):
        ShardDataset(out, tags=["prose"])


def test_split_is_by_document_hash_and_stable(tmp_path, tok):
    ids = [f"doc-{i}" for i in range(4000)]
    frac = np.mean([split_of(i, 0, 0.1) == "validation" for i in ids])
    assert 0.08 < frac < 0.12
    assert [split_of(i, 0, 0.1) for i in ids] == [split_of(i, 0, 0.1) for i in ids]
    assert [split_of(i, 0, 0.1) for i in ids] != [split_of(i, 1, 0.1) for i in ids]

    src = _corpus(tmp_path)
    one = _build([src / "pkg"], tmp_path / "one", tok, val_fraction=0.5)
    _build([src / "pkg", src / "pydoc_data"], tmp_path / "two", tok, val_fraction=0.5)
    assert one["splits"]["train"]["documents"] + one["splits"]["validation"]["documents"] == 2

    def splits(root):
        return {
            info["doc_id"]: split for split in data.SPLITS for _, info in ShardDataset(root, split)
        }

    s1, s2 = splits(tmp_path / "one"), splits(tmp_path / "two")
    assert {k: s2[k] for k in s1} == s1  # adding a source moved nobody
    assert len(s2) == 4


def test_rerun_is_byte_identical_and_skips_when_up_to_date(tmp_path, tok):
    src = _corpus(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    _build([src], a, tok, shard_tokens=64)
    _build([src], b, tok, shard_tokens=64)
    assert _tree_bytes(a) == _tree_bytes(b)
    assert len(list((a / "train").glob("*.bin"))) > 1  # several shards were written

    before = {p: p.stat().st_mtime_ns for p in a.rglob("*")}
    inode = a.stat().st_ino
    _build([src], a, tok, shard_tokens=64)  # up to date: nothing rewritten
    assert a.stat().st_ino == inode
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*")} == before
    _build([src], a, tok, shard_tokens=64, force=True)  # rebuilt, same bytes
    assert a.stat().st_ino != inode
    assert _tree_bytes(a) == _tree_bytes(b)
    (src / "guide.md").write_text("# Changed\n")
    _build([src], a, tok, shard_tokens=64)
    assert _tree_bytes(a) != _tree_bytes(b)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_write_leaves_previous_output_intact(tmp_path, tok, monkeypatch):
    src = _corpus(tmp_path)
    out = tmp_path / "shards"
    _build([src], out, tok, shard_tokens=64)
    before = _tree_bytes(out)
    (src / "guide.md").write_text("# Changed guide\n" * 50)
    calls = []
    real = data._write_bin

    def failing(path, tokens):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", str(path))
        real(path, tokens)

    monkeypatch.setattr(data, "_write_bin", failing)
    with pytest.raises(OSError, match="No space left"):
        _build([src], out, tok, shard_tokens=64)
    assert len(calls) == 3
    assert _tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "shards"]  # no temp left
    assert len(ShardDataset(out)) > 0


def test_bad_and_empty_sources(tmp_path, tok):
    src = _corpus(tmp_path)
    out = tmp_path / "shards"
    _build([src], out, tok)
    before = _tree_bytes(out)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    (tmp_path / "nothing").mkdir()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n')
    cases = [
        (tmp_path / "missing.py", "missing.py' does not exist"),
        (empty, "empty.txt' is empty"),
        (tmp_path / "nothing", "nothing' holds no non-empty documents"),
        (bad, r"bad.jsonl:2: invalid JSON"),
        (nofield, r"nofield.jsonl:1: no text field"),
        (src / "image.png", "unsupported file type '.png'"),
    ]
    for source, message in cases:
        with pytest.raises(InputError, match=message):
            _build([src, source], out, tok)
        assert _tree_bytes(out) == before
    with pytest.raises(InputError, match="appears twice"):
        _build([src, src], out, tok)
    assert _tree_bytes(out) == before


def test_duplicate_texts_are_kept_once(tmp_path, tok):
    src = _corpus(tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "again.py").write_text((src / "pkg" / "a.py").read_text())
    manifest = _build([src / "pkg", copy], tmp_path / "out", tok, val_fraction=0)
    assert manifest["duplicates"] == [["copy/again.py", "pkg/a.py"]]
    assert manifest["splits"]["train"]["documents"] == 2
    assert _build([src / "pkg", copy], tmp_path / "max", tok, max_docs=1)["duplicates"]
    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    (unrelated / "keep.txt").write_text("precious")
    with pytest.raises(StorageError, match="without a shard manifest"):
        _build([src], unrelated, tok)
    assert (unrelated / "keep.txt").read_text() == "precious"
    with pytest.raises(StorageError, match="no shard manifest"):
        ShardDataset(unrelated)


def _write_arrow_stream(path: Path, table) -> None:
    import pyarrow as pa

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def test_hugging_face_dataset_on_disk(tmp_path, tok):
    """The layout ``datasets.DatasetDict.save_to_disk`` writes, made with pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "hf_stories"
    rows = {
        "train": [("s0", "The fox ran.", "narrative"), ("s1", "A list:\n- a\n- b", "list-table")],
        "test": [("s2", "It was late when the bell rang.", None), ("s3", "", None)],
    }
    (root).mkdir()
    (root / "dataset_dict.json").write_text(json.dumps({"splits": list(rows)}))
    for split, items in rows.items():
        d = root / split
        d.mkdir()
        table = pa.table(
            {
                "id": [r[0] for r in items],
                "text": [r[1] for r in items],
                "tag": [r[2] for r in items],
                "score": [1.5, 2.5],
            }
        )
        _write_arrow_stream(d / "data-00000-of-00001.arrow", table)
        (d / "state.json").write_text(
            json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
        )
        (d / "dataset_info.json").write_text("{}")
    docs, skipped = read_source(root)
    got = {d.doc_id: (d.text, d.tag, d.meta["hf_split"], d.meta["score"]) for d in docs}
    assert got == {
        "hf_stories/train#s0": ("The fox ran.", "narrative", "train", 1.5),
        "hf_stories/train#s1": ("A list:\n- a\n- b", "list-table", "train", 2.5),
        "hf_stories/test#s2": ("It was late when the bell rang.", "doc", "test", 1.5),
    }
    assert skipped == [
        {"path": f"{root / 'test' / 'data-00000-of-00001.arrow'} row 1", "reason": "empty text"}
    ]

    # A single saved Dataset: state.json at the top, two data files in its order.
    single = tmp_path / "single"
    single.mkdir()
    names = ["data-00001-of-00002.arrow", "data-00000-of-00002.arrow"]
    for i, name in enumerate(names):
        _write_arrow_stream(single / name, pa.table({"content": [f"part {i}"]}))
    (single / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": n} for n in names]})
    )
    docs, _ = read_source(single)
    assert [(d.doc_id, d.text, d.tag) for d in docs] == [
        ("single:0", "part 0", "doc"),
        ("single:1", "part 1", "doc"),
    ]
    (single / "state.json").write_text(json.dumps({"_data_files": [{"filename": "gone.arrow"}]}))
    with pytest.raises(InputError, match="gone.arrow: listed in state.json but missing"):
        read_source(single)

    # A folder of parquet files (a downloaded dataset).
    flat = tmp_path / "flat"
    flat.mkdir()
    pq.write_table(pa.table({"story": ["One.", "Two."]}), flat / "train-00000-of-00001.parquet")
    docs, _ = read_source(flat)
    assert [(d.doc_id, d.text) for d in docs] == [("flat:0", "One."), ("flat:1", "Two.")]
    out = tmp_path / "shards"
    _build([root, flat], out, tok, val_fraction=0)
    assert sorted(info["doc_id"] for _, info in ShardDataset(out)) == sorted(
        ["hf_stories/train#s0", "hf_stories/train#s1", "hf_stories/test#s2", "flat:0", "flat:1"]
    )
    with pytest.raises(InputError, match="no field 'body'"):
        read_source(flat, text_field="body")


def test_reader_windows(tmp_path, tok):
    src = _corpus(tmp_path)
    out = tmp_path / "shards"
    _build([src], out, tok, val_fraction=0, shard_tokens=100)
    ds = ShardDataset(out)
    length = 40
    w1, where = ds.sample_windows(length, 50, seed=3, return_index=True)
    assert w1.shape == (50, length) and w1.dtype == torch.int64
    assert torch.equal(w1, ds.sample_windows(length, 50, seed=3))
    assert not torch.equal(w1, ds.sample_windows(length, 50, seed=4))
    for row, (d, s) in zip(w1, where.tolist(), strict=True):
        ids, info = ds.doc(d)
        assert info["num_tokens"] >= length
        assert torch.equal(row, ids[s : s + length])
    long_enough = {i for i in range(len(ds)) if ds.lengths[i] >= length}
    assert set(where[:, 0].tolist()) <= long_enough
    assert len(set(where[:, 0].tolist())) > 1
    with pytest.raises(InputError, match="no document has 100000 tokens"):
        ds.sample_windows(100000, 1, seed=0)
    with pytest.raises(IndexError):
        ds.doc(len(ds))
    assert torch.equal(ds[-1][0], ds.doc(len(ds) - 1)[0])
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers: paths travel, not tokens
    assert len(pickle.dumps(ds)) < 20_000
    assert torch.equal(clone.sample_windows(length, 50, seed=3), w1)
    with pytest.raises(InputError, match="no split 'test'"):
        ShardDataset(out, "test")
    # A truncated shard is reported, not read past its end.
    shard = next((out / "train").glob("*.bin"))
    os.truncate(shard, shard.stat().st_size - 4)
    with pytest.raises(StorageError, match="manifest says"):
        ShardDataset(out)


@pytest.mark.skipif(not LONGBENCH.is_dir(), reason="../shared/data/longbench is absent")
def test_longbench_jsonl(tmp_path, tok):
    files = sorted(LONGBENCH.glob("*.jsonl"))
    out = tmp_path / "lb"
    manifest = _build(files, out, tok)
    n = sum(manifest["splits"][s]["documents"] for s in data.SPLITS)
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line]
    assert n == len(rows) == 21
    expected = {r["_id"]: r for r in rows}
    for split in data.SPLITS:
        for ids, info in ShardDataset(out, split):
            row = expected[info["doc_id"].split("#", 1)[1]]
            assert info["tag"] == data.LONGBENCH_TAGS[row["dataset"]]
            assert info["meta"]["answers"] == row["answers"]
            assert info["meta"]["input"] == row["input"]
            assert "context" not in info["meta"]
            assert tok.decode(ids[:200].tolist()) == tok.decode(tok.encode(row["context"])[:200])
            assert info["num_tokens"] == len(tok.encode(row["context"], add_special_tokens=False))


def test_cli(tmp_path, capsys):
    from tools.ingest_data import main

    src = _corpus(tmp_path)
    out = tmp_path / "cli"
    assert main([str(src), "--out", str(out), "--model", "tiny-llama", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "train:" in printed and "validation:" in printed
    assert json.loads((out / "manifest.json").read_text())["model"] == "tiny-llama"
    code = main([str(tmp_path / "nope"), "--out", str(out), "--model", "tiny-llama"])
    assert code == 2
    assert "nope' does not exist" in capsys.readouterr().err


def test_cli_synthetic(tmp_path, capsys):
    from tools.ingest_data import main

    out = tmp_path / "syn"
    args = ["--out", str(out), "--model", "tiny-llama", "--no-progress", "--val-fraction", "0"]
    syn = ["--synthetic", "3", "--synthetic-length", "512", "--synthetic-align", "straddle"]
    assert main([*args, *syn]) == 0
    assert "train: 3 documents" in capsys.readouterr().out
    ds = ShardDataset(out, tags=["synthetic"])
    assert [info["meta"]["task"] for _, info in ds] == ["passkey", "kv", "code"]
    for _, info in ds:
        start, end = info["meta"]["needle_span"]
        assert start < (start // 32 + 1) * 32 < end
