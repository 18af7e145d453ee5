"""The package's shape, read from its source: who imports what, what each module exports, and
which modules are long. These rules keep the room for each change findable
(docs/architecture.md draws the result)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = SRC / "avatarkit"
#: a module longer than this says in its docstring why it is one module
LONG_MODULE_LINES = 700
LONG_MODULE_REASON = "Why one module:"


@dataclass(frozen=True)
class Import:
    module: str          # the importing module
    target: str          # the module imported (or the module a name is imported from)
    name: str | None     # the name imported from ``target`` (None for ``import target``)
    lazy: bool           # inside a function
    type_only: bool      # under ``if TYPE_CHECKING:``
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def package_of(module: str) -> str:
    """``avatarkit.X`` for modules of a subpackage ``X``; ``avatarkit`` for top-level ones."""
    parts = module.split(".")
    if len(parts) > 1 and (ROOT / parts[1]).is_dir():
        return ".".join(parts[:2])
    return "avatarkit"


def imports_of(module: str) -> Iterator[Import]:
    path = modules()[module]
    tree = ast.parse(path.read_text())
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]

    def visit(node: ast.AST, *, lazy: bool, type_only: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            child_type_only = type_only or (isinstance(child, ast.If)
                                            and "TYPE_CHECKING" in ast.unparse(child.test))
            child_lazy = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    parts = base[: len(base) - child.level + 1]
                    target = ".".join([*parts, *([child.module] if child.module else [])])
                else:
                    target = child.module or ""
                for alias in child.names:
                    if target.startswith("avatarkit"):
                        yield Import(module, target, alias.name, lazy, type_only, child.lineno)
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("avatarkit"):
                        yield Import(module, alias.name, None, lazy, type_only, child.lineno)
            yield from visit(child, lazy=child_lazy, type_only=child_type_only)

    yield from visit(tree, lazy=False, type_only=False)


def imported_module(imp: Import) -> str:
    """The module an import loads: ``from a import b`` loads ``a.b`` when that is a module."""
    if imp.name is not None and f"{imp.target}.{imp.name}" in modules():
        return f"{imp.target}.{imp.name}"
    return imp.target


def all_imports() -> Iterator[Import]:
    for module in modules():
        yield from imports_of(module)


def private(dotted: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__")
               for part in dotted.split(".")[1:])


def test_no_module_imports_a_private_name_of_another_package() -> None:
    offences = []
    for imp in all_imports():
        target = imported_module(imp)
        if package_of(target) == package_of(imp.module):
            continue
        dotted = target if imp.name is None or target.endswith(f".{imp.name}") \
            else f"{target}.{imp.name}"
        if private(dotted):
            offences.append(f"{imp.module}:{imp.line} imports {dotted}")
    assert offences == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def test_no_import_cycles_between_modules() -> None:
    """Counting imports inside functions too (only ``TYPE_CHECKING`` ones are left out): a
    module never needs, even late, a module that needs it. (A submodule importing its own
    package is not a cycle: the package is loaded first anyway.)"""
    graph: dict[str, set[str]] = {m: set() for m in modules()}
    for imp in all_imports():
        if imp.type_only:
            continue
        target = imported_module(imp)
        parts = target.split(".")
        for i in range(2, len(parts) + 1):  # importing a.b.c loads a.b too
            loaded = ".".join(parts[:i])
            if loaded in modules() and loaded != imp.module \
                    and not imp.module.startswith(loaded + "."):
                graph[imp.module].add(loaded)
    assert _cycles(graph) == []


def _targets(package: str) -> set[str]:
    return {imported_module(imp) for imp in all_imports()
            if package_of(imp.module) == f"avatarkit.{package}"}


def test_the_local_engine_is_a_leaf() -> None:
    """The engine needs nothing of the SDK but its errors and media types: the server,
    the offline render, consent and disclosure are built on it, not in it."""
    outside = {t for t in _targets("local_engine")
               if not t.startswith("avatarkit.local_engine")}
    assert outside <= {"avatarkit.errors", "avatarkit.media"}


def test_transports_do_not_import_the_engine() -> None:
    assert {t for t in _targets("transport") if t.startswith("avatarkit.local_engine")} == set()


@pytest.mark.parametrize("package", ["routing", "metering", "consent", "session"])
def test_the_provider_contract_comes_from_the_core(package: str) -> None:
    """Routing, metering, consent and sessions depend on ``avatarkit.contract``, never on the
    adapters' package."""
    assert {t for t in _targets(package) if t.startswith("avatarkit.providers")} == set()


def test_sessions_get_services_not_the_kit() -> None:
    assert {t for t in _targets("session") if t == "avatarkit.kit"} == set()


def test_long_modules_say_why_they_are_one_module() -> None:
    unexplained = []
    for module, path in modules().items():
        lines = path.read_text().count("\n")
        if lines <= LONG_MODULE_LINES:
            continue
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if LONG_MODULE_REASON not in docstring:
            unexplained.append(f"{module} ({lines} lines)")
    assert unexplained == []


def isort_key(name: str) -> tuple[int, str]:
    """The order ruff's RUF022 keeps ``__all__`` in: CONSTANTS, then Classes, then the rest."""
    if name.isupper() or (name.upper() == name and not name.startswith("__")):
        return 0, name
    return (1 if name[:1].isupper() else 2), name


def _exports(path: Path) -> tuple[list[str] | None, set[str], set[str]]:
    """(``__all__``, public names defined here, names imported here)."""
    tree = ast.parse(path.read_text())
    declared: list[str] | None = None
    defined: set[str] = set()
    imported: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id == "__all__":
                    assert isinstance(node.value, ast.List | ast.Tuple)
                    declared = [ast.literal_eval(e) for e in node.value.elts]
                elif isinstance(target, ast.Name):
                    defined.add(target.id)
                elif isinstance(target, ast.Tuple):
                    defined.update(e.id for e in target.elts if isinstance(e, ast.Name))
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                name = alias.asname or alias.name
                imported.add(name)
                # a package re-exports what it imports from its own modules (not submodules)
                if package is not None and node.level == 1 and node.module \
                        and f"{package}.{name}" not in modules():
                    defined.add(name)
    public = {n for n in defined if not n.startswith("_") and n != "logger"}
    return declared, public, imported


@pytest.mark.parametrize("module", sorted(m for m, p in modules().items()
                                          if p.name != "__main__.py"))
def test_every_module_exports_exactly_its_public_names_sorted(module: str) -> None:
    """``__all__`` lists every public name the module defines (a name meant for the module
    alone starts with ``_``), only names the module has, in sorted order."""
    declared, public, imported = _exports(modules()[module])
    if declared is None:
        assert public == set(), "public names but no __all__"
        return
    assert set(declared) >= public, f"public but not in __all__: {sorted(public - set(declared))}"
    unknown = set(declared) - public - imported - {"__version__"}
    assert unknown == set(), f"in __all__ but not in the module: {sorted(unknown)}"
    assert len(declared) == len(set(declared))
    assert declared == sorted(declared, key=isort_key), "__all__ is not sorted"


def test_the_package_exports_exactly_what_it_declares() -> None:
    import avatarkit

    assert avatarkit.__all__ == sorted(avatarkit.__all__, key=isort_key)
    missing = [n for n in avatarkit.__all__ if not hasattr(avatarkit, n)]
    assert missing == []
    public = {n for n in vars(avatarkit) if not n.startswith("_")}
    # what `avatarkit` holds beyond __all__ is its subpackages, loaded on import
    extra = {n for n in public - set(avatarkit.__all__)
             if f"avatarkit.{n}" not in modules()}
    assert extra == set()
