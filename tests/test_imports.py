"""The library's imports: free of Prefect (and of slow imports) so it can be used and tested alone, and
laid out so that the folders show the architecture.

The layout rules are checked on the source, by parsing every module of ``longitudinal/`` (imports at any
depth: inside functions and under ``if TYPE_CHECKING:`` too, which is where cycles used to hide):

- no import cycle between the library's modules;
- no module imports another module's ``_private`` name, nor uses one as an attribute of a module it
  imported: a shared kernel moves down into a module of its own and becomes public;
- the sub-packages are in pipeline order, ``data`` → ``model`` → ``fit`` → ``inference`` → ``reporting``: a
  later package may import an earlier one, never the reverse; ``errors``, ``config`` and ``records`` are the
  edges every package may import, and they import no package;
- at most ``MAX_TOP_LEVEL_MODULES`` modules side by side at the top of the library;
- the library never imports prefect.

Each rule is a function over a package folder, so the tests at the end can show that each one fails on a
small package that breaks it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import longitudinal

LIBRARY = Path(longitudinal.__file__).resolve().parent

#: The sub-packages in pipeline order: a package may import those before it, never those after it.
PACKAGE_ORDER = ("data", "model", "fit", "inference", "reporting")
#: Top-level modules every package may import; they import no package themselves.
EDGES = ("errors", "config", "records")
MAX_TOP_LEVEL_MODULES = 8


# ------------------------------------------------------------------------------------- the import graph


@dataclass(frozen=True)
class Import:
    """One import in module ``source`` (line ``line``) of module ``target``, naming ``names`` from it
    (empty for ``import x``), and the attributes of the imported module ``source`` reads (``x.attr``)."""

    source: str
    target: str
    line: int
    names: tuple[str, ...]


def module_names(package: Path) -> dict[str, Path]:
    """Dotted name -> file for every module of the package folder (``__init__.py`` is the package itself)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = (package.name, *path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(package: Path) -> list[Import]:
    """Every import of a module of the package by another, at any depth of the syntax tree; ``from p import
    m`` with ``m`` a module counts as an import of ``p.m``; attribute reads ``alias._name`` on an imported
    module are recorded as names too."""
    modules = module_names(package)
    found: list[Import] = []
    for source, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        aliases: dict[str, str] = {}  # local name -> module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules and alias.name != source:
                        found.append(Import(source, alias.name, node.lineno, ()))
                        aliases[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, source, is_package)
                if base not in modules:
                    continue
                plain = []
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    if submodule in modules:
                        found.append(Import(source, submodule, node.lineno, ()))
                        aliases[alias.asname or alias.name] = submodule
                    else:
                        plain.append(alias.name)
                if plain and base != source:
                    found.append(Import(source, base, node.lineno, tuple(plain)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                found.append(Import(source, aliases[node.value.id], node.lineno, (node.attr,)))
    return found


def _absolute(node: ast.ImportFrom, source: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = source.split(".")
    anchor = parts if is_package else parts[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join([*anchor, *([node.module] if node.module else [])])


# ------------------------------------------------------------------------------------------- the rules


def cycles(package: Path) -> list[list[str]]:
    """The import cycles between the package's modules (one per strongly connected component)."""
    graph: dict[str, set[str]] = {name: set() for name in module_names(package)}
    for imp in imports_of(package):
        graph[imp.source].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return out


def private_imports(package: Path) -> list[str]:
    """Uses of another module's ``_private`` names: ``from m import _x`` or ``m._x``."""
    return [
        f"{imp.source} (line {imp.line}) uses {imp.target}.{name}"
        for imp in imports_of(package)
        for name in imp.names
        if name.startswith("_") and not name.startswith("__")
    ]


def _rank(module: str) -> tuple[str, int | None]:
    """('package', position) for a module of a sub-package, ('edge', None) for an edge module, else ('top', None)."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in PACKAGE_ORDER:
        return "package", PACKAGE_ORDER.index(parts[1])
    if len(parts) > 1 and parts[1] in EDGES:
        return "edge", None
    return "top", None


def order_violations(package: Path) -> list[str]:
    """Imports against the pipeline order: an earlier package importing a later one, or an edge module
    (errors, config, records) importing a package or a top-level module other than an edge."""
    out = []
    for imp in imports_of(package):
        kind, rank = _rank(imp.source)
        target_kind, target_rank = _rank(imp.target)
        if kind == "package" and target_kind == "package" and target_rank is not None and rank is not None:
            if target_rank > rank:
                out.append(f"{imp.source} (line {imp.line}) imports the later package {imp.target}")
        elif kind == "package" and target_kind == "top" and imp.target != package.name:
            out.append(f"{imp.source} (line {imp.line}) imports the top-level {imp.target}, which no package may")
        elif kind == "edge" and target_kind != "edge":
            out.append(f"the edge module {imp.source} (line {imp.line}) imports {imp.target}")
    return out


def top_level_modules(package: Path) -> list[str]:
    return sorted(path.name for path in package.glob("*.py"))


def prefect_imports(package: Path) -> list[str]:
    """Every import of prefect (at any depth) in the package's source."""
    out = []
    for name, path in module_names(package).items():
        for node in ast.walk(ast.parse(path.read_text())):
            modules = (
                [alias.name for alias in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            )
            out += [f"{name} (line {node.lineno}) imports {m}" for m in modules if m.split(".")[0] == "prefect"]
    return out


# ----------------------------------------------------------------------------------- the library's tests


def test_the_library_has_no_import_cycle() -> None:
    assert cycles(LIBRARY) == []


def test_no_module_uses_another_modules_private_names() -> None:
    assert private_imports(LIBRARY) == []


def test_imports_follow_the_pipeline_order_of_the_packages() -> None:
    assert sorted(p.name for p in LIBRARY.iterdir() if (p / "__init__.py").is_file()) == sorted(PACKAGE_ORDER)
    assert order_violations(LIBRARY) == []


def test_the_top_level_of_the_library_stays_small() -> None:
    modules = top_level_modules(LIBRARY)
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, modules


def test_the_library_source_never_imports_prefect() -> None:
    assert prefect_imports(LIBRARY) == []


def _imported_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_library_never_imports_prefect() -> None:
    modules = _imported_after("\n".join(f"import {m}" for m in module_names(LIBRARY)))
    assert not {m for m in modules if m == "prefect" or m.startswith("prefect.")}


def test_great_expectations_is_imported_lazily() -> None:
    modules = _imported_after("import longitudinal.data.validation, longitudinal.data.ingest")
    assert "great_expectations" not in modules


# ------------------------------------------------------------------ each rule fails on a package breaking it


def _package(root: Path, files: dict[str, str]) -> Path:
    """A package ``lib`` under ``root`` with the given modules (paths relative to it) and an __init__ per folder."""
    package = root / "lib"
    for relative, text in {"__init__.py": "", **files}.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(text)
    return package


def test_a_cycle_hidden_in_a_function_level_import_is_found(tmp_path: Path) -> None:
    package = _package(tmp_path, {
        "fit/one.py": "from lib.fit.two import b\n",
        "fit/two.py": "def b():\n    from lib.fit.one import a\n",
    })
    assert cycles(package) == [["lib.fit.one", "lib.fit.two"]]


def test_a_private_name_imported_or_read_from_another_module_is_found(tmp_path: Path) -> None:
    package = _package(tmp_path, {
        "fit/kernels.py": "_LOG_2PI = 1.8\n",
        "fit/one.py": "from lib.fit.kernels import _LOG_2PI\n",
        "fit/two.py": "from lib.fit import kernels\nx = kernels._LOG_2PI\n",
    })
    assert private_imports(package) == [
        "lib.fit.one (line 1) uses lib.fit.kernels._LOG_2PI", "lib.fit.two (line 2) uses lib.fit.kernels._LOG_2PI",
    ]


def test_an_import_against_the_pipeline_order_is_found(tmp_path: Path) -> None:
    package = _package(tmp_path, {
        "records.py": "from lib.fit.candidate import Fit\n",
        "fit/candidate.py": "def f():\n    from lib.inference.criteria import select_model\n",
        "inference/criteria.py": "from lib.fit.candidate import Fit\nfrom lib.records import Fit\n",
    })
    assert order_violations(package) == [
        "lib.fit.candidate (line 2) imports the later package lib.inference.criteria",
        "the edge module lib.records (line 1) imports lib.fit.candidate",
    ]


def test_too_many_top_level_modules_are_counted(tmp_path: Path) -> None:
    package = _package(tmp_path, {f"m{i}.py": "" for i in range(MAX_TOP_LEVEL_MODULES)})
    assert len(top_level_modules(package)) == MAX_TOP_LEVEL_MODULES + 1  # with __init__.py


def test_a_prefect_import_inside_a_function_is_found(tmp_path: Path) -> None:
    package = _package(tmp_path, {"reporting/html.py": "def f():\n    from prefect.logging import get_run_logger\n"})
    assert prefect_imports(package) == ["lib.reporting.html (line 2) imports prefect.logging"]
