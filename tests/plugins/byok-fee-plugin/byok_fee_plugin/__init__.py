"""A 5% platform fee on BYOK usage, charged on the call's list price.

It depends on byok-hookspecs alone. The hook wraps whatever implementation answers below it (the
default one prices the call and says its list cost), and replaces the BYOK charge of 0 by the fee.
"""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

from byok_hookspecs import Charge, Credential, Usage, hookimpl

FEE = Decimal("0.05")
#: computed in memory: an asyncio host may call it on its event loop (byok_hookspecs.blocking)
byok_nonblocking_hooks = frozenset({"byok_compute_charge"})


@hookimpl(wrapper=True, tryfirst=True)
def byok_compute_charge(usage: Usage, credential: Credential):
    charge: Charge | None = yield
    if charge is None or not credential.is_byok:
        return charge
    list_cost = charge.list_cost if charge.list_cost is not None else Decimal(0)
    fee = (list_cost * FEE).quantize(Decimal("0.000001"))
    return replace(
        charge,
        amount=fee,
        reason="byok_fee",
        breakdown=(*charge.breakdown, ("byok fee 5%", fee)),
    )
