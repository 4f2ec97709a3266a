"""byok_plugin/host reaches the plugin only through the public hook contract (byok_hookspecs)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOST = ROOT / "byok_plugin" / "host"


def forbidden_imports(path: Path, package_root: Path) -> list[str]:
    """The imports in ``path`` that reach ``byok_plugin`` outside ``byok_plugin.host``."""
    module_parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
    if module_parts[-1] == "__init__":
        module_parts = module_parts[:-1]
        package_parts = module_parts
    else:
        package_parts = module_parts[:-1]
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                if node.level - 1 > len(package_parts) - 1:
                    base = []
                target = ".".join([*base, node.module] if node.module else base)
                # `from .. import x` names modules too
                targets = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                targets = [node.module or ""]
        for target in targets:
            if target == "byok_plugin" or (
                target.startswith("byok_plugin.") and not target.startswith("byok_plugin.host")
            ):
                bad.append(
                    f"{path.relative_to(package_root.parent)}:{node.lineno} imports {target}"
                )
    return bad


def test_host_imports_only_the_public_contract() -> None:
    files = sorted(HOST.rglob("*.py"))
    assert files, "byok_plugin/host has no modules"
    problems = [p for f in files for p in forbidden_imports(f, ROOT / "byok_plugin")]
    assert problems == []


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
        ("from byok_plugin.pricing import price", True),
        ("from .. import keys", True),
        ("from ..pricing import price", True),
        ("from ...byok_plugin import x", True),
    ],
)
def test_the_rule_itself_catches_a_forbidden_import(tmp_path: Path, source: str, flagged: bool):
    package = tmp_path / "byok_plugin"
    (package / "host").mkdir(parents=True)
    module = package / "host" / "runner.py"
    module.write_text(source + "\n")
    bad = forbidden_imports(module, package)
    assert bool(bad) is flagged, bad
