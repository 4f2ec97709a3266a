"""Credential resolution: the default ``byok_resolve_credential``.

One rule for models and tools, streamed or not:

0. ``byok_authorize(actor, workspace, keys.use)`` first, for every request, whichever key would
   serve it, a request without an actor included: anything but ``True`` raises
   :class:`~byok_hookspecs.NotAuthorized` (audited ``access.denied``), saying how to fix it;
1. the block's own key (source ``block``; the platform does not bill it), unless it is one of
   the platform's keys (refused); or, when the block names a stored key by label
   (``request.key_label``), the workspace's enabled key with that label (source ``workspace``),
   else :class:`~byok_hookspecs.CredentialUnavailable`: never another key, never the platform;
2. else the workspace's BYOK key for the provider: round-robin over its enabled keys, skipping
   keys in cooldown (source ``workspace``);
2b. else, unless the workspace opted out, its organization's keys, by the same rule (source
   ``organization``, BYOK; :mod:`byok_plugin.resolution.organizations`). A block's ``key_label`` the
   workspace has no key for may name one of them (none at all: a key of its own with that label,
   disabled or cooling down, fails the block);
3. else, for hosted models and tools only (``byok_is_hosted``), a platform key
   (``byok_platform_key``; source ``platform``, billed). A platform-billed call on a model with no
   price is refused here, before the call (:class:`~byok_hookspecs.UnpricedModel`);
4. else :class:`~byok_hookspecs.NoCredential`, saying what to configure.

A stored key that does not decrypt, or a store that does not answer, raises
:class:`~byok_hookspecs.CredentialUnavailable` and never falls back to the platform key.

**Asking again.** When the provider refuses a key, the host calls the hook again with
``request.failure`` set (reason ``rate_limit`` / ``auth`` / ``error``, the failed key's source and
``key_id``). The failed key goes into cooldown for as long as the provider said
(``failure.retry_after``: ``Retry-After`` or Gemini's ``RetryInfo``; at most
:data:`MAX_COOLDOWN_SECONDS`), else for the fixed cooldown; a workspace or organization key
only after a refusal (auth or rate limit), or after an ``error`` when the fallback policy is
``on_error``: a 5xx or a timeout is not a refusal, and the block's own retry may use the key
again (a workspace key's cooldown is stored with its
reason, so every worker skips it and applies the fallback policy to the same reason; a platform
key's is this process's), and resolution answers with another key of
the same source if there is one. When the workspace has no usable key left, its fallback policy
(``never`` by default, ``on_rate_limit``, ``on_error``) decides whether the platform key serves
the call; such a credential has ``fallback=True``, source ``platform``, and the fallback is
audited (``fallback.used``). A block's own key is never replaced by another key.

**Speed.** A worker keeps each (workspace, provider)'s list of enabled keys, ciphertexts only, for
``BYOK_KEY_CACHE_SECONDS`` (2 s): a busy workspace costs one read per interval instead of one per
call. A key decrypted for a call is kept with its list and reused until the list expires; expired
lists, and the plaintexts with them, are dropped at the next resolution or at ``close()``. Key
changes made through this
process's hooks (audited ``key.*`` events) drop the entry at once; on SQLite, other workers see
changes and cooldowns within the interval. On PostgreSQL every such change (organization changes
included) sends ``NOTIFY byok_keys`` with its commit and each worker listens
(:mod:`byok_plugin.keys.listener`): the entry goes as the change commits, lists are kept 60 s
meanwhile, and the interval is the safety net while the listening connection is down. Which
organization pool a workspace uses (if any) is kept as long, and dropped at once on this
process's ``org.*`` events or on a notification; while listening, so is the fallback policy
(:attr:`Resolver.served_from_memory`). Then, called on an event loop, resolution sends no
statement on a warm list: its cooldown and audit writes go to the background writer, and a miss is
one indexed read. ``last_used_at`` is written in batches, at most every 30 s, off
the calling thread. ``0`` turns the cache off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shlex
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from byok_hookspecs import (
    Action,
    AuditEvent,
    Credential,
    CredentialRequest,
    CredentialSource,
    CredentialUnavailable,
    FailureReason,
    NoCredential,
    NotAuthorized,
    called_inline,
)
from sqlalchemy.engine import Engine

from byok_plugin.billing.charges import Billing
from byok_plugin.core.errors import StoreUnavailable
from byok_plugin.keys.access import KeyAccess
from byok_plugin.resolution.background_writes import BackgroundWrites
from byok_plugin.resolution.organizations import OrganizationStore, is_org_owner
from byok_plugin.resolution.platform_cooldowns import PlatformCooldowns
from byok_plugin.resolution.platform_keys import PlatformKeyPool, mask_key
from byok_plugin.resolution.workspace_settings import FallbackPolicy, WorkspaceSettingsStore
from byok_plugin.store.engine import retry_deadlocks, write_transaction
from byok_plugin.store.keys_repo import StoredKey
from byok_plugin.store.tables import workspace_keys

__all__ = ["ChangeFollower", "KeyListCache", "Resolver"]

log = logging.getLogger("byok.resolution")

#: how often the last-used times of keys are written (one batch, off the calling thread)
LAST_USED_FLUSH_SECONDS = 30.0
#: the longest cooldown a provider's ``Retry-After`` may set (a longer one is cut to this)
MAX_COOLDOWN_SECONDS = 3600.0
#: how long a key list is kept while every key change is announced (PostgreSQL ``LISTEN``)
LISTENING_CACHE_SECONDS = 60.0


def block_key_id(block_id: str | None) -> str:
    """The safe reference of a block's own key: ``block:<block id>``, or, for a block id longer
    than a key reference may be (80 characters: the audit's and the ledger's ``key_id`` columns
    hold it; a host's block ids may be any length), ``block:`` and a digest of the id."""
    if not block_id:
        return "block"
    key_id = f"block:{block_id}"
    if len(key_id) <= 80:
        return key_id
    return "block:" + hashlib.sha256(block_id.encode("utf-8", "backslashreplace")).hexdigest()[:32]


class HookCaller(Protocol):
    """The part of a pluggy manager resolution uses: ``pm.hook``."""

    hook: Any


class ChangeFollower(Protocol):
    """What else a worker keeps in memory of the store, told of the same announcements as the
    resolver's lists (:meth:`Resolver.listen_for_changes`)."""

    def changed_elsewhere(self, workspace_id: str, provider: str | None) -> None: ...

    def set_listening(self, listening: bool) -> None: ...


def _authorize_hint(request: CredentialRequest, answer: object) -> str:
    """How to get a refused ``keys.use`` allowed (``answer``: what ``byok_authorize`` said)."""
    ws = request.workspace_id
    if answer is False:
        return "a byok_authorize implementation refused it"
    if request.actor is None:
        return (
            f"the {request.provider} call names no actor and no byok_authorize implementation "
            f"allowed that: pass the actor who started the run "
            f"(WorkflowRunner.run(actor=...), CredentialRequest(actor=...)), e.g. for a scheduled "
            f"job Actor('nightly-job', roles={{{ws!r}: Role.MEMBER}}), or install a plugin whose "
            f"byok_authorize allows the host's own runs"
        )
    return (
        f"give the actor a role in workspace {ws!r} (Actor(roles={{{ws!r}: Role.MEMBER}})), or "
        f"install a plugin whose byok_authorize allows it"
    )


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _refused(reason: FailureReason) -> bool:
    """Whether the provider refused the key (auth, rate limit), rather than failed (a 5xx, a
    timeout, unreachable: ``error``), which puts no key in cooldown."""
    return reason is not FailureReason.ERROR


def _stored_reason(key: StoredKey) -> FailureReason:
    """Why a key is cooling down, as stored with its cooldown (``error`` when unknown: a cooldown
    written before the reason was stored, or set by hand)."""
    try:
        return FailureReason(key.cooldown_reason) if key.cooldown_reason else FailureReason.ERROR
    except ValueError:
        return FailureReason.ERROR


@dataclass(slots=True)
class _PendingCooldown:
    """A cooldown a worker applies from memory: until written (``forget_at`` unset), then for one
    cache interval more (monotonic ``forget_at``)."""

    workspace_id: str
    provider: str
    until: datetime
    reason: FailureReason
    forget_at: float | None = None


@dataclass(slots=True)
class _Entry:
    expires: float
    keys: tuple[StoredKey, ...]
    credentials: dict[tuple[str, str], Credential] = field(default_factory=dict)
    # label -> whether the (workspace, provider) has a key with it, enabled or not
    labels: dict[str, bool] = field(default_factory=dict)


class KeyListCache:
    """Each (workspace, provider)'s enabled keys, for a few seconds; bounded, thread-safe.

    An entry also keeps the credentials decrypted from its keys (:meth:`credential`), so a key
    served again within the same few seconds is not decrypted again; they go when the entry goes
    (:meth:`invalidate`, eviction, :meth:`clear`, or expiry: every read or write of the cache
    first drops the entries that have expired), so a plaintext is never held longer than its list
    and the next use of the cache.
    """

    def __init__(
        self,
        ttl_seconds: float,
        *,
        max_entries: int = 20_000,
        clock: Callable[[], float] = time.monotonic,
        listening_seconds: float = LISTENING_CACHE_SECONDS,
    ) -> None:
        """:param ttl_seconds: how long a list is kept (``0``: not at all).
        :param listening_seconds: how long instead while every change is announced
            (:meth:`set_listening`, PostgreSQL's ``LISTEN``); never less than ``ttl_seconds``."""
        self.ttl = ttl_seconds
        self.listening_ttl = max(listening_seconds, ttl_seconds)
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._listening = False
        # bumped by every drop: a list read before a drop is not put after it
        self._generation = 0

    @property
    def listening(self) -> bool:
        """Whether every change reaches the cache as it commits (then lists live longer)."""
        return self._listening

    @property
    def generation(self) -> int:
        """Take it before reading a list from the store, and give it to :meth:`put`."""
        return self._generation

    def set_listening(self, listening: bool) -> None:
        """Changes are announced (``True``) or may no longer be (``False``): either way every
        list goes (one may have changed unannounced), and the next ones live ``listening_ttl``
        or ``ttl``."""
        with self._lock:
            self._listening = listening
            self._generation += 1
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def credentials_held(self) -> int:
        """How many decrypted credentials the cache holds (for tests and diagnostics)."""
        return sum(len(entry.credentials) for entry in list(self._entries.values()))

    def _drop_expired(self, now: float) -> None:
        """Drop the entries that have expired: the oldest first, as they were put (one ttl)."""
        with self._lock:  # another thread may be putting or invalidating
            entries = self._entries
            while entries:
                key, entry = next(iter(entries.items()))
                if entry.expires > now:
                    break
                del entries[key]

    def _live(self, workspace_id: str, provider: str) -> _Entry | None:
        if self.ttl <= 0:
            return None
        now = self._clock()
        self._drop_expired(now)
        entry = self._entries.get((workspace_id, provider))
        if entry is None or entry.expires <= now:
            return None
        return entry

    def get(self, workspace_id: str, provider: str) -> tuple[StoredKey, ...] | None:
        entry = self._live(workspace_id, provider)
        return entry.keys if entry is not None else None

    def put(
        self,
        workspace_id: str,
        provider: str,
        keys: Sequence[StoredKey],
        *,
        generation: int | None = None,
    ) -> None:
        """Keep ``keys``; not when the cache dropped anything since ``generation`` was taken
        (the list may predate the change that was announced)."""
        if self.ttl <= 0:
            return
        now = self._clock()
        self._drop_expired(now)
        with self._lock:
            if generation is not None and generation != self._generation:
                return
            slot = (workspace_id, provider)
            ttl = self.listening_ttl if self._listening else self.ttl
            self._entries[slot] = _Entry(now + ttl, tuple(keys))
            self._entries.move_to_end(slot)  # in expiry order
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)  # the oldest entry

    def credential(self, key: StoredKey, reveal: Callable[[StoredKey], Credential]) -> Credential:
        """``reveal(key)``, or the credential it gave for this very key (same id and ciphertext)
        while the key's list is cached."""
        entry = self._live(key.workspace_id, key.provider)
        if entry is None or not any(k is key for k in entry.keys):
            return reveal(key)  # a list read since, or not cached: no plaintext kept
        slot = (key.id, key.ciphertext)
        credential = entry.credentials.get(slot)
        if credential is None:
            credential = reveal(key)
            entry.credentials[slot] = credential  # a race only decrypts twice
        return credential

    def has_label(
        self, workspace_id: str, provider: str, label: str, read: Callable[[], bool]
    ) -> bool:
        """``read()``: whether the (workspace, provider) has a key with ``label``, disabled keys
        included; kept with the cached list while it is (so dropped on the same changes)."""
        entry = self._live(workspace_id, provider)
        if entry is None:
            return read()
        known = entry.labels.get(label)
        if known is None:
            known = entry.labels[label] = read()  # a race only reads twice
            if len(entry.labels) > 1_000:
                entry.labels.clear()
        return known

    def clear(self) -> None:
        """Drop every entry (and the credentials decrypted from it)."""
        with self._lock:
            self._generation += 1
            self._entries.clear()

    def invalidate(self, workspace_id: str, provider: str | None = None) -> None:
        with self._lock:
            self._generation += 1
            if provider is not None:
                self._entries.pop((workspace_id, provider), None)
                return
            for key in [k for k in self._entries if k[0] == workspace_id]:
                del self._entries[key]


class Resolver:
    """The default resolution policy (see the module docstring), bound to one app's services."""

    def __init__(
        self,
        *,
        keys: KeyAccess,
        engine: Engine,
        workspace_settings: WorkspaceSettingsStore,
        billing: Billing,
        platform_keys: PlatformKeyPool,
        clock: Callable[[], datetime] = _utc_now,
        cooldown_seconds: float = 30.0,
        max_cooldown_seconds: float = MAX_COOLDOWN_SECONDS,
        max_wait_seconds: float = 0.0,
        sleep: Callable[[float], None] = time.sleep,
        cache_seconds: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
        reader: Callable[[str, str], Sequence[StoredKey]] | None = None,
        background: BackgroundWrites | None = None,
        platform_cooldowns: PlatformCooldowns | None = None,
        organizations: OrganizationStore | None = None,
    ) -> None:
        """:param reader: reads a (workspace, provider)'s enabled keys (default:
        ``keys.enabled_keys``; on SQLite, :class:`~byok_plugin.keys.reader.SqliteKeyReader`).
        :param background: where a cooldown that could not be written at once on an event loop's
            thread (the store locked by another writer) is written instead.
        :param platform_cooldowns: where platform-key cooldowns are shared with other workers
            (read at most once per ``cache_seconds`` per provider); per process without it."""
        self._background = background
        # a store across the network: on an event loop's thread, writes go to ``background``
        self._remote = engine.dialect.name == "postgresql"
        # workspace id -> (monotonic expiry, fallback policy): kept only while listening
        self._policies: dict[str, tuple[float, FallbackPolicy]] = {}
        self._shared_cooldowns = platform_cooldowns
        # provider -> when this worker last read the shared platform-key cooldowns
        self._cooldowns_read: dict[str, float] = {}
        self._orgs = organizations
        # workspace id -> (monotonic expiry, owner id of its organization's pool or None)
        self._pools: dict[str, tuple[float, str | None]] = {}
        self._pools_lock = threading.Lock()
        # key id -> a cooldown this worker applies from memory (not written yet, or just written)
        self._pending_cooldowns: dict[str, _PendingCooldown] = {}
        self._pending_lock = threading.Lock()
        self._keys = keys
        self._read = reader if reader is not None else keys.enabled_keys
        self._engine = engine
        self._settings = workspace_settings
        self._billing = billing
        self._pool = platform_keys
        self._clock = clock
        self._cooldown = timedelta(seconds=cooldown_seconds)
        self._max_cooldown = max(cooldown_seconds, max_cooldown_seconds)
        self._max_wait = max_wait_seconds
        self._sleep = sleep
        self._monotonic = monotonic
        self.cache = KeyListCache(cache_seconds, clock=monotonic)
        self._listener: Any = None  # a KeyChangeListener, on PostgreSQL (listen_for_changes)
        self._followers: tuple[ChangeFollower, ...] = ()
        self._turn: dict[tuple[str, str], int] = {}
        self._turn_lock = threading.Lock()
        self._used: dict[str, datetime] = {}
        self._used_lock = threading.Lock()
        self._flushing = False
        self._last_flush = monotonic()

    def __repr__(self) -> str:
        return f"Resolver(cached={len(self.cache)})"

    @property
    def served_from_memory(self) -> bool:
        """Whether every change to what resolution serves reaches this worker as it commits (on
        PostgreSQL, the listener is connected) with the cache on: then a call finds its lists,
        pool membership and fallback policy in memory, and its audit events and cooldowns are
        written by the background writer when it is called on an event loop. A miss (the first
        call of a (workspace, provider) after a change, or in 60 s) is one indexed read.
        ``False`` on SQLite (whose reads are local anyway) and while the listener is down."""
        listener = self._listener
        return (
            self._remote
            and listener is not None
            and listener.is_listening
            and self.cache.listening
            and self.cache.ttl > 0
        )

    def _writes_off_loop(self) -> bool:
        """Whether a write must be handed to the background writer: called on an event loop's
        thread with the store across the network."""
        return self._remote and self._background is not None and called_inline()

    # --- the entry point ------------------------------------------------------------------

    def resolve(self, request: CredentialRequest, pm: HookCaller) -> Credential:
        """Answer one ``byok_resolve_credential`` request (never ``None``).

        :raises NoCredential: no source has a key; the message says what to configure.
        :raises CredentialUnavailable: a key exists but cannot be used (does not decrypt, store
            down, cooling down, refused with fallback not allowed).
        :raises UnpricedModel: the platform would bill a model it has no price for.
        :raises NotAuthorized: ``byok_authorize`` does not allow the request's actor to use the
            workspace (asked for every request, whichever key would serve it; a request without
            an actor is refused unless a plugin allows it).
        """
        if is_org_owner(request.workspace_id):
            raise CredentialUnavailable(
                f"{request.workspace_id!r} is an organization's key pool, not a workspace: a run "
                f"takes place in a workspace, which inherits its organization's keys",
                workspace_id=request.workspace_id,
                provider=request.provider,
            )
        # every request, with or without an actor: no answer from byok_authorize means deny
        self._authorize(request, pm)
        failure = request.failure
        if request.key_label is not None:
            return self._labelled(request, pm)
        if failure is None:
            if request.block_key:
                return self._block_credential(request)
            return self._resolve(request, pm)
        if failure.source is CredentialSource.BLOCK:
            raise CredentialUnavailable(
                f"the block's own {request.provider} key was refused ({self._why(request)}); "
                f"a block's key is never replaced by another key: fix the key in block "
                f"{request.block_id or '?'}",
                workspace_id=request.workspace_id,
                provider=request.provider,
                key_id=failure.key_id,
            )
        if failure.source is CredentialSource.WORKSPACE:
            return self._after_workspace_failure(request, pm)
        if failure.source is CredentialSource.ORGANIZATION:
            return self._after_organization_failure(request, pm)
        # a platform key failed: skip it for a while (in every worker) and resolve again
        if failure.key_id is not None and self._pool.cool_down(failure.key_id):
            self._share_platform_cooldown(request.provider, failure.key_id, failure.reason)
        return self._resolve(request, pm)

    # --- the steps ------------------------------------------------------------------------

    def _labelled(self, request: CredentialRequest, pm: HookCaller) -> Credential:
        """The workspace's enabled key with the block's label, or :class:`CredentialUnavailable`:
        never another key, never the platform's. After a refusal, the key cools down (for every
        worker, audited) and the block fails."""
        label = request.key_label
        ws, provider = request.workspace_id, request.provider
        where = f"block {request.block_id or '?'} asks for the {provider} key labelled {label!r}"
        keys = self.enabled_keys(ws, provider)
        now = self._clock()
        failure = request.failure
        shadowed: str | None = None  # an organization whose key with the label is not used
        if (failure is not None and failure.source is CredentialSource.ORGANIZATION) or not any(
            k.label == label for k in keys
        ):
            owner = self._pool_owner(ws)
            if owner is not None:  # the workspace's own keys first, then its organization's
                pooled = self.enabled_keys(owner, provider)
                if (
                    failure is None
                    and any(k.label == label for k in pooled)
                    and self._has_label(ws, provider, label or "")
                ):
                    # the workspace has a key with that label, disabled: it fails the block, as
                    # it would without an organization (its admin turned that key off)
                    shadowed = owner
                else:
                    keys = keys + pooled
        if failure is not None:
            failed = next((k for k in keys if k.id == failure.key_id), None)
            if (
                failed is not None
                and failure.source in (CredentialSource.WORKSPACE, CredentialSource.ORGANIZATION)
                and _refused(failure.reason)
            ):
                self._cool_down(request, failed, failure.reason, now, pm)
            if not _refused(failure.reason):  # a 5xx, a timeout: the block may try the key again
                raise CredentialUnavailable(
                    f"{where}; the provider failed on workspace {ws!r}'s key {failure.key_id} with "
                    f"that label ({self._why(request)}: not a refusal, the key is not put in "
                    f"cooldown) and a block that names its key is never served by another",
                    workspace_id=ws,
                    provider=provider,
                    key_id=failure.key_id,
                )
            raise CredentialUnavailable(
                f"{where}; workspace {ws!r}'s key {failure.key_id} with that label was refused "
                f"({self._why(request)}) and a block that names its key is never served by "
                f"another (fix or replace it with `byok keys set --workspace {ws} "
                f"--provider {provider} --label {shlex.quote(label or '')}`)",
                workspace_id=ws,
                provider=provider,
                key_id=failure.key_id,
            )
        matching = [k for k in keys if k.label == label]
        if not matching:
            disabled = self._has_label(ws, provider, label or "")
            state = "is disabled" if disabled else "does not exist"
            fix = (
                f"`byok keys enable --workspace {ws} --provider {provider} --label {shlex.quote(label or '')}`"
                if disabled
                else f"`byok keys set --workspace {ws} --provider {provider} --label {shlex.quote(label or '')}`"
            )
            instead = "the platform key is not used in its place"
            if shadowed is not None:
                instead = (
                    f"neither the platform key nor the key with that label of organization "
                    f"{shadowed.removeprefix('org:')!r} is used in its place"
                )
            raise CredentialUnavailable(
                f"{where}, and workspace {ws!r} has none enabled: that key {state} ({instead}; "
                f"{fix})",
                workspace_id=ws,
                provider=provider,
            )
        key = matching[0]
        if key.cooldown_until is not None and key.cooldown_until > now:
            raise CredentialUnavailable(
                f"{where}; that key ({key.id}) of {self._owner_name(key)} is cooling down after "
                f"a provider refusal until {key.cooldown_until:%Y-%m-%d %H:%M:%S} UTC, and a "
                f"block that names its key is never served by another",
                workspace_id=ws,
                provider=provider,
                key_id=key.id,
            )
        return self._reveal(key)

    def _has_label(self, workspace_id: str, provider: str, label: str) -> bool:
        """Whether the workspace has a key with the label, enabled or not: read once per cached
        key list (dropped with it on any key change)."""
        return self.cache.has_label(
            workspace_id,
            provider,
            label,
            functools.partial(self._keys.has_label, workspace_id, provider, label),
        )

    def _block_credential(self, request: CredentialRequest) -> Credential:
        assert request.block_key is not None
        if self._pool.lookup(api_key=request.block_key) is not None:
            # the platform's own key, smuggled in as a block's key: it would run free of charge
            raise CredentialUnavailable(
                f"the key given to block {request.block_id or '?'} as its own {request.provider} "
                f"key is one of the platform's keys; a block may not use a platform key as its "
                f"own",
                workspace_id=request.workspace_id,
                provider=request.provider,
            )
        return Credential(
            api_key=request.block_key,
            provider=request.provider,
            source=CredentialSource.BLOCK,
            key_id=block_key_id(request.block_id),
            hint=mask_key(request.block_key),
        )

    def _resolve(self, request: CredentialRequest, pm: HookCaller) -> Credential:
        keys = self.enabled_keys(request.workspace_id, request.provider)
        now = self._clock()
        usable = [k for k in keys if k.cooldown_until is None or k.cooldown_until <= now]
        if usable:
            return self._reveal(self._pick(request, usable))
        pooled = self._organization_keys(request)
        usable = [k for k in pooled if k.cooldown_until is None or k.cooldown_until <= now]
        if usable:
            return self._reveal(self._pick(request, usable))
        if keys or pooled:
            served = self._wait_for_cooling(request, keys + pooled, now)
            if served is not None:
                return served
            return self._all_cooling(request, pm, keys + pooled, now)
        return self._platform(request, pm, fallback=False)

    def _wait_for_cooling(
        self, request: CredentialRequest, cooling: Sequence[StoredKey], now: datetime
    ) -> Credential | None:
        """Every key is cooling: when the first comes back within ``max_wait_seconds``, wait for
        it (never on a host's event loop) and serve it, saying how long it waited
        (``Credential.waited``); else ``None``."""
        ends = [k.cooldown_until for k in cooling if k.cooldown_until is not None]
        if self._max_wait <= 0 or not ends or called_inline():
            return None
        wait = max(0.0, (min(ends) - now).total_seconds())
        if wait > self._max_wait:
            return None
        self._sleep(wait)
        for owner in {k.workspace_id for k in cooling}:  # read again: other workers write too
            self.cache.invalidate(owner, request.provider)
        later = self._clock()
        for tier in (
            self.enabled_keys(request.workspace_id, request.provider),
            self._organization_keys(request),
        ):
            usable = [k for k in tier if k.cooldown_until is None or k.cooldown_until <= later]
            if usable:
                credential = self._reveal(self._pick(request, usable))
                log.info(
                    "waited %.1f s for a cooling %s key of workspace %s",
                    wait,
                    request.provider,
                    request.workspace_id,
                )
                return replace(credential, waited=round(wait, 3))
        return None

    def _pool_owner(self, workspace_id: str) -> str | None:
        """The owner id of the workspace's organization's keys, unless it has none or opted
        out (one indexed read of the store)."""
        if self._orgs is None:
            return None
        ttl = self.cache.ttl
        if ttl > 0 and self.cache.listening:  # every membership change is announced
            ttl = self.cache.listening_ttl
        tick = self._monotonic()
        if ttl > 0:  # kept as long as a key list: other workers' changes show within the interval
            cached = self._pools.get(workspace_id)
            if cached is not None and cached[0] > tick:
                return cached[1]
        generation = self.cache.generation  # a drop meanwhile: the read may predate the change
        membership = self._orgs.membership(workspace_id)
        owner = membership.owner_id if membership is not None and membership.uses_pool else None
        if ttl > 0:
            with self._pools_lock:
                if generation != self.cache.generation:
                    return owner
                if len(self._pools) > 100_000:
                    self._pools.clear()
                self._pools[workspace_id] = (tick + ttl, owner)
        return owner

    def _fallback_policy(self, workspace_id: str) -> FallbackPolicy:
        """The workspace's fallback policy: read each time, except while every change to it is
        announced (:attr:`served_from_memory`), when it is kept as long as a key list."""
        if not self.served_from_memory:
            return self._settings.fallback_policy(workspace_id)
        tick = self._monotonic()
        cached = self._policies.get(workspace_id)
        if cached is not None and cached[0] > tick:
            return cached[1]
        generation = self.cache.generation
        policy = self._settings.fallback_policy(workspace_id)
        with self._pools_lock:
            if generation == self.cache.generation:
                if len(self._policies) > 100_000:
                    self._policies.clear()
                self._policies[workspace_id] = (tick + self.cache.listening_ttl, policy)
        return policy

    def _organization_keys(self, request: CredentialRequest) -> tuple[StoredKey, ...]:
        owner = self._pool_owner(request.workspace_id)
        return self.enabled_keys(owner, request.provider) if owner is not None else ()

    @staticmethod
    def _owner_name(key: StoredKey) -> str:
        if is_org_owner(key.workspace_id):
            return f"organization {key.workspace_id.removeprefix('org:')!r}"
        return f"workspace {key.workspace_id!r}"

    def _after_organization_failure(self, request: CredentialRequest, pm: HookCaller) -> Credential:
        """An organization key was refused: it cools down (for every worker and every workspace
        of the organization), another of the organization's keys serves, else the fallback
        policy decides."""
        failure = request.failure
        assert failure is not None
        usable, _ = self._skip_failed(request, self._organization_keys(request), pm)
        if usable:
            return self._reveal(self._pick(request, usable))
        return self._fallback(request, pm, failure.reason, failure.key_id)

    def _skip_failed(
        self, request: CredentialRequest, keys: Sequence[StoredKey], pm: HookCaller
    ) -> tuple[list[StoredKey], datetime]:
        """The keys of ``keys`` that may serve after ``request.failure`` (not the failed one, none
        cooling), and the time they were judged at. The failed key goes into cooldown after a
        refusal, and after a 5xx or a timeout only when the platform key may serve meanwhile
        (``on_error``): otherwise it is skipped for this call only, and the block's own retry may
        use it again."""
        failure = request.failure
        assert failure is not None
        failed = next((k for k in keys if k.id == failure.key_id), None)
        now = self._clock()
        if failed is not None and (
            _refused(failure.reason)
            or self._fallback_policy(request.workspace_id).allows(failure.reason)
        ):
            self._cool_down(request, failed, failure.reason, now, pm)
        usable = [
            k
            for k in keys
            if k.id != failure.key_id and (k.cooldown_until is None or k.cooldown_until <= now)
        ]
        return usable, now

    def _after_workspace_failure(self, request: CredentialRequest, pm: HookCaller) -> Credential:
        failure = request.failure
        assert failure is not None
        # only a key of this workspace and provider is put in cooldown
        keys = self.enabled_keys(request.workspace_id, request.provider)
        usable, now = self._skip_failed(request, keys, pm)
        if usable:  # another of the workspace's own keys: not a fallback
            return self._reveal(self._pick(request, usable))
        pooled = [
            k
            for k in self._organization_keys(request)
            if k.cooldown_until is None or k.cooldown_until <= now
        ]
        if pooled:  # the organization's keys come before the platform's: not a fallback
            return self._reveal(self._pick(request, pooled))
        return self._fallback(request, pm, failure.reason, failure.key_id)

    def _all_cooling(
        self, request: CredentialRequest, pm: HookCaller, keys: Sequence[StoredKey], now: datetime
    ) -> Credential:
        """Every enabled key is cooling down: the fallback policy decides, as after a failure."""
        # the reasons are stored with the cooldowns: every worker decides alike, whichever one
        # saw the provider's refusal
        reasons = [_stored_reason(k) for k in keys]
        if FailureReason.AUTH in reasons:
            reason = FailureReason.AUTH
        elif reasons and all(r is FailureReason.RATE_LIMIT for r in reasons):
            reason = FailureReason.RATE_LIMIT
        else:
            reason = FailureReason.ERROR
        return self._fallback(request, pm, reason, None, cooling=keys, now=now)

    def _fallback(
        self,
        request: CredentialRequest,
        pm: HookCaller,
        reason: FailureReason,
        failed_key_id: str | None,
        *,
        cooling: Sequence[StoredKey] = (),
        now: datetime | None = None,
    ) -> Credential:
        policy = self._fallback_policy(request.workspace_id)
        ws, provider = request.workspace_id, request.provider
        if not policy.allows(reason):
            if cooling:
                until = min(k.cooldown_until for k in cooling if k.cooldown_until is not None)
                situation = (
                    f"all {len(cooling)} enabled {provider} keys of workspace {ws!r} are cooling "
                    f"down after provider refusals (the first until {until:%Y-%m-%d %H:%M:%S} "
                    f"UTC)"
                )
            else:
                what = "was refused" if _refused(reason) else "failed (not a refusal: no cooldown)"
                situation = (
                    f"the {provider} key {failed_key_id} of workspace {ws!r} {what} "
                    f"({self._why(request)}) and the workspace has no other usable {provider} key"
                )
            raise CredentialUnavailable(
                f"{situation}; the workspace's fallback policy is '{policy}', so the platform key "
                f"is not used (allow it with `byok fallback set --workspace {ws} "
                f"{'on_error' if reason is not FailureReason.RATE_LIMIT else 'on_rate_limit'}`, "
                f"or add another key with `byok keys set --workspace {ws} --provider {provider}`)",
                workspace_id=ws,
                provider=provider,
                key_id=failed_key_id,
            )
        credential = self._platform(request, pm, fallback=True)
        self._audit(
            pm,
            request,
            "fallback.used",
            key_id=failed_key_id,
            detail=(
                f"{reason.value} on workspace key {failed_key_id or '(all cooling down)'}; "
                f"platform key {credential.key_id} serves {request.model} "
                f"(policy {policy.value}, run {request.run_id or '-'}, "
                f"block {request.block_id or '-'})"
            ),
        )
        log.info(
            "fallback to the platform key for %s %s in workspace %s (%s, policy %s)",
            provider,
            request.model,
            ws,
            reason.value,
            policy.value,
        )
        return credential

    def _platform(
        self, request: CredentialRequest, pm: HookCaller, *, fallback: bool
    ) -> Credential:
        ws, provider, model = request.workspace_id, request.provider, request.model
        hosted = pm.hook.byok_is_hosted(provider=provider, model=model)
        if not hosted:
            what = "tool" if provider == "exa" else "model"
            raise NoCredential(
                ws,
                provider,
                model,
                f"the platform does not host {provider} {what} {model!r}, so the workspace must "
                f"bring its own key: store one with `byok keys set --workspace {ws} --provider {provider}`, or give the "
                f"block its own key",
            )
        self._billing.require_price(provider, model, request.tools)
        self._read_platform_cooldowns(provider)
        api_key = pm.hook.byok_platform_key(provider=provider, model=model)
        if not api_key:
            cooling, wait = self._pool.cooling(provider)
            if cooling:
                raise CredentialUnavailable(
                    f"all {cooling} platform {provider} keys are cooling down after provider "
                    f"refusals; the first is usable again in {wait:.0f} s",
                    workspace_id=ws,
                    provider=provider,
                )
            raise NoCredential(
                ws,
                provider,
                model,
                f"workspace {ws!r} has no {provider} key and the platform has none either: "
                f"store one with `byok keys set --workspace {ws} --provider {provider}`, give the block its own key, or "
                f"configure platform keys (BYOK_PLATFORM_KEYS_{provider.upper()}=k1,k2)",
            )
        pooled = self._pool.lookup(api_key=api_key)
        key_id = (
            pooled.key_id
            if pooled is not None
            else "platform:" + hashlib.sha256(api_key.encode()).hexdigest()[:12]
        )
        return Credential(
            api_key=api_key,
            provider=provider,
            source=CredentialSource.PLATFORM,
            key_id=key_id,
            hint=mask_key(api_key),
            fallback=fallback,
        )

    def listen_for_changes(self, url: Any, *, followers: Sequence[ChangeFollower] = ()) -> None:
        """On PostgreSQL: drop a cached list as soon as any worker's change to it commits
        (:class:`~byok_plugin.keys.listener.KeyChangeListener`), and keep lists longer meanwhile;
        the TTL is the safety net while the listening connection is down.

        :param followers: told of the same announcements, after the resolver (the budget store's
            memory of which workspaces have budgets)."""
        if self._listener is not None or self.cache.ttl <= 0:
            return
        from byok_plugin.keys.listener import KeyChangeListener

        self._followers = tuple(followers)
        self._listener = KeyChangeListener(
            url, changed=self._changed_elsewhere, listening=self._set_listening
        )
        self._listener.start()

    @property
    def listener(self) -> Any:
        """The :class:`~byok_plugin.keys.listener.KeyChangeListener`, if this resolver listens."""
        return self._listener

    def _changed_elsewhere(self, workspace_id: str, provider: str | None) -> None:
        """Another worker's change committed: drop the workspace's lists and which organization
        pool it uses (an attach, detach or opt-out announces the workspace, every provider)."""
        self.cache.invalidate(workspace_id, provider)
        with self._pools_lock:
            self._pools.pop(workspace_id, None)
            self._policies.pop(workspace_id, None)
        for follower in self._followers:
            follower.changed_elsewhere(workspace_id, provider)

    def _set_listening(self, listening: bool) -> None:
        """The listener connected or lost its connection: drop every list and every pool
        membership (either may have changed unannounced)."""
        self.cache.set_listening(listening)
        with self._pools_lock:
            self._pools.clear()
            self._policies.clear()
        for follower in self._followers:
            follower.set_listening(listening)

    def close(self) -> None:
        """Write the pending last-used times, drop the cached keys (and the plaintexts decrypted
        from them) and release the reader's connections."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self.cache.clear()
        self.flush_last_used()
        close = getattr(self._read, "close", None)
        if close is not None:
            close()

    # --- workspace keys -------------------------------------------------------------------

    def enabled_keys(self, workspace_id: str, provider: str) -> tuple[StoredKey, ...]:
        """The (workspace, provider)'s enabled keys, from the cache or one read of the store,
        with the cooldowns this worker has yet to write applied."""
        keys = self.cache.get(workspace_id, provider)
        if keys is None:
            generation = self.cache.generation
            keys = tuple(self._read(workspace_id, provider))
            self.cache.put(workspace_id, provider, keys, generation=generation)
        return self._with_pending(keys)

    def _pick(self, request: CredentialRequest, usable: Sequence[StoredKey]) -> StoredKey:
        if len(usable) == 1:
            return usable[0]
        slot = (usable[0].workspace_id, request.provider)
        with self._turn_lock:
            turn = self._turn.get(slot, 0)
            self._turn[slot] = turn + 1
            if len(self._turn) > 100_000:
                self._turn.clear()
        return usable[turn % len(usable)]

    def _reveal(self, key: StoredKey) -> Credential:
        # raises if it does not decrypt: never a fallback
        credential = self.cache.credential(key, self._keys.reveal)
        self._note_used(key.id)
        if is_org_owner(key.workspace_id):
            return replace(credential, source=CredentialSource.ORGANIZATION)
        return credential

    def _cool_down(
        self,
        request: CredentialRequest,
        key: StoredKey,
        reason: FailureReason,
        now: datetime,
        pm: HookCaller,
    ) -> None:
        until = now + self._cooldown_for(request)
        if self._writes_off_loop():  # PostgreSQL, on the event loop: no round trip here
            # applied from memory over the cached list until written (then announced)
            self._defer_cooldown(request, key, until, reason)
        else:
            try:  # stored: every worker skips it, and knows why
                self._keys.cool_down(key.id, until, reason)
            except StoreUnavailable as exc:
                if self._background is None or not self._background.takes(exc):
                    raise
                # locked by another writer: written off the event loop once it is free
                self._defer_cooldown(request, key, until, reason)
            self.cache.invalidate(key.workspace_id, request.provider)
        self._audit(
            pm,
            request,
            "key.cooldown",
            key_id=key.id,
            detail=f"{self._why(request)}; skipped until {until:%Y-%m-%d %H:%M:%S} UTC",
        )

    def _defer_cooldown(
        self, request: CredentialRequest, key: StoredKey, until: datetime, reason: FailureReason
    ) -> None:
        """Have the background writer store the cooldown; until then this worker applies it from
        memory, so it does not serve the refused key again."""
        assert self._background is not None
        with self._pending_lock:
            self._pending_cooldowns[key.id] = _PendingCooldown(
                key.workspace_id, key.provider, until, reason
            )
        self._background.submit(
            functools.partial(self._write_cooldown, key, until, reason),
            f"the cooldown of {request.provider} key {key.id} of workspace "
            f"{request.workspace_id!r}",
        )

    def _share_platform_cooldown(self, provider: str, key_id: str, reason: FailureReason) -> None:
        """Store a platform key's cooldown for the other workers (this one applies it from
        memory already); a store that does not take it is logged, not raised: the call goes on."""
        if self._shared_cooldowns is None:
            return
        shared = self._shared_cooldowns
        until = self._clock() + self._cooldown

        def write() -> None:
            shared.cool_down(provider, key_id, until, reason.value)

        if self._writes_off_loop():
            assert self._background is not None
            self._background.submit(write, f"the cooldown of platform key {key_id}")
            return
        try:
            write()
        except StoreUnavailable as exc:
            if self._background is not None and self._background.takes(exc):
                self._background.submit(write, f"the cooldown of platform key {key_id}")
                return
            log.warning("platform key %s cools down in this worker only: %s", key_id, exc)

    def _read_platform_cooldowns(self, provider: str) -> None:
        """Apply the platform-key cooldowns other workers stored (at most once per cache
        interval and provider)."""
        if self._shared_cooldowns is None or self._pool.size(provider) == 0:
            return
        now = self._monotonic()
        if now - self._cooldowns_read.get(provider, float("-inf")) < self.cache.ttl:
            return
        self._cooldowns_read[provider] = now
        if self._writes_off_loop():  # read by the background thread: applied once it is in
            assert self._background is not None
            self._background.submit(
                functools.partial(self._apply_platform_cooldowns, provider),
                f"reading the shared {provider} platform key cooldowns",
            )
            return
        self._apply_platform_cooldowns(provider)

    def _apply_platform_cooldowns(self, provider: str) -> None:
        assert self._shared_cooldowns is not None
        wall = self._clock()
        try:
            active = self._shared_cooldowns.active(provider, wall)
        except StoreUnavailable as exc:  # this worker's own cooldowns still apply
            log.warning("could not read the shared platform key cooldowns: %s", exc)
            return
        for key_id, until in active.items():
            self._pool.cool_down(key_id, (until - wall).total_seconds())

    def _cooldown_for(self, request: CredentialRequest) -> timedelta:
        """As long as the provider said (``failure.retry_after``), within
        [0, ``max_cooldown_seconds``]; the fixed cooldown when it said nothing."""
        failure = request.failure
        wait = failure.retry_after if failure is not None else None
        if wait is None or wait != wait or wait < 0:  # absent, NaN or negative: not a hint
            return self._cooldown
        return timedelta(seconds=min(float(wait), self._max_cooldown))

    def _write_cooldown(self, key: StoredKey, until: datetime, reason: FailureReason) -> None:
        """A deferred cooldown, written in the background; applied from memory meanwhile.

        It is written only if nobody changed the key since it was read (an operator's
        ``enable`` wins, and the memory of it goes). Written, it is still applied from memory for
        one cache interval, over any list read before the write; not written (the store stayed
        locked), it is applied until it ends.
        """
        written: bool | None = None
        try:
            written = self._keys.cool_down(key.id, until, reason, unchanged_since=key.updated_at)
        finally:
            self.cache.invalidate(key.workspace_id, key.provider)
            with self._pending_lock:
                pending = self._pending_cooldowns.get(key.id)
                if pending is not None and (pending.until, pending.reason) == (until, reason):
                    if written is False:
                        del self._pending_cooldowns[key.id]
                    elif written:
                        pending.forget_at = self._monotonic() + self.cache.ttl + 1.0

    def key_changed(
        self,
        workspace_id: str,
        provider: str | None,
        *,
        key_id: str | None = None,
        state_changed: bool = False,
    ) -> None:
        """A key of the workspace changed through this process: drop the cached list. When its
        state changed (enabled, disabled, deleted, replaced), also forget the cooldown still
        waiting to be written for it (``key_id``; every key of the workspace and provider when
        ``None``): the late write will not apply either."""
        self.cache.invalidate(workspace_id, provider)
        with self._pools_lock:
            self._pools.pop(workspace_id, None)
            self._policies.pop(workspace_id, None)
        for follower in self._followers:
            follower.changed_elsewhere(workspace_id, provider)
        if not state_changed:
            return
        with self._pending_lock:
            for pending_id, pending in list(self._pending_cooldowns.items()):
                if key_id is not None and pending_id != key_id:
                    continue
                if pending.workspace_id == workspace_id and provider in (None, pending.provider):
                    del self._pending_cooldowns[pending_id]

    def _with_pending(self, keys: tuple[StoredKey, ...]) -> tuple[StoredKey, ...]:
        """``keys`` with the cooldowns this worker applies from memory."""
        if not self._pending_cooldowns:
            return keys
        now, tick = self._clock(), self._monotonic()
        with self._pending_lock:
            for key_id, pending in list(self._pending_cooldowns.items()):
                if pending.until <= now or (
                    pending.forget_at is not None and pending.forget_at <= tick
                ):
                    del self._pending_cooldowns[key_id]
            pending_now = {k: (p.until, p.reason) for k, p in self._pending_cooldowns.items()}
        return tuple(
            replace(
                k, cooldown_until=pending_now[k.id][0], cooldown_reason=pending_now[k.id][1].value
            )
            if k.id in pending_now
            and (k.cooldown_until is None or k.cooldown_until < pending_now[k.id][0])
            else k
            for k in keys
        )

    # --- authorization, audit, last use ---------------------------------------------------

    def _authorize(self, request: CredentialRequest, pm: HookCaller) -> None:
        """Ask ``byok_authorize`` whether the request's actor may use the workspace (whichever
        key would serve: its own, its organization's or the platform's, which bills it), an
        absent actor (``None``) included: no answer means deny."""
        allowed = pm.hook.byok_authorize(
            actor=request.actor, workspace_id=request.workspace_id, action=Action.USE_KEYS
        )
        if allowed is True:
            return
        actor_id = request.actor.id if request.actor is not None else None
        self._audit(
            pm,
            request,
            "access.denied",
            outcome="denied",
            detail=(
                f"{Action.USE_KEYS.value}: run {request.provider} {request.model}"
                + ("" if request.actor is not None else " (the request names no actor)")
            ),
        )
        raise NotAuthorized(
            actor_id, request.workspace_id, Action.USE_KEYS.value, _authorize_hint(request, allowed)
        )

    def _audit(
        self,
        pm: HookCaller,
        request: CredentialRequest,
        action: str,
        *,
        outcome: str = "ok",
        key_id: str | None = None,
        detail: str = "",
    ) -> None:
        pm.hook.byok_audit(
            event=AuditEvent(
                action=action,
                workspace_id=request.workspace_id,
                actor_id=request.actor.id if request.actor is not None else None,
                outcome=outcome,
                provider=request.provider,
                key_id=key_id,
                detail=detail,
                occurred_at=self._clock(),
            )
        )

    @staticmethod
    def _why(request: CredentialRequest) -> str:
        failure = request.failure
        if failure is None:
            return "no failure"
        status = f", HTTP {failure.status}" if failure.status is not None else ""
        return f"{failure.reason.value}{status}"

    def _note_used(self, key_id: str) -> None:
        self._used[key_id] = self._clock()
        if not self._flushing and self._monotonic() - self._last_flush >= LAST_USED_FLUSH_SECONDS:
            with self._used_lock:
                if self._flushing:
                    return
                self._flushing = True
            threading.Thread(
                target=self.flush_last_used, name="byok-last-used", daemon=True
            ).start()

    def flush_last_used(self) -> int:
        """Write the pending last-used times in one transaction; returns how many were written."""
        with self._used_lock:
            pending, self._used = self._used, {}
            self._last_flush = self._monotonic()
        try:
            if not pending:
                return 0
            t = workspace_keys
            statement = (
                sa.update(t)
                .where(
                    t.c.id == sa.bindparam("key_id"),
                    sa.or_(t.c.last_used_at.is_(None), t.c.last_used_at < sa.bindparam("at")),
                )
                .values(last_used_at=sa.bindparam("at"))
            )
            # rows locked in key id order, as every multi-row update of the keys table does:
            # two workers flushing the same keys at once then wait for each other, never
            # deadlock (and a deadlock victim all the same is tried again)
            params = [{"key_id": k, "at": pending[k]} for k in sorted(pending)]

            def flush() -> None:
                with write_transaction(self._engine) as conn:
                    conn.execute(statement, params)

            try:
                retry_deadlocks(flush)
            except sa.exc.SQLAlchemyError as exc:  # informational only: never fail a call on it
                log.warning("could not record the last use of %d keys: %s", len(pending), exc)
                return 0
            return len(pending)
        finally:
            self._flushing = False
