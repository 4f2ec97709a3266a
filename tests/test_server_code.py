"""The server package's own code: every public function says what it does, and none is dead."""

from __future__ import annotations

import ast
from pathlib import Path

import byok_plugin.server

ROOT = Path(__file__).resolve().parents[1] / "byok_plugin"
SERVER = ROOT / "server"

Function = ast.FunctionDef | ast.AsyncFunctionDef


def _public_definitions(tree: ast.Module) -> list[tuple[str, ast.AST]]:
    """Module-level public functions and classes, and the public methods of public classes."""
    found: list[tuple[str, ast.AST]] = []
    for node in tree.body:
        if isinstance(node, Function | ast.ClassDef) and not node.name.startswith("_"):
            found.append((node.name, node))
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for member in node.body:
                if isinstance(member, Function) and not member.name.startswith("_"):
                    found.append((f"{node.name}.{member.name}", member))
    return found


def test_every_public_function_of_the_server_package_has_a_docstring() -> None:
    missing = [
        f"{path.name}:{node.lineno} {name}"  # type: ignore[attr-defined]
        for path in sorted(SERVER.glob("*.py"))
        for name, node in _public_definitions(ast.parse(path.read_text(encoding="utf-8")))
        if not ast.get_docstring(node)  # type: ignore[arg-type]
    ]
    assert missing == []


def _imported_names(tree: ast.Module, module: str) -> set[str]:
    """The names ``tree`` imports from ``module`` (or from the ``byok_plugin.server`` package)."""
    return {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module in (module, "byok_plugin.server")
        for alias in node.names
    }


def test_every_module_level_function_of_the_server_package_is_used() -> None:
    """A public function that its own module never calls, that no module imports, and that the
    package does not export, is dead code."""
    trees = {
        path: ast.parse(path.read_text(encoding="utf-8"))
        for path in [*ROOT.rglob("*.py"), *ROOT.parent.joinpath("tests").rglob("*.py")]
        if "__pycache__" not in path.parts
    }
    exported = set(byok_plugin.server.__all__)
    dead = []
    for path in sorted(SERVER.glob("*.py")):
        module = f"byok_plugin.server.{path.stem}"
        tree = trees[path]
        for node in tree.body:
            if not isinstance(node, Function) or node.name.startswith("_"):
                continue
            used_here = any(isinstance(n, ast.Name) and n.id == node.name for n in ast.walk(tree))
            imported = any(
                node.name in _imported_names(other_tree, module)
                for other, other_tree in trees.items()
                if other != path
            )
            if node.name not in exported and not used_here and not imported:
                dead.append(f"{path.name}:{node.lineno} {node.name}")
    assert dead == []
