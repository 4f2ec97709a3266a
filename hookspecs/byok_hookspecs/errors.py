"""Errors a host can catch without importing any implementation.

No message ever carries a key: they name the workspace, the provider and a safe key reference.
"""

from __future__ import annotations

from decimal import Decimal

__all__ = [
    "BudgetExceeded",
    "ByokError",
    "CredentialUnavailable",
    "NoCredential",
    "NotAuthorized",
    "UnpricedModel",
]


class ByokError(Exception):
    """Base of every error raised through the ``byok`` hooks."""


class NoCredential(ByokError):
    """No source has a key for this call; the message says what to configure."""

    def __init__(self, workspace_id: str, provider: str, model: str, hint: str = "") -> None:
        self.workspace_id = workspace_id
        self.provider = provider
        self.model = model
        message = f"no credential for {provider} model {model!r} in workspace {workspace_id!r}"
        super().__init__(f"{message}: {hint}" if hint else message)


class CredentialUnavailable(ByokError):
    """A key exists but cannot be used: it does not decrypt, or the store does not answer.

    Never a reason to fall back to the platform key in silence.
    """

    def __init__(
        self, message: str, *, workspace_id: str, provider: str, key_id: str | None = None
    ) -> None:
        self.workspace_id = workspace_id
        self.provider = provider
        self.key_id = key_id
        super().__init__(message)


class UnpricedModel(ByokError):
    """A platform-billed call on a model with no price: refused before the call."""

    def __init__(self, provider: str, model: str) -> None:
        self.provider = provider
        self.model = model
        super().__init__(
            f"no price for {provider} model {model!r}: a platform-billed call would be charged "
            f"$0; add the model to a price file (BYOK_PRICE_FILE) or allow unpriced models"
        )


class NotAuthorized(ByokError):
    """``byok_authorize`` did not allow the action."""

    def __init__(
        self, actor_id: str | None, workspace_id: str, action: str, hint: str = ""
    ) -> None:
        self.actor_id = actor_id
        self.workspace_id = workspace_id
        self.action = action
        message = f"{actor_id or 'anonymous'!s} may not {action} in workspace {workspace_id!r}"
        super().__init__(f"{message}: {hint}" if hint else message)


class BudgetExceeded(ByokError):
    """A call's worst case does not fit a hard budget: refused before it is sent."""

    def __init__(
        self,
        workspace_id: str,
        budget: str,
        *,
        limit: Decimal,
        spent: Decimal,
        reserved: Decimal,
        needed: Decimal,
        currency: str = "USD",
    ) -> None:
        self.workspace_id = workspace_id
        self.budget = budget
        self.limit = limit
        self.spent = spent
        self.reserved = reserved
        self.needed = needed
        self.left = max(limit - spent - reserved, Decimal(0))
        super().__init__(
            f"workspace {workspace_id!r}: budget {budget!r} refuses the call: it may cost up to "
            f"{needed:f} {currency}, and of {limit:f} {currency} {spent:f} is spent, "
            f"{reserved:f} reserved by calls in flight, {self.left:f} left"
        )
