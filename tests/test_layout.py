"""The package's layout (issue 23): subpackages by concern, imports in one direction only, no
import cycle between any two modules, function-level imports included.

The parts, bottom first, and what each may import besides itself:

    base      qes_edge/__init__.py, atomic, faults, home, threads  (nothing)
    native    the C library's binding, the engine, quant types, fixed point
    tasks     prompts and rewards                                    (base)
    ledger    the SQLite ledger and its run log                       (base)
    gguf      the model file: header checks, model names, export      (native)
    sync      frames, links, the sync protocol                        (native, ledger)
    llama     llama.cpp: runtime, weight capture, driver, chat        (native, gguf)
    training  config, coefficients, trainer, session, executors, follow
    agent     the overnight daemon, its db, manners, service, status, report
    cli       the command line; nothing but entry imports it
    entry     qes_edge/entry.py and __main__.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "qes_edge"
BASE = {"__init__", "atomic", "faults", "home", "threads"}
ENTRY = {"entry", "__main__"}

_below_training = {"base", "native", "tasks", "ledger", "gguf", "sync", "llama"}
ALLOWED = {
    "base": set(),
    "native": {"base"},
    "tasks": {"base"},
    "ledger": {"base"},
    "gguf": {"base", "native"},
    "sync": {"base", "native", "ledger"},
    "llama": {"base", "native", "gguf"},
    "training": _below_training,
    "agent": _below_training | {"training"},
    "cli": _below_training | {"training", "agent"},
    "entry": {"base", "native", "cli"},
}


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def part_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "base"
    if len(parts) == 2 and parts[1] in BASE:
        return "base"
    if len(parts) == 2 and parts[1] in ENTRY:
        return "entry"
    return parts[1]


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """({module: the package modules it imports, anywhere in its body}, relative imports found)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    top = root.name
    graph, relative = {}, []

    def resolve(name: str) -> str | None:  # the longest module prefix of a dotted name
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in modules.items():
        out = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == top:
                        out.add(resolve(a.name))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    relative.append(f"{path.relative_to(root.parent)}:{node.lineno}")
                    continue
                if node.module and node.module.split(".")[0] == top:
                    for a in node.names:  # `from pkg import module` imports that module
                        sub = f"{node.module}.{a.name}"
                        out.add(sub if sub in modules else resolve(node.module))
        out.discard(None)
        out.discard(mod)
        graph[mod] = out
    return graph, relative


def against_direction(graph) -> list[str]:
    bad = []
    for mod, deps in sorted(graph.items()):
        for dep in sorted(deps):
            a, b = part_of(mod), part_of(dep)
            if a != b and b not in ALLOWED.get(a, set()):
                bad.append(f"{mod} ({a}) imports {dep} ({b})")
    return bad


def cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph():
    g, relative = import_graph(PKG)
    assert not relative, f"relative imports (the layout test reads absolute ones): {relative}"
    return g


def test_every_module_belongs_to_a_known_part(graph):
    unknown = sorted({f"{m} ({part_of(m)})" for m in graph if part_of(m) not in ALLOWED})
    assert not unknown, f"modules outside the layout's parts (add the part to ALLOWED): {unknown}"


def test_imports_go_one_way(graph):
    bad = against_direction(graph)
    assert not bad, "imports against the layout's direction:\n" + "\n".join(bad)


def test_no_import_cycles(graph):
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_nothing_but_entry_imports_cli(graph):
    users = sorted(m for m, deps in graph.items() for d in deps
                   if part_of(d) == "cli" and part_of(m) not in ("cli", "entry"))
    assert not users


def test_the_checks_catch_what_they_guard(tmp_path):
    """A package made to break every rule: each is reported."""
    root = tmp_path / "qes_edge"
    for d in ("native", "cli", "tasks"):
        (root / d).mkdir(parents=True)
        (root / d / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "native" / "engine.py").write_text("def f():\n    from qes_edge.cli.main import app\n")
    (root / "cli" / "main.py").write_text("import qes_edge.native.engine\n")
    (root / "tasks" / "a.py").write_text("from qes_edge.tasks import b\n")
    (root / "tasks" / "b.py").write_text("from qes_edge.tasks.a import x\nfrom . import a\n")
    g, relative = import_graph(root)
    assert relative == ["qes_edge/tasks/b.py:2"]
    assert g["qes_edge.native.engine"] == {"qes_edge.cli.main"}  # a function-level import counts
    assert against_direction(g) == ["qes_edge.native.engine (native) imports qes_edge.cli.main (cli)"]
    assert sorted(cycles(g)) == [["qes_edge.cli.main", "qes_edge.native.engine"],
                                 ["qes_edge.tasks.a", "qes_edge.tasks.b"]]


def test_the_model_file_checks_and_chat_templates_do_not_load_the_c_library():
    """gguf/check.py and llama/chat.py name the quant types and QESError (native/types.py, plain
    Python): importing them leaves libqes unloaded (a header check costs no native library)."""
    import subprocess
    import sys
    code = ("import sys, qes_edge.gguf.check, qes_edge.llama.chat; "
            "print(sorted(m for m in sys.modules if m in ('qes_edge.native.binding', '_cffi_backend')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
