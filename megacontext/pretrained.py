"""Pretrained memories: a trained GistNet (and LensNet) shipped for one base model.

A *memory* is a directory ``<root>/<name>/`` holding

- ``memory.json``: the manifest (:class:`MemoryManifest`, versioned, pydantic-checked):
  the base model it belongs to (name, hidden size, vocabulary size, layers and the
  sha256 of its vocabulary), each weight file's byte size and sha256, the
  :class:`~megacontext.config.MegaContextConfig` fields a user gets by default, the
  focus policy and the provenance (command, config file, data and split, seed, git
  commit, date, trainer phases);
- ``gistnet.safetensors`` and, optionally, ``lensnet.safetensors`` (fp16 or bf16,
  the formats of :meth:`GistNet.save` / :meth:`LensNet.save`; at most
  :data:`MAX_BYTES` in all);
- ``MODEL_CARD.md``: the human-readable card (:func:`model_card`), not hashed.

The shipped memories live in the package (``megacontext/memories/``, inside the
wheel); ``$MEGACONTEXT_MEMORIES`` replaces that root (tests, private memories).
:func:`read_memory` checks every listed file (present, size, sha256) before reading
it, reads safetensors only (never pickle) and needs no network.
:meth:`megacontext.MegaContext.pretrained` builds a system from one; the CLI's
``run`` / ``chat`` / ``serve`` use the memory shipped for ``--model`` by default.
See docs/pretrained.md.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._atomic import atomic_replace_dir
from ._version import __version__
from .base import Base, load_base
from .checkpoint import _inference_config, check_links, read_trainer_state
from .config import MegaContextConfig, read_yaml_mapping
from .errors import ConfigError, StorageError
from .gistnet import GistNet
from .lensnet import LensNet

__all__ = [
    "MANIFEST",
    "MAX_BYTES",
    "Memory",
    "MemoryManifest",
    "available_memories",
    "check_base",
    "export_memory",
    "memories_root",
    "memory_for_model",
    "model_card",
    "read_memory",
    "vocab_fingerprint",
]

FORMAT = "megacontext-memory"
VERSION = 1
MANIFEST = "memory.json"
CARD = "MODEL_CARD.md"
GISTNET_FILE = "gistnet.safetensors"
LENSNET_FILE = "lensnet.safetensors"
ENV_ROOT = "MEGACONTEXT_MEMORIES"
# The cap on what the wheel carries (decimal megabytes, every file counted).
MAX_BYTES = 24_000_000
# megacontext: fields of a trainer config that describe the training run, not how the
# memory should be used: the training budget (a CPU-cost choice), the loss horizon,
# the seed, and the model (the manifest's base.name).
TRAINING_ONLY = frozenset({"model", "seed", "w_max", "horizon"})
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_CHUNK = 1 << 20
_EXPORTED = frozenset({MANIFEST, CARD, GISTNET_FILE, LENSNET_FILE})


# --------------------------------------------------------------------------- manifest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseFacts(_Strict):
    """What identifies the base model a memory was trained for."""

    name: str = Field(min_length=1, description="load_base name (e.g. smollm2-135m)")
    hidden_size: int = Field(gt=0, description="d: embedding width (Base.dim)")
    vocab_size: int = Field(gt=0, description="rows of the input embedding matrix")
    num_layers: int = Field(gt=0, description="decoder layers")
    vocab_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="vocab_fingerprint()")


class FileFacts(_Strict):
    bytes: int = Field(gt=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Provenance(BaseModel):
    """How the weights were made; free-form keys beyond these are kept."""

    model_config = ConfigDict(extra="allow", frozen=True)

    command: str | None = None
    config_file: str | None = None
    data: str | None = None
    split: str | None = None
    seed: int | None = None
    git_commit: str | None = None
    date: str | None = None
    run: str | None = None
    checkpoint: str | None = None
    phases: list[str] = Field(default_factory=list)
    global_step: int | None = None
    exported_by: str | None = None


class MemoryManifest(_Strict):
    """``memory.json``. ``files`` maps ``gistnet.safetensors`` (required) and
    ``lensnet.safetensors`` (optional) to their size and sha256; ``config`` holds
    :class:`MegaContextConfig` fields (any, passed through, ``model`` excluded)."""

    format: Literal["megacontext-memory"]
    version: int
    name: str = Field(pattern=_NAME.pattern)
    base: BaseFacts
    dtype: Literal["float16", "bfloat16"]
    files: dict[str, FileFacts]
    config: dict[str, Any] = Field(default_factory=dict)
    focus: str = Field(description="focus policy: lensnet, recency, or a config scorer")
    provenance: Provenance = Field(default_factory=Provenance)


class Memory(NamedTuple):
    """A read memory: modules in eval mode on the CPU (float32 values rounded to the
    stored dtype), its default config fields, its manifest and its directory."""

    gistnet: GistNet
    lensnet: LensNet | None
    config: dict[str, Any]
    manifest: MemoryManifest
    path: Path


# --------------------------------------------------------------------------- helpers


def vocab_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id, sorted JSON).

    The vocabulary, not the tokenizer's full serialisation
    (:func:`megacontext.data.tokenizer_fingerprint`): the ids a gist reads are what
    must match, and the serialised pipeline changes with the ``tokenizers`` version
    while the vocabulary does not."""
    blob = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def base_facts(base: Base) -> BaseFacts:
    """The manifest's ``base`` section for a loaded base model."""
    return BaseFacts(
        name=base.name,
        hidden_size=base.dim,
        vocab_size=base.vocab_size,
        num_layers=base.num_layers,
        vocab_sha256=vocab_fingerprint(base.tokenizer),
    )


def memories_root() -> Path:
    """Where memories are looked up by name: ``$MEGACONTEXT_MEMORIES`` when set, else
    the package's ``megacontext/memories/`` (shipped in the wheel)."""
    env = os.environ.get(ENV_ROOT, "").strip()
    return Path(env).expanduser() if env else Path(__file__).resolve().parent / "memories"


def available_memories() -> list[str]:
    """Names of the memories under :func:`memories_root` (directories holding a
    ``memory.json``), sorted."""
    root = memories_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / MANIFEST).is_file())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_manifest(directory: Path) -> MemoryManifest:
    file = directory / MANIFEST
    if not file.is_file():
        raise StorageError(f"{file}: memory manifest not found", path=str(file))
    try:
        raw = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StorageError(f"{file}: unreadable ({exc})", path=str(file), field="json") from None
    if not isinstance(raw, dict):
        raise StorageError(f"{file}: top level is not an object", path=str(file), field="json")
    if raw.get("format") != FORMAT:
        raise StorageError(
            f"{file}: field 'format' is {raw.get('format')!r}, expected {FORMAT!r}",
            path=str(file),
            field="format",
        )
    if raw.get("version") != VERSION:
        raise StorageError(
            f"{file}: unsupported version {raw.get('version')!r} (this megacontext reads "
            f"version {VERSION}; a newer memory needs a newer megacontext)",
            path=str(file),
            field="version",
        )
    try:
        manifest = MemoryManifest(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err.get("loc", ()))
        raise StorageError(
            f"{file}: field {field!r}: {err['msg']}", path=str(file), field=field
        ) from None
    allowed = {GISTNET_FILE, LENSNET_FILE}
    extra = sorted(set(manifest.files) - allowed)
    if extra or GISTNET_FILE not in manifest.files:
        what = f"unknown entries {extra}" if extra else f"no {GISTNET_FILE!r}"
        raise StorageError(f"{file}: field 'files' has {what}", path=str(file), field="files")
    if "model" in manifest.config:
        raise StorageError(
            f"{file}: field 'config' names 'model'; the base model is 'base.name'",
            path=str(file),
            field="config.model",
        )
    return manifest


def _check_file(directory: Path, name: str, facts: FileFacts) -> Path:
    """``directory/name`` exists, has the manifest's size and sha256."""
    path = directory / name
    if not path.is_file():
        raise StorageError(
            f"{path}: missing (listed in {directory / MANIFEST})", path=str(path), field="files"
        )
    size = path.stat().st_size
    if size < facts.bytes:
        raise StorageError(
            f"{path}: truncated: {size} of {facts.bytes} bytes", path=str(path), field="bytes"
        )
    if size != facts.bytes:
        raise StorageError(
            f"{path}: {size} bytes, the manifest says {facts.bytes}", path=str(path), field="bytes"
        )
    digest = _sha256(path)
    if digest != facts.sha256:
        raise StorageError(
            f"{path}: checksum mismatch: sha256 {digest}, the manifest says {facts.sha256}",
            path=str(path),
            field="sha256",
        )
    return path


def check_base(manifest: MemoryManifest, base: Base, where: str | os.PathLike[str] = "") -> None:
    """Refuse ``base`` unless it is the model ``manifest`` was trained for: a
    :class:`ConfigError` naming the manifest field (``base.name``,
    ``base.hidden_size``, ``base.vocab_size``, ``base.num_layers``,
    ``base.vocab_sha256``) and both values."""
    want = manifest.base
    have = {
        "name": base.name,
        "hidden_size": base.dim,
        "vocab_size": base.vocab_size,
        "num_layers": base.num_layers,
    }
    prefix = f"{where}: " if where else ""
    for field, value in have.items():
        expected = getattr(want, field)
        if value != expected:
            raise ConfigError(
                f"{prefix}memory {manifest.name!r} is for base.{field}={expected!r}, "
                f"the given base has {value!r}",
                field=f"base.{field}",
                value=value,
            )
    sha = vocab_fingerprint(base.tokenizer)
    if sha != want.vocab_sha256:
        raise ConfigError(
            f"{prefix}memory {manifest.name!r} is for base.vocab_sha256={want.vocab_sha256!r}, "
            f"the given base's tokenizer has {sha!r}",
            field="base.vocab_sha256",
            value=sha,
        )


def _resolve(name_or_dir: str | os.PathLike[str]) -> Path:
    """A memory's directory: a bare name (no path separator) among
    :func:`available_memories`, else a directory path."""
    text = os.fspath(name_or_dir)
    path = Path(text).expanduser()
    bare = isinstance(name_or_dir, str) and os.sep not in text and not text.startswith((".", "~"))
    names = available_memories()
    if bare and text in names:
        return memories_root() / text
    if path.is_dir():
        return path
    if not bare or path.exists():
        what = "is not a directory" if path.exists() else "does not exist"
        raise StorageError(f"{path}: memory directory {what}", path=str(path))
    raise ConfigError(
        f"unknown memory {text!r}; available: {', '.join(names) if names else 'none'} "
        f"(in {memories_root()}; ${ENV_ROOT} replaces that folder), or pass a memory directory",
        field="name",
        value=text,
    )


def memory_for_model(model: str) -> str | None:
    """The name of the memory shipped for base model ``model`` (its manifest's
    ``base.name``), or ``None``. Among several, the one named like the model wins,
    else the first by name (names compared without case, as :func:`load_base` does for
    the built-in ones). A manifest that cannot be read raises StorageError."""
    key = model.strip().lower()
    found = [
        n
        for n in available_memories()
        if _read_manifest(memories_root() / n).base.name.lower() == key
    ]
    if not found:
        return None
    return key if key in found else found[0]


# --------------------------------------------------------------------------- read


def read_memory(name_or_dir: str | os.PathLike[str], base: Base | None = None) -> Memory:
    """The memory named ``name_or_dir`` (see :func:`available_memories`) or stored in
    that directory, checked: the manifest (format, version, fields), no link out of
    the directory, every listed file present with its size and sha256, the weights'
    shapes against the manifest, and, when ``base`` is given, that it is the base the
    memory was trained for (:func:`check_base`).

    Errors: an unknown name -> :class:`ConfigError` listing the available ones; a
    missing, truncated or altered file -> :class:`StorageError` naming it; another base
    model -> :class:`ConfigError` naming the manifest field and both values."""
    directory = _resolve(name_or_dir)
    manifest = _read_manifest(directory)
    check_links(directory)
    if base is not None:
        check_base(manifest, base, directory / MANIFEST)
    try:
        config = MegaContextConfig(model=manifest.base.name, **manifest.config)
    except ConfigError as exc:
        raise ConfigError(
            f"{directory / MANIFEST}: config: {exc}", field=f"config.{exc.field}", value=exc.value
        ) from None
    gpath = _check_file(directory, GISTNET_FILE, manifest.files[GISTNET_FILE])
    gistnet = GistNet.load(gpath).eval()
    lensnet = None
    if LENSNET_FILE in manifest.files:
        lpath = _check_file(directory, LENSNET_FILE, manifest.files[LENSNET_FILE])
        lensnet = LensNet.load(lpath).eval()
    _check_shapes(directory, manifest, gistnet, lensnet, config)
    return Memory(gistnet, lensnet, dict(manifest.config), manifest, directory)


def _check_shapes(
    directory: Path,
    manifest: MemoryManifest,
    gistnet: GistNet,
    lensnet: LensNet | None,
    config: MegaContextConfig,
) -> None:
    checks = [
        (GISTNET_FILE, "dim", gistnet.config.dim, "base.hidden_size", manifest.base.hidden_size),
        (
            GISTNET_FILE,
            "block_size",
            gistnet.config.block_size,
            "config.block_size",
            config.block_size,
        ),
    ]
    if lensnet is not None:
        checks.append(
            (LENSNET_FILE, "dim", lensnet.config.dim, "base.hidden_size", manifest.base.hidden_size)
        )
    for file, field, value, mfield, expected in checks:
        if value != expected:
            raise StorageError(
                f"{directory / file}: {field} {value} does not match the manifest's "
                f"{mfield} {expected}",
                path=str(directory / file),
                field=field,
            )


# --------------------------------------------------------------------------- export


def _git_commit() -> str | None:
    """HEAD of the git checkout this package runs from, ``None`` outside one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if re.fullmatch(r"[0-9a-f]{40}", sha) else None


# trainer phases that train each module, and their config sections (megacontext.train)
_TRAINED_BY = {"gistnet": ("warm-gist", "b1"), "lensnet": ("warm-lens", "b2")}


def _untrained(raw: dict[str, Any], done: list[Any], module: str) -> bool:
    """Whether no completed phase of the checkpoint trained ``module``: none of its
    phases is done, or each done one ran 0 steps (a section without ``steps``
    counts as trained)."""
    ran = [p[0] for p in done if isinstance(p, list) and p and p[0] in _TRAINED_BY[module]]
    for phase in ran:
        section = raw.get(phase.replace("-", "_"))
        steps = section.get("steps") if isinstance(section, dict) else None
        if not isinstance(steps, int) or steps > 0:
            return False
    return True


def _relative(path: Path) -> str:
    """``path`` relative to the working directory when under it (no machine paths
    in a shipped manifest), else absolute."""
    full = path.resolve()
    try:
        return str(full.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(full)


def _card_evaluation(card: Path) -> str | None:
    """The ``## Evaluation`` section body of an existing card (kept across re-exports)."""
    try:
        text = card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    m = re.search(r"^## Evaluation\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    return m.group(1).strip() if m else None


def _previous_export(out: Path) -> MemoryManifest | None:
    try:
        return _read_manifest(out)
    except StorageError:
        return None


def model_card(manifest: MemoryManifest, evaluation: str | None = None) -> str:
    """``MODEL_CARD.md`` for ``manifest``: what the memory is, the base model, the
    files with their hashes, the default config, the provenance, and ``evaluation``
    (Markdown: the measured numbers, with the command that made them) under
    ``## Evaluation``."""
    b, p = manifest.base, manifest.provenance
    modules = "GistNet + LensNet" if LENSNET_FILE in manifest.files else "GistNet"
    lines = [
        f"# Memory `{manifest.name}`",
        "",
        f"A megacontext memory ({modules}, {manifest.dtype}) for the frozen base model "
        f"`{b.name}`. Focus policy: `{manifest.focus}`.",
        "",
        "```python",
        "import megacontext as mc",
        f'system = mc.MegaContext.pretrained("{manifest.name}")',
        "```",
        "",
        "## Base model",
        "",
        "| field | value |",
        "|---|---|",
        f"| name | `{b.name}` |",
        f"| hidden_size | {b.hidden_size} |",
        f"| vocab_size | {b.vocab_size} |",
        f"| num_layers | {b.num_layers} |",
        f"| vocab_sha256 | `{b.vocab_sha256}` |",
        "",
        "## Files",
        "",
        "| file | bytes | sha256 |",
        "|---|---:|---|",
        *(f"| {n} | {f.bytes:,} | `{f.sha256}` |" for n, f in sorted(manifest.files.items())),
        "",
        "## Default config",
        "",
        "Fields a session gets unless the caller changes them (`MegaContextConfig`):",
        "",
        "| field | value |",
        "|---|---|",
        *(f"| {k} | `{v!r}` |" for k, v in sorted(manifest.config.items())),
        "",
        "## Training",
        "",
        *(
            f"- {k}: `{v}`"
            for k, v in p.model_dump().items()
            if v is not None and v != [] and k != "phases"
        ),
        f"- phases: {', '.join(p.phases) if p.phases else 'not recorded'}",
        "",
        "## Evaluation",
        "",
        (evaluation or "").strip()
        or "Not measured at export (`megacontext export-memory "
        "--evaluation FILE` puts a results table here).",
        "",
        "## Limitations",
        "",
        f"- Trained for `{b.name}` only: loading it with another base model raises "
        "`ConfigError` naming the differing field.",
        "- Weights are stored in half precision and loaded into float32 modules.",
        "",
    ]
    return "\n".join(lines)


def export_memory(
    checkpoint_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    name: str,
    *,
    dtype: torch.dtype = torch.float16,
    include_lensnet: bool = True,
    config: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    base: Base | None = None,
    evaluation: str | None = None,
    force: bool = False,
    drop_lora: bool = False,
    max_bytes: int = MAX_BYTES,
) -> Path:
    """Write the memory ``name`` from the complete trainer checkpoint ``checkpoint_dir``
    into ``out_dir`` (atomically: a temporary sibling renamed into place); returns it.

    - weights: the checkpoint's GistNet (and LensNet unless ``include_lensnet`` is
      false) cast to ``dtype`` (float16 or bfloat16); every file together at most
      ``max_bytes`` (default :data:`MAX_BYTES`), else :class:`ConfigError` and
      nothing written;
    - ``config``: the checkpoint's ``megacontext:`` section minus
      :data:`TRAINING_ONLY` (``w_max``, ``horizon``, ``seed``, ``model``), updated by
      ``config`` (any MegaContextConfig fields, validated);
    - ``provenance``: read from the checkpoint (run, config file, data, split, seed,
      phases, step), the git commit and the date, updated by ``provenance``;
    - ``base``: the base model for the identifying facts (default: loaded on the CPU
      by the checkpoint's ``model``); ``evaluation``: the card's ``## Evaluation``
      Markdown (default: the one of the export being replaced, if any).

    An ``out_dir`` that is a file, or a non-empty directory that is not a previous
    export, is refused (:class:`StorageError`) unless ``force``; a checkpoint with a
    LoRA adapter is refused (:class:`ConfigError`: a memory does not carry one, so
    the exported system would differ) unless ``drop_lora``, and so is one where no
    completed phase trained the GistNet, or the LensNet when it is included (its
    phases all ran 0 steps or none is done: random weights are not a memory). The
    result is read back
    with :func:`read_memory` before returning."""
    ckpt = Path(checkpoint_dir)
    out = Path(out_dir)
    if not _NAME.match(name):
        raise ConfigError(
            f"memory name {name!r}: use lower-case letters, digits, '.', '_', '-' "
            "(starting with a letter or digit, at most 64)",
            field="name",
            value=name,
        )
    dtype_name = {v: k for k, v in _DTYPES.items()}.get(dtype)
    if dtype_name is None:
        raise ConfigError(
            f"dtype {dtype}: a memory stores float16 or bfloat16", field="dtype", value=str(dtype)
        )
    state = read_trainer_state(ckpt)
    model, _, _ = _inference_config(ckpt)
    raw = read_yaml_mapping(ckpt / "config.yaml")
    if (ckpt / "lora").is_dir() and not drop_lora:
        raise ConfigError(
            f"{ckpt / 'lora'}: the checkpoint carries a LoRA adapter, which a memory does not "
            "ship (the exported system would differ from the checkpoint's); export with "
            "drop_lora=True (--drop-lora) to leave it out",
            field="lora",
            value=str(ckpt / "lora"),
        )

    section = {k: v for k, v in (raw.get("megacontext") or {}).items() if k not in TRAINING_ONLY}
    section.update(config or {})
    if "model" in section:
        raise ConfigError(
            "config: 'model' is the base model (base.name), not a memory config field",
            field="config.model",
            value=section["model"],
        )
    try:
        run_config = MegaContextConfig(model=model, **section)
    except ConfigError as exc:
        raise ConfigError(
            f"memory config: {exc}", field=f"config.{exc.field}", value=exc.value
        ) from None

    if base is None:
        base = load_base(model, device="cpu")
    elif base.name != model:
        raise ConfigError(
            f"{ckpt}: trained on base.name={model!r}, the given base is {base.name!r}",
            field="base.name",
            value=base.name,
        )
    facts = base_facts(base)
    gistnet = GistNet.load(ckpt / GISTNET_FILE)
    lensnet = LensNet.load(ckpt / LENSNET_FILE) if include_lensnet else None
    if gistnet.config.block_size != run_config.block_size:
        raise ConfigError(
            f"{ckpt / GISTNET_FILE}: block_size {gistnet.config.block_size}, the memory "
            f"config's block_size is {run_config.block_size}",
            field="config.block_size",
            value=run_config.block_size,
        )

    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    run = raw.get("run")
    plan = state.get("plan") or []
    done = plan[: state["done"]]
    for module, wanted in (("gistnet", True), ("lensnet", include_lensnet)):
        if wanted and _untrained(raw, done, module):
            fix = "include_lensnet=False (--no-lensnet)" if module == "lensnet" else "a later one"
            raise ConfigError(
                f"{ckpt}: no completed phase trained the {module} (phases done: "
                f"{[f'{p[0]}@{p[1]}' for p in done if isinstance(p, list)]}, "
                f"{'/'.join(_TRAINED_BY[module])} are its phases); export with {fix}",
                field=module,
                value=str(ckpt),
            )
    prov: dict[str, Any] = {
        "config_file": f"{raw.get('runs_dir', 'configs/runs')}/{run}.yaml" if run else None,
        "data": data.get("path") or data.get("kind"),
        "split": data.get("split"),
        "seed": raw.get("seed"),
        "git_commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "run": run,
        "checkpoint": _relative(ckpt),
        "phases": [f"{p[0]}@{p[1]}" for p in done if isinstance(p, list)],
        "global_step": state.get("global_step"),
        "exported_by": f"megacontext {__version__}",
    }
    prov.update(provenance or {})
    if lensnet is not None:
        focus = "lensnet"
    else:
        lens = section.get("lens")
        focus = lens if isinstance(lens, str) else "recency"

    previous = None
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise StorageError(f"{out}: exists and is not a directory", path=str(out))
        previous = _previous_export(out)
        entries = sorted(p.name for p in out.iterdir())
        foreign = [n for n in entries if n not in _EXPORTED]
        if previous is None and entries and not force:
            raise StorageError(
                f"{out}: a non-empty directory that is not a memory export (no valid "
                f"{MANIFEST}); refusing to replace it (force=True / --force does)",
                path=str(out),
            )
        if previous is not None and foreign and not force:
            raise StorageError(
                f"{out}: a previous export that also holds {foreign}, which replacing it "
                "would delete; move them, or force=True / --force",
                path=str(out),
            )
    if evaluation is None and previous is not None:
        evaluation = _card_evaluation(out / CARD)

    def fill(tmp: Path) -> None:
        files: dict[str, FileFacts] = {}
        parts = [(GISTNET_FILE, gistnet)] + (
            [(LENSNET_FILE, lensnet)] if lensnet is not None else []
        )
        for fname, module in parts:
            module.to(dtype).save(tmp / fname)
            path = tmp / fname
            files[fname] = FileFacts(bytes=path.stat().st_size, sha256=_sha256(path))
        manifest = MemoryManifest(
            format=FORMAT,
            version=VERSION,
            name=name,
            base=facts,
            dtype=dtype_name,
            files=files,
            config=section,
            focus=focus,
            provenance=Provenance(**prov),
        )
        (tmp / MANIFEST).write_text(
            json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8"
        )
        (tmp / CARD).write_text(model_card(manifest, evaluation), encoding="utf-8")
        total = sum(p.stat().st_size for p in tmp.iterdir())
        if total > max_bytes:
            raise ConfigError(
                f"memory {name!r}: {total:,} bytes, more than the cap of {max_bytes:,} "
                f"({', '.join(f'{n} {f.bytes:,}' for n, f in files.items())}); "
                "shrink the modules or leave the LensNet out",
                field="bytes",
                value=total,
            )

    atomic_replace_dir(out, fill, overwrite=True)
    read_memory(out, base=base)
    return out
