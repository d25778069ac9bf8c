"""The package's layering, checked on its import graph (parsed from the source, nothing imported).

Data moves down the flow model -> task -> gradients -> store -> estimators -> scores -> applications ->
report / CLI and never back up: each module may import only the datainf modules its layer allows. Also: no
import cycle, no private name imported from another module, and one list of methods (the registry).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "datainf"

#: module (or package prefix) -> the datainf modules (or prefixes) it may import
ALLOWED: dict[str, tuple[str, ...]] = {
    "datainf": ("datainf.version",),  # the root re-exports lazily, by name, without importing
    "datainf.__main__": ("datainf.cli",),
    "datainf.version": (),
    "datainf.errors": (),
    "datainf.atomic": (),
    "datainf.outputs": ("datainf.errors",),  # the one output guard, used by every command that writes
    "datainf.adapters": (),
    "datainf.metrics": ("datainf.errors",),
    "datainf.ranking": ("datainf.errors",),
    "datainf.data.assets": ("datainf.errors", "datainf.atomic"),  # atomic: the cache lock
    "datainf.data": ("datainf.errors", "datainf.data", "datainf.tasks"),
    "datainf.tasks": ("datainf.errors",),
    "datainf.gradients": ("datainf.errors", "datainf.tasks", "datainf.adapters"),
    "datainf.store": ("datainf.errors", "datainf.atomic", "datainf.version", "datainf.adapters", "datainf.store"),
    "datainf.estimators": ("datainf.errors", "datainf.estimators"),
    "datainf.distributed": ("datainf.errors", "datainf.estimators", "datainf.store"),
    "datainf.fitted": ("datainf.errors", "datainf.atomic", "datainf.estimators", "datainf.store",
                       "datainf.distributed"),
    "datainf.scoring": ("datainf.errors", "datainf.atomic", "datainf.version", "datainf.estimators",
                        "datainf.store", "datainf.distributed", "datainf.fitted"),
    "datainf.diagnostics": ("datainf.errors", "datainf.estimators"),
    "datainf.attributor": ("datainf.errors", "datainf.atomic", "datainf.tasks", "datainf.gradients",
                           "datainf.store", "datainf.estimators", "datainf.distributed", "datainf.scoring",
                           "datainf.fitted", "datainf.data", "datainf.ranking"),
    "datainf.models": ("datainf.errors", "datainf.atomic", "datainf.tasks", "datainf.data", "datainf.models"),
    "datainf.report": ("datainf.errors", "datainf.atomic", "datainf.version", "datainf.metrics",
                       "datainf.estimators.registry", "datainf.report"),
}
#: the application layers may import everything below them (never the CLI)
ALLOWED["datainf.experiments"] = tuple(sorted({m for v in ALLOWED.values() for m in v} | set(ALLOWED))) + (
    "datainf.experiments",)
ALLOWED["datainf.cli"] = ALLOWED["datainf.experiments"] + ("datainf.cli",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported datainf module, names taken from it, line) for every import statement in the file, except
    those under ``if TYPE_CHECKING:`` (annotations only: never run, so neither a dependency nor a cycle)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                 and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                 for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "datainf"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base.split(".")[0] == "datainf":
                out.append((base, [a.name for a in node.names], node.lineno))
    return out


def rule_for(module: str) -> tuple[str, ...]:
    best = max((key for key in ALLOWED if module == key or module.startswith(key + ".")), key=len, default=None)
    assert best is not None, f"{module}: no layering rule; add it to ALLOWED in tests/test_layering.py"
    return ALLOWED[best]


def allowed(target: str, rule: tuple[str, ...]) -> bool:
    return any(target == r or target.startswith(r + ".") for r in rule)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def resolve(target: str, names: list[str]) -> list[str]:
    """``from datainf.data import text`` imports the submodule datainf.data.text: count that one."""
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
    return subs or [target]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_only_its_layer(module):
    rule = rule_for(module)
    bad = []
    for target, names, line in imports_of(MODULES[module]):
        for t in resolve(target, names):
            if t != module and not allowed(t, rule):
                bad.append(f"line {line}: {t}")
    assert not bad, f"{module} imports above its layer: {bad}"


def test_no_private_name_crosses_modules():
    bad = [f"{module} line {line}: {target}.{name}" for module, path in MODULES.items()
           for target, names, line in imports_of(path) for name in names
           if name.startswith("_") and not name.startswith("__") and target != module]
    assert not bad, bad


def test_no_import_cycle():
    graph = {m: {t for target, names, _ in imports_of(p) for t in resolve(target, names) if t in MODULES and t != m}
             for m, p in MODULES.items()}
    # a package's __init__ importing its own submodules is how a package is built, not a cycle
    for m in graph:
        graph[m] = {t for t in graph[m] if not (t.startswith(m + ".") and MODULES[m].name == "__init__.py")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_one_list_of_methods():
    """Method names are listed in one place, the registry: no other module spells out the list."""
    offenders = []
    for module, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        for quoted in ('"datainf", "exact", "lissa", "identity"', "'datainf', 'exact', 'lissa', 'identity'",
                       '"datainf,exact,lissa,identity'):
            if quoted in text and module != "datainf.estimators":
                offenders.append(module)
    assert not offenders, f"these modules list the methods themselves; read method_names(): {offenders}"
