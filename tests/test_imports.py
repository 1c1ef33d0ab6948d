"""The engine's import graph, read from the source with ``ast`` (module-level and function-level imports alike).

Rules (the layering of the Layout section of the design): no import cycle between engine modules;
``mirotrain.checkpoint`` never imports ``mirotrain.training``; the engine never imports the Prefect layer
(``pipelines``, ``tasks``, ``prefect``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_TOPS = ("pipelines", "tasks", "prefect")


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package (``__init__`` names the package)."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported_names(module: str, path: Path) -> list[tuple[str, int]]:
    """(dotted name, line) of every import statement in the file, nested ones included; relative imports are
    resolved, and ``from X import Y`` yields ``X.Y`` (the caller keeps it only if that is a module)."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, node.lineno))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names if alias.name != "*"]
    return found


def import_graph(package_dir: Path) -> tuple[dict[str, set[str]], dict[str, list[tuple[str, int]]]]:
    """(edges between the package's own modules, every imported name per module with its line)."""
    modules = module_names(package_dir)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    raw: dict[str, list[tuple[str, int]]] = {}
    for module, path in modules.items():
        raw[module] = imported_names(module, path)
        for name, _ in raw[module]:
            target = name
            while target and target not in modules:  # `import a.b.c` of a name inside a.b: the module a.b
                target = target.rpartition(".")[0]
            if target and target != module:
                edges[module].add(target)
    return edges, raw


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_the_engine():
    edges, _ = import_graph(ROOT / "mirotrain")
    found = cycles(edges)
    assert not found, "import cycles between engine modules:\n" + "\n".join(
        " <-> ".join(c) + "\n    " + "; ".join(f"{m} -> {sorted(edges[m] & set(c))}" for m in c) for c in found)


def test_checkpoint_does_not_import_training():
    edges, _ = import_graph(ROOT / "mirotrain")
    bad = sorted(f"{m} -> {t}" for m, targets in edges.items() if m.startswith("mirotrain.checkpoint")
                 for t in targets if t.startswith("mirotrain.training"))
    assert not bad, "mirotrain.checkpoint imports mirotrain.training: " + ", ".join(bad)


def test_engine_does_not_import_the_prefect_layer():
    _, raw = import_graph(ROOT / "mirotrain")
    bad = sorted({f"{module} line {line}: {name}" for module, names in raw.items() for name, line in names
                  if name.split(".")[0] in FORBIDDEN_TOPS})
    assert not bad, "the engine imports the Prefect layer: " + ", ".join(bad)


def test_the_walker_sees_function_level_relative_and_from_imports(tmp_path):
    """The rules above can fail: a cycle through a function-level import, a relative import and a
    ``from package import module`` is found, and so is an import of the Prefect layer."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from .. import c\n")
    (pkg / "c.py").write_text("import pkg.a\nimport os\n")
    (pkg / "d.py").write_text("def g():\n    import prefect.flows\n")
    edges, raw = import_graph(pkg)
    assert cycles(edges) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    assert ("prefect.flows", 2) in raw["pkg.d"]
