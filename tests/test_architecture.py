"""The rooms of byok_plugin and the imports between them.

Each sub-package ("room") of ``byok_plugin`` says in its ``__init__`` docstring, on a
``May import:`` line, which other rooms and top-level modules its code may import; the top-level
modules (``app``, ``defaults``, ``manager``, ...) compose the rooms and may import any of them.
These tests fail on an import a room's rule forbids, on a cycle between rooms (or top-level
modules), and on a cycle between modules at import time. Imports under ``if TYPE_CHECKING:`` are
annotations only and are not counted. docs/architecture.md draws the rooms.

``byok_plugin/host`` is the reference host engine: it reaches the plugin only through the public
hook contract (``byok_hookspecs``), exactly as a third-party engine would.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "byok_plugin"
HOST = PACKAGE / "host"


@dataclass(frozen=True)
class Import:
    target: str  # dotted module (or package) name
    line: int
    module_level: bool  # runs when the module is imported (not inside a function)


def module_name(path: Path, package_root: Path) -> str:
    parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _children(node: ast.stmt) -> list[ast.stmt]:
    inner: list[ast.stmt] = []
    for name in ("body", "orelse", "finalbody"):
        value = getattr(node, name, None)
        if isinstance(value, list):
            inner += [n for n in value if isinstance(n, ast.stmt)]
    for handler in getattr(node, "handlers", []):
        inner += handler.body
    for case in getattr(node, "cases", []):
        inner += case.body
    return inner


def imports_of(path: Path, package_root: Path) -> Iterator[Import]:
    """The runtime imports of ``path`` (a module of the package at ``package_root``), resolved."""
    name = module_name(path, package_root)
    package_parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

    def walk(nodes: list[ast.stmt], module_level: bool) -> Iterator[Import]:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node):
                yield from walk(node.orelse, module_level)
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Import(alias.name, node.lineno, module_level)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    keep = len(package_parts) - (node.level - 1)
                    base = ".".join(package_parts[:keep]) if keep > 0 else ""
                    module = ".".join(p for p in (base, node.module or "") if p)
                else:
                    module = node.module or ""
                for alias in node.names:
                    # `from package import module` imports that module
                    sub = package_root.parent.joinpath(*f"{module}.{alias.name}".split("."))
                    is_module = sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file()
                    yield Import(
                        f"{module}.{alias.name}" if is_module else module, node.lineno, module_level
                    )
            # a function body runs later; a class, if, try, with or loop body runs on import
            inner_level = module_level and not isinstance(
                node, ast.FunctionDef | ast.AsyncFunctionDef
            )
            yield from walk(_children(node), inner_level)

    yield from walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body, True)


def rooms_of(package_root: Path) -> dict[str, str]:
    """Room name -> its ``__init__`` docstring."""
    return {
        init.parent.name: ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        for init in sorted(package_root.glob("*/__init__.py"))
    }


def rule_of(docstring: str) -> set[str] | None:
    """The names a room's ``May import:`` paragraph allows; ``{"*"}`` for anything; None if none."""
    match = re.search(r"^May import:(.*?)(?:\n\s*\n|\Z)", docstring, re.S | re.M)
    if match is None:
        return None
    text = match.group(1)
    if text.strip().startswith("anything"):
        return {"*"}
    return set(re.findall(r"\bbyok_plugin(?:\.\w+)?", text))


def unit_of(target: str) -> str:
    """The room (``byok_plugin.keys``) or top-level module (``byok_plugin.app``) of a module."""
    parts = target.split(".")
    return ".".join(parts[:2])


def boundary_problems(package_root: Path) -> list[str]:
    rooms = rooms_of(package_root)
    problems = []
    for room, docstring in rooms.items():
        allowed = rule_of(docstring)
        if allowed is None:
            problems.append(
                f"byok_plugin/{room}/__init__.py: the docstring has no 'May import:' line"
            )
            continue
        own = f"byok_plugin.{room}"
        for path in sorted((package_root / room).rglob("*.py")):
            for imp in imports_of(path, package_root):
                if imp.target != "byok_plugin" and not imp.target.startswith("byok_plugin."):
                    continue
                unit = unit_of(imp.target)
                if unit == own or "*" in allowed or unit in allowed:
                    continue
                problems.append(
                    f"{path.relative_to(package_root.parent)}:{imp.line} imports {imp.target}, "
                    f"which {own}'s 'May import:' rule does not allow"
                )
    return problems


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (as a closed path), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def import_graphs(package_root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(rooms and top-level modules -> what they import at all, module -> what it imports at
    import time), within the package."""
    units: dict[str, set[str]] = {}
    modules: dict[str, set[str]] = {}
    top = package_root.name
    for path in sorted(package_root.rglob("*.py")):
        name = module_name(path, package_root)
        unit = unit_of(name)
        for imp in imports_of(path, package_root):
            if imp.target != top and not imp.target.startswith(top + "."):
                continue
            target_unit = unit_of(imp.target)
            if target_unit != unit and top not in (unit, target_unit):
                units.setdefault(unit, set()).add(target_unit)
            if imp.module_level and imp.target != name:
                modules.setdefault(name, set()).add(imp.target)
    return units, modules


# --- the rules on byok_plugin itself


def test_every_room_states_what_it_may_import() -> None:
    rooms = rooms_of(PACKAGE)
    assert {"core", "keys", "billing", "resolution", "store", "host", "server", "cli"} <= set(rooms)
    assert [room for room, doc in rooms.items() if rule_of(doc) is None] == []


def test_no_room_imports_what_its_rule_forbids() -> None:
    assert boundary_problems(PACKAGE) == []


def test_no_cycle_between_rooms() -> None:
    units, _ = import_graphs(PACKAGE)
    assert find_cycle(units) is None


def test_no_cycle_between_modules_at_import_time() -> None:
    _, modules = import_graphs(PACKAGE)
    assert find_cycle(modules) is None


def forbidden_imports(path: Path, package_root: Path) -> list[str]:
    """The imports in ``path`` that reach ``byok_plugin`` outside ``byok_plugin.host``."""
    return [
        f"{path.relative_to(package_root.parent)}:{imp.line} imports {imp.target}"
        for imp in imports_of(path, package_root)
        if imp.target == "byok_plugin"
        or (imp.target.startswith("byok_plugin.") and not imp.target.startswith("byok_plugin.host"))
    ]


def test_host_imports_only_the_public_contract() -> None:
    files = sorted(HOST.rglob("*.py"))
    assert files, "byok_plugin/host has no modules"
    problems = [p for f in files for p in forbidden_imports(f, PACKAGE)]
    assert problems == []


# --- the checks themselves catch what they should


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        ("import byok_hookspecs", False),
        ("from byok_hookspecs import Usage", False),
        ("import httpx", False),
        ("from byok_plugin.host.providers import openai", False),
        ("from . import emulator", False),
        ("from byok_plugin import keys", True),
        ("import byok_plugin.store", True),
        ("from byok_plugin.billing.pricing import price", True),
        ("from .. import keys", True),
        ("from ..billing import price", True),
        ("from ...byok_plugin import x", True),
        ("def f():\n    from byok_plugin.store import engine", True),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from byok_plugin import app",
            False,
        ),
    ],
)
def test_the_host_rule_catches_a_forbidden_import(tmp_path: Path, source: str, flagged: bool):
    package = tmp_path / "byok_plugin"
    (package / "host").mkdir(parents=True)
    module = package / "host" / "runner.py"
    module.write_text(source + "\n")
    bad = forbidden_imports(module, package)
    assert bool(bad) is flagged, bad


def _package(tmp_path: Path, files: Mapping[str, str]) -> Path:
    package = tmp_path / "byok_plugin"
    for name, text in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


def test_a_room_importing_a_room_its_rule_omits_is_named(tmp_path: Path) -> None:
    package = _package(
        tmp_path,
        {
            "store/__init__.py": '"""Rows.\n\nMay import: byok_plugin.core.\n"""\n',
            "store/rows.py": "from byok_plugin.core.errors import Bad\n",
            "store/bad.py": "def f():\n    from byok_plugin.billing import ledger\n",
            "core/__init__.py": '"""Core.\n\nMay import: nothing.\n"""\n',
            "core/errors.py": "class Bad(Exception): ...\n",
            "billing/__init__.py": '"""Money.\n\nMay import: byok_plugin.store.\n"""\n',
            "billing/ledger.py": "from byok_plugin.store import rows\n",
        },
    )
    assert boundary_problems(package) == [
        "byok_plugin/store/bad.py:2 imports byok_plugin.billing.ledger, "
        "which byok_plugin.store's 'May import:' rule does not allow"
    ]


def test_a_room_without_a_rule_is_named(tmp_path: Path) -> None:
    package = _package(tmp_path, {"extra/__init__.py": '"""No rule here."""\n'})
    assert boundary_problems(package) == [
        "byok_plugin/extra/__init__.py: the docstring has no 'May import:' line"
    ]


def test_a_cycle_between_rooms_is_found_and_type_only_imports_are_not_counted(
    tmp_path: Path,
) -> None:
    package = _package(
        tmp_path,
        {
            "keys/__init__.py": "",
            "keys/service.py": "def f():\n    from byok_plugin.billing import ledger\n",
            "billing/__init__.py": "",
            "billing/ledger.py": "from byok_plugin.keys import service\n",
            "app.py": (
                "from typing import TYPE_CHECKING\nfrom byok_plugin.keys import service\n"
                "if TYPE_CHECKING:\n    from byok_plugin import defaults\n"
            ),
            "defaults.py": "from byok_plugin import app\n",
        },
    )
    units, modules = import_graphs(package)
    assert find_cycle(units) in (
        ["byok_plugin.billing", "byok_plugin.keys", "byok_plugin.billing"],
        ["byok_plugin.keys", "byok_plugin.billing", "byok_plugin.keys"],
    )
    # the keys -> billing import is inside a function: no cycle when the modules are imported
    assert find_cycle(modules) is None
    (package / "keys" / "service.py").write_text("from byok_plugin.billing import ledger\n")
    _, modules = import_graphs(package)
    assert find_cycle(modules) is not None
