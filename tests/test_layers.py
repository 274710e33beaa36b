"""The package's layers: no module imports one above it, type-only imports included.

Top to bottom (docs/design.md, "The tree"): cli, process, service, api, delivery / auth / node,
ingest, http / store, foundation. A module may import its own package and any layer below its
own; packages that share a layer never import each other; http/ imports nothing but itself.
Every import statement counts, wherever it stands: at the top, under `if TYPE_CHECKING`, or
inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "incrementer"

LAYERS = [
    {"__main__"},  # python -m incrementer
    {"cli"},
    {"process"},
    {"service"},
    {"api"},
    {"delivery", "auth", "node"},
    {"ingest"},
    {"http", "store"},
    {"foundation"},
]
FOUNDATION = {"config", "logs", "metrics", "build", "faults", "urls", "periods", "__init__"}
ISOLATED = {"http"}
"""Packages that import nothing else from incrementer, not even the foundation."""


def unit_of(module: str) -> str:
    """The layer unit a dotted module name (without `incrementer.`) belongs to."""
    head = module.split(".", 1)[0]
    return "foundation" if head in FOUNDATION or not head else head


def rank(unit: str) -> int:
    for index, layer in enumerate(LAYERS):
        if unit in layer:
            return index
    raise AssertionError(f"{unit!r} is in no layer: add it to LAYERS (and docs/design.md)")


def imports_of(path: Path, package_root: Path) -> list[tuple[int, str]]:
    """(line, imported module without `incrementer.`) for every import of the package in path."""
    tree = ast.parse(path.read_text(), str(path))
    here = path.relative_to(package_root).with_suffix("").parts
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = ".".join(here[: len(here) - node.level])
                names = [f"incrementer.{base}.{node.module or ''}".rstrip(".")]
            else:
                names = [node.module or ""]
            if names[0] in ("incrementer", "incrementer."):  # from incrementer import x, y
                names = [f"incrementer.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "incrementer" or name.startswith("incrementer."):
                found.append((node.lineno, name.removeprefix("incrementer").lstrip(".")))
    return sorted(found)


def violations(package_root: Path) -> list[str]:
    found = []
    for path in sorted(package_root.rglob("*.py")):
        relative = path.relative_to(package_root)
        if relative.parts[0] == "store" and "migrations" in relative.parts:
            continue  # yoyo's steps, loaded by path
        unit = unit_of(".".join(relative.with_suffix("").parts))
        for line, target in imports_of(path, package_root):
            to = unit_of(target)
            if to == unit:
                continue
            where = f"{relative}:{line} imports incrementer.{target}"
            if unit in ISOLATED:
                found.append(f"{where}: {unit}/ imports nothing else from the package")
            elif rank(to) <= rank(unit):
                found.append(f"{where}: {to} is not below {unit}")
    return found


def test_no_module_imports_a_layer_above_it() -> None:
    """Every import in src/incrementer points down the layers (or stays in its own package)."""
    assert violations(PACKAGE) == []


def test_every_module_belongs_to_a_layer() -> None:
    """A new top-level module or package must be placed in a layer before it can be used."""
    for entry in PACKAGE.iterdir():
        if entry.name.startswith((".", "_")) and entry.name not in ("__init__.py", "__main__.py"):
            continue
        if entry.is_dir() and (entry / "__init__.py").exists():
            rank(entry.name)
        elif entry.suffix == ".py":
            rank(unit_of(entry.stem))


def test_the_check_catches_upward_and_type_only_imports(tmp_path: Path) -> None:
    """A planted upward import is reported wherever it stands, an import under TYPE_CHECKING
    and one inside a function included, as is http/ reaching the foundation."""
    root = tmp_path / "incrementer"
    for package in ("http", "ingest", "api"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "config.py").write_text("")
    (root / "http" / "server.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from incrementer.api.handler import App\n"
        "from incrementer import config\n"
    )
    (root / "ingest" / "intake.py").write_text("def later():\n    import incrementer.api.handler\n")
    (root / "api" / "handler.py").write_text(
        "from incrementer.ingest import intake\nfrom incrementer.http import server\n"
    )
    found = violations(root)
    assert sorted(found) == [
        "http/server.py:3 imports incrementer.api.handler: http/ imports nothing else from the package",
        "http/server.py:4 imports incrementer.config: http/ imports nothing else from the package",
        "ingest/intake.py:2 imports incrementer.api.handler: api is not below ingest",
    ]


DESIGN = PACKAGE.parent.parent / "docs" / "design.md"


def listed_in_design() -> list[str]:
    """The paths named in the first column of docs/design.md's module table."""
    text = DESIGN.read_text()
    table = text[text.index("## Modules") :].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    return [name.strip("`") for row in rows for name in row.split("|")[1].strip().split(", ")]


def test_design_lists_every_module_and_nothing_stale() -> None:
    """docs/design.md's module table names each module of the package once, and only those."""
    listed = listed_in_design()
    modules = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*")
        if path.suffix in (".py", ".html", ".json")
        and path.name not in ("__init__.py", "__main__.py")
        and "migrations" not in path.parts
    }
    directories = {name for name in listed if name.endswith("/")}
    assert all((PACKAGE / name).is_dir() for name in directories), directories
    files = [name for name in listed if not name.endswith("/")]
    assert sorted(files) == sorted(set(files)), "a module is listed twice"
    assert sorted(set(files) - modules) == [], "listed, but not in the tree"
    assert sorted(modules - set(files)) == [], "in the tree, but not listed"
