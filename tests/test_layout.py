"""The shape of the code under gptlab/: short modules, imports that go one way, no block written twice.
Static checks (ast and text, no imports, no subprocess)."""

from __future__ import annotations

import ast
import hashlib
import re
from collections import defaultdict
from pathlib import Path

GPTLAB = Path(__file__).resolve().parent.parent / "gptlab"
MAX_LINES = 300
WINDOW = 6  # lines: a block this long written twice is a function waiting to be shared


def modules() -> dict[str, Path]:
    """gptlab's modules by dotted name (a package by its own name)."""
    found = {}
    for path in sorted(GPTLAB.rglob("*.py")):
        parts = path.relative_to(GPTLAB.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(gptlab modules imported at module level, those imported inside functions). Imports under
    `if TYPE_CHECKING:` are for annotations only and count as neither; those under
    `if __name__ == "__main__":` run only when the module is the program (not imported), so they count
    as lazy."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top: set[str] = set()
    lazy: set[str] = set()

    def target(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted if dotted and dotted != name else None

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            main_block = isinstance(child, ast.If) and "__name__" in ast.unparse(child.test)
            found: list[str] = []
            if isinstance(child, ast.Import):
                found = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod
                found = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names]
            for dotted in found:
                if (t := target(dotted)) is not None:
                    (lazy if in_function else top).add(t)
            visit(child, in_function or main_block or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), False)
    return top, lazy


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_no_module_is_over_300_lines():
    long = {str(p.relative_to(GPTLAB.parent)): n for p in modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (at most {MAX_LINES} lines): {long}"


def test_imports_go_one_way():
    """Module-level imports form no cycle between modules (what Python runs at import time), and no
    import at all, function-level ones included, makes two packages (gptlab.data, gptlab.run, ...,
    or a top-level module like gptlab.config) depend on each other: a lazy import still ties them.
    Inside a package a function may import a sibling that imports it (a registry reaching the
    tokenizer it builds, a package's lazy attribute)."""
    known = modules()
    top, every = {}, {}
    for name, path in known.items():
        module_level, lazy = imports(name, path, set(known))
        top[name], every[name] = module_level, module_level | lazy
    assert cycles(top) == []

    def package(name: str) -> str:
        return ".".join(name.split(".")[:2])

    packages: dict[str, set[str]] = defaultdict(set)
    for name, targets in every.items():
        packages[package(name)] |= {package(t) for t in targets} - {package(name), "gptlab"}
    assert cycles(packages) == []
    assert "gptlab.run" in packages["gptlab.report"] and "gptlab.schema" in packages["gptlab.models"]  # the graph is real


def blocks(path: Path) -> list[tuple[str, int]]:
    """(hash of WINDOW consecutive code lines, first line number), over lines stripped of
    whitespace, with blank, comment, import and docstring-only lines left out."""
    code: list[tuple[str, int]] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = re.sub(r"\s+", " ", line.strip())
        if not text or text.startswith(("#", "import ", "from ", '"""', "'''")) or text in (")", "]", "}", "):"):
            continue
        code.append((text, number))
    return [(hashlib.sha1("\n".join(t for t, _ in code[i : i + WINDOW]).encode()).hexdigest(), code[i][1])
            for i in range(len(code) - WINDOW + 1)]


def test_no_block_of_six_lines_is_written_twice():
    seen: dict[str, list[str]] = defaultdict(list)
    for path in modules().values():
        for digest, line in blocks(path):
            seen[digest].append(f"{path.relative_to(GPTLAB.parent)}:{line}")
    repeated = sorted(places for places in seen.values() if len(places) > 1)
    assert not repeated, f"{WINDOW} lines repeated at: {repeated[:10]}"
