"""Reconciliation: the ledger's cost beside what the provider itself reported.

Per provider, key and day: the calls, the ledger's list cost, the cost the provider reported in
its responses where it reports one (Exa's ``costDollars`` today), what the price table alone would
have said for those calls, and the difference; plus the calls the ledger could not settle by
itself (``uncertain``: the provider may have run them; ``interrupted``; parts without a price).
Exact Decimal sums of the ledger's amounts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from byok_hookspecs import USAGE_COUNTS, Usage

from byok_plugin.billing.pricing import price_call

if TYPE_CHECKING:
    from byok_plugin.billing.charges import Billing
    from byok_plugin.billing.ledger import LedgerRow

__all__ = ["ReconcileLine", "reconcile"]


@dataclass
class ReconcileLine:
    """One provider key's calls on one day."""

    provider: str
    key_id: str
    day: str
    calls: int = 0
    reported_calls: int = 0
    uncertain_calls: int = 0
    #: the uncertain calls' estimated input at list price (not in ``list_cost``)
    uncertain_estimated_cost: Decimal = field(default_factory=Decimal)
    interrupted_calls: int = 0
    unpriced_calls: int = 0
    list_cost: Decimal = field(default_factory=Decimal)
    reported_cost: Decimal = field(default_factory=Decimal)
    #: what the price table alone says for the calls that carry a reported cost
    table_cost: Decimal = field(default_factory=Decimal)

    @property
    def difference(self) -> Decimal:
        """Reported minus the table's price, over the calls that carry a reported cost."""
        return self.reported_cost - self.table_cost

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: amounts as decimal strings in plain notation (never ``1E-7``)."""
        return {
            "provider": self.provider,
            "key_id": self.key_id,
            "day": self.day,
            "calls": self.calls,
            "reported_calls": self.reported_calls,
            "uncertain_calls": self.uncertain_calls,
            "uncertain_estimated_cost": format(self.uncertain_estimated_cost, "f"),
            "interrupted_calls": self.interrupted_calls,
            "unpriced_calls": self.unpriced_calls,
            "list_cost": format(self.list_cost, "f"),
            "reported_cost": format(self.reported_cost, "f"),
            "table_cost": format(self.table_cost, "f"),
            "difference": format(self.difference, "f"),
        }


def _table_cost(billing: Billing, row: LedgerRow) -> Decimal:
    """The row's cost at the table's price, ignoring the cost the provider reported."""
    price = billing.price_of(row.provider, row.model)
    if price is None:
        return Decimal(0)
    usage = Usage(
        provider=row.provider,
        model=row.model,
        **{name: getattr(row, name) for name in USAGE_COUNTS},
        tool_uses=row.tool_uses,
    )
    return price_call(replace(price, reported_cost=False), usage, billing.prices.tools).total


def reconcile(
    rows: Iterable[LedgerRow], billing: Billing, provider: str | None = None
) -> list[ReconcileLine]:
    """The lines of ``provider``'s rows (all providers when ``None``), by key and day.

    :raises ValueError: rows in more than one currency (their costs do not add up), as
        :func:`~byok_plugin.billing.usage_report.build_report` refuses them.
    """
    lines: dict[tuple[str, str, str], ReconcileLine] = {}
    currencies: set[str] = set()
    for row in rows:
        if provider is not None and row.provider != provider:
            continue
        currencies.add(row.currency)
        key = (row.provider, row.key_id or "-", row.occurred_at.date().isoformat())
        line = lines.get(key)
        if line is None:
            line = lines[key] = ReconcileLine(*key)
        line.calls += 1
        if row.status == "uncertain":
            line.uncertain_calls += 1
            line.uncertain_estimated_cost += row.list_cost or Decimal(0)
            continue
        if row.list_cost is not None:
            line.list_cost += row.list_cost
        if row.list_cost is None or row.unpriced:
            line.unpriced_calls += 1
        if row.status == "interrupted":
            line.interrupted_calls += 1
        if row.reported_cost is not None:
            line.reported_calls += 1
            line.reported_cost += row.reported_cost
            line.table_cost += _table_cost(billing, row)
    if len(currencies) > 1:
        raise ValueError(
            f"the ledger rows in this range are in several currencies "
            f"({', '.join(sorted(currencies))}): their costs do not add up; narrow the range or "
            f"the workspaces"
        )
    return [lines[k] for k in sorted(lines)]
