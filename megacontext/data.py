"""Tokenized, memory-mapped document shards: sources, writer, reader.

``build_shards(sources, out, tokenizer=...)`` (and ``megacontext ingest``)
reads text sources into :class:`Document` s, splits them into train / validation by
a hash of each document id, tokenizes them with the base model's tokenizer (no
special tokens) and writes::

    OUT/manifest.json                 model, tokenizer, sources, options, per-split counts
    OUT/<split>/shard-NNNNN.bin       uint32 little-endian token ids, documents back to back
    OUT/<split>/shard-NNNNN.idx.parquet   one row per document: offset, length (tokens,
                                      within the .bin), tag, source, doc_id, meta (JSON)

:class:`ShardDataset` reads them back through ``numpy.memmap``: ``len``, ``doc(i)``
(int64 ids ``[n]`` and the document's record), iteration, ``sample_windows`` and
tag filtering (the curriculum: ``CURRICULUM[0]`` first, then everything).

Tags (the guide's curriculum classes plus ``synthetic``), decided per source:

- ``.py`` files -> ``code``; ``pydoc_data/topics.py`` is special: every topic of
  its ``topics`` dict is its own ``doc`` document (English prose about Python);
- ``.md`` / ``.rst`` / ``.txt`` -> ``doc`` (plain text cannot be told apart from
  prose reliably; name narrative sources explicitly: ``stories/=narrative``);
- ``.csv`` / ``.tsv`` -> ``list-table``;
- JSONL rows and Hugging Face rows: the row's ``tag`` field when it is a known tag,
  else by LongBench ``dataset`` (``LONGBENCH_TAGS``), else ``doc``;
- ``PATH=TAG`` on the command line overrides the tag of every document of a source.
"""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import hashlib
import io
import json
import os
import tokenize
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._atomic import atomic_replace_dir
from .errors import InputError, StorageError

__all__ = [
    "CURRICULUM",
    "SPLIT_SEED",
    "TAGS",
    "VAL_FRACTION",
    "Document",
    "ShardDataset",
    "build_shards",
    "read_source",
    "split_of",
    "stdlib_modules",
    "stdlib_prose",
    "stdlib_topics",
]

FORMAT = "megacontext-shards"
FORMAT_VERSION = 1
TAGS = ("narrative", "doc", "code", "list-table", "synthetic")
# The guide: "start with narrative/doc tasks; add lists/tables/code once stable".
CURRICULUM: tuple[tuple[str, ...], ...] = (("narrative", "doc"), TAGS)
SPLITS = ("train", "validation")
# The split every shipped corpus is built with (``megacontext ingest`` defaults); the
# evaluation picks its held-out documents by the same rule (:func:`stdlib_modules`).
SPLIT_SEED = 0
VAL_FRACTION = 0.1
DEFAULT_SHARD_TOKENS = 1 << 24  # 16M tokens = 64 MiB of uint32 per shard
DEFAULT_EXCLUDE = ("__pycache__", "site-packages", "dist-packages", ".*")

SUFFIX_TAGS = {
    ".py": "code",
    ".md": "doc",
    ".rst": "doc",
    ".txt": "doc",
    ".csv": "list-table",
    ".tsv": "list-table",
}
# LongBench ``dataset`` -> tag. passage_retrieval_en is 30 enumerated "Paragraph k:"
# passages to pick from: a list, so list-table.
LONGBENCH_TAGS = {
    "narrativeqa": "narrative",
    "qasper": "doc",
    "multifieldqa_en": "doc",
    "passage_retrieval_en": "list-table",
}
TEXT_FIELDS = ("text", "context", "content", "document", "article", "story")
_TOKENIZE_BATCH = 64


@dataclass(frozen=True)
class Document:
    """One document before tokenization. ``meta`` must be JSON-serialisable."""

    doc_id: str
    text: str
    tag: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _ReadResult:
    documents: list[Document]
    skipped: list[dict[str, str]]


def _check_tag(tag: str, where: str) -> str:
    if tag not in TAGS:
        raise InputError(f"{where}: unknown tag {tag!r}; expected one of {', '.join(TAGS)}")
    return tag


def parse_source(spec: str | Path) -> tuple[Path, str | None]:
    """``"PATH"`` or ``"PATH=TAG"`` -> (path, tag override or None)."""
    text = str(spec)
    if "=" in text:
        head, _, tail = text.rpartition("=")
        if tail in TAGS:
            return Path(head), tail
    return Path(text), None


# --------------------------------------------------------------------------- sources


def _read_text(path: Path) -> str:
    """A text file's contents (``.py`` honours its PEP 263 coding line)."""
    data = path.read_bytes()
    if path.suffix == ".py":
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        text = data.decode(encoding)
        return text[1:] if text.startswith("\ufeff") else text
    return data.decode("utf-8")


def _is_pydoc_topics(path: Path) -> bool:
    return path.name == "topics.py" and path.parent.name == "pydoc_data"


def _pydoc_topics(path: Path, label: str) -> list[Document]:
    """``pydoc_data/topics.py``: one ``doc`` document per topic of its ``topics`` dict."""
    try:
        tree = ast.parse(_read_text(path), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: not a readable pydoc topics file ({exc})") from None
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            topics = ast.literal_eval(node.value)
            break
    else:
        raise InputError(f"{path}: no `topics = {{...}}` dict literal found")
    return [
        Document(f"{label}#{key}", text, "doc", str(path), {"topic": key})
        for key, text in sorted(topics.items())
        if isinstance(text, str) and text.strip()
    ]


def _row_tag(row: dict[str, Any], where: str) -> str:
    tag = row.get("tag")
    if isinstance(tag, str) and tag in TAGS:
        return tag
    dataset = row.get("dataset")
    if isinstance(dataset, str) and dataset in LONGBENCH_TAGS:
        return LONGBENCH_TAGS[dataset]
    return "doc"


def _text_field(row: dict[str, Any], text_field: str | None, where: str) -> str:
    if text_field is not None:
        if text_field not in row:
            raise InputError(f"{where}: no field {text_field!r} (fields: {sorted(row)})")
        return text_field
    for name in TEXT_FIELDS:
        if name in row:
            return name
    raise InputError(
        f"{where}: no text field; expected one of {', '.join(TEXT_FIELDS)} "
        f"(fields: {sorted(row)}); pass text_field / --text-field"
    )


def _jsonable(value: Any) -> Any:
    """Make a row value JSON-serialisable (arrow rows may hold bytes, dates, ...)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _row_document(
    row: dict[str, Any], doc_id: str, source: Path, where: str, text_field: str | None
) -> Document | None:
    name = _text_field(row, text_field, where)
    text = row[name]
    if text is None:
        return None
    if not isinstance(text, str):
        raise InputError(f"{where}: field {name!r} is {type(text).__name__}, not text")
    if not text.strip():
        return None
    meta = {k: _jsonable(v) for k, v in row.items() if k != name}
    return Document(doc_id, text, _row_tag(row, where), str(source), meta)


def _jsonl(path: Path, label: str, text_field: str | None) -> _ReadResult:
    docs: list[Document] = []
    skipped: list[dict[str, str]] = []
    seen: set[str] = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 ({exc})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: a JSONL row must be an object, got {type(row).__name__}")
        rid = row.get("_id", row.get("id"))
        doc_id = f"{label}#{rid}" if isinstance(rid, (str, int)) else f"{label}:{lineno}"
        if doc_id in seen:  # a file may repeat an id; the line keeps it unique
            doc_id = f"{label}:{lineno}"
        seen.add(doc_id)
        doc = _row_document(row, doc_id, path, where, text_field)
        if doc is None:
            skipped.append({"path": where, "reason": "empty text"})
        else:
            docs.append(doc)
    return _ReadResult(docs, skipped)


def _read_arrow_table(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            return pq.read_table(path)
        # save_to_disk writes the Arrow IPC *stream* format; accept the file format too.
        with pa.memory_map(str(path)) as source:
            try:
                return pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path}: not a readable Arrow/Parquet table ({exc})") from None


def _hf_split_files(split_dir: Path) -> list[Path]:
    """Data files of one saved split, in ``state.json`` order when there is one."""
    state = split_dir / "state.json"
    if state.is_file():
        try:
            entries = json.loads(state.read_text())["_data_files"]
            return [split_dir / e["filename"] for e in entries]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{state}: not a datasets state.json ({exc})") from None
    return sorted(p for p in split_dir.rglob("*") if p.suffix in (".arrow", ".parquet"))


def is_hf_dataset_dir(path: Path) -> bool:
    """True for a ``save_to_disk`` directory (Dataset or DatasetDict) or a folder of parquet."""
    if not path.is_dir():
        return False
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return True
    files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return bool(files) and all(
        p.suffix in (".arrow", ".parquet") or p.name in ("dataset_info.json", "README.md")
        for p in files
    )


def _hf_dataset(path: Path, label: str, text_field: str | None) -> _ReadResult:
    """Rows of a Hugging Face dataset on disk, read with pyarrow (no ``datasets``)."""
    dict_file = path / "dataset_dict.json"
    if dict_file.is_file():
        try:
            splits = list(json.loads(dict_file.read_text())["splits"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{dict_file}: not a datasets dataset_dict.json ({exc})") from None
        parts = [(name, path / name) for name in splits]
    else:
        parts = [("", path)]
    docs: list[Document] = []
    skipped: list[dict[str, str]] = []
    for split, split_dir in parts:
        files = _hf_split_files(split_dir)
        if not files:
            raise InputError(f"{split_dir}: no .arrow or .parquet files")
        row_index = 0
        prefix = f"{label}/{split}" if split else label
        for file in files:
            if not file.is_file():
                raise InputError(f"{file}: listed in state.json but missing")
            for row in _read_arrow_table(file).to_pylist():
                where = f"{file} row {row_index}"
                rid = row.get("_id", row.get("id"))
                doc_id = (
                    f"{prefix}#{rid}" if isinstance(rid, (str, int)) else f"{prefix}:{row_index}"
                )
                doc = _row_document(row, doc_id, path, where, text_field)
                if doc is None:
                    skipped.append({"path": where, "reason": "empty text"})
                else:
                    if split:
                        doc.meta.setdefault("hf_split", split)
                    docs.append(doc)
                row_index += 1
    return _ReadResult(docs, skipped)


def _excluded(rel: Path, exclude: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(part, pat) for part in rel.parts for pat in exclude) or any(
        fnmatch.fnmatch(rel.as_posix(), pat) for pat in exclude
    )


def _text_file(path: Path, doc_id: str, tag: str) -> Document | str:
    """A document, or the reason it was skipped."""
    try:
        text = _read_text(path)
    except (UnicodeDecodeError, SyntaxError, LookupError) as exc:
        return f"not decodable ({type(exc).__name__})"
    if not text.strip():
        return "empty"
    return Document(doc_id, text, tag, str(path), {})


def _folder(path: Path, label: str, exclude: Sequence[str], text_field: str | None) -> _ReadResult:
    docs: list[Document] = []
    skipped: list[dict[str, str]] = []
    files: list[Path] = []
    for here, dirs, names in os.walk(path):
        rel_here = Path(here).relative_to(path)
        # Prune excluded folders (site-packages can be larger than the stdlib itself).
        dirs[:] = [d for d in dirs if not _excluded(rel_here / d, exclude)]
        files += [Path(here) / n for n in names if not _excluded(rel_here / n, exclude)]
    for file in sorted(files, key=lambda f: f.relative_to(path).parts):
        rel = file.relative_to(path)
        if not file.is_file():
            continue
        doc_id = f"{label}/{rel.as_posix()}"
        if _is_pydoc_topics(file):
            docs.extend(_pydoc_topics(file, doc_id))
        elif file.suffix == ".jsonl":
            part = _jsonl(file, doc_id, text_field)
            docs.extend(part.documents)
            skipped.extend(part.skipped)
        elif file.suffix in SUFFIX_TAGS:
            doc = _text_file(file, doc_id, SUFFIX_TAGS[file.suffix])
            if isinstance(doc, str):
                skipped.append({"path": str(file), "reason": doc})
            else:
                docs.append(doc)
    return _ReadResult(docs, skipped)


def read_source(
    spec: str | Path,
    *,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    text_field: str | None = None,
) -> tuple[list[Document], list[dict[str, str]]]:
    """Documents of one source (``PATH`` or ``PATH=TAG``) and the files it skipped.

    Document ids start with the source's base name (``python3.11/json/decoder.py``,
    ``narrativeqa.jsonl#<_id>``, ``topics.py#assert``), never with where the source
    lives, so moving a corpus or adding another keeps every document's split.
    Raises :class:`InputError` naming the path for a missing, unreadable, unsupported
    or empty source (inside folders, undecodable or empty files are skipped and
    reported instead).
    """
    path, override = parse_source(spec)
    if not path.exists():
        raise InputError(f"source {str(path)!r} does not exist")
    path = path.resolve()
    label = path.name
    if path.is_dir():
        if is_hf_dataset_dir(path):
            result = _hf_dataset(path, label, text_field)
        else:
            result = _folder(path, label, exclude, text_field)
    elif _is_pydoc_topics(path):
        result = _ReadResult(_pydoc_topics(path, label), [])
    elif path.suffix == ".jsonl":
        result = _jsonl(path, label, text_field)
    elif path.suffix in (".arrow", ".parquet"):
        result = _ReadResult([], [])
        for i, row in enumerate(_read_arrow_table(path).to_pylist()):
            doc = _row_document(row, f"{label}:{i}", path, f"{path} row {i}", text_field)
            if doc is None:
                result.skipped.append({"path": f"{path} row {i}", "reason": "empty text"})
            else:
                result.documents.append(doc)
    elif path.suffix in SUFFIX_TAGS:
        doc = _text_file(path, label, SUFFIX_TAGS[path.suffix])
        if isinstance(doc, str):
            raise InputError(f"source {str(path)!r} is {doc}")
        result = _ReadResult([doc], [])
    else:
        raise InputError(
            f"source {str(path)!r}: unsupported file type {path.suffix!r} "
            f"(supported: {', '.join(sorted([*SUFFIX_TAGS, '.jsonl', '.arrow', '.parquet']))})"
        )
    if not result.documents:
        raise InputError(f"source {str(path)!r} holds no non-empty documents")
    docs = result.documents
    if override is not None:
        docs = [Document(d.doc_id, d.text, override, d.source, d.meta) for d in docs]
    return docs, result.skipped


# --------------------------------------------------------------------------- split


def split_of(doc_id: str, seed: int = SPLIT_SEED, val_fraction: float = VAL_FRACTION) -> str:
    """``"validation"`` for a ``val_fraction`` share of ids, by a seeded hash of the id
    alone: ``blake2b(f"{seed}\\0{doc_id}", 8 bytes) / 2**64 < val_fraction``. The one
    rule that decides a document's split: :func:`build_shards` (so the trainer's
    shards) and the evaluation's document selection both call it."""
    digest = hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2.0**64
    return "validation" if u < val_fraction else "train"


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS} or None, got {split!r}")


def _stdlib() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def stdlib_modules(split: str | None) -> list[tuple[str, Path]]:
    """The standard library's top-level modules ``(doc_id, path)`` in name order whose
    document is in ``split`` (``None``: all), with the ids ``megacontext ingest
    STDLIB`` gives them (``python3.11/inspect.py``: the folder's name, then the path)
    and its split (:func:`split_of` at :data:`SPLIT_SEED`, :data:`VAL_FRACTION`).

    A module whose exact text is also another file of the library (ingest keeps one
    copy, maybe in the other split) is left out of ``"validation"``; only files of
    the same byte size are compared, so this reads few files."""
    _check_split(split)
    root = _stdlib()
    files = sorted(root.glob("*.py"))
    out = [(f"{root.name}/{p.name}", p) for p in files]
    if split is None:
        return out
    out = [(d, p) for d, p in out if split_of(d) == split]
    if split != "validation" or not out:
        return out
    sizes: dict[int, list[Path]] = {}
    for here, dirs, names in os.walk(root):
        rel = Path(here).relative_to(root)
        dirs[:] = [d for d in dirs if not _excluded(rel / d, DEFAULT_EXCLUDE)]
        for n in names:
            if n.endswith(".py"):
                f = Path(here) / n
                with contextlib.suppress(OSError):
                    sizes.setdefault(f.stat().st_size, []).append(f)
    kept = []
    for doc_id, p in out:
        twins = [f for f in sizes.get(p.stat().st_size, []) if f != p]
        if twins:
            key = p.read_bytes()
            if any(f.read_bytes() == key for f in twins):
                continue
        kept.append((doc_id, p))
    return kept


def stdlib_topics(split: str | None) -> list[tuple[str, str]]:
    """``pydoc_data/topics.py``'s topics ``(doc_id, text)`` in key order whose document
    is in ``split`` (``None``: all), with the ids ingest gives them
    (``python3.11/pydoc_data/topics.py#assert``). A text shared with a topic of the
    other split (ingest keeps one copy) is never in ``"validation"``."""
    _check_split(split)
    root = _stdlib()
    path = root / "pydoc_data" / "topics.py"
    docs = _pydoc_topics(path, f"{root.name}/pydoc_data/topics.py")
    out = [(d.doc_id, d.text) for d in docs]
    if split is None:
        return out
    splits: dict[bytes, set[str]] = {}
    for doc_id, text in out:
        splits.setdefault(_text_key(text), set()).add(split_of(doc_id))
    return [
        (d, t)
        for d, t in out
        if split_of(d) == split and (split != "validation" or splits[_text_key(t)] == {split})
    ]


def stdlib_prose(split: str) -> str:
    """English prose of one split: the topics of :func:`stdlib_topics` ``(split)``
    joined with blank lines, in key order. For ``"validation"`` each topic keeps
    only the paragraphs (split at blank lines) that no training topic holds: topics
    nest (``specialnames`` repeats ``numeric-types``, ``customization``, ...), so a
    held-out topic can quote text the trainer read."""
    _check_split(split)
    texts = [text for _, text in stdlib_topics(split)]
    if split == "validation":
        train = "\n\n".join(text for _, text in stdlib_topics("train"))
        texts = [
            "\n\n".join(p for p in t.split("\n\n") if p.strip() and p not in train) for t in texts
        ]
    return "\n\n".join(t.strip() for t in texts if t.strip())


# --------------------------------------------------------------------------- writer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = (
        backend.to_str()
        if backend is not None
        else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)[
        "input_ids"
    ]


class _ShardWriter:
    """Accumulates documents of one split and writes shards of at most ``shard_tokens``."""

    def __init__(self, root: Path, split: str, shard_tokens: int):
        self.dir = root / split
        self.split = split
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._ids: list[np.ndarray] = []
        self._rows: list[dict[str, Any]] = []
        self._fill = 0

    def add(self, ids: np.ndarray, doc: Document) -> None:
        if self._rows and self._fill + len(ids) > self.shard_tokens:
            self.flush()
        self._rows.append(
            {
                "offset": self._fill,
                "length": len(ids),
                "tag": doc.tag,
                "source": doc.source,
                "doc_id": doc.doc_id,
                "meta": json.dumps(doc.meta, sort_keys=True, ensure_ascii=False),
            }
        )
        self._ids.append(ids)
        self._fill += len(ids)

    def flush(self) -> None:
        if not self._rows:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"shard-{len(self.shards):05d}"
        tokens = np.concatenate(self._ids).astype("<u4", copy=False)
        _write_bin(self.dir / f"{name}.bin", tokens)
        table = pa.table(
            {k: [r[k] for r in self._rows] for k in self._rows[0]},
            schema=_index_schema(),
        )
        pq.write_table(table, self.dir / f"{name}.idx.parquet", compression="zstd")
        self.shards.append(
            {
                "bin": f"{self.split}/{name}.bin",
                "index": f"{self.split}/{name}.idx.parquet",
                "documents": len(self._rows),
                "tokens": int(tokens.size),
                "sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
            }
        )
        self._ids, self._rows, self._fill = [], [], 0


def _index_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("offset", pa.int64()),
            ("length", pa.int64()),
            ("tag", pa.string()),
            ("source", pa.string()),
            ("doc_id", pa.string()),
            ("meta", pa.string()),
        ]
    )


def _write_bin(path: Path, tokens: np.ndarray) -> None:
    # A module-level function so tests can make a write fail mid-way.
    tokens.tofile(path)


def _documents_fingerprint(docs: Sequence[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        for part in (d.doc_id, d.tag, d.source, json.dumps(d.meta, sort_keys=True), d.text):
            b = part.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


def load_manifest(root: str | Path) -> dict[str, Any]:
    """``root/manifest.json``, checked to be a shard manifest of this format version."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise StorageError(f"{path}: no shard manifest (run megacontext ingest)", path=str(path))
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StorageError(f"{path}: unreadable manifest ({exc})", path=str(path)) from None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise StorageError(
            f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest "
            f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})",
            path=str(path),
            field="format",
        )
    return manifest


def _is_complete(root: Path, manifest: dict[str, Any]) -> bool:
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            bin_path, idx_path = root / shard["bin"], root / shard["index"]
            if not idx_path.is_file() or not bin_path.is_file():
                return False
            if bin_path.stat().st_size != 4 * shard["tokens"]:
                return False
    return True


def build_shards(
    sources: Sequence[str | Path],
    out: str | Path,
    *,
    tokenizer: Any,
    model_name: str,
    documents: Iterable[Document] = (),
    val_fraction: float = VAL_FRACTION,
    seed: int = SPLIT_SEED,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    max_docs: int | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    text_field: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``sources`` (plus ready ``documents``) into shards under ``out``.

    Documents keep the order of ``sources`` (then ``documents``); a text seen before
    is dropped (``manifest["duplicates"]``: [dropped id, kept id]); ``max_docs`` keeps
    the first N of that order. Each goes to ``split_of(doc_id, seed, val_fraction)``.
    Returns the manifest. When ``out/manifest.json`` already describes the same
    documents, options and tokenizer, and its shards are all there, nothing is
    rewritten and the existing manifest is returned (unless ``force``). The output is built in a temporary folder
    beside ``out`` and renamed into place at the end: on any error ``out`` is as it was.
    """
    out = Path(out)
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise InputError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if max_docs is not None and max_docs < 1:
        raise InputError(f"max_docs must be >= 1, got {max_docs}")
    if out.exists() and not out.is_dir():
        raise StorageError(f"output {str(out)!r} exists and is not a directory", path=str(out))
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise StorageError(
            f"output {str(out)!r} is a non-empty directory without a shard manifest; "
            "refusing to replace it",
            path=str(out),
        )

    docs: list[Document] = []
    skipped: list[dict[str, str]] = []
    source_entries: list[dict[str, Any]] = []
    for spec in sources:
        found, skip = read_source(spec, exclude=exclude, text_field=text_field)
        path, override = parse_source(spec)
        source_entries.append(
            {"path": str(path.resolve()), "tag": override, "documents_read": len(found)}
        )
        docs.extend(found)
        skipped.extend(skip)
    extra = list(documents)
    for d in extra:
        _check_tag(d.tag, f"document {d.doc_id!r}")
    docs.extend(extra)
    if not docs:
        raise InputError("no documents: give at least one source or document")
    where: dict[str, str] = {}
    for d in docs:
        if d.doc_id in where:
            raise InputError(
                f"document id {d.doc_id!r} appears twice (sources {where[d.doc_id]!r} and "
                f"{d.source!r}); give each source once"
            )
        where[d.doc_id] = d.source
    # Identical texts (a file copied in two places, a corpus given twice under two
    # names) are kept once, so the same text never sits in both splits.
    first: dict[bytes, str] = {}
    unique: list[Document] = []
    duplicates: list[list[str]] = []
    for d in docs:
        key = hashlib.sha256(d.text.encode("utf-8", "surrogatepass")).digest()
        if key in first:
            duplicates.append([d.doc_id, first[key]])
        else:
            first[key] = d.doc_id
            unique.append(d)
    docs = unique
    if max_docs is not None:
        docs = docs[:max_docs]

    options = {
        "val_fraction": val_fraction,
        "seed": seed,
        "shard_tokens": shard_tokens,
        "max_docs": max_docs,
        "exclude": list(exclude),
        "text_field": text_field,
    }
    tok_info = {
        "name": str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__)),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "sha256": tokenizer_fingerprint(tokenizer),
    }
    fingerprint = hashlib.sha256(
        json.dumps(
            {
                "format": [FORMAT, FORMAT_VERSION],
                "model": model_name,
                "tokenizer": tok_info["sha256"],
                "options": options,
                "documents": _documents_fingerprint(docs),
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()

    if not force and (out / "manifest.json").is_file():
        try:
            old = load_manifest(out)
        except StorageError:
            old = None
        if old is not None and old.get("fingerprint") == fingerprint and _is_complete(out, old):
            return old

    result: dict[str, Any] = {}

    def fill(tmp: Path) -> None:
        manifest = _write_all(tmp, docs, tokenizer, seed, val_fraction, shard_tokens, progress)
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "model": model_name,
            "tokenizer": tok_info,
            "dtype": "uint32",
            "sources": source_entries,
            "extra_documents": len(extra),
            "options": options,
            "skipped": skipped,
            "duplicates": duplicates,
            **manifest,
        }
        text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        (tmp / "manifest.json").write_text(text, encoding="utf-8")
        result["manifest"] = manifest

    # ``out`` stays whole until the final rename
    atomic_replace_dir(out, fill, overwrite=True)
    return result["manifest"]


def _write_all(
    root: Path,
    docs: list[Document],
    tokenizer: Any,
    seed: int,
    val_fraction: float,
    shard_tokens: int,
    progress: bool,
) -> dict[str, Any]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    writers = {s: _ShardWriter(root, s, shard_tokens) for s in SPLITS}
    stats = {s: {"documents": 0, "tokens": 0, "tags": {}} for s in SPLITS}
    with Progress(
        TextColumn("[bold]tokenizing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("docs {task.fields[tokens]:,} tokens"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not progress,
    ) as bar:
        task = bar.add_task("tokenizing", total=len(docs), tokens=0)
        total = 0
        for start in range(0, len(docs), _TOKENIZE_BATCH):
            batch = docs[start : start + _TOKENIZE_BATCH]
            for doc, ids in zip(
                batch, _encode_batch(tokenizer, [d.text for d in batch]), strict=True
            ):
                arr = np.asarray(ids, dtype=np.int64)
                if arr.size == 0:
                    raise InputError(f"document {doc.doc_id!r} ({doc.source}) has no tokens")
                if arr.min() < 0 or arr.max() >= 2**32:
                    raise InputError(f"document {doc.doc_id!r}: token id outside uint32")
                split = split_of(doc.doc_id, seed, val_fraction)
                writers[split].add(arr.astype("<u4"), doc)
                st = stats[split]
                st["documents"] += 1
                st["tokens"] += int(arr.size)
                tag = st["tags"].setdefault(doc.tag, {"documents": 0, "tokens": 0})
                tag["documents"] += 1
                tag["tokens"] += int(arr.size)
                total += int(arr.size)
            bar.update(task, advance=len(batch), tokens=total)
    splits = {}
    for s in SPLITS:
        writers[s].flush()
        splits[s] = {**stats[s], "shards": writers[s].shards}
    return {"splits": splits}


# --------------------------------------------------------------------------- reader


class ShardDataset:
    """Documents of one split, memory-mapped.

    ``ds[i]`` / ``ds.doc(i)`` -> ``(ids, info)``: int64 ids ``[n]`` (a copy, the
    shard stays mapped read-only) and ``{"doc_id", "tag", "source", "num_tokens",
    "meta"}`` (``meta`` holds the source's extra fields, e.g. LongBench ``input`` and
    ``answers``). ``tags`` keeps only documents with those tags (curriculum stages).
    """

    def __init__(self, root: str | Path, split: str = "train", tags: Sequence[str] | None = None):
        import pyarrow.parquet as pq

        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        splits = self.manifest["splits"]
        if split not in splits:
            raise InputError(f"{self.root}: no split {split!r} (splits: {sorted(splits)})")
        self.split = split
        self._bins: list[Path] = []
        self._maps: list[np.memmap] | None = None
        cols: dict[str, list] = {k: [] for k in ("shard", "offset", "length")}
        self._tag: list[str] = []
        self._source: list[str] = []
        self._doc_id: list[str] = []
        self._meta: list[str] = []
        for k, shard in enumerate(splits[split]["shards"]):
            bin_path, idx_path = self.root / shard["bin"], self.root / shard["index"]
            if not bin_path.is_file() or not idx_path.is_file():
                missing = bin_path if not bin_path.is_file() else idx_path
                raise StorageError(f"{missing}: shard file missing", path=str(missing))
            size = bin_path.stat().st_size
            if size != 4 * shard["tokens"]:
                raise StorageError(
                    f"{bin_path}: {size} bytes, manifest says {shard['tokens']} uint32 tokens",
                    path=str(bin_path),
                    field="tokens",
                )
            self._bins.append(bin_path)
            index = pq.read_table(idx_path).to_pydict()
            offsets = np.asarray(index["offset"], dtype=np.int64)
            lengths = np.asarray(index["length"], dtype=np.int64)
            if len(offsets) and int((offsets + lengths).max()) > shard["tokens"]:
                raise StorageError(
                    f"{idx_path}: a document runs past the end of {bin_path.name}",
                    path=str(idx_path),
                    field="offset",
                )
            cols["shard"].append(np.full(len(offsets), k, dtype=np.int64))
            cols["offset"].append(offsets)
            cols["length"].append(lengths)
            self._tag += index["tag"]
            self._source += index["source"]
            self._doc_id += index["doc_id"]
            self._meta += index["meta"]
        cat = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in cols.items()}
        self._shard, self._offset, self._length = cat["shard"], cat["offset"], cat["length"]
        self.tags = tuple(tags) if tags is not None else None
        if tags is not None:
            for t in tags:
                _check_tag(t, "ShardDataset(tags=...)")
            keep = {t for t in tags}
            self._rows = np.asarray(
                [i for i, t in enumerate(self._tag) if t in keep], dtype=np.int64
            )
        else:
            self._rows = np.arange(len(self._tag), dtype=np.int64)

    def with_tags(self, tags: Sequence[str] | None) -> ShardDataset:
        """The same split restricted to ``tags`` (``None``: every document)."""
        return ShardDataset(self.root, self.split, tags)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every selected document, int64 ``[len(self)]``."""
        return self._length[self._rows]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def _check(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents")
        return int(self._rows[i])

    def info(self, i: int) -> dict[str, Any]:
        r = self._check(i)
        return {
            "doc_id": self._doc_id[r],
            "tag": self._tag[r],
            "source": self._source[r],
            "num_tokens": int(self._length[r]),
            "meta": json.loads(self._meta[r]),
        }

    def tokens(self, i: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Token ids ``[start:stop]`` of document ``i`` as int64 numpy (no tensor)."""
        r = self._check(i)
        n = int(self._length[r])
        lo, hi, _ = slice(start, stop).indices(n)
        base = int(self._offset[r])
        return np.asarray(self._map(int(self._shard[r]))[base + lo : base + max(lo, hi)], np.int64)

    def _map(self, k: int) -> np.memmap:
        # Mapped on first use, per process: a pickled dataset (DataLoader workers,
        # torch.multiprocessing) carries paths, never the mapped tokens.
        if self._maps is None:
            self._maps = [np.memmap(p, dtype="<u4", mode="r") for p in self._bins]
        return self._maps[k]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    def doc(self, i: int) -> tuple[Any, dict[str, Any]]:
        import torch

        return torch.from_numpy(self.tokens(i)), self.info(i)

    __getitem__ = doc

    def __iter__(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        for i in range(len(self)):
            yield self.doc(i)

    def sample_windows(self, length: int, n: int, seed: int, *, return_index: bool = False) -> Any:
        """``n`` random contiguous windows of ``length`` tokens: int64 ``[n, length]``.

        Every window of every document with at least ``length`` tokens is equally
        likely (documents are picked in proportion to their number of windows).
        Deterministic in ``seed``. With ``return_index`` also returns int64 ``[n, 2]``
        of (document index in this dataset, start token).
        """
        import torch

        if length < 1 or n < 0:
            raise InputError(f"sample_windows needs length >= 1 and n >= 0 (got {length}, {n})")
        lengths = self.lengths
        counts = np.maximum(lengths - length + 1, 0)
        total = int(counts.sum())
        if total == 0:
            longest = int(lengths.max()) if len(lengths) else 0
            raise InputError(
                f"{self.root} [{self.split}]: no document has {length} tokens "
                f"(longest: {longest})"
            )
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, total, size=n, dtype=np.int64)
        ends = np.cumsum(counts)
        docs = np.searchsorted(ends, picks, side="right")
        starts = picks - (ends[docs] - counts[docs])
        out = np.empty((n, length), dtype=np.int64)
        for j, (d, s) in enumerate(zip(docs.tolist(), starts.tolist(), strict=True)):
            out[j] = self.tokens(d, s, s + length)
        windows = torch.from_numpy(out)
        if return_index:
            return windows, torch.from_numpy(np.stack([docs, starts], axis=1))
        return windows

    def __repr__(self) -> str:
        tags = "all" if self.tags is None else ",".join(self.tags)
        return (
            f"ShardDataset({str(self.root)!r}, split={self.split!r}, tags={tags}, "
            f"documents={len(self)}, tokens={self.num_tokens})"
        )
