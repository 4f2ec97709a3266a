"""The default charge for one provider call: what ``byok_compute_charge`` answers.

- a workspace (BYOK) credential: 0, reason ``byok``: the workspace pays the provider itself;
- a block's own key: 0, reason ``block_key``;
- a platform credential (fallbacks included): list price x ``BYOK_CHARGE_MULTIPLIER``, reason
  ``platform``.

Every charge carries the call's cost at list price (``list_cost``), whoever pays it, so that what
BYOK saved a workspace can be summed from the ledger, and the version of the price table used.

**Finding the price.** A model is looked up by its name, then by its catalog alias, then, for a
dated snapshot the table does not list (``gpt-4o-mini-2024-07-18``, ``claude-sonnet-4-5-20250929``:
the names providers answer with), by its base name without the trailing ``-YYYY-MM-DD`` or
``-YYYYMMDD``.

**Unpriced calls.** A platform-billed call that could not be priced is refused before the call by
resolution (:meth:`Billing.require_price`): no entry, or an entry that lacks the input or output
price a call produces (a partial ``BYOK_PRICE_FILE`` entry), or a provider tool the block enables
(``CredentialRequest.tools``: web search) without a per-request price in the table's ``tools``,
raises :class:`~byok_hookspecs.UnpricedModel` unless ``BYOK_ALLOW_UNPRICED=1``.

**A part without a price.** A completed call some part of which has no price (1-hour cache writes
on an entry without ``cache_write_1h``, a tool use the table does not price) is charged what can
be priced; the charge's ``unpriced`` names the rest, the ledger row keeps it, and ``byok usage``
counts the row in ``unpriced_calls``. A part without a price never makes the whole call $0.

Should a completed platform call still be unpriceable when it is charged (a host that charges a
model other than the one it asked resolution about, a price file changed in between, token kinds
the entry lacks), :meth:`Billing.charge` does **not** raise: the call happened and the platform
paid for it, and an exception there would leave no ledger row at all. It answers a charge of 0
with reason ``unpriced`` and ``list_cost`` ``None``, logged as an error (a warning when
``BYOK_ALLOW_UNPRICED=1`` asked for it): the row is in the ledger, and ``byok usage`` counts it
in ``unpriced_calls`` (rows without a list cost), so it can be billed by hand. Never a silent $0,
never a lost call.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Context, Decimal

from byok_hookspecs import Charge, Credential, CredentialSource, UnpricedModel, Usage

from byok_plugin.billing.catalog import Catalog
from byok_plugin.billing.pricing import Price, PriceTable, TokenRates, price_call

__all__ = ["MAX_MONEY", "MONEY_QUANTUM", "Billing", "IncompletePrice", "money", "snapshot_base"]

log = logging.getLogger("byok.billing")

#: amounts are kept to 12 decimal places (a millionth of a micro-dollar): per-token prices
#: reach 1e-9 USD and a multiplier adds digits; the ledger stores exactly this many
MONEY_QUANTUM = Decimal("1e-12")
#: amounts must stay under this (the ledger's NUMERIC(30, 12) holds 18 digits before the point)
MAX_MONEY = Decimal(10) ** 18
#: enough digits to round any amount under :data:`MAX_MONEY` to :data:`MONEY_QUANTUM` (the
#: default context's 28 digits fail from 10^16 on, with ``InvalidOperation``)
_MONEY_CONTEXT = Context(prec=32)
_ZERO = Decimal(0)
#: a dated snapshot's suffix: ``-2024-07-18`` (OpenAI) or ``-20250929`` (Anthropic)
_SNAPSHOT_DATE = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8})$")
_REASONS = {
    CredentialSource.WORKSPACE: "byok",
    CredentialSource.ORGANIZATION: "byok",
    CredentialSource.BLOCK: "block_key",
    CredentialSource.PLATFORM: "platform",
}


def snapshot_base(model: str) -> str:
    """A dated snapshot's base name (``gpt-4o-mini-2024-07-18`` -> ``gpt-4o-mini``); other names
    unchanged."""
    return _SNAPSHOT_DATE.sub("", model)


class IncompletePrice(UnpricedModel):
    """A platform-billed call on a model whose price entry lacks a price the call needs."""

    def __init__(self, provider: str, model: str, entry: str, missing: tuple[str, ...]) -> None:
        super().__init__(provider, model)
        self.entry = entry
        self.missing = missing
        self.args = (
            f"the price of {provider} model {model!r} (entry {entry!r}) has no "
            f"{' or '.join(missing)} price, so a platform-billed call could not be charged; "
            f"complete the entry in the price file (BYOK_PRICE_FILE) or allow unpriced models",
        )


def _missing_rates(price: Price) -> tuple[str, ...]:
    """The prices a call on this entry may need and the entry lacks: a tool priced per request
    needs nothing more; a model needs ``input`` and ``output`` (cached input, cache writes and
    reasoning fall back to them), in its long-context tier too."""
    if price.rates == TokenRates() and (price.per_request is not None or price.reported_cost):
        return ()
    tiers = [("", price.rates)]
    if price.long_context is not None:
        tiers.append(("long_context.", price.long_context))
    return tuple(
        f"{prefix}{name}"
        for prefix, rates in tiers
        for name in ("input", "output")
        if getattr(rates, name) is None
    )


def money(amount: Decimal) -> Decimal:
    """Round to :data:`MONEY_QUANTUM` (banker's rounding); exact amounts are unchanged.

    :raises ValueError: the amount is not finite, or not under :data:`MAX_MONEY` in size (the
        inputs are bounded so that no price, token count or multiplier reaches it).
    """
    if not amount.is_finite() or amount.copy_abs() >= MAX_MONEY:  # copy_abs: exact, no context
        raise ValueError(f"an amount of money must be finite and under 10^18, not {amount}")
    rounded = amount.quantize(MONEY_QUANTUM, rounding=ROUND_HALF_EVEN, context=_MONEY_CONTEXT)
    return amount if rounded == amount else rounded


@dataclass
class Billing:
    """Prices calls with a price table and the catalog (for model aliases)."""

    prices: PriceTable
    catalog: Catalog
    multiplier: Decimal = Decimal(1)
    allow_unpriced: bool = False
    _lookups: dict[tuple[str, str], Price | None] = field(
        default_factory=dict, init=False, repr=False
    )

    @property
    def price_version(self) -> str:
        return self.prices.version

    def price_of(self, provider: str, model: str) -> Price | None:
        """The list price of a model or tool, found by its name, its catalog alias, or (a dated
        snapshot) its base name."""
        key = (provider, model)
        try:
            return self._lookups[key]
        except KeyError:
            pass
        price = self._named(provider, model)
        if price is None:
            base = snapshot_base(model)
            if base != model:
                price = self._named(provider, base)
        if len(self._lookups) < 10_000:  # bounded: model names come from workflows
            self._lookups[key] = price
        return price

    def _named(self, provider: str, model: str) -> Price | None:
        price = self.prices.price(provider, model)
        if price is None:
            canonical = self.catalog.canonical(provider, model)
            if canonical != model:
                price = self.prices.price(provider, canonical)
        return price

    def require_price(self, provider: str, model: str, tools: tuple[str, ...] = ()) -> None:
        """Refuse, before the call, a platform-billed call that could not be priced.

        :param tools: the provider's own tools the call may use (``web_search``); each needs a
            per-request price in the table's ``tools``.

        :raises UnpricedModel: no price, and ``BYOK_ALLOW_UNPRICED`` is off.
        :raises IncompletePrice: (an ``UnpricedModel``) the entry lacks the input or output price
            (or, for a tool, the per-request price) a call produces, and ``BYOK_ALLOW_UNPRICED``
            is off.
        """
        if self.allow_unpriced:
            return
        price = self.price_of(provider, model)
        if price is None:
            raise UnpricedModel(provider, model)
        missing = _missing_rates(price) + tuple(
            f"tool {provider}/{tool} per_request"
            for tool in tools
            if self.prices.tool(provider, tool) is None
        )
        if missing:
            raise IncompletePrice(provider, model, price.key, missing)

    def list_cost(
        self, usage: Usage
    ) -> tuple[Decimal | None, tuple[tuple[str, Decimal], ...], tuple[str, ...]]:
        """The call's cost at list price, its breakdown and the parts without a price; ``None``
        when nothing of it can be priced (no entry)."""
        price = self.price_of(usage.provider, usage.model)
        if price is None:
            if usage.reported_cost is not None:
                return money(usage.reported_cost), (("reported_cost", usage.reported_cost),), ()
            return None, (), ()
        cost = price_call(price, usage, self.prices.tools)
        if cost.unpriced:
            log.warning(
                "%s/%s: no price for %s of the call; the rest is charged",
                usage.provider,
                usage.model,
                ", ".join(cost.unpriced),
            )
            if not cost.breakdown:  # nothing of it had a price
                return None, (), cost.unpriced
        return money(cost.total), cost.breakdown, cost.unpriced

    def charge(self, usage: Usage, credential: Credential) -> Charge:
        """The default charge for one completed call (see the module docstring)."""
        cost, breakdown, unpriced = self.list_cost(usage)
        source = credential.source
        if source is not CredentialSource.PLATFORM:
            return Charge(
                amount=_ZERO,
                reason=_REASONS[source],
                list_cost=cost,
                breakdown=breakdown,
                price_version=self.prices.version,
                unpriced=unpriced,
            )
        if cost is None:  # recorded, never raised: the call happened (see the module docstring)
            log.log(
                logging.WARNING if self.allow_unpriced else logging.ERROR,
                "platform-billed call on unpriced %s model %r charged 0 with reason 'unpriced'%s",
                usage.provider,
                usage.model,
                " (BYOK_ALLOW_UNPRICED=1)"
                if self.allow_unpriced
                else ": the ledger row has no list cost; bill it by hand",
            )
            return Charge(
                amount=_ZERO,
                reason="unpriced",
                list_cost=None,
                price_version=self.prices.version,
                unpriced=unpriced,
            )
        return Charge(
            amount=money(cost * self.multiplier),
            reason=_REASONS[source],
            list_cost=cost,
            breakdown=breakdown,
            price_version=self.prices.version,
            unpriced=unpriced,
        )
