"""Prompt templates: text with ``{{inputs.ticket}}`` and ``{{classify.content}}`` references.

A reference is ``inputs.NAME`` or ``BLOCK.FIELD`` followed by any number of ``.key`` or ``[index]``
steps into a structured value (``{{classify.json.category}}``, ``{{search.results[0].url}}``).
Whitespace inside the braces is allowed. Anything between ``{{`` and ``}}`` that is not a reference
is an error when the workflow is loaded, not when it runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

__all__ = [
    "INPUTS",
    "MAX_RENDERED_CHARS",
    "Ref",
    "RenderError",
    "Template",
    "TemplateSyntaxError",
    "to_text",
]

INPUTS = "inputs"
#: the longest text one template may render, in characters (16 Mi): the bound of the operator's
#: JSON files (``byok_plugin.core.json_file.MAX_BYTES``), more than the largest context window
#: takes (Gemini's 2M tokens are about 8 MB of text). ``{{start.t}}`` written 2,000 times over a
#: 100 KB input would otherwise build (and send) a 200 MB prompt.
MAX_RENDERED_CHARS = 16 * 1024 * 1024

_OPEN, _CLOSE = "{{", "}}"
_HEAD = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_STEP = re.compile(r"\.([A-Za-z0-9_-]+)|\[(\d+)\]")


class TemplateSyntaxError(ValueError):
    """A malformed ``{{ ... }}``; the message quotes it."""


class RenderError(LookupError):
    """A reference that cannot be filled at run time (a field the upstream output lacks)."""


@dataclass(frozen=True, slots=True)
class Ref:
    """``root`` is ``inputs`` or a block id; ``path`` the steps after it (first: the field)."""

    root: str
    path: tuple[str | int, ...]
    text: str

    @property
    def is_input(self) -> bool:
        return self.root == INPUTS

    @property
    def field(self) -> str | int | None:
        return self.path[0] if self.path else None

    def __str__(self) -> str:
        return "{{" + self.text + "}}"


def _parse_ref(inner: str) -> Ref:
    text = inner.strip()
    head = _HEAD.match(text)
    if head is None:
        raise TemplateSyntaxError(
            f"{{{{{inner}}}}} is not a reference: write {{{{inputs.NAME}}}} or {{{{BLOCK.FIELD}}}}"
        )
    steps: list[str | int] = []
    pos = head.end()
    while pos < len(text):
        step = _STEP.match(text, pos)
        if step is None:
            raise TemplateSyntaxError(
                f"{{{{{inner}}}}} is not a reference: unexpected {text[pos:]!r} "
                f"(steps are .name or [index])"
            )
        steps.append(step.group(1) if step.group(1) is not None else int(step.group(2)))
        pos = step.end()
    if not steps:
        raise TemplateSyntaxError(
            f"{{{{{inner}}}}} names no field: write {{{{{text}.content}}}} or {{{{inputs.{text}}}}}"
        )
    return Ref(root=head.group(0), path=tuple(steps), text=text)


@dataclass(frozen=True, slots=True)
class Template:
    """Parsed text: literal strings and :class:`Ref` values, in order."""

    source: str
    parts: tuple[str | Ref, ...]

    @classmethod
    def parse(cls, source: str) -> Template:
        parts: list[str | Ref] = []
        pos = 0
        while True:
            start = source.find(_OPEN, pos)
            if start < 0:
                if source[pos:]:
                    parts.append(source[pos:])
                break
            end = source.find(_CLOSE, start + 2)
            if end < 0:
                snippet = source[start : start + 30]
                raise TemplateSyntaxError(f"{snippet!r}: '{{{{' is never closed with '}}}}'")
            if start > pos:
                parts.append(source[pos:start])
            parts.append(_parse_ref(source[start + 2 : end]))
            pos = end + 2
        return cls(source=source, parts=tuple(parts))

    @property
    def refs(self) -> tuple[Ref, ...]:
        return tuple(p for p in self.parts if isinstance(p, Ref))

    def evaluate(self, lookup: Callable[[Ref], Any]) -> Any:
        """The value itself when the template is one reference and nothing else (a list stays a
        list in an output), else the rendered text."""
        if len(self.parts) == 1 and isinstance(self.parts[0], Ref):
            return lookup(self.parts[0])
        return self.render(lookup)

    def render(self, lookup: Callable[[Ref], Any], limit: int = MAX_RENDERED_CHARS) -> str:
        """The text with every reference replaced by ``to_text(lookup(ref))``.

        :raises RenderError: the text would be longer than ``limit`` characters; counted as the
            parts are filled in, so the long text is never built.
        """
        if len(self.parts) == 1 and isinstance(self.parts[0], str):
            return self.parts[0]
        pieces: list[str] = []
        size = 0
        for part in self.parts:
            text = part if isinstance(part, str) else to_text(lookup(part))
            size += len(text)
            if size > limit:
                where = f"at {part}" if isinstance(part, Ref) else "in its own text"
                raise RenderError(
                    f"the rendered text would be longer than {limit:,} characters, the most a "
                    f"template may produce (reached {where}, part {len(pieces) + 1} of "
                    f"{len(self.parts)}); repeat an input less, or give a shorter one"
                )
            pieces.append(text)
        return "".join(pieces)


def step_into(value: Any, ref: Ref, steps: Sequence[str | int]) -> Any:
    """Follow ``steps`` into a structured value; a missing key or index is a :class:`RenderError`."""
    for step in steps:
        # two branches so that mypy narrows ``step`` in each
        if isinstance(value, Mapping) and isinstance(step, str) and step in value:  # noqa: SIM114
            value = value[step]
        elif (
            isinstance(value, Sequence)
            and not isinstance(value, str)
            and isinstance(step, int)
            and step < len(value)
        ):
            value = value[step]
        else:
            shown = f".{step}" if isinstance(step, str) else f"[{step}]"
            raise RenderError(f"{ref}: the value has no {shown} ({_kind(value)} found)")
    return value


def to_text(value: Any) -> str:
    """How a value reads inside a prompt: text as is, structures as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | Decimal):
        return str(value)
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=str)


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, str):
        return "text"
    if isinstance(value, Sequence):
        return f"a list of {len(value)}"
    return type(value).__name__
