"""The package's import graph is layered and has no cycles.

Every ``import`` / ``from ... import`` of a ``megacontext`` module is read with
``ast`` from every file of the package: module-level and function-local (a
function-local import hides a cycle from the interpreter, not from the design),
relative and absolute. Imports inside ``if TYPE_CHECKING:`` never run and those in
``if __name__ == "__main__":`` run only in a script (``python -m X``, an alias of a
CLI command), so both are left out, as is the lazy attribute loader of
``megacontext/__init__.py`` (it resolves ``mc.X`` on first use and sits above
everything by construction).

Importing ``a.b.c`` from a module outside the package ``a.b`` also runs
``a/b/__init__.py``: that edge is in the graph too.

Two rules, each with a message that names the files:

- no cycle: the strongly connected components of the graph are single modules;
- no upward import: each module has a layer in :data:`LAYERS` (longest prefix wins)
  and imports only modules of its own layer or below.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "megacontext"

# Low to high. A module not named here fails the test: a new module is placed
# deliberately, not by accident.
LAYERS: dict[str, int] = {
    # 0: what everything may use: typed errors, the version, atomic file writes
    "megacontext": 0,
    "megacontext._version": 0,
    "megacontext.errors": 0,
    "megacontext._atomic": 0,
    # 1: compiled and fused code
    "megacontext._C": 1,
    "megacontext.native": 1,
    "megacontext.kernels": 1,
    # 2: the modules
    "megacontext.config": 2,
    "megacontext.profiling": 2,
    "megacontext._weights": 2,
    "megacontext.tree": 2,
    "megacontext.storage": 2,
    "megacontext.working_context": 2,
    "megacontext.allocator": 2,
    "megacontext.gistnet": 2,
    "megacontext.lensnet": 2,
    "megacontext.cache": 2,
    "megacontext.hook": 2,
    "megacontext.attention_scorer": 2,
    "megacontext.lexical_scorer": 2,
    "megacontext.base": 2,
    "megacontext.lora": 2,
    "megacontext.checkpoint": 2,
    "megacontext.pretrained": 2,
    "megacontext.session_store": 2,
    "megacontext.nll": 2,
    "megacontext.data": 2,
    "megacontext.synthetic": 2,
    "megacontext.demo_data": 2,
    # 3: the focus loop (tree + working context + allocator + scorers)
    "megacontext.focus": 3,
    # 4: the runtime and its observers
    "megacontext.runtime": 4,
    "megacontext.telemetry": 4,
    "megacontext.walkthrough": 4,
    # 5: the runtime's users: training, evaluation, the transformers adapter
    "megacontext.train": 5,
    "megacontext.hf": 5,
    "megacontext.eval": 5,
    # the HTTP server over sessions (megacontext serve)
    "megacontext.serve": 5,
    # 6: the command line
    "megacontext.cli": 6,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _never_imported(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` (never runs) or ``if __name__ == "__main__":`` (runs
    only in the script ``python -m X``, a module nothing imports)."""
    if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
        return True
    if isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING":
        return True
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and len(test.comparators) == 1
        and isinstance(test.comparators[0], ast.Constant)
        and test.comparators[0].value == "__main__"
    )


def import_nodes(tree: ast.Module, skip_function_local: bool) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run, in source order."""
    out: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _never_imported(child.test):
                for sub in child.orelse:
                    visit_one(sub, in_function)
                continue
            visit_one(child, in_function)

    def visit_one(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if not (in_function and skip_function_local):
                out.append(node)
            return
        fn = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        visit(node, in_function or fn)

    visit(tree, False)
    return out


def collect_modules() -> dict[str, Path]:
    mods = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    # the compiled extension is a module too (it imports nothing of ours)
    mods.setdefault("megacontext._C", PACKAGE / "_C")
    return mods


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The deepest known module that ``name`` (dotted) refers to."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in known:
            return cand
        parts.pop()
    return None


def imports_of(
    mod: str, path: Path, known: dict[str, Path]
) -> list[tuple[str, int, str]]:  # (target, line, kind)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    # the root package's __getattr__ is the lazy loader: everything by design
    nodes = import_nodes(tree, skip_function_local=(mod == "megacontext"))
    pkg = mod if is_package(path) else mod.rpartition(".")[0]
    out: list[tuple[str, int, str]] = []
    for node in nodes:
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            if node.level:
                base_parts = pkg.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts)
                full = f"{base}.{node.module}" if node.module else base
            else:
                full = node.module or ""
            # `from pkg import sub` imports the submodule `pkg.sub` when there is one
            targets = [
                f"{full}.{a.name}" if f"{full}.{a.name}" in known else full for a in node.names
            ]
        for t in targets:
            if t != "megacontext" and not t.startswith("megacontext."):
                continue
            target = _resolve(t, known)
            if target is None or target == mod:
                continue
            out.append((target, node.lineno, "import"))
            # importing a.b.c from outside a.b runs a/__init__ and a/b/__init__ too
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in known and not (mod == parent or mod.startswith(parent + ".")):
                    out.append((parent, node.lineno, "package"))
    return out


def build_graph() -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    known = collect_modules()
    graph: dict[str, dict[str, int]] = {m: {} for m in known}
    for mod, path in known.items():
        if not path.is_file():
            continue
        for target, line, _ in imports_of(mod, path, known):
            graph[mod].setdefault(target, line)
    return known, graph


def layer_of(mod: str) -> int | None:
    parts = mod.split(".")
    while parts:
        key = ".".join(parts)
        if key in LAYERS:
            return LAYERS[key]
        parts.pop()
    return None


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    advanced = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _where(known: dict[str, Path], mod: str, line: int) -> str:
    return f"{known[mod].relative_to(ROOT)}:{line}"


def test_every_module_has_a_layer():
    known, _ = build_graph()
    missing = sorted(m for m in known if layer_of(m) is None)
    assert not missing, f"modules without a layer in tests/test_imports.py LAYERS: {missing}"


def test_no_import_cycles():
    known, graph = build_graph()
    cycles = strongly_connected(graph)
    lines = []
    for comp in cycles:
        members = set(comp)
        edges = [
            f"    {_where(known, a, line)}: {a} -> {b}"
            for a in comp
            for b, line in sorted(graph[a].items())
            if b in members
        ]
        lines.append(f"cycle {comp}:\n" + "\n".join(edges))
    assert not cycles, "import cycles (function-local imports included):\n" + "\n".join(lines)


def test_no_upward_imports():
    known, graph = build_graph()
    bad = []
    for mod, targets in sorted(graph.items()):
        lm = layer_of(mod)
        for target, line in sorted(targets.items()):
            lt = layer_of(target)
            if lm is not None and lt is not None and lt > lm:
                bad.append(
                    f"  {_where(known, mod, line)}: {mod} (layer {lm}) imports {target} "
                    f"(layer {lt})"
                )
    assert not bad, "imports that run upward:\n" + "\n".join(bad)


def _graph_of(sources: dict[str, str], tmp_path: Path) -> dict[str, dict[str, int]]:
    """The graph of a throwaway package laid out like megacontext."""
    for rel, text in sources.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    known = {module_name_at(p, tmp_path): p for p in (tmp_path / "megacontext").rglob("*.py")}
    graph: dict[str, dict[str, int]] = {m: {} for m in known}
    for mod, path in known.items():
        for target, line, _ in imports_of(mod, path, known):
            graph[mod].setdefault(target, line)
    return graph


def module_name_at(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_the_walker_sees_hidden_and_package_imports(tmp_path):
    """The walker itself: function-local, relative, absolute, ``from . import sub``,
    package ``__init__`` edges; ``TYPE_CHECKING`` blocks skipped."""
    graph = _graph_of(
        {
            "megacontext/__init__.py": "def __getattr__(n):\n    from .a import x\n",
            "megacontext/a.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from .b import y\n"
                "def f():\n    from .sub.c import z\n"
            ),
            "megacontext/b.py": (
                "import megacontext.a\nfrom . import a\n"
                "if __name__ == '__main__':\n    from .sub import c\n"
            ),
            "megacontext/sub/__init__.py": "from .c import z\n",
            "megacontext/sub/c.py": "from ..b import q\nfrom . import d\n",
            "megacontext/sub/d.py": "",
        },
        tmp_path,
    )
    assert graph["megacontext"] == {}
    assert set(graph["megacontext.a"]) == {"megacontext.sub", "megacontext.sub.c"}
    assert set(graph["megacontext.b"]) == {"megacontext.a"}
    assert set(graph["megacontext.sub.c"]) == {"megacontext.b", "megacontext.sub.d"}
    cycles = strongly_connected(graph)
    assert cycles == [["megacontext.a", "megacontext.b", "megacontext.sub", "megacontext.sub.c"]]


def test_eval_shared_helpers_are_leaves():
    """The report's helpers (``eval.tables``) and the suites' (``eval.common``) import
    no evaluation module but ``eval.metrics``, which imports none."""
    _, graph = build_graph()
    for mod in ("megacontext.eval.tables", "megacontext.eval.common"):
        inside = {t for t in graph[mod] if t.startswith("megacontext.eval")}
        assert inside <= {"megacontext.eval.metrics"}, (mod, inside)
    assert not {t for t in graph["megacontext.eval.metrics"] if t.startswith("megacontext.eval")}
