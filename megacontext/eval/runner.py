"""``run_eval``: run suites for one system against the peers and write the report."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..base import load_base
from ..errors import InputError
from ..lora import has_lora
from .common import SIZES
from .external import base_model_source, recording_tasks, write_tasks
from .peers import is_untrained, untrained_system
from .report import write_run
from .suites import SUITES

__all__ = ["default_out_dir", "machine_line", "run_eval"]


def default_out_dir(name: str) -> Path:
    return Path("artifacts") / "reports" / name


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} CPUs, {gpu}, torch threads {torch.get_num_threads()}"


def _memory_line() -> str:
    """Peak memory of this process: CPU max RSS, and CUDA peak allocation if used."""
    import resource

    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    line = f"peak CPU RSS {rss_mb:,.0f} MiB"
    if torch.cuda.is_available():
        line += f", peak CUDA allocated {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB"
    return line


def run_eval(
    suites: Sequence[str],
    *,
    size: str = "small",
    out_dir: str | os.PathLike[str] | None = None,
    base: Any = None,
    model: str = "smollm2-135m",
    system: Any = None,
    methods: Sequence[str] | None = None,
    command: str = "",
    log: Callable[[str], None] | None = None,
    **suite_kw: Any,
) -> Path:
    """Run ``suites`` (names of :data:`megacontext.eval.suites.SUITES`, or ``all``)
    at ``size`` with ``system`` (default: the untrained system, mean-pool gists and
    a seeded untrained LensNet) and write the run to ``out_dir``."""
    if size not in SIZES:
        raise InputError(f"unknown size {size!r}; expected one of {list(SIZES)}")
    names = list(SUITES) if list(suites) == ["all"] else list(suites)
    bad = [s for s in names if s not in SUITES]
    if bad:
        raise InputError(f"unknown suites {bad}; expected some of {list(SUITES)} or 'all'")
    if base is None:
        base = load_base(model)
    if system is None:
        system = untrained_system(base)
    name = Path(out_dir).name if out_dir is not None else f"{'+'.join(names)}-{size}"
    out = Path(out_dir) if out_dir is not None else default_out_dir(name)
    rows: list[dict[str, Any]] = []
    tel: list[dict[str, Any]] = []
    kw: dict[str, Any] = {"telemetry": tel}
    if log is not None:
        kw["log"] = log
    with recording_tasks() as tasks:  # every compare_methods task, for external peers
        for s in names:
            fn = SUITES[s]
            no_methods = ("runtime", "ablation")  # suites without peer methods
            extra = {"methods": methods} if methods is not None and s not in no_methods else {}
            rows += fn(base, system, size, **kw, **extra, **suite_kw.get(s, {}))
    meta = {
        "name": name,
        "command": command,
        "model": base.name,
        "system": (
            f"gistnet={'mean-pool' if system.gistnet is None else type(system.gistnet).__name__}, "
            f"lensnet={'none' if system.lensnet is None else type(system.lensnet).__name__}"
            f" ({'untrained, seeded' if is_untrained(system) else 'as given'}), "
            f"lens={system.config.lens}, kv_mode={system.config.kv_mode}, "
            f"LoRA adapter on the system's base: {'yes' if has_lora(system.base.model) else 'no'}"
        ),
        "size": size,
        "suites": names,
        "machine": machine_line(),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "memory": _memory_line(),
        "tasks": write_tasks(out, tasks),  # tasks.parquet: what external peers read
        "base_model": base_model_source(base),
    }
    return write_run(out, rows, tel, meta)
