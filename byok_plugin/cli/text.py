"""The one way the CLI hands user-controlled text to Rich.

Labels, workspace ids, models, block ids, workflow names and provider messages come from tenants,
workflow authors and providers. Given to Rich as a plain ``str`` they would be read as console
markup (``[/]`` raises ``MarkupError``, ``[link=...]`` makes a hyperlink, ``[conceal]`` hides
text) and ``:emoji:`` codes. :func:`plain` makes a :class:`~rich.text.Text`, which Rich shows as
it is. Use it for every such value, in table cells and titles and in ``console.print``; build the
whole line first when the line mixes fixed words and user text (``plain(f"keys of {label}")``).
"""

from __future__ import annotations

from decimal import Decimal

from rich.style import Style
from rich.text import Text

__all__ = ["money", "plain"]


def plain(value: object, style: str | Style = "") -> Text:
    """``value`` as literal text for Rich: no markup, no emoji codes, no highlighting."""
    return Text(str(value), style=style)


def money(amount: Decimal, currency: str = "USD") -> str:
    """The one way the CLI prints an amount: ``$0.00``, ``$1,234.50``, ``$0.00000125``,
    ``-$0.01``; ``0.50 EUR`` in another currency. At least cents and every further digit the
    amount has (never rounded: what the ledger holds is what is shown)."""
    sign = "-" if amount < 0 else ""
    text = f"{abs(amount).normalize():,f}"
    whole, _, fraction = text.partition(".")
    number = f"{whole}.{fraction.ljust(2, '0')}"
    return f"{sign}${number}" if currency == "USD" else f"{sign}{number} {currency}"
