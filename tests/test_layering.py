"""The dependency direction, checked on the source: ``protos <- cache_service <- workers <- router <- deploy``.

Every import counts, whether at module level, inside a function (a lazy import is still a dependency) or
under ``TYPE_CHECKING``, and so does a module named to ``importlib.import_module`` by a literal string (the
CLI's subcommand table). A lower layer never imports a higher one, and no two modules import each other,
directly or around a longer loop. ``common`` is a leaf every layer may use; load generation (``loadgen``)
and simulation (``simulator``) sit above the router and below the launcher, which runs them; the
side-by-side benchmarks may use everything.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Package -> layer. A module may import modules of its own layer or lower ones.
LAYERS = {
    "common": 0,
    "protos": 0,
    "cache_service": 1,
    "workers": 2,
    "router": 3,
    "loadgen": 4,
    "simulator": 4,
    "deploy": 5,
    "benchmarks": 6,
}
LEAVES = {"common", "protos"}  # import nothing of the project but themselves


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    out = {}
    for pkg in LAYERS:
        base = ROOT / pkg
        if base.is_dir():
            for path in base.rglob("*.py"):
                out[module_name(path)] = path
    return out


def imported_names(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports (absolute names), lazy and TYPE_CHECKING ones included."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
        elif isinstance(node, ast.Tuple) and name == "deploy.cli":
            # The CLI's SUBCOMMANDS table: ("module.path", "help") pairs imported by name at run time.
            for elt in node.elts:
                if isinstance(elt, ast.Constant) and isinstance(elt.value, str) and elt.value.split(".")[0] in LAYERS:
                    found.add(elt.value)
    return found


def project_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for imp in imported_names(path, name):
            # Resolve to the longest project module the name denotes (``a.b.c`` may be an attribute of ``a.b``).
            parts = imp.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts and ".".join(parts) != name:
                deps.add(".".join(parts))
        graph[name] = deps
    return graph


def test_no_layer_imports_a_higher_one():
    upward = []
    for mod, deps in project_graph().items():
        pkg = mod.split(".")[0]
        for dep in deps:
            dep_pkg = dep.split(".")[0]
            if pkg in LEAVES and dep_pkg != pkg:
                upward.append(f"{mod} -> {dep} (a leaf imports nothing of the project)")
            elif LAYERS[dep_pkg] > LAYERS[pkg] or (LAYERS[dep_pkg] == LAYERS[pkg] and dep_pkg != pkg
                                                   and not {pkg, dep_pkg} <= {"loadgen", "simulator"}):
                upward.append(f"{mod} -> {dep}")
    assert upward == [], "imports against the layering:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = project_graph()
    # Tarjan's strongly connected components: any component of 2+ modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles: {cycles}"


def test_the_checker_sees_lazy_imports_and_relative_ones(tmp_path):
    # The checker itself must not miss the imports it is there to catch.
    src = tmp_path / "mod.py"
    src.write_text("import os\ndef f():\n    from workers.engine import Engine\nfrom . import sibling\n")
    found = imported_names(src, "cache_service.mod")
    assert {"os", "workers.engine", "workers.engine.Engine", "cache_service", "cache_service.sibling"} <= found


def test_importing_the_router_imports_no_torch_and_no_worker_actor():
    # In a fresh interpreter: every router module, then what got imported along.
    router_modules = sorted(m for m in project_modules() if m.split(".")[0] == "router")
    code = (
        "import importlib, sys\n"
        "FORBIDDEN = ('torch', 'transformers', 'workers.ray_worker', 'workers.engine')\n"
        "bad = []\n"
        f"for m in {router_modules!r}:\n"
        "    importlib.import_module(m)\n"
        "    bad += [f'{m} -> {f}' for f in FORBIDDEN if f in sys.modules and not any(f in b for b in bad)]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
