"""Every subcommand against a table of bad inputs (issue 17, item 11): exit code 2,
one line ``error: ...`` on stderr naming the argument, file or field, no traceback.

Subcommands are listed from the typer app, so a new one is covered by the generic
cases (an unknown option, a non-integer for each integer option) and by every table
row whose parameter name it shares. Where a model is needed it is ``tiny-llama``;
each bad input here is refused before any model would load.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import typer.main
from typer.testing import CliRunner

from megacontext import cli
from megacontext.cli import app

runner = CliRunner()


def _commands(group=None, prefix: tuple[str, ...] = ()):
    group = group if group is not None else typer.main.get_command(app)
    for name, cmd in sorted(group.commands.items()):
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


COMMANDS = dict(_commands())


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("inputs")
    (d / "ok.txt").write_text("def add(a, b):\n    return a + b\n" * 4)
    (d / "binary.dat").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    (d / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1"))
    (d / "empty.txt").write_text(" \n\n")
    (d / "folder").mkdir()
    (d / "bad.yaml").write_text("w_max: 3\n")  # a valid YAML mapping, an invalid budget
    (d / "notyaml.yaml").write_text("w_max: [1,\n")
    train = d / "train.yaml"
    shutil.copy("configs/train-tiny.yaml", train)
    return {
        "ok": str(d / "ok.txt"),
        "binary": str(d / "binary.dat"),
        "latin1": str(d / "latin1.txt"),
        "empty": str(d / "empty.txt"),
        "dir": str(d / "folder"),
        "missing": str(d / "missing.txt"),
        "bad_yaml": str(d / "bad.yaml"),
        "not_yaml": str(d / "notyaml.yaml"),
        "train": str(train),
    }


# nll takes PATH or --module, not both
_EXCLUSIVE = {"module": {"path"}}


# Baselines: valid values for what a command needs to reach its checks.
def _baseline(path: tuple[str, ...], cmd, f: dict[str, str], skip: str) -> list[str]:
    args: list[str] = []
    for p in cmd.params:
        if p.name == skip or p.name in _EXCLUSIVE.get(skip, ()):
            continue
        if p.param_type_name == "argument":
            value = {
                "path": f["ok"],
                "paths": f["ok"],
                "config": f["train"],
                "suite": "budget",
            }.get(p.name, f["ok"])
            args.append(value)
        elif p.name == "model":
            args += [p.opts[0], "tiny-llama"]
        elif p.required:
            # a required option (e.g. --text-shards) the check under test runs before
            args += [p.opts[0], f["ok"]]
    return args


# (parameter name) -> [(value or a key of `files`, text the error line must contain)]
_DEVICES = [("bogus", "--device"), ("meta", "--device"), ("cuda:99", "--device")]
if not torch.cuda.is_available():
    _DEVICES.append(("cuda", "CUDA is not available"))
_WEIGHTS = [("binary", "binary.dat"), ("dir", "folder"), ("missing", "missing.txt")]
OPTION_CASES: dict[str, list[tuple[str, str]]] = {
    "device": _DEVICES,
    "w_max": [("1000000000", "--w-max"), ("0", "--w-max")],
    "model": [("", "--model"), ("   ", "--model")],
    "config": [
        ("binary", "binary.dat"),
        ("latin1", "latin1.txt"),
        ("dir", "folder"),
        ("missing", "missing.txt"),
        ("bad_yaml", "w_max"),
        ("not_yaml", "notyaml.yaml"),
    ],
    "gistnet": _WEIGHTS,
    "lensnet": _WEIGHTS,
    # named by the option: with the baseline suite (budget) it is refused as unread
    "causal_lensnet": [(value, "--causal-lensnet") for value, _ in _WEIGHTS],
    "checkpoint": [("ok", "ok.txt"), ("missing", "missing.txt"), ("dir", "folder")],
    "module": [("no.such.module", "no.such.module"), ("", "--module")],
    "kv_mode": [("fast", "kv_mode")],
    "size": [("huge", "--size")],
    "overrides": [("nonsense", "nonsense"), ("seed=abc", "seed"), ("device=bogus", "device")],
}
ARGUMENT_CASES: dict[str, list[tuple[str, str]]] = {
    "path": [
        ("binary", "binary.dat"),
        ("latin1", "latin1.txt"),
        ("empty", "empty.txt"),
        ("dir", "folder"),
        ("missing", "missing.txt"),
    ],
    "config": [
        ("binary", "binary.dat"),
        ("latin1", "latin1.txt"),
        ("dir", "folder"),
        ("missing", "missing.txt"),
        ("bad_yaml", "w_max"),
    ],
    "run_dir": [("ok", "ok.txt"), ("missing", "missing.txt"), ("dir", "folder")],
    "suite": [("no-such-suite", "no-such-suite")],
}
ARGUMENT_CASES["paths"] = ARGUMENT_CASES["path"]


def _takes_int(param) -> bool:
    """Whether a CLI parameter parses an integer (``int`` or ``int | None``).

    typer >= 0.28 keeps the annotation on ``type_descriptor``; older typer has a
    click-style ``param.type`` (from click or typer's vendored copy of it, so the class
    is matched by name; the GPU image has typer 0.27).
    """
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None:
        return any(c.__name__ == "IntParamType" for c in type(param.type).__mro__)
    ann = descriptor.annotation
    args = [a for a in getattr(ann, "__args__", ()) if a is not type(None)]
    return (args[0] if len(args) == 1 else ann) is int


def _cases():
    for path, cmd in COMMANDS.items():
        name = " ".join(path)
        yield pytest.param(
            path, None, ["--no-such-option"], "--no-such-option", id=f"{name}-unknown"
        )
        for p in cmd.params:
            if p.param_type_name == "option":
                flag = p.opts[0]
                rows = list(OPTION_CASES.get(p.name, []))
                if _takes_int(p):
                    rows.append(("abc", flag))
                for value, expect in rows:
                    yield pytest.param(
                        path, p.name, [flag, value], expect, id=f"{name}-{flag}={value}"
                    )
            elif p.param_type_name == "argument":
                for value, expect in ARGUMENT_CASES.get(p.name, []):
                    yield pytest.param(path, p.name, [value], expect, id=f"{name}-{p.name}={value}")


def test_every_subcommand_is_listed():
    names = {" ".join(p) for p in COMMANDS}
    assert {"nll", "run", "chat", "train", "eval", "accept", "demo walkthrough"} <= names


@pytest.mark.parametrize(("path", "param", "bad", "expect"), list(_cases()))
def test_bad_input_is_one_line_and_exit_code_2(files, path, param, bad, expect):
    cmd = COMMANDS[path]
    bad = [files.get(v, v) for v in bad]
    args = [*path]
    if param is not None and any(
        p.name == param and p.param_type_name == "argument" for p in cmd.params
    ):
        # the bad value takes the argument's place among the valid baseline
        base = _baseline(path, cmd, files, skip=param)
        args += bad + base
    else:
        args += _baseline(path, cmd, files, skip=param or "") + bad
    result = runner.invoke(app, args, input="")
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.exception is None or isinstance(
        result.exception, SystemExit
    ), f"{args}: {result.exception!r}"
    assert result.exit_code == 2, f"{args}: exit {result.exit_code}\n{output}"
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, f"{args}: {result.stderr!r}"
    assert expect in lines[0], f"{args}: {lines[0]!r} does not name {expect!r}"


def test_a_budget_beyond_free_memory_is_refused_before_allocating(files, monkeypatch):
    import megacontext.cache

    allocated = []
    real = megacontext.cache.MegaContextCache.__init__

    def spy(self, *a, **kw):
        allocated.append(kw.get("capacity"))
        real(self, *a, **kw)

    monkeypatch.setattr(megacontext.cache.MegaContextCache, "__init__", spy)
    monkeypatch.setattr(cli, "_available_memory", lambda device: 1 << 20)
    for args in (
        ["run", files["ok"], "--w-max", "4096"],
        ["demo", "walkthrough", "--w-max", "4096"],
    ):
        result = runner.invoke(app, [*args, "--model", "tiny-llama"])
        assert result.exit_code == 2, result.output
        line = result.stderr.strip()
        assert line.startswith("error:") and "--w-max" in line and "GiB" in line
        assert "\n" not in line
    assert allocated == []  # refused before the cache was allocated


def test_the_kv_estimate_is_what_a_session_allocates(tiny_base):
    from megacontext import MegaContext, MegaContextConfig

    cfg = MegaContextConfig(model="tiny-llama", w_max=256, block_size=8)
    session = MegaContext(tiny_base, None, None, cfg).session()
    real = sum(b.numel() * b.element_size() for b in session.cache.buffers)
    itemsize = tiny_base.model.get_input_embeddings().weight.element_size()
    assert cfg.attention_sink  # one sink slot before the W_max + K slots
    assert cli._kv_cache_bytes(tiny_base.model.config, 256, 8, itemsize, sink=1) == real


@pytest.mark.parametrize("kind", ["binary", "latin1", "empty", "dir", "missing"])
@pytest.mark.parametrize("command", ["nll", "run", "chat"])
def test_text_files_are_checked_before_the_model_loads(files, monkeypatch, kind, command):
    import megacontext.base

    loads = []
    monkeypatch.setattr(megacontext.base, "load_base", lambda *a, **k: loads.append(a))
    result = runner.invoke(app, [command, files[kind], "--model", "smollm2-135m"], input="")
    assert result.exit_code == 2, result.output
    assert Path(files[kind]).name in result.stderr and loads == []
