"""Synthetic long-range tasks, measured with the real (SmolLM2) tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from megacontext import synthetic
from megacontext.data import ShardDataset
from megacontext.errors import InputError

BLOCK = 32
GENS = {
    "passkey": synthetic.passkey,
    "kv": synthetic.key_value,
    "code": synthetic.code_identifier,
}


@pytest.fixture(scope="module")
def tok(tiny_base):
    return tiny_base.tokenizer


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("task", list(GENS))
@pytest.mark.parametrize("align", [None, "edge", "straddle", "mid"])
@pytest.mark.parametrize("length,depth", [(640, 0.0), (1500, 0.37), (3000, 1.0)])
def test_length_needle_alignment_and_target(tok, task, align, length, depth):
    t = GENS[task](tok, length=length, depth=depth, seed=11, needle_align=align)
    m = t.meta
    ids = _ids(tok, t.context)
    assert abs(len(ids) - length) <= 4
    assert m["context_tokens"] == len(ids)
    start, end = m["needle_span"]
    answer = m["answer"]
    # The needle's tokens spell the answer, and the target is that answer.
    assert tok.decode(ids[start:end]).strip() == answer
    assert t.target == f" {answer}"
    # The target tokenizes apart from the context: the model predicts exactly these ids.
    assert _ids(tok, t.context + t.target) == ids + _ids(tok, t.target)
    assert m["target_tokens"] == len(_ids(tok, t.target))
    # Stated once, far away: the last 64 tokens (the query) do not contain it.
    if depth < 1.0:
        assert answer not in tok.decode(ids[-64:])
        assert end <= len(ids) - 64
    s0, s1 = m["statement_span"]
    assert s0 <= start < end <= s1
    if align == "edge":
        assert start % BLOCK == 0
    elif align == "straddle":
        edge = (start // BLOCK + 1) * BLOCK
        assert start < edge < end and abs((edge - start) - (end - edge)) <= 1
    elif align == "mid":
        assert start % BLOCK > 0 and end % BLOCK != 0 and start // BLOCK == (end - 1) // BLOCK
    else:
        # depth is where the statement starts within the filler + statement budget
        budget = length - (s1 - s0) - 30
        assert abs(s0 - depth * budget) <= 40
    if align is not None:
        # aligned placement stays within one block (plus the needle) of the asked depth
        budget = len(ids) - (s1 - s0)
        assert abs(s0 - depth * budget) <= BLOCK + 40


@pytest.mark.parametrize("task", list(GENS))
def test_deterministic_in_seed(tok, task):
    a = GENS[task](tok, length=700, depth=0.4, seed=5)
    b = GENS[task](tok, length=700, depth=0.4, seed=5)
    c = GENS[task](tok, length=700, depth=0.4, seed=6)
    assert a == b
    assert a.context != c.context and a.meta["answer"] != c.meta["answer"]


def test_filler_is_real_text(tok):
    prose = synthetic.passkey(tok, length=600, seed=1).context
    code = synthetic.code_identifier(tok, length=600, seed=1, kind="function").context
    from pydoc_data.topics import topics

    words = [w for w in prose.split() if len(w) > 6][:20]
    corpus = "\n".join(topics.values())
    assert sum(w in corpus for w in words) >= 18
    assert "def " in code or "class " in code or "import " in code
    assert code.count("\n") > 20


def test_code_kinds(tok):
    const = synthetic.code_identifier(tok, length=800, seed=2, kind="constant")
    func = synthetic.code_identifier(tok, length=800, seed=2, kind="function")
    assert const.context.rstrip().endswith(f"assert {const.meta['name']} ==")
    assert f"{const.meta['name']} = {const.meta['answer']}" in const.context
    assert func.context.endswith(
        f"def {func.meta['name']}({func.meta['answer'].split()[0]}):\n    return"
    )
    assert func.context.count(func.meta["answer"]) == 1


def test_bad_arguments(tok):
    with pytest.raises(InputError, match="needle_align"):
        synthetic.passkey(tok, length=500, needle_align="corner")
    with pytest.raises(InputError, match="depth"):
        synthetic.passkey(tok, length=500, depth=1.5)
    with pytest.raises(InputError, match="too short"):
        synthetic.key_value(tok, length=100)
    with pytest.raises(InputError, match="unknown synthetic tasks"):
        synthetic.generate_tasks(tok, 2, length=500, tasks=["sudoku"])
    with pytest.raises(InputError, match="at most 6 tokens, got 9"):
        synthetic.code_identifier(
            tok, length=500, kind="function", needle_align="mid", block_size=8
        )


def test_generate_and_write_shards(tmp_path, tok):
    tasks = synthetic.generate_tasks(tok, 6, length=512, seed=3, needle_align="edge")
    assert [t.meta["task"] for t in tasks] == ["passkey", "kv", "code"] * 2
    assert all(t.meta["needle_span"][0] % BLOCK == 0 for t in tasks)
    assert tasks == synthetic.generate_tasks(tok, 6, length=512, seed=3, needle_align="edge")
    out = tmp_path / "syn"
    manifest = synthetic.write_synthetic_shards(
        out, tasks, tokenizer=tok, model_name="tiny-llama", val_fraction=0
    )
    assert manifest["splits"]["train"]["tags"] == {
        "synthetic": {
            "documents": 6,
            "tokens": sum(len(_ids(tok, t.context + t.target)) for t in tasks),
        }
    }
    ds = ShardDataset(out, tags=["synthetic"])
    assert len(ds) == 6
    for (ids, info), task in zip(ds, tasks, strict=True):
        meta = info["meta"]
        n = meta["context_tokens"]
        assert info["tag"] == "synthetic"
        assert tok.decode(ids[n:].tolist()) == task.target
        s, e = meta["needle_span"]
        assert tok.decode(ids[s:e].tolist()).strip() == meta["answer"]


@pytest.mark.slow
def test_placement_sweep(tok):
    """600 random lengths, depths, alignments and block sizes all place exactly."""
    rng = np.random.default_rng(0)
    gens = list(GENS.values())
    for i in range(600):
        align = [None, "edge", "straddle", "mid"][int(rng.integers(4))]
        block = int(rng.choice([16, 32, 64]))
        length, depth = int(rng.integers(600, 6000)), float(rng.uniform(0, 1))
        t = gens[i % 3](
            tok, length=length, depth=depth, seed=i, needle_align=align, block_size=block
        )
        start, end = t.meta["needle_span"]
        assert abs(t.meta["context_tokens"] - length) <= 4
        assert synthetic._check_align(start, end, align, block)
