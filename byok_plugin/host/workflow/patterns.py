"""The regular expressions of ``matches`` conditions, in linear time.

A workflow author writes the pattern; a provider or a user writes the text it is searched in. With
Python's backtracking ``re`` a pattern such as ``^(a+)+$`` takes seconds on 30 characters, on the
event loop, and stalls every run of the worker. RE2 (``google-re2``) matches in time linear in the
text and refuses what it cannot do so (backreferences, look-around). Patterns are also bounded in
length and in compiled size, so a workflow cannot make one that eats memory.
"""

from __future__ import annotations

from typing import Protocol

import re2

__all__ = ["MAX_PATTERN_LENGTH", "Pattern", "PatternError", "compile_pattern"]

#: the longest ``matches`` pattern a workflow may hold, in characters
MAX_PATTERN_LENGTH = 1000
#: memory RE2 may use for one compiled pattern; a larger program is refused at load time
_MAX_MEMORY = 1 << 20


class Pattern(Protocol):
    """What a condition needs of a compiled pattern."""

    def search(self, text: str) -> object | None: ...


class PatternError(ValueError):
    """A pattern that cannot be used: the message says why (never the text searched)."""


def compile_pattern(pattern: str, *, ignore_case: bool = False) -> Pattern:
    """``pattern`` compiled by RE2, or :class:`PatternError`."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise PatternError(
            f"is {len(pattern)} characters long; a pattern may have at most {MAX_PATTERN_LENGTH}"
        )
    options = re2.Options()
    options.log_errors = False  # RE2 would write every bad pattern to stderr
    options.case_sensitive = not ignore_case
    options.max_mem = _MAX_MEMORY
    try:
        compiled: Pattern = re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise PatternError(
            f"is not a valid regular expression for RE2 (linear time: no backreferences or "
            f"look-around): {reason}"
        ) from None
    return compiled
