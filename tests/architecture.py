"""An AST probe of slimship's imports: module-level *and* lazy (inside functions) imports, so a cycle hidden
behind a function-level import is still a cycle. Used by tests/test_architecture.py."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


@dataclass(frozen=True)
class Import:
    importer: str  # module that imports
    target: str  # module imported (resolved to a module of the package where possible)
    names: tuple[str, ...]  # names taken from it (``from x import a, b``)
    lazy: bool
    type_only: bool
    line: int


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def _resolve(name: str, known: set[str]) -> str | None:
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_package(mod: str, known: dict[str, Path]) -> bool:
    return known[mod].name == "__init__.py"


def imports() -> Iterator[Import]:
    known = modules()
    for mod, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        type_blocks: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for sub in node.body:
                    for inner in ast.walk(sub):
                        type_blocks.add(id(inner))
        funcs: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(node):
                    if inner is not node:
                        funcs.add(id(inner))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod if _is_package(mod, known) else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    full = f"{base}.{node.module}" if node.module else base
                else:
                    full = node.module or ""
                if not full.startswith("slimship"):
                    continue
                # `from pkg import submodule` imports the submodule
                for alias in node.names:
                    sub = f"{full}.{alias.name}"
                    target = sub if sub in known else _resolve(full, set(known))
                    if target is None:
                        continue
                    yield Import(
                        mod,
                        target,
                        () if sub in known else (alias.name,),
                        id(node) in funcs,
                        id(node) in type_blocks,
                        node.lineno,
                    )
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("slimship"):
                        target = _resolve(alias.name, set(known))
                        if target:
                            yield Import(
                                mod, target, (), id(node) in funcs, id(node) in type_blocks, node.lineno
                            )


def graph(include_lazy: bool = True) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {m: set() for m in modules()}
    for imp in imports():
        if imp.type_only or (imp.lazy and not include_lazy) or imp.target == imp.importer:
            continue
        # importing a package's submodule also runs the package's __init__, but that is not a dependency on
        # the package's contents; count only the module imported
        g[imp.importer].add(imp.target)
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in g:
                continue
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

    import sys

    sys.setrecursionlimit(10_000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def private_imports() -> list[str]:
    """``from slimship.x import _name`` (or ``slimship.x._mod``) taken by a module outside the one that owns it.
    A package's own modules may share its ``_private`` modules (``passes/_common.py`` for passes/*)."""
    out = []
    for imp in imports():
        owner_pkg = imp.target if _is_package(imp.target, modules()) else imp.target.rpartition(".")[0]
        same_pkg = imp.importer == owner_pkg or imp.importer.startswith(owner_pkg + ".")
        for name in imp.names:
            if name.startswith("_") and not name.startswith("__"):
                out.append(f"{imp.importer}:{imp.line} imports {name} from {imp.target}")
        leaf = imp.target.rpartition(".")[2]
        if leaf.startswith("_") and not leaf.startswith("__") and not same_pkg:
            out.append(f"{imp.importer}:{imp.line} imports private module {imp.target}")
    return sorted(out)


if __name__ == "__main__":
    g = graph()
    for c in cycles(g):
        print("cycle (incl. lazy):", " ↔ ".join(c))
    for c in cycles(graph(include_lazy=False)):
        print("cycle (module level):", " ↔ ".join(c))
    for p in private_imports():
        print(p)
