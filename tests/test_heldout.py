"""Evaluation reads only held-out data: the documents and synthetic haystacks of
every suite are in the validation split by the rule the trainer's shards use, and
evaluation task seeds never meet training ones."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest

import megacontext as mc
from megacontext import synthetic
from megacontext.data import (
    ShardDataset,
    build_shards,
    split_of,
    stdlib_modules,
    stdlib_prose,
    stdlib_topics,
)
from megacontext.eval import accept as acc
from megacontext.eval.common import sweep_documents
from megacontext.eval.longbench import load_longbench, longbench_dir

STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_base):
    """Trainer shards of a copy of the library's layout (same folder name, so the
    same ids): the held-out modules' candidates, a few training modules, and the
    pydoc topics; built by ``build_shards``, i.e. ``megacontext ingest``."""
    root = tmp_path_factory.mktemp("lib") / STDLIB.name
    (root / "pydoc_data").mkdir(parents=True)
    shutil.copy(STDLIB / "pydoc_data" / "topics.py", root / "pydoc_data" / "topics.py")
    for name in ("turtle.py", "doctest.py", "zipfile.py", "_pydecimal.py", "inspect.py"):
        shutil.copy(STDLIB / name, root / name)
    out = tmp_path_factory.mktemp("shards") / "out"
    build_shards([root], out, tokenizer=tiny_base.tokenizer, model_name="t", progress=False)
    ids = {
        s: {ShardDataset(out, s).info(i)["doc_id"] for i in range(len(ShardDataset(out, s)))}
        for s in ("train", "validation")
    }
    return ids


def test_one_rule_decides_the_split(shards):
    for doc_id in shards["validation"]:
        assert split_of(doc_id) == "validation"
    for doc_id in shards["train"]:
        assert split_of(doc_id) == "train"
    # the documents the evaluation used before issue 14 are training documents
    assert f"{STDLIB.name}/_pydecimal.py" in shards["train"]
    assert f"{STDLIB.name}/inspect.py" in shards["train"]


def test_helpers_list_only_held_out_documents(shards):
    val_topics = {d for d, _ in stdlib_topics("validation")}
    assert val_topics and val_topics <= shards["validation"]
    assert not val_topics & shards["train"]
    train_topics = {d for d, _ in stdlib_topics("train")}
    assert not train_topics & val_topics
    for doc_id, _ in stdlib_modules("validation"):
        assert split_of(doc_id) == "validation"
        assert doc_id not in shards["train"]
    with pytest.raises(mc.InputError, match="split"):
        stdlib_modules("test")


def test_no_evaluation_document_is_in_the_training_split(tiny_base, shards):
    docs = sweep_documents(tiny_base, 4, 600)
    assert [k for _, k, _ in docs] == ["code", "prose", "code", "prose"]
    val_modules = {p.name: d for d, p in stdlib_modules("validation")}
    val_text = stdlib_prose("validation")
    train_text = stdlib_prose("train")
    for doc_id, kind, ids in docs:
        if kind == "code":
            name = doc_id.removeprefix("code/")
            assert name in val_modules and val_modules[name] not in shards["train"]
        else:
            text = tiny_base.tokenizer.decode(ids[50:150].tolist())
            assert text in val_text and text not in train_text
    # accept's documents too
    code = acc._code_docs(tiny_base, 2, 600)
    by_size = sorted((p for _, p in stdlib_modules("validation")), key=lambda p: -p.stat().st_size)
    assert code[0].tolist() == tiny_base.encode(by_size[0].read_text(encoding="utf-8")).tolist()
    for ids in acc._narrative_docs(tiny_base, 2, 600):
        text = tiny_base.tokenizer.decode(ids[50:150].tolist())
        assert text in val_text and text not in train_text


@pytest.mark.skipif(longbench_dir() is None, reason="../shared/data/longbench absent")
def test_longbench_rows_follow_the_ingest_ids(tmp_path, tiny_base):
    folder = longbench_dir()
    every = load_longbench(folder)
    held = load_longbench(folder, split="validation")
    assert held and len(held) < len(every)
    out = tmp_path / "lb"
    build_shards(
        sorted(folder.glob("*.jsonl")),
        out,
        tokenizer=tiny_base.tokenizer,
        model_name="t",
        progress=False,
    )
    train = ShardDataset(out, "train")
    train_ids = {train.info(i)["doc_id"] for i in range(len(train))}
    assert all(ex.meta["doc_id"] not in train_ids for ex in held)
    assert all(ex.meta["doc_id"] in train_ids for ex in every if ex not in held)


def test_seed_namespaces_are_disjoint():
    seeds = [synthetic.train_seed(s, i) for s in range(50) for i in range(20)]
    assert min(seeds) >= synthetic.TRAIN_SEED_BASE > 10**9
    assert max(seeds) < 2 * synthetic.TRAIN_SEED_BASE
    synthetic.check_seed(123, "validation")
    synthetic.check_seed(seeds[0], "train")
    with pytest.raises(mc.InputError, match="training namespace"):
        synthetic.check_seed(seeds[0], "validation")
    with pytest.raises(mc.InputError, match="train_seed"):
        synthetic.check_seed(123, "train")


def test_evaluation_tasks_use_held_out_filler(tiny_base):
    tok = tiny_base.tokenizer
    t = synthetic.passkey(tok, length=600, depth=0.6, seed=5, haystack="validation")
    assert t.meta["haystack"] == "validation"
    head = t.context[: t.context.index("The pass key is")].strip()[-300:]
    assert head in synthetic._prose_text("validation")
    assert head not in synthetic._prose_text("train")
    c = synthetic.code_identifier(tok, length=600, depth=0.5, seed=5, haystack="validation")
    # the filler ends where the statement's leading blank lines begin
    head = c.context[: c.context.index(c.meta["name"])].rsplit("\n\n\n", 1)[0][-300:]
    assert head in synthetic._code_text("validation")
    with pytest.raises(mc.InputError, match="training namespace"):
        synthetic.passkey(tok, length=600, seed=synthetic.train_seed(0), haystack="validation")
