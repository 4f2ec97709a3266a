"""The API's bodies as pydantic models: the request bodies the server validates, and the answers
it gives, from which FastAPI generates the OpenAPI document (see :mod:`byok_plugin.server.openapi`).

Request models are strict (``"yes"`` is not a boolean, ``1`` is not a string) and forbid unknown
fields. Answers are built by the routes as plain JSON; their models document them (and the fuzz
test checks every answer against them).
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from byok_plugin.core.key_format import KNOWN_PROVIDERS
from byok_plugin.server.errors import ErrorCode

__all__ = ["REQUEST_MODELS", "Error", "Provider"]

#: the providers a key can be stored for, as the key store knows them
Provider = enum.StrEnum("Provider", [(name, name) for name in KNOWN_PROVIDERS])  # type: ignore[misc]
Provider.__doc__ = "A provider a key can be stored for."

KEY_ID_PATTERN = r"^key_[A-Za-z0-9_-]{8,64}$"
KeyId = Annotated[str, Field(pattern=KEY_ID_PATTERN)]
KeyStatus = Literal["enabled", "disabled"]
DECIMAL = r"^-?[0-9]+(\.[0-9]+)?$"
Money = Annotated[str, Field(pattern=DECIMAL)]
FallbackPolicyName = Literal["never", "on_rate_limit", "on_error"]


class RequestBody(BaseModel):
    """A request body: strict types, no unknown fields."""

    model_config = ConfigDict(strict=True, extra="forbid")


# --- request bodies -------------------------------------------------------------------------


class SetKeyRequest(RequestBody):
    """Store a key for a provider, under a label (``default`` when none is given)."""

    provider: Provider
    api_key: str = Field(min_length=1, max_length=512, json_schema_extra={"writeOnly": True})
    label: str | None = Field(default=None, min_length=1, max_length=64)
    test: bool = Field(default=True, description="Check the key with the provider first.")


class DeleteKeysRequest(RequestBody):
    """Delete a provider's keys, or only the one with ``key_id``."""

    provider: Provider
    key_id: KeyId | None = None


class UpdateKeyRequest(RequestBody):
    """Enable or disable a key."""

    status: KeyStatus


class TestKeyRequest(RequestBody):
    """No fields (an empty body is accepted too)."""


class SessionRequest(RequestBody):
    """The one-time sign-in token ``byok serve`` printed in the URL's fragment."""

    token: str = Field(min_length=1, max_length=200)


class SignOutRequest(RequestBody):
    """No fields."""


class SetBudgetRequest(RequestBody):
    """A budget's limit (USD, as a decimal string) and its rules."""

    # the same as byok_plugin.billing.budgets.LIMIT_PATTERN and LIMIT_TEXT_LENGTH (a test checks)
    limit: str = Field(min_length=1, max_length=40, pattern=r"^[0-9]+(\.[0-9]+)?$")
    metric: Literal["charge", "list_cost"] = "charge"
    period: Literal["day", "month", "none"] = "month"
    hard: bool = True
    thresholds: list[Annotated[int, Field(ge=1, le=1000)]] = Field(
        default=[50, 80, 100], max_length=10
    )
    key_id: str | None = Field(default=None, max_length=120)
    workflow_id: str | None = Field(default=None, max_length=200)


class SetFallbackRequest(RequestBody):
    """The workspace's new fallback policy."""

    policy: FallbackPolicyName


#: the request models by name, as the routes ask for them
REQUEST_MODELS: dict[str, type[RequestBody]] = {
    model.__name__: model
    for model in (
        SetKeyRequest,
        DeleteKeysRequest,
        UpdateKeyRequest,
        TestKeyRequest,
        SessionRequest,
        SignOutRequest,
        SetBudgetRequest,
        SetFallbackRequest,
    )
}


# --- answers --------------------------------------------------------------------------------


def _error_schema() -> dict[str, Any]:
    """The inner object of every error answer, inline (clients read ``error.code``)."""
    return {
        "type": "object",
        "required": ["code", "message", "field"],
        "properties": {
            "code": {"type": "string", "enum": [code.value for code in ErrorCode]},
            "message": {"type": "string"},
            "field": {
                "type": ["string", "null"],
                "description": "The request field at fault, when there is one.",
            },
        },
    }


class Error(BaseModel):
    """Every error: a stable ``code`` (clients branch on it) and a message for people; ``field``
    names the request field at fault when there is one."""

    model_config = ConfigDict(title="Error")

    error: dict[str, Any] = Field(json_schema_extra=_error_schema())


class Health(BaseModel):
    """The server is up, and its version."""

    status: Literal["ok"]
    version: str


class Me(BaseModel):
    """The caller: its id, whether it is an operator, and its role in each workspace."""

    id: str
    operator: bool
    workspaces: dict[str, Literal["member", "admin"]]


class ModelInfo(BaseModel):
    """A model of the catalog."""

    id: str
    kind: Literal["chat", "tool"]
    hosted: bool
    aliases: list[str] = []


class ProviderInfo(BaseModel):
    """A provider of the catalog, with its models."""

    id: str
    name: str
    models: list[ModelInfo]


class Providers(BaseModel):
    """The catalog's providers and their models."""

    catalog_version: str
    providers: list[ProviderInfo]


class Key(BaseModel):
    """A stored key as the API shows it: masked, never the key itself."""

    id: KeyId
    provider: str
    label: str
    hint: str
    status: KeyStatus
    created_at: str = Field(json_schema_extra={"format": "date-time"})
    created_by: str | None
    updated_at: str = Field(json_schema_extra={"format": "date-time"})
    updated_by: str | None
    last_used_at: str | None
    cooldown_until: str | None


class KeyList(BaseModel):
    """A workspace's keys, masked, and whether the caller may manage them."""

    workspace_id: str
    can_manage: bool
    keys: list[Key]


class KeyResult(BaseModel):
    """One key, as it is now."""

    key: Key


class KeyCheck(BaseModel):
    """A provider's verdict on a key (``invalid`` is a 200: the check ran)."""

    key_id: KeyId | None = None
    provider: str
    status: Literal["valid", "invalid", "unreachable", "skipped", "no_credit"]
    message: str


class SetKeyResult(BaseModel):
    """A stored key; ``created`` is false when it replaced the key under its label."""

    key: Key
    created: bool
    replaced_key_id: KeyId | None
    warnings: list[str]
    check: KeyCheck | None


class DeleteKeysResult(BaseModel):
    """The ids of the deleted keys."""

    deleted: list[KeyId] = Field(min_length=1)


class Session(BaseModel):
    """A ``byok serve`` session token, for ``Authorization: Bearer``."""

    model_config = ConfigDict(extra="forbid")

    session: str
    idle_timeout_seconds: int = Field(ge=1)


class Budget(BaseModel):
    """A budget: its rules, and what is spent, reserved and left in its period (USD)."""

    workspace_id: str
    name: str
    metric: Literal["charge", "list_cost"]
    period: Literal["day", "month", "none"]
    limit: Money
    hard: bool
    thresholds: list[int]
    key_id: str | None
    #: the key named by ``key_id`` no longer exists (deleted, or replaced under its label): the
    #: budget applies to no call until it is set again with a current key
    key_gone: bool
    workflow_id: str | None
    spent: Money
    reserved: Money
    left: Money
    period_start: str = Field(json_schema_extra={"format": "date-time"})
    updated_by: str | None
    updated_at: str = Field(json_schema_extra={"format": "date-time"})


class BudgetList(BaseModel):
    """A workspace's budgets, and whether the caller may change them."""

    workspace_id: str
    can_manage: bool
    budgets: list[Budget]


class BudgetResult(BaseModel):
    """One budget, as it is now."""

    budget: Budget


class DeleteBudgetResult(BaseModel):
    """The name of the deleted budget."""

    deleted: str


class InheritedKey(Key):
    """A key a workspace inherits from its organization, masked."""

    organization_id: str
    inherited: Literal[True]
    active: bool = Field(
        description="False when the workspace opted out of its organization's keys: listed, "
        "never used."
    )


class InheritedKeyList(BaseModel):
    """The keys a workspace inherits from its organization."""

    workspace_id: str
    organization_id: str | None
    opted_out: bool | None
    keys: list[InheritedKey]


class AuditEvent(BaseModel):
    """One event of the audit log."""

    occurred_at: str = Field(json_schema_extra={"format": "date-time"})
    action: str
    workspace_id: str
    actor_id: str | None
    outcome: str
    provider: str | None
    key_id: str | None
    detail: str


class AuditLog(BaseModel):
    """One page of a workspace's audit log, newest first."""

    workspace_id: str
    events: list[AuditEvent]
    older: int | None = Field(description="The cursor of the next, older page (``before=``).")


class UsageSums(BaseModel):
    """Calls and money (decimal strings, in the usage's currency) of some usage."""

    calls: int = Field(ge=0)
    byok_calls: int = Field(ge=0, description="Calls on the workspace's own keys.")
    platform_calls: int = Field(
        ge=0, description="Calls on the platform's keys (or a block's own key)."
    )
    byok_cost: Money = Field(
        description="The own keys' calls at list price: billed by the provider, not the platform."
    )
    platform_charged: Money = Field(description="What the platform charged the workspace.")
    byok_saved: Money = Field(
        description="What the own keys' calls would have cost on the platform at list price."
    )


class UsageDay(UsageSums):
    """The usage of one day (UTC)."""

    day: str = Field(json_schema_extra={"format": "date"})


class UsageModel(UsageSums):
    """The usage of one model."""

    provider: str
    model: str


class UsageBlock(UsageSums):
    """The usage of one workflow block and key."""

    workflow_id: str | None
    block_id: str | None
    key_id: str | None


class Usage(BaseModel):
    """A workspace's usage over a period: totals, by day, by model and by block."""

    workspace_id: str
    currency: str
    since: str = Field(json_schema_extra={"format": "date"})
    days: int
    totals: UsageSums
    by_day: list[UsageDay]
    by_model: list[UsageModel]
    by_block: list[UsageBlock]


class FallbackPolicy(BaseModel):
    """A workspace's fallback policy, and whether the caller may change it."""

    workspace_id: str
    policy: FallbackPolicyName
    updated_by: str | None
    updated_at: str | None
    can_manage: bool
