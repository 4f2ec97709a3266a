"""The one way a ``--json`` output is written: an object whose ``"version"`` says its format.

Every ``--json`` document is a JSON object with ``"version": JSON_VERSION`` first; a list (keys,
budgets, plugins) sits under a named field. The version goes up when a field is removed, renamed
or changes meaning; new fields may appear in any version. docs/cli_json.md describes each one.
"""

from __future__ import annotations

import json
import re
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


#: what json.dumps writes as it is and a terminal acts on: DEL, C1 controls, line and paragraph
#: separators, bidi controls, lone surrogates (json escapes the C0 controls itself)
_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def echo_json(document: Mapping[str, Any], *, indent: int | None = 2) -> None:
    """Print ``document``, versioned, on standard output (non-ASCII text as it is, but for the
    characters a terminal would act on, written ``\\u009b``: the same JSON value)."""
    text = json.dumps(versioned(document), indent=indent, ensure_ascii=False)
    click.echo(_UNSAFE.sub(lambda match: f"\\u{ord(match.group()):04x}", text))
