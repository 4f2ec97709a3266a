"""The default charge for one provider call: what ``byok_compute_charge`` answers.

- a workspace (BYOK) credential: 0, reason ``byok``: the workspace pays the provider itself;
- a block's own key: 0, reason ``block_key``;
- a platform credential (fallbacks included): list price x ``BYOK_CHARGE_MULTIPLIER``, reason
  ``platform``.

Every charge carries the call's cost at list price (``list_cost``), whoever pays it, so that what
BYOK saved a workspace can be summed from the ledger, and the version of the price table used.

A platform-billed call on a model with no price is refused before the call by resolution (see
:meth:`Billing.require_price`). Should one reach billing anyway, it raises
:class:`~byok_hookspecs.UnpricedModel`, unless ``BYOK_ALLOW_UNPRICED=1``, in which case it is
charged 0 with reason ``unpriced`` and a warning: visible in the ledger, never a silent $0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal

from byok_hookspecs import Charge, Credential, CredentialSource, UnpricedModel, Usage

from byok_plugin.catalog import Catalog
from byok_plugin.pricing import MissingRate, Price, PriceTable, list_cost

__all__ = ["MONEY_QUANTUM", "Billing", "money"]

log = logging.getLogger("byok.billing")

#: amounts are kept to 12 decimal places (a millionth of a micro-dollar): per-token prices
#: reach 1e-9 USD and a multiplier adds digits; the ledger stores exactly this many
MONEY_QUANTUM = Decimal("1e-12")
_ZERO = Decimal(0)
_REASONS = {
    CredentialSource.WORKSPACE: "byok",
    CredentialSource.BLOCK: "block_key",
    CredentialSource.PLATFORM: "platform",
}


def money(amount: Decimal) -> Decimal:
    """Round to :data:`MONEY_QUANTUM` (banker's rounding); exact amounts are unchanged."""
    rounded = amount.quantize(MONEY_QUANTUM, rounding=ROUND_HALF_EVEN)
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
        """The list price of a model or tool, found by its name or its catalog alias."""
        key = (provider, model)
        try:
            return self._lookups[key]
        except KeyError:
            pass
        price = self.prices.price(provider, model)
        if price is None:
            canonical = self.catalog.canonical(provider, model)
            if canonical != model:
                price = self.prices.price(provider, canonical)
        if len(self._lookups) < 10_000:  # bounded: model names come from workflows
            self._lookups[key] = price
        return price

    def require_price(self, provider: str, model: str) -> None:
        """Refuse, before the call, a platform-billed call that could not be priced.

        :raises UnpricedModel: no price, and ``BYOK_ALLOW_UNPRICED`` is off.
        """
        if self.allow_unpriced or self.price_of(provider, model) is not None:
            return
        raise UnpricedModel(provider, model)

    def list_cost(self, usage: Usage) -> tuple[Decimal | None, tuple[tuple[str, Decimal], ...]]:
        """The call's cost at list price and its breakdown; ``None`` when it cannot be priced."""
        price = self.price_of(usage.provider, usage.model)
        if price is None:
            if usage.reported_cost is not None:
                return money(usage.reported_cost), (("reported_cost", usage.reported_cost),)
            return None, ()
        try:
            total, breakdown = list_cost(price, usage)
        except MissingRate as exc:
            log.warning("cannot price %s/%s: %s", usage.provider, usage.model, exc)
            return None, ()
        return money(total), breakdown

    def charge(self, usage: Usage, credential: Credential) -> Charge:
        """The default charge for one completed call (see the module docstring)."""
        cost, breakdown = self.list_cost(usage)
        source = credential.source
        if source is not CredentialSource.PLATFORM:
            return Charge(
                amount=_ZERO,
                reason=_REASONS[source],
                list_cost=cost,
                breakdown=breakdown,
                price_version=self.prices.version,
            )
        if cost is None:
            if not self.allow_unpriced:
                raise UnpricedModel(usage.provider, usage.model)
            log.warning(
                "platform-billed call on unpriced %s model %r charged 0 (BYOK_ALLOW_UNPRICED=1)",
                usage.provider,
                usage.model,
            )
            return Charge(amount=_ZERO, reason="unpriced", price_version=self.prices.version)
        return Charge(
            amount=money(cost * self.multiplier),
            reason=_REASONS[source],
            list_cost=cost,
            breakdown=breakdown,
            price_version=self.prices.version,
        )
