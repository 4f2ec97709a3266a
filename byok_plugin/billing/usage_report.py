"""Usage totals from the ledger: by workspace, provider, model, credential source and day, and by
workflow, block and stored key.

Every sum is a Decimal sum of the ledger's exact amounts. For each group and each workspace the
report says how many calls ran on the workspace's own keys (the BYOK share) and what those calls
would have cost at list price: what BYOK saved the workspace.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from byok_hookspecs import USAGE_COUNTS, CredentialSource

if TYPE_CHECKING:  # the ledger (and SQLAlchemy) load when a report is built, not for --help
    from byok_plugin.billing.ledger import LedgerRow

__all__ = ["DEFAULT_GROUPS", "GROUP_KEYS", "Totals", "UsageReport", "build_report"]

#: what rows can be grouped by, in display order
GROUP_KEYS = ("day", "workspace", "provider", "model", "source", "workflow", "block", "key")
#: the grouping when none is asked for
DEFAULT_GROUPS = ("day", "workspace", "provider", "model", "source")
#: the groupings a call may have no value for (no workflow, no block, a platform key): JSON null
_OPTIONAL = frozenset({"workflow", "block", "key"})
_SHARE = Decimal("0.0001")
_TOKENS = USAGE_COUNTS


@dataclass
class Totals:
    """Sums over a set of ledger rows."""

    calls: int = 0
    byok_calls: int = 0
    platform_calls: int = 0
    block_calls: int = 0
    fallback_calls: int = 0
    unpriced_calls: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    tool_requests: int = 0
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0
    list_cost: Decimal = field(default_factory=Decimal)
    charged: Decimal = field(default_factory=Decimal)
    byok_saved: Decimal = field(default_factory=Decimal)
    #: calls sent and never answered (not charged) and their estimated input's list cost, kept
    #: apart from the tokens and costs above, which are what the provider reported
    uncertain_calls: int = 0
    uncertain_estimated_cost: Decimal = field(default_factory=Decimal)
    #: answered-in-part calls (interrupted streams) charged on an input estimated from the request
    estimated_calls: int = 0

    def add(self, row: LedgerRow) -> None:
        self.calls += 1
        if row.status == "uncertain":
            self._add_uncertain(row)
            return
        if row.is_byok:
            self.byok_calls += 1
            if row.list_cost is not None:
                self.byok_saved += row.list_cost
        elif row.source is CredentialSource.PLATFORM:
            self.platform_calls += 1
        else:
            self.block_calls += 1
        if row.fallback:
            self.fallback_calls += 1
        if row.estimated:
            self.estimated_calls += 1
        if row.list_cost is None or row.unpriced:  # wholly, or some part of it, without a price
            self.unpriced_calls += 1
        if row.list_cost is not None:
            self.list_cost += row.list_cost
        self.charged += row.amount
        for name in _TOKENS:
            setattr(self, name, getattr(self, name) + getattr(row, name))

    def _add_uncertain(self, row: LedgerRow) -> None:
        """A call the provider may have run: counted by source, charged what the ledger says (0),
        its estimated cost apart; its estimated tokens are not added to the reported ones."""
        self.uncertain_calls += 1
        if row.is_byok:
            self.byok_calls += 1
        elif row.source is CredentialSource.PLATFORM:
            self.platform_calls += 1
        else:
            self.block_calls += 1
        if row.fallback:
            self.fallback_calls += 1
        if row.list_cost is not None:
            self.uncertain_estimated_cost += row.list_cost
        self.charged += row.amount

    @property
    def byok_share(self) -> Decimal:
        """The fraction of calls that ran on the workspace's own keys (0 to 1, 4 places)."""
        if not self.calls:
            return Decimal(0).quantize(_SHARE)
        return (Decimal(self.byok_calls) / Decimal(self.calls)).quantize(_SHARE)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: amounts as decimal strings in plain notation (``0.0000001``, never
        ``1E-7``; never floats)."""
        return {
            "calls": self.calls,
            "byok_calls": self.byok_calls,
            "platform_calls": self.platform_calls,
            "block_key_calls": self.block_calls,
            "fallback_calls": self.fallback_calls,
            "unpriced_calls": self.unpriced_calls,
            "byok_share": format(self.byok_share, "f"),
            **{name: getattr(self, name) for name in _TOKENS},
            "list_cost": format(self.list_cost, "f"),
            "charged": format(self.charged, "f"),
            "byok_saved": format(self.byok_saved, "f"),
            "uncertain_calls": self.uncertain_calls,
            "uncertain_estimated_cost": format(self.uncertain_estimated_cost, "f"),
            "estimated_calls": self.estimated_calls,
        }


@dataclass
class UsageReport:
    """Grouped rows, per-workspace summaries and grand totals over a date range."""

    since: datetime | None
    until: datetime | None
    group_by: tuple[str, ...]
    currency: str = "USD"
    rows: list[tuple[tuple[str, ...], Totals]] = field(default_factory=list)
    workspaces: list[tuple[str, Totals]] = field(default_factory=list)
    totals: Totals = field(default_factory=Totals)

    def group_values(self, key: tuple[str, ...]) -> dict[str, str | None]:
        """A row's grouping values by name; ``None`` for a call without workflow, block or
        stored key (a platform key has no key id)."""
        return {
            name: (value if value or name not in _OPTIONAL else None)
            for name, value in zip(self.group_by, key, strict=True)
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "currency": self.currency,
            "group_by": list(self.group_by),
            "totals": self.totals.to_dict(),
            "workspaces": [{"workspace": ws, **t.to_dict()} for ws, t in self.workspaces],
            "rows": [{**self.group_values(key), **t.to_dict()} for key, t in self.rows],
        }


def _key_of(row: LedgerRow, group_by: Sequence[str]) -> tuple[str, ...]:
    values = {
        "day": row.occurred_at.date().isoformat(),
        "workspace": row.workspace_id,
        "provider": row.provider,
        "model": row.model,
        "source": row.source.value,
        "workflow": row.workflow_id or "",
        "block": row.block_id or "",
        "key": row.key_id or "",
    }
    return tuple(values[name] for name in group_by)


def build_report(
    rows: Iterable[LedgerRow],
    *,
    group_by: Sequence[str] = DEFAULT_GROUPS,
    since: datetime | None = None,
    until: datetime | None = None,
) -> UsageReport:
    """Sum ledger rows into groups, workspaces and totals (one pass, exact).

    :raises ValueError: an unknown grouping, or rows in more than one currency.
    """
    unknown = [name for name in group_by if name not in GROUP_KEYS]
    if unknown:
        raise ValueError(
            f"cannot group by {', '.join(unknown)}: choose from {', '.join(GROUP_KEYS)}"
        )
    groups: dict[tuple[str, ...], Totals] = {}
    workspaces: dict[str, Totals] = {}
    totals = Totals()
    currencies: set[str] = set()
    for row in rows:
        currencies.add(row.currency)
        groups.setdefault(_key_of(row, group_by), Totals()).add(row)
        workspaces.setdefault(row.workspace_id, Totals()).add(row)
        totals.add(row)
    if len(currencies) > 1:
        raise ValueError(
            f"the ledger rows in this range are in several currencies ({', '.join(sorted(currencies))})"
        )
    return UsageReport(
        since=since,
        until=until,
        group_by=tuple(group_by),
        currency=currencies.pop() if currencies else "USD",
        rows=sorted(groups.items()),
        workspaces=sorted(workspaces.items()),
        totals=totals,
    )
