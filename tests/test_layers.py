"""Layers with arrows pointing one way.

Statically, every import statement of the project is read, those inside functions
included (a lazy import is an arrow all the same): no two modules may reach each other by
any path (no circles), and no package of the core may import one above it. In fresh
interpreters: the core imports neither Flower nor the packages above it; the deployment
apps never import the simulation harness; a config mistake is reported before torch or
Flower is imported.

Imports under `if TYPE_CHECKING:` are not arrows: they never run, they name a type for an
annotation. A module below `fedtune.config` that takes a config argument uses one."""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPPER = ("flwr", "ray", "simulations", "server", "clients")
PROJECT = ("fedtune", "clients", "server", "simulations", "benchmarks")
# The core's packages, lowest first: a module may import from its own package, from one
# listed before it, from `fedtune.errors` and `fedtune.config`. The top-level modules
# (`cli`, `run_config`, the `fedtune` namespace itself) sit above them all.
CORE_LAYERS = ("errors", "system", "data", "models", "privacy", "training", "federation", "reporting", "audit")
# `fedtune.config` is the vocabulary every package shares; it reads only these (the
# registries its validation consults), and they never import it back (no circles).
CONFIG_READS = {"fedtune.errors", "fedtune.models.adapter_methods", "fedtune.federation.aggregate",
                "fedtune.federation.server_optimizers",
                "fedtune.privacy.accountants"}


def _imported_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _modules(package: str) -> list[str]:
    """Every module of a package, subpackages included."""
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (ROOT / package).rglob("*.py") if p.stem != "__main__")


def test_the_core_imports_nothing_above_it():
    imported = _imported_after("\n".join(f"import {m}" for m in _modules("fedtune")))
    assert not imported & set(UPPER), imported & set(UPPER)


def test_the_deployment_apps_never_import_the_simulation_harness():
    modules = _modules("server") + _modules("clients")
    imported = _imported_after("\n".join(f"import {m}" for m in modules))
    assert "flwr" in imported and "simulations" not in imported


def test_a_config_mistake_is_reported_before_torch_or_flower_load():
    for command in ("train-local", "simulate"):
        code = (f"from fedtune.cli import main\nrc = main([{command!r}, '--set', 'dp.target_epsilon=-1'])\n"
                "assert rc == 2, rc")
        imported = _imported_after(code)
        assert not imported & {"torch", "flwr", "ray", "transformers"}, (command, imported & {"torch", "flwr"})


def _project_modules() -> dict[str, Path]:
    return {m: ROOT / (m.replace(".", "/") + ("/__init__.py" if (ROOT / m.replace(".", "/")).is_dir() else ".py"))
            for package in PROJECT for m in _modules(package)}


def _runtime_imports(tree: ast.AST):
    """Every import statement that can run: module level, in functions, in branches; not
    under `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            for node in child.orelse:
                yield from _runtime_imports(ast.Module(body=[node], type_ignores=[]))
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        yield from _runtime_imports(child)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules (or packages) it imports, at any depth of its code."""
    modules = _project_modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{alias.name}" for alias in node.names]
            targets |= {name for name in names if name.split(".")[0] in UPPER + PROJECT}
        graph[module] = {resolve(n) or n for n in targets} - {module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next((c for c in children if c in graph), None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _core_unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fedtune"


def _rank(unit: str) -> int:
    """A package's place in CORE_LAYERS; the top-level modules share the place above them."""
    return CORE_LAYERS.index(unit) if unit in CORE_LAYERS else len(CORE_LAYERS)


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    """Core imports that point from a lower package to a higher one (or out of the core)."""
    wrong = []
    for module, targets in sorted(graph.items()):
        if not module.startswith("fedtune"):
            continue
        unit = _core_unit(module)
        for target in sorted(targets):
            if not target.startswith("fedtune") or target.split(".")[0] != "fedtune":
                wrong.append(f"{module} -> {target} (the core never imports it)")
                continue
            other = _core_unit(target)
            if other == unit or target == "fedtune.config":
                continue
            if module == "fedtune.config":
                if target not in CONFIG_READS:
                    wrong.append(f"{module} -> {target} (config reads only the registries it validates against)")
                continue
            if _rank(other) > _rank(unit):
                wrong.append(f"{module} -> {target}")
    return wrong


def test_no_module_reaches_itself_through_imports_lazy_ones_included():
    assert circles(import_graph()) == []


def test_no_core_package_imports_one_above_it():
    assert upward_arrows(import_graph()) == []


def test_the_deployment_apps_import_nothing_of_the_harness_even_lazily():
    graph = import_graph()
    wrong = [f"{m} -> {t}" for m, ts in graph.items() if m.split(".")[0] in ("server", "clients")
             for t in ts if t.split(".")[0] == "simulations"]
    assert wrong == []


def test_the_check_sees_lazy_circles_and_upward_arrows():
    """The checks themselves can fail: a circle closed by an import inside a function, and
    an arrow from the data package up to federation, are both found."""
    graph = {"fedtune.data.tables": {"fedtune.federation.server"},
             "fedtune.federation.server": {"fedtune.data.tables"}, "fedtune.errors": set()}
    assert circles(graph) == [["fedtune.data.tables", "fedtune.federation.server"]]
    assert upward_arrows(graph) == ["fedtune.data.tables -> fedtune.federation.server"]
    tree = ast.parse("def f():\n    import fedtune.federation.server\nif TYPE_CHECKING:\n    import fedtune.reporting\n")
    assert [ast.unparse(n) for n in _runtime_imports(tree)] == ["import fedtune.federation.server"]
