"""The one way the CLI hands user-controlled text to Rich.

Labels, workspace ids, models, block ids, workflow names and provider messages come from tenants,
workflow authors and providers. Given to Rich as a plain ``str`` they would be read as console
markup (``[/]`` raises ``MarkupError``, ``[link=...]`` makes a hyperlink, ``[conceal]`` hides
text) and ``:emoji:`` codes. :func:`plain` makes a :class:`~rich.text.Text`, which Rich shows as
it is. Use it for every such value, in table cells and titles and in ``console.print``; build the
whole line first when the line mixes fixed words and user text (``plain(f"keys of {label}")``).

Such text may also hold characters a terminal acts on instead of showing: ESC starts an escape
sequence (set the window title, clear the screen, colour or hide text), CR and BS overwrite what
was printed, a bidi override shows text in another order than it is. :func:`plain` (and
:func:`printable`, for text printed without Rich) writes each of them as ``\\u001b``; multi-line
text (a model's answer) keeps its line breaks and tabs when asked.
"""

from __future__ import annotations

import re
from decimal import Decimal

from rich.style import Style
from rich.text import Text

__all__ = ["money", "plain", "printable"]

#: C0 controls, DEL, C1 controls (U+009B is a one-character CSI), the line and paragraph
#: separators, the bidi embeddings, overrides and isolates, and lone surrogates (no UTF-8 form)
_UNSAFE = "\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE_CHARACTER = re.compile(f"[{_UNSAFE}]")
#: the same, but for a line break or a tab
_UNSAFE_IN_LINES = re.compile(f"(?![\\n\\t])[{_UNSAFE}]")


def printable(text: str, *, lines: bool = False) -> str:
    """``text`` with each character a terminal would act on written as ``\\uXXXX`` (ESC as
    ``\\u001b``); with ``lines``, line breaks and tabs are kept."""
    pattern = _UNSAFE_IN_LINES if lines else _UNSAFE_CHARACTER
    return pattern.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def plain(value: object, style: str | Style = "", *, lines: bool = False) -> Text:
    """``value`` as literal text for Rich: no markup, no emoji codes, no highlighting, and no
    character a terminal would act on (see :func:`printable`; ``lines`` keeps line breaks)."""
    return Text(printable(str(value), lines=lines), style=style)


def money(amount: Decimal, currency: str = "USD") -> str:
    """The one way the CLI prints an amount: ``$0.00``, ``$1,234.50``, ``$0.00000125``,
    ``-$0.01``; ``0.50 EUR`` in another currency. At least cents and every further digit the
    amount has (never rounded: what the ledger holds is what is shown)."""
    sign = "-" if amount < 0 else ""
    text = f"{abs(amount).normalize():,f}"
    whole, _, fraction = text.partition(".")
    number = f"{whole}.{fraction.ljust(2, '0')}"
    return f"{sign}${number}" if currency == "USD" else f"{sign}{number} {currency}"
