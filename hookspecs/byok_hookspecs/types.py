"""The frozen values that go in and out of the ``byok`` hooks.

Every secret field (``api_key``, ``block_key``) is left out of ``repr`` so that a value logged by
mistake, printed in a traceback or shown by a debugger never carries a key.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from operator import attrgetter
from types import MappingProxyType

__all__ = [
    "RECORD_STATUSES",
    "USAGE_COUNTS",
    "Action",
    "Actor",
    "AuditEvent",
    "BudgetHold",
    "BudgetReservation",
    "BudgetSettlement",
    "Charge",
    "Credential",
    "CredentialRequest",
    "CredentialSource",
    "FailureReason",
    "KeyCheck",
    "KeyCheckStatus",
    "ProviderFailure",
    "Role",
    "Usage",
    "UsageRecord",
    "WrappedDataKey",
]

#: the counts a :class:`Usage` carries, in display order (each a non-negative int)
USAGE_COUNTS = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "tool_requests",
    "cache_write_1h_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
)

#: the counts of a :class:`Usage`, read at once (its validation)
_usage_counts = attrgetter(*USAGE_COUNTS)
_PLAIN_INT = {int}

_NO_ROLES: Mapping[str, Role | str] = MappingProxyType({})


class CredentialSource(enum.StrEnum):
    """Where a credential came from."""

    #: the agent block carried its own key; the platform does not bill it
    BLOCK = "block"
    #: the workspace's stored BYOK key; the workspace pays the provider directly
    WORKSPACE = "workspace"
    #: a key of the workspace's organization, inherited by the workspace; BYOK as well (the
    #: organization pays the provider directly, the platform does not bill it)
    ORGANIZATION = "organization"
    #: the platform's own key; the platform bills the workspace
    PLATFORM = "platform"


class FailureReason(enum.StrEnum):
    """Why the provider refused a credential, when the host asks again."""

    AUTH = "auth"
    RATE_LIMIT = "rate_limit"
    ERROR = "error"


class Role(enum.StrEnum):
    """A person's role in a workspace."""

    MEMBER = "member"
    ADMIN = "admin"


class Action(enum.StrEnum):
    """What an actor asks to do with a workspace's keys, decided by ``byok_authorize``."""

    #: list the masked keys and read the workspace's settings
    READ_KEYS = "keys.read"
    #: set, replace, delete, enable, disable or test a key
    MANAGE_KEYS = "keys.manage"
    #: run a workflow on the workspace's keys
    USE_KEYS = "keys.use"
    #: read the workspace's usage and charges
    READ_USAGE = "usage.read"


class KeyCheckStatus(enum.StrEnum):
    """The outcome of a live key check."""

    VALID = "valid"
    #: the provider refused the key itself (revoked, deleted, malformed)
    INVALID = "invalid"
    UNREACHABLE = "unreachable"
    SKIPPED = "skipped"
    #: the key authenticated, but its account has no credit left (OpenAI ``insufficient_quota``,
    #: Anthropic's "credit balance is too low"): neither an auth failure nor a rate limit
    NO_CREDIT = "no_credit"


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asks. The host builds it from its own authentication; it is trusted as given.

    :param id: a stable identifier of the person or service.
    :param roles: workspace id -> role, as the host knows it.
    :param operator: the local operator who holds the master key (the ``byok`` command).
    """

    id: str
    roles: Mapping[str, Role | str] = field(default_factory=lambda: _NO_ROLES)
    operator: bool = False

    def role_in(self, workspace_id: str) -> Role | None:
        """The actor's role in a workspace, or None when not a member."""
        role = self.roles.get(workspace_id)
        return Role(role) if role is not None else None


@dataclass(frozen=True, slots=True)
class ProviderFailure:
    """The provider's refusal of a credential the host used; sent back on a second request.

    :param reason: what kind of failure it was.
    :param source: the source of the credential that failed.
    :param key_id: the safe reference of the key that failed, if it had one.
    :param status: the HTTP status the provider answered, if any.
    :param retry_after: how many seconds the provider asked to wait before using the key again
        (``Retry-After``, ``retry-after-ms``, Gemini's ``RetryInfo.retryDelay``), if it said.
    """

    reason: FailureReason
    source: CredentialSource
    key_id: str | None = None
    status: int | None = None
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class CredentialRequest:
    """A host's question: which key runs this provider call?

    :param workspace_id: the workspace the workflow runs in.
    :param provider: ``openai``, ``anthropic``, ``google``, ``mistral``, ``exa`` or a plugin's own.
    :param model: the model, or the tool (``exa-search``) for tool calls.
    :param workflow_id: the workflow's name or id, for the ledger.
    :param run_id: the run, for the ledger.
    :param block_id: the block, for the ledger.
    :param block_key: the block's own key, if the block carries one (never in repr).
    :param actor: who started the run; resolution asks ``byok_authorize`` about it, ``None``
        included (the default rule refuses ``None``).
    :param stream: whether the call is streamed (resolution does not depend on it).
    :param failure: set when the host asks again after the provider refused a credential.
    :param key_label: the block asks for the workspace's stored key with this label
        (``"key": {"label": ...}`` in a workflow): that key serves the call (source
        ``workspace``), or resolution fails; never another key, never the platform's.
    :param tools: the provider's own tools the call may use, each billed per request
        (``web_search``): a platform-billed call is refused before it is sent when one of them
        has no price.
    """

    workspace_id: str
    provider: str
    model: str
    workflow_id: str | None = None
    run_id: str | None = None
    block_id: str | None = None
    block_key: str | None = field(default=None, repr=False)
    actor: Actor | None = None
    stream: bool = False
    failure: ProviderFailure | None = None
    key_label: str | None = None
    tools: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Credential:
    """A hook's answer: the key to call the provider with, and where it came from.

    :param api_key: the secret (never in repr).
    :param provider: the provider it is for.
    :param source: block, workspace, organization or platform.
    :param key_id: a safe reference for logs and the ledger (a stored key's id, or a pool slot).
    :param hint: the masked form, such as ``sk-pro...abcd``.
    :param fallback: True when the platform serves a call after the workspace key failed.
    :param waited: seconds resolution waited for a cooling key to come back (0 when it did not).
    """

    api_key: str = field(repr=False)
    provider: str
    source: CredentialSource
    key_id: str | None = None
    hint: str = ""
    fallback: bool = False
    waited: float = 0.0

    @property
    def is_byok(self) -> bool:
        """True for a stored BYOK key, the workspace's or its organization's: they pay the
        provider."""
        return self.source in (CredentialSource.WORKSPACE, CredentialSource.ORGANIZATION)

    @property
    def billed_by_platform(self) -> bool:
        """True when the platform's key served the call and the platform pays the provider."""
        return self.source is CredentialSource.PLATFORM


@dataclass(frozen=True, slots=True)
class Usage:
    """What one provider call consumed, as the provider reported it.

    The token counts are disjoint, so that each is priced once:
    ``input_tokens`` are fresh (uncached) input tokens, ``cached_input_tokens`` are cache reads,
    ``cache_write_tokens`` are tokens written to a prompt cache (Anthropic's 5-minute cache),
    ``cache_write_1h_tokens`` those written to Anthropic's 1-hour cache (billed higher),
    ``output_tokens`` are visible output tokens and ``reasoning_tokens`` are hidden reasoning
    ("thinking") tokens; ``input_audio_tokens`` and ``output_audio_tokens`` are audio tokens in
    and out (OpenAI's audio models), priced at their own rates.

    :param provider: the provider that served the call.
    :param model: the model, or the tool for tool calls.
    :param tool_requests: billable requests of a tool called on its own (an Exa search is one),
        priced at the tool's ``per_request``.
    :param tool_uses: the provider's own tools a model call used, each billed per request:
        ``(("web_search", 3), ("web_fetch", 1))``, sorted by name, counts > 0.
    :param reported_cost: the cost the provider itself reported, in USD, where it reports one.
    """

    provider: str
    model: str
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    tool_requests: int = 0
    cache_write_1h_tokens: int = 0
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0
    reported_cost: Decimal | None = None
    tool_uses: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        # built several times per provider call: plain non-negative ints and no tool uses are
        # told at once (C-level), anything else goes through the full checks below
        counts = _usage_counts(self)
        if set(map(type, counts)) == _PLAIN_INT and min(counts) >= 0:
            if type(self.tool_uses) is tuple and not self.tool_uses:
                if self.reported_cost is not None and not isinstance(self.reported_cost, Decimal):
                    raise TypeError("Usage.reported_cost must be a Decimal")
                return
        else:
            for name, value in zip(USAGE_COUNTS, counts, strict=True):
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"Usage.{name} must be a non-negative integer, got {value!r}")
        uses = dict(self.tool_uses)
        if len(uses) != len(self.tool_uses) or any(
            not isinstance(k, str)
            or not k
            or not isinstance(v, int)
            or isinstance(v, bool)
            or v < 1
            for k, v in uses.items()
        ):
            raise ValueError(
                "Usage.tool_uses must be (tool name, count > 0) pairs, each tool once, got "
                f"{self.tool_uses!r}"
            )
        object.__setattr__(self, "tool_uses", tuple(sorted(uses.items())))
        if self.reported_cost is not None and not isinstance(self.reported_cost, Decimal):
            raise TypeError("Usage.reported_cost must be a Decimal")

    @property
    def total_tokens(self) -> int:
        return (
            self.input_tokens
            + self.cached_input_tokens
            + self.cache_write_tokens
            + self.cache_write_1h_tokens
            + self.output_tokens
            + self.reasoning_tokens
            + self.input_audio_tokens
            + self.output_audio_tokens
        )


@dataclass(frozen=True, slots=True)
class Charge:
    """What the platform charges the workspace for one provider call.

    :param amount: the charged amount (Decimal, never float).
    :param currency: ISO 4217 code.
    :param reason: why this amount: ``byok``, ``block_key``, ``platform`` or a plugin's own word.
    :param list_cost: the call's cost at list price, whoever pays it (what BYOK saved).
    :param breakdown: ``(item, amount)`` pairs that add up to ``list_cost`` or ``amount``.
    :param price_version: the version of the price table used, if any.
    :param unpriced: the parts of the call the price table has no price for (``cache_write_1h``,
        ``tool:web_fetch``): they are not in ``list_cost`` or ``amount``, to be billed by hand.
    """

    amount: Decimal
    currency: str = "USD"
    reason: str = "platform"
    list_cost: Decimal | None = None
    breakdown: tuple[tuple[str, Decimal], ...] = ()
    price_version: str | None = None
    unpriced: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.amount, Decimal):
            raise TypeError("Charge.amount must be a Decimal")
        if self.amount < 0:
            raise ValueError("Charge.amount must not be negative")


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One provider call for the ledger. Written once per ``idempotency_key``.

    :param idempotency_key: unique per run, block and attempt; a retried write is a no-op.
    :param workspace_id: who is charged.
    :param usage: what the call consumed.
    :param charge: what the platform charges for it.
    :param source: which credential source served the call.
    :param key_id: the safe reference of the key that served it.
    :param fallback: True when the platform served the call after the workspace key failed.
    :param status: ``complete``; ``interrupted`` for a stream that broke (or whose run was
        cancelled) after the provider started answering: the usage is what the provider is known
        to bill for it, charged as any call; ``uncertain`` for a request the provider may have
        executed without the client reading its answer (a timeout or a reset after the request
        was sent, or a 2xx answer the client could not read): not charged, kept for
        reconciliation.
    :param estimated: the usage counts (names from ``USAGE_COUNTS``) that are estimated from the
        request, not reported by the provider: ``input_tokens`` of an ``uncertain`` call, or of
        an ``interrupted`` stream whose provider reports the input only at its end.
    """

    idempotency_key: str
    workspace_id: str
    usage: Usage
    charge: Charge
    source: CredentialSource
    key_id: str | None = None
    fallback: bool = False
    workflow_id: str | None = None
    run_id: str | None = None
    block_id: str | None = None
    attempt: int = 1
    occurred_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    status: str = "complete"
    estimated: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.status not in RECORD_STATUSES:
            raise ValueError(
                f"UsageRecord.status must be one of {', '.join(RECORD_STATUSES)}, not {self.status!r}"
            )
        unknown = [name for name in self.estimated if name not in USAGE_COUNTS]
        if unknown:
            raise ValueError(
                f"UsageRecord.estimated names no usage count: {', '.join(map(repr, unknown))}"
            )


#: what a :class:`UsageRecord`'s ``status`` may be
RECORD_STATUSES = ("complete", "interrupted", "uncertain")


@dataclass(frozen=True, slots=True)
class RecordedCall:
    """A call already in the usage ledger under a run id (``byok_recorded_calls``).

    :param idempotency_key: the record's key (``run_id:block_id:attempt``...).
    :param workspace_id: the workspace it was charged to.
    :param block_id: the block that made the call, if known.
    :param attempt: the block's attempt that made it.
    """

    idempotency_key: str
    workspace_id: str
    block_id: str | None = None
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """Something that happened to a workspace's keys, or a refusal.

    :param action: ``key.created``, ``key.replaced``, ``key.deleted``, ``key.enabled``,
        ``key.disabled``, ``key.tested``, ``key.rewrapped``, ``master_key.retired``,
        ``fallback.used``, ``access.denied``, ``budget.threshold``, ``budget.refused``...
    :param workspace_id: the workspace concerned.
    :param actor_id: who did it (``None`` for the system).
    :param outcome: ``ok`` or ``denied`` or ``error``.
    :param provider: the provider concerned, if any.
    :param key_id: the key concerned, if any.
    :param detail: free text without secrets.
    """

    action: str
    workspace_id: str
    actor_id: str | None
    outcome: str = "ok"
    provider: str | None = None
    key_id: str | None = None
    detail: str = ""
    occurred_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True, slots=True)
class KeyCheck:
    """The result of a live key check against the provider.

    :param provider: the provider asked.
    :param status: valid, invalid, unreachable or skipped.
    :param message: what the provider said, without the key.
    """

    provider: str
    status: KeyCheckStatus
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status is KeyCheckStatus.VALID


@dataclass(frozen=True, slots=True)
class WrappedDataKey:
    """A workspace's data key as stored: encrypted (wrapped) by a key-encryption key.

    Not a secret on its own (only the key-encryption key opens it), but its bytes are still kept
    out of ``repr``.

    :param provider: who wrapped it and can unwrap it: ``local`` (the master keyring),
        ``vault-transit``, ``aws-kms`` or a plugin's own name.
    :param key_id: which key-encryption key, and version, wrapped it (a master key id, a Transit
        key name, a KMS key id); shown in errors and by ``byok keys rewrap``.
    :param blob: the wrapped bytes, as the provider returned them.
    """

    provider: str
    key_id: str
    blob: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.provider or not self.key_id:
            raise ValueError("a wrapped data key names its provider and key-encryption key")
        if not isinstance(self.blob, bytes) or not self.blob:
            raise ValueError("a wrapped data key's blob is non-empty bytes")


@dataclass(frozen=True, slots=True)
class BudgetReservation:
    """A host's request to hold a provider call's worst-case cost against the workspace's budgets,
    before the call is sent.

    :param idempotency_key: the call's key, the one its :class:`UsageRecord` will carry; reserving
        again under a key still held replaces the hold (another credential after a refused key).
    :param workspace_id: whose budgets.
    :param provider: the provider called.
    :param model: the model, or the tool.
    :param source: the credential source that will serve the call (a BYOK list-cost budget counts
        ``workspace`` calls only).
    :param amount: the worst-case platform charge (``byok_compute_charge`` of the worst-case usage).
    :param list_cost: the worst-case cost at list price.
    :param hold_seconds: how long the hold lasts if the call is never settled (a crashed worker).
    :param key_id: the safe reference of the key that will serve it, for per-key budgets.
    :param workflow_id: the workflow, for per-workflow budgets.
    :param run_id: the run.
    :param block_id: the block.
    """

    idempotency_key: str
    workspace_id: str
    provider: str
    model: str
    source: CredentialSource
    amount: Decimal
    list_cost: Decimal = Decimal(0)
    hold_seconds: float = 900.0
    key_id: str | None = None
    workflow_id: str | None = None
    run_id: str | None = None
    block_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("amount", "list_cost"):
            value = getattr(self, name)
            if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
                raise ValueError(f"BudgetReservation.{name} must be a finite Decimal >= 0")
        if not self.hold_seconds > 0:
            raise ValueError("BudgetReservation.hold_seconds must be > 0")


@dataclass(frozen=True, slots=True)
class BudgetHold:
    """What a reservation holds: the answer of ``byok_reserve_budget``.

    :param idempotency_key: the call's key.
    :param workspace_id: whose budgets.
    :param budgets: the names of the budgets holding something for the call.
    :param amount: the largest amount held on any one of them.
    :param expires_at: when the hold lapses if the call is never settled.
    """

    idempotency_key: str
    workspace_id: str
    budgets: tuple[str, ...]
    amount: Decimal
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class BudgetSettlement:
    """A call's actual cost, replacing its hold; a call that did not complete settles at zero.

    :param idempotency_key: the call's key (a second settlement under it changes nothing).
    :param workspace_id: whose budgets.
    :param amount: the platform charge actually computed (0 for a call that did not complete).
    :param list_cost: the cost at list price.
    :param source: the credential source that served the call.
    :param completed: False when the call never completed: the hold is released, nothing spent.
    """

    idempotency_key: str
    workspace_id: str
    amount: Decimal
    list_cost: Decimal = Decimal(0)
    source: CredentialSource = CredentialSource.PLATFORM
    completed: bool = True

    def __post_init__(self) -> None:
        for name in ("amount", "list_cost"):
            value = getattr(self, name)
            if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
                raise ValueError(f"BudgetSettlement.{name} must be a finite Decimal >= 0")
