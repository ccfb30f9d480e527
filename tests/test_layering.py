"""The package's import graph: no cycle anywhere, layers point one way (STYLE.md rules 9 and 11).

Imports are read from the source (module level and inside functions alike: a lazy import is still an edge), so
the test needs neither a GPU nor the optional dependencies."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "wush_compile"
ROOT = "wush_compile"

#: Backends (kernel launchers with their heuristics and state) and the layers above them they must not import.
BACKENDS = ("wush_compile.ops.kernels", "wush_compile.ops._gemm", "wush_compile.ops._quant", "wush_compile.cuda")
SCHEMA_AND_ROUTER = ("wush_compile.ops.library", "wush_compile.ops.dispatch")
#: Edges that break the rules and are on the list to remove. Empty: the router runs every route, so no backend
#: hands a call to another. Adding to this list needs a reason.
KNOWN_BACKEND_EDGES: set[tuple[str, str]] = set()
#: Tools inside the backend packages (they compare backends, so they may import several).
TOOLS = ("wush_compile.cuda.bench",)


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _is_package(mods: dict[str, Path], name: str) -> bool:
    return mods[name].name == "__init__.py"


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        base = name if _is_package(mods, name) else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = base.split(".")
                    anchor = ".".join(parts[: len(parts) - node.level + 1])
                    mod = f"{anchor}.{node.module}" if node.module else anchor
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            for t in targets:
                # importing a.b.c runs a.b's __init__ too; a module's own packages are already being imported
                # when it runs (and the top-level package always first), so those are no edges
                parts = t.split(".")
                for i in range(2, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    if dep in mods and dep != name and not name.startswith(dep + "."):
                        graph[name].add(dep)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_walker_sees_known_edges():
    graph = _edges(_modules())
    assert "wush_compile.ops.dispatch" in graph["wush_compile.ops.library"]  # module level
    assert "wush_compile.ops.kernels" in graph["wush_compile.ops.dispatch"]  # inside a function
    assert "wush_compile.cuda.loader" in graph["wush_compile.cuda.decode"]


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = _cycle(_edges(_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_layers_point_one_way():
    graph = _edges(_modules())
    bad = []
    for name, deps in graph.items():
        if name in TOOLS:
            continue
        for d in deps:
            if _under(name, BACKENDS) and _under(d, SCHEMA_AND_ROUTER):
                bad.append((name, d, "a backend imports the schema layer or the router"))
            triton_to_cuda = _under(name, BACKENDS[:3]) and _under(d, ("wush_compile.cuda",))
            cuda_to_triton = _under(name, ("wush_compile.cuda",)) and _under(d, BACKENDS[:3])
            if (triton_to_cuda or cuda_to_triton) and (name, d) not in KNOWN_BACKEND_EDGES:
                bad.append((name, d, "a backend imports another backend"))
    assert "wush_compile.explain" not in graph["wush_compile.backend"], "backend.py imports explain.py"
    for d in graph["wush_compile.ops.library"]:  # the schema layer reaches the backends through the router only
        if _under(d, BACKENDS):
            bad.append(("wush_compile.ops.library", d, "the schema layer imports a backend (go through dispatch)"))
    assert not bad, "\n".join(f"{a} -> {b}: {why}" for a, b, why in sorted(bad))


def test_no_private_names_across_cuda_modules():
    """cuda/decode.py uses the loader's and the CUTLASS ops' public names only."""
    tree = ast.parse((PKG / "cuda" / "decode.py").read_text())
    private = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            private += [a.name for a in node.names if a.name.startswith("_")]
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("loader", "ops") \
                and node.attr.startswith("_"):
            private.append(f"{node.value.id}.{node.attr}")
    assert not private, f"cuda/decode.py uses private names {private}"


def test_environment_read_in_settings_only():
    readers = sorted(
        str(p.relative_to(PKG.parent)) for p in PKG.rglob("*.py")
        if "os.environ" in p.read_text() or "getenv(" in p.read_text()
    )
    assert readers == ["wush_compile/settings.py"], f"os.environ read outside wush_compile/settings.py: {readers}"
