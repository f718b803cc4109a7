"""LongBench and InfiniteBench loaders.

LongBench (THUDM) rows are JSON lines with ``input`` (the question), ``context``
(the long document), ``answers`` (reference answers) and ``dataset``; the project
reads real rows from ``../shared/data/longbench/*.jsonl`` (see SOURCE.md there)
when that folder exists. Prompts follow LongBench's ``dataset2prompt`` templates
(context first, the question at the tail). The metric is LongBench's: token F1
for the QA tasks, accuracy (exact match of the paragraph label) for
``passage_retrieval_en``.

InfiniteBench (OpenBMB) rows are JSON lines with ``id``, ``context``, ``input``,
``answer`` (a string or a list) and ``options`` (multiple choice tasks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import split_of
from ..errors import InputError, StorageError

__all__ = [
    "LONGBENCH_TASKS",
    "LongExample",
    "build_prompt",
    "load_infinitebench",
    "load_longbench",
    "longbench_dir",
    "longbench_doc_id",
    "middle_truncate",
]

LONGBENCH_TASKS = ("narrativeqa", "qasper", "multifieldqa_en", "passage_retrieval_en")

# LongBench's dataset2prompt, split around the context: (prefix, suffix with {input})
_PROMPTS = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a "
        "question. Answer the question asconcisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\nStory: ",
        "\n\nNow, answer the question based on the story asconcisely as you can, using a "
        "single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}"
        "\n\nAnswer:",
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as "
        "concisely as you can, using a single phrase or sentence if possible. If the "
        "question cannot be answered based on the information in the article, write "
        '"unanswerable". If the question is a yes/no question, answer "yes", "no", or '
        '"unanswerable". Do not provide any explanation.\n\nArticle: ',
        "\n\n Answer the question based on the above article as concisely as you can, "
        "using a single phrase or sentence if possible. If the question cannot be "
        'answered based on the information in the article, write "unanswerable". If the '
        'question is a yes/no question, answer "yes", "no", or "unanswerable". Do not '
        "provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n",
        "\n\nNow, answer the following question based on the above text, only give me "
        "the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine "
        "which paragraph the abstract is from.\n\n",
        "\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the "
        'paragraph that the abstract is from. The answer format must be like "Paragraph '
        '1", "Paragraph 2", etc.\n\nThe answer is:',
    ),
}
_GENERIC = ("", "\n\nQuestion: {input}\nAnswer:")


@dataclass(frozen=True)
class LongExample:
    """One benchmark row: ``context`` then ``question``; ``answers`` the references."""

    task: str
    id: str
    context: str
    question: str
    answers: list[str]
    metric: str = "f1"
    meta: dict[str, Any] = field(default_factory=dict)


def longbench_dir() -> Path | None:
    """``../shared/data/longbench`` relative to the repository root, or None."""
    here = Path(__file__).resolve().parents[2]
    cand = here.parent / "shared" / "data" / "longbench"
    return cand if cand.is_dir() else None


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise StorageError(f"{path}: cannot read ({exc})", path=str(path)) from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StorageError(f"{path}:{i}: invalid JSON ({exc})", path=str(path)) from None
        if not isinstance(row, dict):
            raise StorageError(f"{path}:{i}: a row must be a JSON object", path=str(path))
        out.append((i, row))
    return out


def _need(path: Path, line: int, row: dict[str, Any], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise StorageError(
            f"{path}:{line}: missing keys {missing}", path=str(path), field=missing[0]
        )


def longbench_doc_id(task: str, line: int, row: dict[str, Any]) -> str:
    """The id ``megacontext ingest <folder>/<task>.jsonl`` gives a row:
    ``<task>.jsonl#<_id>`` (``<task>.jsonl:<line>`` without an id), so
    :func:`megacontext.data.split_of` puts it in the trainer's split."""
    rid = row.get("_id", row.get("id"))
    return f"{task}.jsonl#{rid}" if isinstance(rid, (str, int)) else f"{task}.jsonl:{line}"


def load_longbench(
    folder: str | Path,
    tasks: tuple[str, ...] = LONGBENCH_TASKS,
    limit: int | None = None,
    split: str | None = None,
) -> list[LongExample]:
    """Rows of ``<folder>/<task>.jsonl`` for each task present (absent tasks are
    skipped), at most ``limit`` per task, in file order. ``split``: only the rows in
    that split of the trainer's rule (:func:`longbench_doc_id`,
    :func:`megacontext.data.split_of`); ``None``: all."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StorageError(f"{folder}: not a directory", path=str(folder))
    out: list[LongExample] = []
    for task in tasks:
        path = folder / f"{task}.jsonl"
        if not path.is_file():
            continue
        rows = _read_jsonl(path)
        if split is not None:
            rows = [(i, r) for i, r in rows if split_of(longbench_doc_id(task, i, r)) == split]
        for line, row in rows[: limit if limit is not None else len(rows)]:
            _need(path, line, row, ("input", "context", "answers"))
            answers = row["answers"]
            if isinstance(answers, str):
                answers = [answers]
            if not answers:
                raise StorageError(f"{path}:{line}: empty answers", path=str(path), field="answers")
            metric = row.get("metric") or (
                "accuracy" if task.startswith("passage_retrieval") else "f1"
            )
            out.append(
                LongExample(
                    task=task,
                    id=str(row.get("_id", line)),
                    context=row["context"],
                    question=row["input"],
                    answers=[str(a) for a in answers],
                    metric=metric,
                    meta={
                        "line": line,
                        "length": row.get("length"),
                        "doc_id": longbench_doc_id(task, line, row),
                    },
                )
            )
    return out


def load_infinitebench(path: str | Path, limit: int | None = None) -> list[LongExample]:
    """Rows of one InfiniteBench task file (``<task>.jsonl``: ``id``, ``context``,
    ``input``, ``answer``, ``options``). Multiple-choice rows get the options
    appended to the question; the metric is ``em`` for them and ``f1`` otherwise."""
    path = Path(path)
    task = path.stem
    rows = _read_jsonl(path)
    out = []
    for line, row in rows[: limit if limit is not None else len(rows)]:
        _need(path, line, row, ("context", "input", "answer"))
        ans = row["answer"]
        answers = [str(a) for a in ans] if isinstance(ans, list) else [str(ans)]
        if not answers:
            raise StorageError(f"{path}:{line}: empty answer", path=str(path), field="answer")
        question = row["input"]
        options = row.get("options") or []
        if options:
            letters = "ABCDEFGHIJ"
            question += "\n" + "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))
        out.append(
            LongExample(
                task=task,
                id=str(row.get("id", line)),
                context=row["context"],
                question=question,
                answers=answers,
                metric="em" if options else "f1",
                meta={"line": line, "options": options},
            )
        )
    return out


def build_prompt(ex: LongExample) -> tuple[str, str]:
    """``(prefix, suffix)``: the prompt is ``prefix + context + suffix``; the
    question is in the suffix (at the tail)."""
    pre, suf = _PROMPTS.get(ex.task, _GENERIC)
    return pre, suf.format(input=ex.question)


def middle_truncate(ids: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """LongBench's truncation: keep the first and last ``max_tokens // 2`` tokens."""
    if max_tokens < 2:
        raise InputError(f"max_tokens must be >= 2, got {max_tokens}")
    ids = torch.as_tensor(ids)
    if ids.numel() <= max_tokens:
        return ids
    half = max_tokens // 2
    return torch.cat([ids[:half], ids[ids.numel() - (max_tokens - half) :]])
