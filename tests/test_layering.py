"""The package's layering, checked on its import graph (parsed from the source, nothing imported).

Data moves down the flow model -> task -> gradients -> store -> estimators -> scores -> applications ->
report / CLI and never back up: each module may import only the datainf modules its layer allows. Also: no
import cycle (type-checking imports included), no private name imported from another module nor private
attribute taken from its objects, and one list of methods (the registry).
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
    "datainf.outputs": ("datainf.errors", "datainf.adapters"),  # the one output guard, used by every command that writes
    "datainf.adapters": (),
    "datainf.metrics": ("datainf.errors",),
    "datainf.ranking": ("datainf.errors",),
    "datainf.data.assets": ("datainf.errors", "datainf.atomic"),  # atomic: the cache lock
    "datainf.data": ("datainf.errors", "datainf.data", "datainf.tasks"),
    "datainf.tasks": ("datainf.errors", "datainf.adapters"),
    "datainf.collector": ("datainf.errors", "datainf.tasks", "datainf.adapters"),  # hooks + projection
    "datainf.gradients": ("datainf.errors", "datainf.tasks", "datainf.adapters", "datainf.collector"),
    "datainf.store": ("datainf.errors", "datainf.atomic", "datainf.version", "datainf.adapters", "datainf.store"),
    "datainf.estimators": ("datainf.errors", "datainf.estimators"),
    "datainf.distributed": ("datainf.errors", "datainf.estimators", "datainf.store"),
    "datainf.fitted": ("datainf.errors", "datainf.atomic", "datainf.estimators", "datainf.store",
                       "datainf.distributed"),
    "datainf.remedies": ("datainf.errors", "datainf.estimators"),  # gradient remedies, applied by scoring
    "datainf.scoring": ("datainf.errors", "datainf.atomic", "datainf.version", "datainf.estimators",
                        "datainf.store", "datainf.distributed", "datainf.fitted", "datainf.remedies"),
    "datainf.index": ("datainf.errors", "datainf.atomic", "datainf.version", "datainf.store", "datainf.scoring",
                      "datainf.ranking", "datainf.estimators.defaults"),  # the top-k index: beside scoring, faiss imported lazily
    # one way to combine scores (weighted sums of terms over one training set); data.collate: the loss default
    "datainf.combine": ("datainf.errors", "datainf.atomic", "datainf.version", "datainf.estimators",
                        "datainf.store", "datainf.scoring", "datainf.data.collate"),
    "datainf.diagnostics": ("datainf.errors", "datainf.estimators"),
    "datainf.attributor": ("datainf.errors", "datainf.atomic", "datainf.tasks", "datainf.gradients",
                           "datainf.store", "datainf.estimators", "datainf.distributed", "datainf.scoring",
                           "datainf.fitted", "datainf.data", "datainf.ranking"),
    # token-level attribution: per-token query gradients (the attributor's path) scored by combine
    "datainf.tokens": ("datainf.errors", "datainf.attributor", "datainf.combine", "datainf.data.collate",
                       "datainf.estimators", "datainf.gradients", "datainf.ranking", "datainf.tasks"),
    "datainf.models": ("datainf.errors", "datainf.atomic", "datainf.tasks", "datainf.data", "datainf.models"),
    "datainf.report": ("datainf.errors", "datainf.atomic", "datainf.version", "datainf.metrics",
                       "datainf.estimators.registry", "datainf.report"),
}
#: explain as a library call (datainf.explain): an application of everything below it, used by the CLI
ALLOWED["datainf.explaining"] = ("datainf.errors", "datainf.atomic", "datainf.outputs", "datainf.tasks", "datainf.data",
                                 "datainf.gradients", "datainf.store", "datainf.estimators", "datainf.scoring",
                                 "datainf.combine", "datainf.attributor", "datainf.models", "datainf.ranking",
                                 "datainf.tokens", "datainf.index")
#: the application layers may import everything below them (never the CLI)
ALLOWED["datainf.experiments"] = tuple(sorted({m for v in ALLOWED.values() for m in v} | set(ALLOWED))) + (
    "datainf.experiments",)
#: the Trainer / TRL callback: an application too (it calls the gradient writer and the run stores)
ALLOWED["datainf.integrations"] = tuple(m for m in ALLOWED["datainf.experiments"] if m != "datainf.experiments")
ALLOWED["datainf.cli"] = ALLOWED["datainf.experiments"] + ("datainf.cli",)


def module_name(path: Path, root: Path = SRC) -> str:
    """The dotted name of the module in ``path``, a file of the package folder ``root``."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def all_imports_of(path: Path, root: Path = SRC) -> list[tuple[str, list[str], int, bool]]:
    """(imported module of the package, names taken from it, line, type-only) for every import statement in
    the file; type-only: under ``if TYPE_CHECKING:`` (read by type checkers, never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and is_type_checking(node.test)
                 for child in node.body for n in ast.walk(child)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno, id(node) in type_only) for a in node.names
                    if a.name.split(".")[0] == root.name]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base.split(".")[0] == root.name:
                out.append((base, [a.name for a in node.names], node.lineno, id(node) in type_only))
    return out


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """The imports that run (those under ``if TYPE_CHECKING:`` left out): the layering's dependencies."""
    return [(target, names, line) for target, names, line, type_only in all_imports_of(path) if not type_only]


def rule_for(module: str) -> tuple[str, ...]:
    best = max((key for key in ALLOWED if module == key or module.startswith(key + ".")), key=len, default=None)
    assert best is not None, f"{module}: no layering rule; add it to ALLOWED in tests/test_layering.py"
    return ALLOWED[best]


def allowed(target: str, rule: tuple[str, ...]) -> bool:
    return any(target == r or target.startswith(r + ".") for r in rule)


def modules_of(root: Path) -> dict[str, Path]:
    """Every module of the package folder ``root``: dotted name -> file."""
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


MODULES = modules_of(SRC)


def resolve(target: str, names: list[str], modules: dict[str, Path] = MODULES) -> list[str]:
    """``from datainf.data import text`` imports the submodule datainf.data.text: count that one."""
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
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


def import_graph(root: Path, *, type_only: bool) -> dict[str, set[str]]:
    """module -> the modules of the package it imports: the imports that run, or (``type_only``) all of them,
    those under ``if TYPE_CHECKING:`` included. A package's ``__init__`` importing its own submodules is how a
    package is built, not a dependency that can close a cycle, so it is left out."""
    modules = modules_of(root)
    graph = {}
    for m, path in modules.items():
        targets = {t for target, names, _, hidden in all_imports_of(path, root) if type_only or not hidden
                   for t in resolve(target, names, modules) if t in modules and t != m}
        if path.name == "__init__.py":
            targets = {t for t in targets if not t.startswith(m + ".")}
        graph[m] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as [a, b, ..., a], or None when it has none."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph(SRC, type_only=False))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycle_through_type_checking_imports():
    """A cycle that only annotations close (``if TYPE_CHECKING:``) still ties the two modules together: each
    needs the other to be understood, and neither can move without the other."""
    cycle = find_cycle(import_graph(SRC, type_only=True))
    assert cycle is None, "import cycle (type-checking imports included): " + " -> ".join(cycle or [])


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def defined_names(tree: ast.AST) -> set[str]:
    """The names a module defines: its functions, classes and methods, the names it assigns (module, class
    and local variables) and the attributes it assigns on ``self`` or ``cls``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            names.add(node.attr)
    return names


def private_accesses(tree: ast.AST) -> list[tuple[str, int]]:
    """(name, line) of every private attribute the module takes from an object other than ``self`` / ``cls``:
    ``obj._name`` and ``getattr(obj, "_name")`` (``hasattr``, ``setattr``, ``delattr`` too)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            owner, name = node.value, node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and private(node.args[1].value)):
            owner, name = node.args[0], node.args[1].value
        else:
            continue
        if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
            out.append((name, node.lineno))
    return out


def private_attribute_violations(root: Path) -> list[str]:
    """``module line N: ._name (defined in other.module)`` for every private attribute a module of the package
    takes from another module's objects: the name is defined by some other module of the package and not by
    this one. (A module's own private names, on whatever object, are its own business; private names of other
    libraries' objects, e.g. ``torch._C``, are outside this rule.)"""
    trees = {m: ast.parse(p.read_text(encoding="utf-8")) for m, p in modules_of(root).items()}
    defined = {m: {n for n in defined_names(t) if private(n)} for m, t in trees.items()}
    bad = []
    for m, tree in trees.items():
        for name, line in sorted(set(private_accesses(tree)), key=lambda x: (x[1], x[0])):
            owners = sorted(o for o, names in defined.items() if o != m and name in names)
            if owners and name not in defined[m]:
                bad.append(f"{m} line {line}: .{name} (defined in {', '.join(owners)})")
    return bad


def test_no_private_attribute_of_another_modules_objects():
    """``store._mapped(...)`` in another module reaches into GradientStore's internals: give what others
    need a public name instead."""
    bad = private_attribute_violations(SRC)
    assert not bad, bad


def test_the_checks_see_a_type_only_cycle_and_a_private_attribute(tmp_path):
    """The checks above can fail: a toy package whose two modules import each other, one side under
    ``if TYPE_CHECKING:``, and whose third module calls another module's private method."""
    pkg = tmp_path / "toy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "reader.py").write_text(
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from toy.store import Store\n"
        "class Reader:\n"
        "    def __init__(self, store: Store):\n"
        "        self.store = store\n"
        "    def read(self):\n"
        "        return self.store._raw()\n"
        "    def _own(self):\n"
        "        return self._helper, other._own\n"  # self, and a name this module defines: allowed
    )
    (pkg / "store.py").write_text(
        "from toy.reader import Reader\n"
        "class Store:\n"
        "    def _raw(self):\n"
        "        return getattr(Reader(self), '_secret', None)\n"
        "    def reader(self):\n"
        "        return Reader(self)\n"
    )
    (pkg / "user.py").write_text("import torch\nfrom toy.store import Store\nx = Store()._raw(), torch._C\n")
    assert find_cycle(import_graph(pkg, type_only=False)) is None  # the import that runs alone: no cycle
    assert find_cycle(import_graph(pkg, type_only=True)) == ["toy.reader", "toy.store", "toy.reader"]
    assert private_attribute_violations(pkg) == [
        "toy.reader line 9: ._raw (defined in toy.store)",
        "toy.user line 3: ._raw (defined in toy.store)",
    ]


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
