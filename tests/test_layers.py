"""One-way layers, checked: every `import` in nanoseek/ (module level, inside functions, under
`if TYPE_CHECKING:`) is read from the source with `ast` and held against the layer order

    cli (nanoseek/cli.py)
      -> faces: the subcommand modules listed in nanoseek.cli._COMMAND_MODULES (each package's
         cli.py, demo, model.info): they may import any library layer
    serve | train        (5)
      -> eval            (4)
      -> engine          (3)
      -> model | data    (2)  (beside each other: neither imports the other)
      -> checkpoint | config | chat_format   (1)
      -> _extras | jsonl | _argparse | _runtime (0)  (helpers with no nanoseek imports)

A library module imports only strictly lower layers (or its own package); nothing but
nanoseek/cli.py imports a face; and no two modules import each other, directly or round a loop.
Nothing is imported: the test reads files, so it runs without torch or any extra installed.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "nanoseek"

RANK = {
    "serve": 5, "train": 5,
    "eval": 4,
    "engine": 3,
    "model": 2, "data": 2,
    "checkpoint": 1, "config": 1, "chat_format": 1,
    "_extras": 0, "jsonl": 0, "_argparse": 0, "_runtime": 0,
}
# Temporary aliases kept for code that is still moving (re-exports only); none at present.
ALIASES: set[str] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported nanoseek module, line) for every import statement anywhere in the file."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "nanoseek"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "nanoseek":
                continue
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
            # `from pkg import submodule` imports the submodule; `from mod import name` the module
            out += [(s, node.lineno) for s in subs] if subs else [(mod, node.lineno)]
    # an `import a.b.c` resolves to the deepest known module
    resolved = []
    for mod, line in out:
        while mod not in known and "." in mod:
            mod = mod.rsplit(".", 1)[0]
        if mod in known and mod != name:
            resolved.append((mod, line))
    return resolved


def _faces() -> set[str]:
    tree = ast.parse((PKG / "cli.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_COMMAND_MODULES" for t in node.targets):
            return set(ast.literal_eval(node.value)) | {"nanoseek.cli"}
    raise AssertionError("nanoseek/cli.py has no _COMMAND_MODULES")


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "nanoseek"


def _graph():
    mods = _modules()
    known = set(mods)
    return mods, {m: _imports(m, p, known) for m, p in mods.items()}


def layer_violations() -> list[str]:
    mods, graph = _graph()
    faces = _faces() | {m for m in mods if m.endswith(".cli")}
    bad = []
    for mod, edges in graph.items():
        src = mods[mod].relative_to(ROOT)
        for target, line in edges:
            where = f"{src}:{line}: {mod} imports {target}"
            if target in faces:
                if mod != "nanoseek.cli":
                    bad.append(f"{where}: only nanoseek/cli.py may import a command module (a face)")
                continue
            if target in ALIASES and mod not in ALIASES:
                bad.append(f"{where}: {target} is a temporary alias; import what it re-exports")
            if mod in faces:
                continue  # a face may import any library layer
            a, b = _layer(mod), _layer(target)
            if a == b:
                continue
            if a not in RANK or b not in RANK:
                bad.append(f"{where}: {a!r} or {b!r} has no layer in tests/test_layers.py RANK")
            elif RANK[a] <= RANK[b]:
                how = "beside it" if RANK[a] == RANK[b] else "above it"
                bad.append(f"{where}: layer {a} may not import {b} ({how})")
    return bad


def import_cycles() -> list[list[str]]:
    """Strongly connected components (> 1 module) of the module import graph, Tarjan's algorithm."""
    _, graph = _graph()
    edges = {m: sorted({t for t, _ in e}) for m, e in graph.items()}
    index, low, stack, on, sccs = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
                sccs.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sccs


def test_the_walker_sees_function_local_and_relative_imports():
    mods, graph = _graph()
    assert "nanoseek.engine.generate" in mods and "nanoseek.cli" in mods
    spec = {t for t, _ in graph["nanoseek.model.transformer"]}
    assert "nanoseek.checkpoint" in spec and "nanoseek.config" in spec  # `from .. import checkpoint`
    loading = {t for t, _ in graph["nanoseek.engine.loading"]}
    assert {"nanoseek.model", "nanoseek.data.tokenizer"} <= loading  # function-local imports


def test_every_package_has_a_layer():
    mods, _ = _graph()
    missing = sorted({_layer(m) for m in mods} - set(RANK) - {"nanoseek", "cli", "demo"})
    assert not missing, f"give these a layer in tests/test_layers.py RANK: {missing}"


def test_imports_go_down_the_layers_only():
    bad = layer_violations()
    assert not bad, "import-layer violations:\n  " + "\n  ".join(bad)


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, "import cycles (each line: modules that import each other round a loop):\n  " + \
        "\n  ".join(" <-> ".join(c) for c in cycles)


def test_checkpoint_never_imports_the_model():
    _, graph = _graph()
    assert not [t for t, _ in graph["nanoseek.checkpoint"] if t.startswith("nanoseek.model")]


if __name__ == "__main__":
    for line in layer_violations():
        print(line)
    for c in import_cycles():
        print("cycle:", " <-> ".join(c))
