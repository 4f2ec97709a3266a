"""The hook specifications of the pluggy project ``byok``.

Every hook is prefixed ``byok_`` because hosts add these specs to their own plugin manager.
Hooks are synchronous: an asyncio host calls the ones that may wait on the network from a worker
thread (:mod:`byok_hookspecs.blocking` says which implementations never do).
"""

from __future__ import annotations

from collections.abc import Sequence

import pluggy

from byok_hookspecs import hookspec
from byok_hookspecs.types import (
    Action,
    Actor,
    AuditEvent,
    BudgetHold,
    BudgetReservation,
    BudgetSettlement,
    Charge,
    Credential,
    CredentialRequest,
    KeyCheck,
    RecordedCall,
    Usage,
    UsageRecord,
    WrappedDataKey,
)


@hookspec(historic=True)
def byok_manager_ready(pm: pluggy.PluginManager) -> None:
    """Hand every plugin the manager it is registered in, once the byok hooks are added to it.

    ``add_to`` makes this a historic call: a plugin registered later receives it on
    registration. A plugin keeps ``pm`` to ask other hooks, as the default resolution asks
    ``byok_is_hosted`` and ``byok_platform_key`` so that any plugin's answers come first.

    :param pm: the plugin manager that holds the byok hooks.
    :returns: nothing.
    """


@hookspec(firstresult=True)
def byok_resolve_credential(request: CredentialRequest) -> Credential | None:
    """Choose the key that runs one provider call.

    The default policy: the block's own key, else the workspace's BYOK key for the provider, else a
    platform key for hosted models and tools, else :class:`~byok_hookspecs.NoCredential`. A key
    that exists but cannot be used raises :class:`~byok_hookspecs.CredentialUnavailable`; it
    never falls back to the billed platform key in silence. When ``request.failure`` is set, the
    host asks again after the provider refused a key, and the workspace's fallback policy decides.

    Stops at first non-None result.

    :param request: the workspace, provider, model or tool, and the run's ids.
    :returns: the credential to use, or ``None`` to let the next implementation answer.
    """


@hookspec(firstresult=True)
def byok_is_hosted(provider: str, model: str) -> bool | None:
    """Tell whether the platform hosts a model or tool, that is, may serve it on its own key.

    Stops at first non-None result.

    :param provider: the provider's name.
    :param model: the model, or the tool.
    :returns: ``True`` if hosted, ``False`` if not, ``None`` to let the next implementation answer.
    """


@hookspec(firstresult=True)
def byok_platform_key(provider: str, model: str) -> str | None:
    """Give a platform key for a hosted model or tool, from the platform's key pool.

    Stops at first non-None result.

    :param provider: the provider's name.
    :param model: the model, or the tool.
    :returns: the key, or ``None`` when the platform has none for this provider.
    """


@hookspec(firstresult=True)
def byok_compute_charge(usage: Usage, credential: Credential) -> Charge | None:
    """Price one completed provider call: the billing hook.

    The default charges 0 for a BYOK or block credential, and price x multiplier for a platform
    one. Override it with ``@hookimpl(tryfirst=True)``, for example to add a fee on BYOK usage.

    Stops at first non-None result.

    :param usage: what the call consumed, as the provider reported it.
    :param credential: the credential that served the call (its source decides who pays).
    :returns: the charge, or ``None`` to let the next implementation answer.
    """


@hookspec
def byok_record_usage(record: UsageRecord) -> None:
    """Record one provider call: the ledger, and any metering export.

    Every implementation runs. Implementations must be idempotent on
    ``record.idempotency_key``, so that a retried block is never charged twice.

    :param record: the call, its usage, its charge and the credential source that served it.
    :returns: nothing.
    """


@hookspec
def byok_record_usage_batch(records: Sequence[UsageRecord]) -> None:
    """Record several provider calls that finished together, in one go (one transaction).

    The batch form of :func:`byok_record_usage`, an addition to it: a host that groups the records
    of concurrent calls (the reference runner does when the hooks run in a worker thread) calls
    this hook with the group, and :func:`byok_record_usage` for each record on the plugins that do
    not implement this one, so every plugin sees every record once. Every implementation runs.

    Implementations must be idempotent on each ``record.idempotency_key``, as
    ``byok_record_usage``'s are. Raising means that none of the records may be taken as recorded:
    the host then calls ``byok_record_usage`` for each record, on every plugin (idempotent).

    :param records: the calls, in the order they finished; never empty.
    :returns: nothing.
    """


@hookspec(firstresult=True)
def byok_record_usage_and_settle(
    records: Sequence[UsageRecord], settlements: Sequence[BudgetSettlement]
) -> bool | None:
    """Record a group of calls and settle their budget holds together, in one transaction.

    :func:`byok_record_usage_batch` and :func:`byok_settle_budget` at once, so that a call's
    ledger row and its settlement land together (one commit for the group). A host calls it only
    when exactly one plugin implements it and that plugin is the only one implementing
    ``byok_settle_budget``; the plugins that implement the batch or single recording hooks get
    the records through those hooks as well.

    Stops at first non-None result.

    :param records: the calls, in the order they finished; never empty.
    :param settlements: the budget settlements of those of the calls that hold something;
        idempotent on each ``idempotency_key`` as ``byok_settle_budget`` is.
    :returns: ``True`` when the records and the settlements were committed together; ``None``
        to decline (the host then records and settles them separately, as without this hook).
        Raising means neither was done: the host then does both separately (idempotent).
    """


@hookspec(firstresult=True)
def byok_recorded_calls(run_id: str) -> tuple[RecordedCall, ...] | None:
    """The calls already recorded in the usage ledger under a run id, of any workspace.

    A host asks before it starts a run with an id its caller chose: calls already recorded mean
    the id was used before, and a call made again under the same idempotency key would not be
    recorded (nor charged). The host refuses the run, or, when its caller asks to replay it, makes
    no completed call again and numbers new attempts after the recorded ones.

    Stops at first non-None result.

    :param run_id: the run id the caller gave.
    :returns: the recorded calls, oldest first (empty when none), or ``None`` to let the next
        implementation answer.
    """


@hookspec(firstresult=True)
def byok_claim_run(run_id: str, workspace_id: str, claimant: str, seconds: float) -> bool | None:
    """Claim a run id its caller chose for one run in flight, across every worker of the store.

    A host asks before it starts a run with an id its caller chose, and again while the run goes
    on, to extend the claim. Two workers given the same run id at once would both make the run's
    calls under the same idempotency keys, and only the first record of a key is kept: the other
    worker's calls would be made and never recorded nor charged. A host calls it off its event
    loop (it writes to the store).

    Stops at first non-None result.

    :param run_id: the run id the caller gave.
    :param workspace_id: the workspace the run is for.
    :param claimant: the host's random token for this run in flight: a claim held under the same
        token is extended.
    :param seconds: how long the claim lasts unless extended or released (a worker that dies
        mid-run leaves a claim that lapses then).
    :returns: ``True`` when the run id is this run's (claimed, extended, or taken over from a claim
        that lapsed), ``False`` when another run in flight holds it, or ``None`` to let the next
        implementation answer (no answer at all: nothing is claimed).
    """


@hookspec
def byok_release_run(run_id: str, claimant: str) -> None:
    """Give back a run id claimed with :func:`byok_claim_run` once its run has ended.

    A host calls it when the run completed, failed or was cancelled, off its event loop. A claim
    held under another token is left as it is.

    :param run_id: the run id.
    :param claimant: the token the run claimed it with.
    :returns: nothing.
    """


@hookspec(firstresult=True)
def byok_authorize(actor: Actor | None, workspace_id: str, action: Action) -> bool | None:
    """Decide whether an actor may do something with a workspace's keys.

    No answer at all means deny: a host with no authorization plugin denies everything.

    Stops at first non-None result.

    :param actor: who asks, as the host authenticated them (``None`` if anonymous, or a
        credential request that names no actor: the default gives no answer for it).
    :param workspace_id: the workspace concerned.
    :param action: read keys, manage keys, use keys or read usage.
    :returns: ``True`` to allow, ``False`` to deny, ``None`` to let the next implementation answer.
    """


@hookspec(firstresult=True)
def byok_validate_key(provider: str, api_key: str) -> KeyCheck | None:
    """Check a key live against its provider before it is saved or when an admin tests it.

    Stops at first non-None result.

    :param provider: the provider's name.
    :param api_key: the key to check; implementations must never log it.
    :returns: the check's outcome, or ``None`` to let the next implementation answer.
    """


@hookspec
def byok_audit(event: AuditEvent) -> None:
    """Record an audit event: a key created, replaced, deleted or rotated, a fallback, a denial.

    Every implementation runs.

    :param event: what happened, to which workspace, by whom; never a secret.
    :returns: nothing.
    """


@hookspec(firstresult=True)
def byok_wrap_data_key(workspace_id: str, data_key: bytes) -> WrappedDataKey | None:
    """Wrap a workspace's new data key with the active key-encryption key (envelope encryption).

    Called when a workspace stores its first key under envelope encryption, and by
    ``byok keys rewrap`` to move a data key to the current key-encryption key. The wrapping must
    be bound to ``workspace_id`` (associated data, an encryption context), so that a wrapped data
    key copied to another workspace does not unwrap there. Raise (naming the KMS) when the KMS
    does not answer; never return a key wrapped by something else instead.

    Stops at first non-None result.

    :param workspace_id: the workspace the data key belongs to.
    :param data_key: the 32 random bytes to wrap; implementations must never log them.
    :returns: the wrapped key, or ``None`` to let the next implementation answer.
    """


@hookspec(firstresult=True)
def byok_unwrap_data_key(workspace_id: str, wrapped: WrappedDataKey) -> bytes | None:
    """Unwrap a workspace's data key, so that its stored provider keys can be decrypted.

    An implementation answers only for ``wrapped.provider`` values it owns (``None`` otherwise),
    and raises when it owns the key but cannot unwrap it: the KMS does not answer, the key was
    tampered with or wrapped for another workspace. Resolution then fails loudly; it never falls
    back to a platform key. The result is cached in memory for a bounded time
    (``BYOK_DATA_KEY_CACHE_SECONDS``), so a resolution does not call the KMS.

    Stops at first non-None result.

    :param workspace_id: the workspace the data key must belong to.
    :param wrapped: the wrapped data key, as :func:`byok_wrap_data_key` returned it.
    :returns: the 32-byte data key, or ``None`` to let the next implementation answer.
    """


@hookspec(firstresult=True)
def byok_rewrap_data_key(workspace_id: str, wrapped: WrappedDataKey) -> WrappedDataKey | None:
    """Move a wrapped data key to the current key-encryption key inside the KMS.

    Called by ``byok keys rewrap`` for each data key not wrapped by the current key-encryption
    key (after a rotation), so that the data key never leaves the KMS (Transit's ``rewrap``, AWS
    KMS's ``ReEncrypt``). Return ``None`` when you cannot (``wrapped.provider`` is not yours, or
    your KMS has no such operation): byok-plugin then unwraps and wraps it again through the two
    hooks above. Keep the binding to ``workspace_id``.

    Stops at first non-None result.

    :param workspace_id: the workspace the data key belongs to.
    :param wrapped: the data key as wrapped by an older key-encryption key (or key version).
    :returns: the data key wrapped by the current key-encryption key, or ``None``.
    """


@hookspec(firstresult=True)
def byok_key_provider() -> str | None:
    """Describe the active key-encryption provider, for ``byok plugins`` and ``byok init``.

    Stops at first non-None result.

    :returns: a one-line description without secrets (``local keyring (key file ...)``,
        ``OpenBao/Vault Transit key byok at https://...``), or ``None``.
    """


@hookspec
def byok_prepare() -> None:
    """Load what the other hooks need (the store, the catalog, the prices) before a first call.

    Every implementation runs. A host calls it once, off its event loop (the reference runner
    does in ``WorkflowRunner.open``, in a worker thread), so that a first run does not stall the
    loop while a database is opened and migrated or files are read. An implementation that
    fails is logged by the host; the hooks that need what it could not load report it.

    :returns: nothing.
    """


@hookspec(firstresult=True)
def byok_reserve_budget(reservation: BudgetReservation) -> BudgetHold | None:
    """Hold a provider call's worst-case cost against the workspace's budgets, before the call.

    A call that does not fit a hard budget is refused: raise
    :class:`~byok_hookspecs.BudgetExceeded` (it names the workspace, the budget, what is spent,
    reserved and left). The check and the hold must be one atomic step, so that calls in flight
    in many workers never overshoot. A hold the host never settles lapses after
    ``reservation.hold_seconds``. A platform with its own credit system answers here and in
    ``byok_settle_budget``.

    Stops at first non-None result.

    :param reservation: the call's key, workspace, credential source and worst-case amounts.
    :returns: what is held, or ``None`` when no budget applies (the host need not settle).
    """


@hookspec(firstresult=True)
def byok_settle_budget(settlement: BudgetSettlement) -> bool | None:
    """Replace a call's hold by what it actually cost (or release it: ``completed=False``).

    Implementations must be idempotent on ``settlement.idempotency_key``: a second settlement of
    the same call changes nothing. A hold that already lapsed still counts what was spent.

    Stops at first non-None result.

    :param settlement: the call's key, workspace, actual charge and list cost.
    :returns: ``True`` when this settlement changed a budget, ``False`` when it had been settled
        already (or nothing was held), ``None`` to let the next implementation answer.
    """
