"""The one way a ``--json`` output is written: an object whose ``"version"`` says its format.

Every ``--json`` document is a JSON object with ``"version": JSON_VERSION`` first; a list (keys,
budgets, plugins) sits under a named field. The version goes up when a field is removed, renamed
or changes meaning; new fields may appear in any version. docs/cli_json.md describes each one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import click

__all__ = ["JSON_VERSION", "echo_json", "versioned"]

#: the format of every ``--json`` document the CLI prints
JSON_VERSION = 1


def versioned(document: Mapping[str, Any]) -> dict[str, Any]:
    """``document`` with ``"version"`` first; a document's own ``version`` field is a mistake."""
    if "version" in document:
        raise ValueError("a --json document has its own 'version' field")
    return {"version": JSON_VERSION, **document}


def echo_json(document: Mapping[str, Any], *, indent: int | None = 2) -> None:
    """Print ``document``, versioned, on standard output (non-ASCII text as it is)."""
    click.echo(json.dumps(versioned(document), indent=indent, ensure_ascii=False))
