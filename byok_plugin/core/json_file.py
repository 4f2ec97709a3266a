"""Reading an operator's JSON file (``BYOK_PRICE_FILE``, ``BYOK_CATALOG_FILE``) safely.

Whatever the file is, the answer is its document or one :class:`JsonFileError` whose one-line
message names the file and, where the fault is in the document, its JSON path: never a traceback.

- only a regular file is read (a directory, ``/dev/zero`` or a FIFO is refused before reading), and
  at most :data:`MAX_BYTES` of it;
- it must be UTF-8 JSON; ``NaN``, ``Infinity`` and ``-Infinity`` (which Python's ``json`` accepts)
  are refused at their JSON path;
- nesting deeper than :data:`MAX_DEPTH` is refused at its JSON path (neither the decoder nor the
  code reading the document recurses without bound).

Numbers with a fraction are read as :class:`~decimal.Decimal` when asked (prices: never a float).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_BYTES",
    "MAX_DEPTH",
    "JsonFileError",
    "json_path",
    "printable_text",
    "read_json_file",
]

#: LiteLLM's whole price map is about 1.5 MB; ten times more than any price or catalog file needs
MAX_BYTES = 16 * 1024 * 1024
#: a price or catalog document is 4 levels deep; LiteLLM's map 5
MAX_DEPTH = 32


class JsonFileError(ValueError):
    """An operator's JSON file cannot be used; the message names it (and the JSON path)."""


def printable_text(text: str) -> str:
    """``text`` with each character that is not printable (a control character, a line break, a
    bidi override) written ``\\uXXXX``: a message quoting a file's keys stays one line that a
    terminal shows as it is."""
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


def json_path(parent: str, key: str | int) -> str:
    """``$`` then ``.key`` or ``[index]`` (keys as they are: ``models.openai/gpt-4o``)."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return key if parent == "$" else f"{parent}.{key}"


class _NotANumber(Exception):
    def __init__(self, name: str) -> None:
        self.name = name


def _refuse_constant(name: str) -> Any:
    raise _NotANumber(name)


def read_json_file(
    path: Path, what: str, *, parse_float: Callable[[str], Any] | None = None
) -> tuple[bytes, Any]:
    """The file's bytes and its JSON document.

    :param what: how messages name the file: ``prices``, ``catalog``.
    :raises JsonFileError: it is missing, unreadable, not a regular file, too large, not UTF-8
        JSON, holds NaN or Infinity, or is nested deeper than :data:`MAX_DEPTH`.
    """

    def fail(detail: str) -> JsonFileError:
        return JsonFileError(printable_text(f"{what} {path}: {detail}"))

    not_regular = "is not a regular file (a directory, device or pipe cannot be read)"
    try:
        # before opening too: opening a FIFO would wait for a writer
        if path.is_dir():
            raise fail("is a directory, not a JSON file")
        if path.exists() and not path.is_file():
            raise fail(not_regular)
        with path.open("rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise fail(not_regular)
            raw = handle.read(MAX_BYTES + 1)
    except IsADirectoryError:
        raise fail("is a directory, not a JSON file") from None
    except OSError as exc:
        raise fail(f"cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_BYTES:
        raise fail(f"is larger than {MAX_BYTES // (1024 * 1024)} MB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"not valid JSON (not UTF-8 text at byte {exc.start})") from None
    try:
        data = json.loads(text, parse_float=parse_float, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise fail(f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except _NotANumber as exc:
        raise fail(
            f"{_where_constant(text, exc.name)}: {exc.name} is not a number JSON allows"
        ) from None
    except RecursionError:
        raise fail(f"not valid JSON (nested deeper than {MAX_DEPTH} levels)") from None
    _check_depth(data, fail)
    return raw, data


def _check_depth(data: Any, fail: Callable[[str], JsonFileError]) -> None:
    stack: list[tuple[Any, str, int]] = [(data, "$", 1)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, dict):
            items: Any = value.items()
        elif isinstance(value, list):
            items = enumerate(value)
        else:
            continue
        if depth > MAX_DEPTH:
            raise fail(f"{where}: nested deeper than {MAX_DEPTH} levels")
        for key, item in items:
            if isinstance(item, dict | list):
                stack.append((item, json_path(where, key), depth + 1))


def _where_constant(text: str, name: str) -> str:
    """The JSON path of the first ``NaN``/``Infinity`` in ``text`` (decoded again, with the
    constants as markers, which cannot fail: the text parsed up to them)."""
    marker = object()
    try:
        data = json.loads(text, parse_constant=lambda _name: marker)
    except (ValueError, RecursionError):
        return "$"
    stack: list[tuple[Any, str]] = [(data, "$")]
    while stack:
        value, where = stack.pop(0)
        if value is marker:
            return where
        if isinstance(value, dict):
            stack.extend((item, json_path(where, key)) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((item, json_path(where, i)) for i, item in enumerate(value))
    return "$"
