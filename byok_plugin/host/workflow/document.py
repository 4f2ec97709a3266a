"""Reading a workflow document and checking it against the shipped JSON Schema (draft 2020-12).

jsonschema's own messages quote the offending value; ours do too for short plain values, but never
for anything under a ``key`` (where someone may have pasted a secret), and they name the JSON path
of the value, not of the schema.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

from byok_plugin.host.workflow.errors import Problem, WorkflowError, json_path

__all__ = [
    "MAX_BLOCKS",
    "MAX_EDGES",
    "MAX_INPUTS",
    "MAX_WORKFLOW_BYTES",
    "SCHEMA_RESOURCE",
    "read_document",
    "schema_problems",
    "workflow_schema",
]

SCHEMA_RESOURCE = "workflow.schema.json"
#: the largest workflow file (or text) read, as the operator's JSON files
#: (``byok_plugin.core.json_file.MAX_BYTES``)
MAX_WORKFLOW_BYTES = 16 * 1024 * 1024
#: the most blocks a workflow may have (the schema's ``maxProperties`` of ``blocks``)
MAX_BLOCKS = 1000
#: the most edges a workflow may have (the schema's ``maxItems`` of ``edges``)
MAX_EDGES = 10_000
#: the most inputs a workflow may declare (the schema's ``maxProperties`` of ``inputs``)
MAX_INPUTS = 1000

_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    type(None): "null",
}
_SCHEMA_TYPE_WORDS = {
    "object": "an object",
    "array": "an array",
    "string": "a string",
    "boolean": "true or false",
    "integer": "an integer",
    "number": "a number",
    "null": "null",
}
_KEY_HELP = (
    "a key is never written in a workflow file; name the workspace's stored key by its label: "
    '{"label": "my-team"}'
)


@cache
def workflow_schema() -> Mapping[str, Any]:
    """The shipped JSON Schema of the workflow format."""
    text = (
        resources.files("byok_plugin.host")
        .joinpath("schema", SCHEMA_RESOURCE)
        .read_text(encoding="utf-8")
    )
    schema: dict[str, Any] = json.loads(text)
    Draft202012Validator.check_schema(schema)
    return schema


def _end_of_text(pattern: str) -> str:
    """``pattern`` with each ``$`` anchor (not escaped, not in a ``[...]`` class) written ``\\Z``.

    JSON Schema patterns are ECMA-262 regular expressions, where ``$`` is the end of the text;
    Python's ``re`` also lets ``$`` match before a final newline, so ``^[a-z]+$`` would admit
    ``"default\\n"`` (a label, an env name, a block id with a newline at its end).
    """
    out: list[str] = []
    escaped = in_class = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "$":
            out.append("\\Z")
            continue
        out.append(char)
    return "".join(out)


@cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(_end_of_text(pattern))


def _pattern_keyword(
    validator: Any, pattern: str, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    """The ``pattern`` keyword with ECMA-262's ``$`` (see :func:`_end_of_text`)."""
    if validator.is_type(instance, "string") and _compiled(pattern).search(instance) is None:
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


_WorkflowValidator = validators.extend(Draft202012Validator, {"pattern": _pattern_keyword})


@cache
def _validator() -> Any:
    return _WorkflowValidator(workflow_schema())


class _Object(dict):  # type: ignore[type-arg]
    """A parsed JSON object that remembers the keys it saw twice (json keeps only the last)."""

    duplicates: tuple[str, ...] = ()


def _pairs(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    dups = []
    for key, value in pairs:
        if key in obj:
            dups.append(key)
        obj[key] = value
    if dups:
        obj.duplicates = tuple(dups)
    return obj


class _NonFinite(float):
    """``NaN``, ``Infinity`` or ``-Infinity``: Python's json reads them, JSON has no such numbers."""

    def __new__(cls, name: str) -> _NonFinite:
        obj = super().__new__(cls, name)
        obj.name = name
        return obj

    name: str


def _duplicate_problems(value: Any, parts: tuple[str | int, ...] = ()) -> Iterator[Problem]:
    """Keys given twice, and the non-numbers NaN and Infinity, with their JSON paths."""
    if isinstance(value, _NonFinite):
        yield Problem(json_path(parts), f"{value.name} is not a JSON number")
    if isinstance(value, dict):
        for key in getattr(value, "duplicates", ()):
            yield Problem(
                json_path((*parts, key)),
                "appears more than once in the same object (JSON keeps only the last one)",
            )
        for key, item in value.items():
            yield from _duplicate_problems(item, (*parts, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _duplicate_problems(item, (*parts, i))


def read_document(text: str | bytes, source: str = "<workflow>") -> Any:
    """Parse JSON text; a syntax error, a duplicated key or a text longer than
    :data:`MAX_WORKFLOW_BYTES` is a :class:`WorkflowError`."""
    if len(text) > MAX_WORKFLOW_BYTES:
        raise WorkflowError([_too_large()], source)
    try:
        document = json.loads(text, object_pairs_hook=_pairs, parse_constant=_NonFinite)
    except json.JSONDecodeError as exc:
        raise WorkflowError(
            [Problem("$", f"not valid JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}")],
            source,
        ) from None
    except (UnicodeDecodeError, RecursionError) as exc:
        raise WorkflowError(
            [Problem("$", f"cannot be read as JSON ({type(exc).__name__})")], source
        ) from None
    dups = list(_duplicate_problems(document))
    if dups:
        raise WorkflowError(dups, source)
    return document


def _too_large() -> Problem:
    return Problem("$", f"is larger than {MAX_WORKFLOW_BYTES // (1024 * 1024)} MB")


def read_file(path: Path) -> Any:
    """The document in ``path``: a regular file (a FIFO or a device is refused before it is
    read), at most :data:`MAX_WORKFLOW_BYTES` of it."""
    not_regular = "is not a regular file (a directory, device or pipe cannot be read)"
    try:
        # before opening too: opening a FIFO would wait for a writer
        if path.exists() and not path.is_file():
            raise WorkflowError([Problem("$", not_regular)], str(path))
        with path.open("rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise WorkflowError([Problem("$", not_regular)], str(path))
            raw = handle.read(MAX_WORKFLOW_BYTES + 1)
    except OSError as exc:
        raise WorkflowError(
            [Problem("$", f"cannot be read ({exc.strerror or exc})")], str(path)
        ) from None
    return read_document(raw, str(path))


def schema_problems(document: Any) -> list[Problem]:
    """Every way ``document`` fails the schema, one :class:`Problem` per offending value.

    A document with more blocks, edges or inputs than the schema allows (:data:`MAX_BLOCKS`,
    :data:`MAX_EDGES`, :data:`MAX_INPUTS`) is refused for that alone, before the rest is checked.
    """
    problems = _too_many(document)
    if problems:
        return problems
    for error in _validator().iter_errors(document):
        problems.extend(_translate(error))
    return sorted(set(problems))


def _too_many(document: Any) -> list[Problem]:
    if not isinstance(document, dict):
        return []
    problems = []
    for member, limit, noun in (
        ("blocks", MAX_BLOCKS, "blocks"),
        ("edges", MAX_EDGES, "edges"),
        ("inputs", MAX_INPUTS, "inputs"),
    ):
        value = document.get(member)
        if isinstance(value, dict | list) and len(value) > limit:
            problems.append(
                Problem(
                    json_path((member,)),
                    f"has {len(value)} {noun}; a workflow may have at most {limit}",
                )
            )
    return problems


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    if isinstance(value, bool | int | float) or value is None:
        return json.dumps(value)
    return (
        _JSON_TYPES.get(type(value), type(value).__name__)
        if not isinstance(value, dict)
        else "an object"
    )


def _kind_of(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _translate(error: ValidationError) -> Iterator[Problem]:
    parts = tuple(error.absolute_path)
    kind = error.validator
    value = error.instance
    if "propertyNames" in error.absolute_schema_path and isinstance(value, str):
        # a bad property *name*: jsonschema reports it at the object's path, we at the name's
        yield _bad_name(parts, value, kind)
        return
    path = json_path(parts)
    secret = any(p == "key" for p in parts)
    if secret and parts and parts[-1] == "key" and not isinstance(value, dict):
        yield Problem(path, _KEY_HELP)
        return
    shown = "the value" if secret else _show(value)

    if kind == "required":
        assert isinstance(value, dict)
        for name in error.validator_value:
            if name not in value:
                yield Problem(json_path((*parts, name)), "is required")
    elif kind == "additionalProperties":
        assert isinstance(value, dict)
        allowed = sorted((error.schema.get("properties") or {}).keys())
        for name in value:
            if name not in allowed:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = (
                    f"; did you mean {close[0]!r}?"
                    if close
                    else f" (allowed: {', '.join(allowed)})"
                )
                yield Problem(json_path((*parts, name)), f"is not a known property{hint}")
    elif kind == "type":
        wanted = error.validator_value
        words = (
            " or ".join(_SCHEMA_TYPE_WORDS.get(str(w), str(w)) for w in wanted)
            if isinstance(wanted, list)
            else _SCHEMA_TYPE_WORDS.get(wanted, wanted)
        )
        yield Problem(path, f"must be {words}, not {_kind_of(value)}")
    elif kind == "enum":
        options = ", ".join(json.dumps(o) for o in error.validator_value)
        what = "block type" if parts and parts[-1] == "type" and len(parts) == 3 else "value"
        close = (
            difflib.get_close_matches(
                value, [o for o in error.validator_value if isinstance(o, str)], n=1
            )
            if isinstance(value, str)
            else []
        )
        hint = f"; did you mean {close[0]!r}?" if close else ""
        yield Problem(path, f"unknown {what} {shown}: must be one of {options}{hint}")
    elif kind == "const":
        yield Problem(path, f"must be {json.dumps(error.validator_value)}, not {shown}")
    elif kind in {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}:
        bound = error.validator_value
        rel = {
            "minimum": "at least",
            "maximum": "at most",
            "exclusiveMinimum": "more than",
            "exclusiveMaximum": "less than",
        }[kind]
        yield Problem(path, f"must be {rel} {bound}, not {shown}")
    elif kind in {"minLength", "maxLength"}:
        n = error.validator_value
        if kind == "minLength":
            yield Problem(
                path, "must not be empty" if n == 1 else f"must be at least {n} characters"
            )
        else:
            yield Problem(path, f"must be at most {n} characters")
    elif kind in {"minItems", "maxItems", "minProperties", "maxProperties"}:
        n = error.validator_value
        noun = "item" if "Items" in kind else "entry"
        rel = "at least" if kind.startswith("min") else "at most"
        yield Problem(path, f"must have {rel} {n} {noun}{'s' if n != 1 else ''}")
    elif kind == "uniqueItems":
        yield Problem(path, "must not list the same item twice")
    elif kind == "pattern":
        yield Problem(path, f"{shown} has the wrong form{_pattern_help(parts)}")
    elif kind == "oneOf":
        yield Problem(path, _one_of_message(error))
    elif kind == "not" and error.validator_value == {"const": "inputs"}:
        yield Problem(path, "'inputs' is reserved for {{inputs.NAME}} references")
    else:
        yield Problem(path, f"is not valid ({kind})")
    # errors on a property *name* (propertyNames) carry the object's path and the name as instance
    return


def _bad_name(parts: tuple[str | int, ...], name: str, kind: str) -> Problem:
    path = json_path((*parts, name))
    what = {"blocks": "block id", "inputs": "input name", "fields": "field name"}.get(
        str(parts[-1]) if parts else "", "name"
    )
    if kind == "not":
        return Problem(
            path, "'inputs' is reserved for {{inputs.NAME}} references; use another block id"
        )
    return Problem(
        path,
        f"{_show(name)} is not a valid {what}: start with a letter, then letters, digits, _"
        + (" or -" if what == "block id" else "")
        + " (at most 64 characters)",
    )


def _pattern_help(parts: Sequence[str | int]) -> str:
    if tuple(parts) == ("name",):
        return (
            ": a workflow name is text without control characters, line breaks or "
            "bidirectional-text controls (it is the ledger's workflow id and is shown in terminals)"
        )
    if len(parts) == 3 and parts[0] == "blocks" and parts[-1] == "model":
        return (
            ": a model name is text without control characters, line breaks or "
            "bidirectional-text controls (it is recorded in the ledger and shown in terminals)"
        )
    if parts and parts[-1] == "label":
        return (
            ": a stored key's label (1 to 64 characters, no control characters, no space at "
            "either end)"
        )
    if parts and parts[-1] == "env":
        return ": an environment variable name (letters, digits and _, not starting with a digit)"
    if parts and parts[-1] == "version":
        return ": a version such as 1, 1.2 or 1.2.0"
    return ": start with a letter, then letters, digits, _ or -"


def _one_of_message(error: ValidationError) -> str:
    branches = error.validator_value
    keys = [
        b["required"][0] for b in branches if list(b) == ["required"] and len(b["required"]) == 1
    ]
    if len(keys) != len(branches) or not isinstance(error.instance, dict):
        return "does not match exactly one of the allowed forms"
    present = [k for k in keys if k in error.instance]
    options = ", ".join(keys)
    if not present:
        return f"needs one of: {options}"
    return f"has {', '.join(present)}: keep exactly one of {options}"
