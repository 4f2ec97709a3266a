"""What is wrong with a workflow: problems that each name the JSON path of the offending value."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["InputsError", "Problem", "WorkflowError", "json_path"]

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def json_path(parts: Iterable[str | int]) -> str:
    """``$.blocks.classify.prompt``, ``$.edges[2].to``, ``$.blocks["odd key"]``."""
    out = ["$"]
    for part in parts:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif _PLAIN_KEY.fullmatch(part):
            out.append(f".{part}")
        else:
            out.append(f'["{"".join(map(_escape, part))}"]')
    return "".join(out)


def _escape(char: str) -> str:
    """A character of a key in a JSON path: ``\\`` and ``"`` escaped, and anything a terminal
    would not show as itself (a control character, a line break, a bidi override) as ``\\uXXXX``."""
    if char in '\\"':
        return "\\" + char
    return char if char.isprintable() else f"\\u{ord(char):04x}"


@dataclass(frozen=True, slots=True, order=True)
class Problem:
    """One thing wrong, at one JSON path (``$`` for the whole document)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class WorkflowError(ValueError):
    """A workflow that must not run. ``problems`` lists every reason, each with its JSON path.

    The message never carries a key: workflow files hold key *references* only, and the
    validator does not echo the value found where a key reference belongs.
    """

    def __init__(self, problems: Sequence[Problem], source: str = "<workflow>") -> None:
        self.problems = tuple(sorted(set(problems), key=_path_order))
        self.source = source
        count = len(self.problems)
        head = f"{source}: {count} problem{'s' if count != 1 else ''}"
        super().__init__("\n".join([head, *(f"  {p}" for p in self.problems)]))


class InputsError(WorkflowError):
    """The inputs given to a run do not fit the workflow's declared inputs."""


def _path_order(problem: Problem) -> tuple[str, str]:
    return (problem.path, problem.message)
