"""Workspace budgets that hold under concurrency: reserve a call's worst case, then settle it.

What ``byok_reserve_budget`` and ``byok_settle_budget`` do by default. A budget belongs to a
workspace (optionally narrowed to one stored key or one workflow) and limits, over a period (a UTC
day, a UTC month, or none), one of two amounts:

- ``charge``: what the platform charges the workspace (its platform-billed calls);
- ``list_cost``: what the workspace's own keys (BYOK) spent at list price, a shadow budget the
  workspace's admin sets as a guard against a runaway workflow on their key.

A ``hard`` budget refuses a call whose worst case does not fit (:class:`BudgetExceeded`); a soft
one never refuses. Both emit the audit event ``budget.threshold`` once per period for each of
their thresholds (percentages of the limit) that spending crosses.

**Definitions** (:meth:`BudgetStore.set_budget`, for the CLI and the HTTP API alike): a limit is a
whole number of :data:`UNIT` (never rounded), thresholds are at most :data:`MAX_THRESHOLDS`, an
organization's key pool (``org:<id>``) is not a workspace and has no budgets, and a key scope names
a stored key that serves the workspace (its own, or its organization's pool's). A budget whose key
is then replaced or deleted is listed with ``key_gone`` and applies to no call. A workflow scope
matches the workflow's name, which its author chooses: a convenience, not a boundary.

**Atomicity.** Amounts are integers of :data:`UNIT` (a nano-dollar), so that the database adds and
compares them exactly. On PostgreSQL a reservation is one autocommitted statement
(:data:`_PG_RESERVE`): it locks the budget rows that apply in id order (``FOR UPDATE``, which
hands back their latest versions), expires their lapsed holds, checks that every hard one has room
and only then adds to ``reserved`` and writes the holds; a settlement is one statement too
(:data:`_PG_SETTLE`, for one call or a group, run inside the ledger's group commit by
``byok_record_usage_and_settle``). On SQLite a reservation is one ``BEGIN IMMEDIATE`` transaction
whose admission is a conditional ``UPDATE ... SET reserved = reserved + :need WHERE spent +
reserved + :need <= limit``. Neither is a read followed by a write decided in Python.

Each held amount is a row of ``byok_budget_holds`` keyed by the call's idempotency key and the
budget: a settlement flips the
rows from ``held`` (or ``expired``) to ``settled`` and moves the amount from ``reserved`` to
``spent``; a second settlement finds nothing to flip and changes nothing. A call that did not
complete releases its holds: they become ``expired`` (not ``settled``), so the same call made again
is held again. Every statement on holds names the workspace as well as the key. A hold whose call never
settles (a worker killed between the two) lapses at its ``expires_at``: from then on it counts
for nothing (:meth:`BudgetStore.list_budgets` shows ``reserved`` from live holds only), and it is
marked ``expired``, its amount leaving the budget row's ``reserved``, by the next reservation on
its budget on PostgreSQL; on SQLite by the next reservation of the workspace that does not fit a
hard budget (which expires the workspace's lapsed holds and tries once more) or that prunes
(below), whichever comes first. A late settlement of a lapsed hold frees it too.

**Pruning.** Settled and expired holds do not pile up (one per call per budget): a reservation
also deletes, in its one statement on PostgreSQL (the holds on the budgets it locked), at most
:data:`PRUNE_BATCH` holds that are settled or expired and whose expiry and settlement are both
more than ``keep_holds`` (:data:`KEEP_HOLDS`, a day) ago, never the reserving call's own. On
SQLite a store's first reservation and every ``prune_every``-th (:data:`PRUNE_EVERY`) after it
do so in their ``BEGIN IMMEDIATE`` transaction (the workspace's holds, at most ``PRUNE_BATCH *
prune_every``), after expiring the workspace's lapsed holds; the others skip both statements. No
background thread: each call writes one hold per budget and may delete up to :data:`PRUNE_BATCH`
old ones (on average), so the table holds about the holds of the last ``keep_holds`` plus the
hold time (plus, on SQLite, those of the last ``prune_every`` calls). A settlement of a
call whose holds were pruned finds nothing and changes nothing (as a repeated one does); a
reservation repeated under its key after that is held afresh, and a late settlement of an expired
hold no longer spends.

**Speed.** The statements are built once. On a SQLite file they are also compiled once and run on
``sqlite3`` connections of the file (as the ledger's writer does), with the values bound by the
columns' own SQLAlchemy processors: a reservation plus a settlement costs about 0.2 ms there,
against 0.9 ms through SQLAlchemy's connection and result machinery. A workspace without budgets
costs one indexed read per call on SQLite; on PostgreSQL none while the key-change listener is
connected (:attr:`BudgetStore.presence` knows it has no budget), else the reservation's one
statement finding no row. There each statement is planned once per connection (psycopg prepares
it; the settlement says ``SET LOCAL plan_cache_mode = force_generic_plan`` in the group's
transaction, the reservation is written so that the server keeps its generic plan): planned per
call, a reservation took 1.2 ms here against 0.55 ms.
On SQLite a reservation with budgets is ``BEGIN IMMEDIATE``, one read of the budgets joined with
the call's previous holds, the admission and the hold per budget, ``COMMIT`` (the separate read
of the budgets is skipped once the store has found budgets for the workspace: a hint of the
order only, the read in the transaction decides); a settlement (:meth:`BudgetStore.settle`, or
:meth:`BudgetStore.settle_on` inside the ledger row's transaction) reads the call's holds,
then spends and marks each. In a hook called on an event loop a SQLite write waits at most
``LOOP_LOCK_WAIT_MS`` for another writer's lock and then fails, and the runner tries it again in a
worker thread.

Holds are rounded up to the unit, and so are settled amounts, so a budget's ``spent`` is never
below what the ledger charged. A call that outlives its hold (``hold_seconds``) still counts what
it spent when it settles, so it may push a budget past its limit: keep the hold longer than any
provider call (the runner's default is 15 minutes).

**Bounds.** The columns hold at most :data:`MAX_UNITS` (a BIGINT: about 9.2e9 USD), and no amount
past it is ever bound or summed into one: a hard budget refuses a worst case past it (no limit is
higher), a soft one holds at most what its ``reserved`` can still take, and a settled amount, or
a group's sum on PostgreSQL, saturates ``spent`` there (see :meth:`BudgetStore.reserve` and
``_settled_units``). PostgreSQL compares and sums in ``numeric`` where a bigint could overflow.
"""

from __future__ import annotations

import collections
import enum
import itertools
import re
import secrets
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from byok_hookspecs import (
    AuditEvent,
    BudgetExceeded,
    BudgetHold,
    BudgetReservation,
    BudgetSettlement,
    CredentialSource,
    called_inline,
)
from sqlalchemy.engine import Connection, Dialect, Engine

from byok_plugin.billing.budget_presence import BudgetPresence
from byok_plugin.core.errors import InvalidInput, StoreUnavailable
from byok_plugin.core.key_format import check_key_id, check_workspace_id
from byok_plugin.keys.reader import sqlite_file_of
from byok_plugin.store.engine import (
    LockBackoff,
    lock_backoff,
    lock_in_transaction,
    store_busy,
    store_errors,
    write_transaction,
)
from byok_plugin.store.key_events import notify_key_change
from byok_plugin.store.sqlite_connections import SqliteConnections, SqliteWriters
from byok_plugin.store.tables import UTCDateTime, metadata, workspace_keys

__all__ = [
    "KEEP_HOLDS",
    "LIMIT_PATTERN",
    "MAX_THRESHOLDS",
    "MAX_UNITS",
    "PRUNE_BATCH",
    "PRUNE_EVERY",
    "UNIT",
    "Budget",
    "BudgetError",
    "BudgetMetric",
    "BudgetPeriod",
    "BudgetStore",
    "budget_holds",
    "budgets",
    "check_thresholds",
    "from_units",
    "to_units",
]

#: the smallest amount a budget counts: a nano-dollar (amounts are stored as integers of it)
UNIT = Decimal("0.000000001")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_THRESHOLDS = (50, 80, 100)
#: how long a settled or expired hold is kept after both its expiry and its settlement: while it
#: is kept, a repeated settlement of its call finds it settled (and changes nothing), a repeated
#: reservation of a settled call holds nothing more, and a late settlement of an expired hold still
#: spends what the call cost. After that the next reservation on its budget deletes it.
KEEP_HOLDS = timedelta(days=1)
#: at most this many old holds are deleted per reservation (a bounded delete on a path every
#: call takes; each call writes one hold per budget that applies, so the table stops growing).
#: On PostgreSQL every reservation deletes up to this many; on SQLite every
#: :data:`PRUNE_EVERY`-th reservation of a store deletes up to ``PRUNE_BATCH * PRUNE_EVERY``
PRUNE_BATCH = 64
#: on SQLite, how often a store's reservations expire the workspace's lapsed holds and prune its
#: old ones: the first reservation and every ``PRUNE_EVERY``-th after it (a reservation that does
#: not fit a hard budget expires the lapsed holds at once and tries again)
PRUNE_EVERY = 16
#: how many workspaces a store remembers as having budgets (past that it starts again)
_BUDGETED_HINTS = 10_000
#: the sources a BYOK list-cost budget counts: the workspace's own keys and those it inherits
_BYOK_SOURCES = (CredentialSource.WORKSPACE, CredentialSource.ORGANIZATION)
#: the most a budget's amount columns (``limit_units``, ``spent_units``, ``reserved_units``, a
#: hold's ``amount_units``) hold: a BIGINT of nano-dollars, about 9.2e9 USD. Amounts past it
#: (a hostile price file, a huge request, a provider reporting huge usage) are never bound as
#: parameters: a hard budget refuses such a worst case, a soft one holds what its column can
#: still take, and a settlement's spending saturates at it (see :meth:`BudgetStore.reserve`)
MAX_UNITS = 2**63 - 1
#: the largest limit: a BIGINT of nano-dollars
MAX_LIMIT = Decimal(MAX_UNITS) * UNIT
_MAX_UNITS_SQL = sa.literal_column(str(MAX_UNITS), sa.BigInteger)
#: the owner id prefix of an organization's key pool (``resolution.organizations.ORG_PREFIX``;
#: billing may not import resolution, a test checks that they agree)
ORG_PREFIX = "org:"
#: the workspaces' organizations (``resolution.organizations.organization_workspaces``): the
#: columns a key scope's check reads
organization_workspaces = sa.table(
    "byok_organization_workspaces",
    sa.column("workspace_id", sa.String),
    sa.column("organization_id", sa.String),
    sa.column("opted_out", sa.Boolean),
)


class BudgetError(ValueError):
    """A budget definition is malformed, or names a budget that does not exist."""


class BudgetMetric(enum.StrEnum):
    """What a budget limits."""

    #: the platform's charge to the workspace
    CHARGE = "charge"
    #: the list cost of the calls the workspace's own keys served (a BYOK shadow budget)
    LIST_COST = "list_cost"


class BudgetPeriod(enum.StrEnum):
    """Over what a budget's spending adds up (UTC calendar periods)."""

    DAY = "day"
    MONTH = "month"
    NONE = "none"

    def start(self, now: datetime) -> datetime:
        """The start of the period that contains ``now``."""
        now = now.astimezone(UTC)
        if self is BudgetPeriod.DAY:
            return now.replace(hour=0, minute=0, second=0, microsecond=0)
        if self is BudgetPeriod.MONTH:
            return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        return _EPOCH


def to_units(amount: Decimal) -> int:
    """``amount`` in :data:`UNIT`, rounded up."""
    return int((amount / UNIT).to_integral_value(rounding=ROUND_CEILING))


def from_units(units: int) -> Decimal:
    """``units`` of :data:`UNIT` in USD, without trailing zeros or an exponent."""
    return Decimal(format((Decimal(int(units)) * UNIT).normalize(), "f")) if units else Decimal(0)


budgets = sa.Table(
    "byok_budgets",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("workspace_id", sa.String(200), nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("metric", sa.String(16), nullable=False),
    sa.Column("period", sa.String(8), nullable=False),
    sa.Column("hard", sa.Boolean, nullable=False),
    sa.Column("limit_units", sa.BigInteger, nullable=False),
    sa.Column("spent_units", sa.BigInteger, nullable=False),
    sa.Column("reserved_units", sa.BigInteger, nullable=False),
    # "50,80,100": percentages of the limit that emit budget.threshold once per period
    sa.Column("thresholds", sa.String(64), nullable=False),
    # the thresholds already announced in this period
    sa.Column("alerted", sa.String(64), nullable=False),
    sa.Column("key_id", sa.String(120), nullable=True),
    sa.Column("workflow_id", sa.String(200), nullable=True),
    sa.Column("period_start", UTCDateTime, nullable=False),
    sa.Column("updated_by", sa.String(200), nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.UniqueConstraint("workspace_id", "name"),
    sa.CheckConstraint("metric IN ('charge', 'list_cost')", name="metric"),
    sa.CheckConstraint("period IN ('day', 'month', 'none')", name="period"),
)

budget_holds = sa.Table(
    "byok_budget_holds",
    metadata,
    sa.Column("idempotency_key", sa.String(255), primary_key=True),
    sa.Column(
        "budget_id",
        sa.String(40),
        sa.ForeignKey(budgets.c.id, ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("workspace_id", sa.String(200), nullable=False),
    # held, expired (the call never settled in time), settled
    sa.Column("state", sa.String(10), nullable=False),
    sa.Column("amount_units", sa.BigInteger, nullable=False),
    sa.Column("spent_units", sa.BigInteger, nullable=True),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("settled_at", UTCDateTime, nullable=True),
    sa.CheckConstraint("state IN ('held', 'expired', 'settled')", name="state"),
    sa.Index(None, "workspace_id", "state", "expires_at"),
)


@dataclass(frozen=True, slots=True)
class Budget:
    """A budget and where it stands now (the current period; holds that lapsed left out)."""

    workspace_id: str
    name: str
    metric: BudgetMetric
    period: BudgetPeriod
    limit: Decimal
    hard: bool
    thresholds: tuple[int, ...]
    key_id: str | None
    workflow_id: str | None
    spent: Decimal
    reserved: Decimal
    period_start: datetime
    updated_by: str | None
    updated_at: datetime
    #: the budget names a key (``key_id``) that is no longer one of its workspace's keys nor of
    #: its organization's pool (deleted, or replaced by ``keys set``: a new id): it applies to
    #: no call until it is set again with a key that exists
    key_gone: bool = False

    @property
    def left(self) -> Decimal:
        """What may still be reserved (0 once spent and reserved reach the limit)."""
        return max(self.limit - self.spent - self.reserved, Decimal(0))

    def as_dict(self) -> dict[str, Any]:
        return {
            "workspace_id": self.workspace_id,
            "name": self.name,
            "metric": self.metric.value,
            "period": self.period.value,
            "limit": format(self.limit, "f"),
            "hard": self.hard,
            "thresholds": list(self.thresholds),
            "key_id": self.key_id,
            "key_gone": self.key_gone,
            "workflow_id": self.workflow_id,
            "spent": format(self.spent, "f"),
            "reserved": format(self.reserved, "f"),
            "left": format(self.left, "f"),
            "period_start": self.period_start.isoformat(),
            "updated_by": self.updated_by,
            "updated_at": self.updated_at.isoformat(),
        }


#: a limit as text: ASCII digits, optionally a point and more digits (the HTTP API's
#: ``SetBudgetRequest.limit`` pattern is the same: the CLI and the API accept the same limits)
LIMIT_PATTERN = r"[0-9]+(\.[0-9]+)?"
_LIMIT_TEXT = re.compile(LIMIT_PATTERN)
#: the longest limit text (the API's ``max_length``)
LIMIT_TEXT_LENGTH = 40
#: the most thresholds a budget has (the API's ``max_length``): their text always fits the
#: ``thresholds`` column (10 of at most 4 digits, comma-separated, is 49 characters of 64)
MAX_THRESHOLDS = 10
_THRESHOLD_TEXT = re.compile(r"[0-9]{1,4}")


def parse_limit(value: Decimal | str) -> Decimal:
    """A limit in USD: more than 0, at most :data:`MAX_LIMIT`, and a whole number of
    :data:`UNIT` (a nano-dollar: what the store counts), never rounded. Text is ASCII digits
    with an optional decimal point (:data:`LIMIT_PATTERN`), such as ``25`` or ``0.5``."""
    if isinstance(value, Decimal):
        limit = value
    else:
        text = str(value)
        if len(text) > LIMIT_TEXT_LENGTH or not _LIMIT_TEXT.fullmatch(text):
            raise BudgetError(
                f"a budget limit is an amount in USD such as 25.00: the digits 0-9 with an "
                f"optional decimal point, at most {LIMIT_TEXT_LENGTH} characters, not "
                f"{text[:LIMIT_TEXT_LENGTH]!r}"
            )
        limit = Decimal(text)  # exact: the constructor does not round
    if not limit.is_finite() or limit <= 0 or limit > MAX_LIMIT:
        raise BudgetError(f"a budget limit must be more than 0 and at most {MAX_LIMIT} USD")
    # exact: at most 19 digits once quantized (limit <= MAX_LIMIT), within the context's 28
    if limit.quantize(UNIT) != limit:
        raise BudgetError(
            f"a budget limit is a whole number of nano-dollars (at most 9 decimal places, such "
            f"as 0.000000001), not {format(limit, 'f')[:60]!r}: budgets count in {UNIT} USD "
            "and a limit is never rounded"
        )
    return limit


def check_thresholds(value: str | Iterable[int]) -> tuple[int, ...]:
    """A budget's thresholds as given (``"50,80,100"``, or numbers): at most
    :data:`MAX_THRESHOLDS`, each a whole percentage from 1 to 1000 (ASCII digits when text),
    the same bounds as the HTTP API's; duplicates count once."""
    parts: list[Any]
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip() != ""]
    else:
        parts = list(value)
    if len(parts) > MAX_THRESHOLDS:
        raise BudgetError(f"a budget has at most {MAX_THRESHOLDS} thresholds, not {len(parts)}")
    found = set()
    for part in parts:
        if isinstance(part, str) and _THRESHOLD_TEXT.fullmatch(part):
            number = int(part)
        elif isinstance(part, int) and not isinstance(part, bool):
            number = part
        else:
            raise BudgetError(
                f"budget thresholds are whole percentages such as 50,80,100, not {str(part)[:20]!r}"
            )
        if not 1 <= number <= 1000:
            raise BudgetError(f"a budget threshold is a percentage from 1 to 1000, not {number}")
        found.add(number)
    return tuple(sorted(found))


def parse_thresholds(value: str | Iterable[int]) -> tuple[int, ...]:
    """``"50,80,100"`` (or numbers) as stored: percentages of the limit, 1 to 1000, each once.
    What a caller gives is checked by :func:`check_thresholds`."""
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)
    found = set()
    for part in parts:
        if part == "":
            continue
        try:
            number = int(part)
        except (TypeError, ValueError):
            raise BudgetError(
                f"budget thresholds are whole percentages such as 50,80,100, not {part!r}"
            ) from None
        if not 1 <= number <= 1000:
            raise BudgetError(f"a budget threshold is a percentage from 1 to 1000, not {number}")
        found.add(number)
    return tuple(sorted(found))


def _enum(kind: type[enum.StrEnum], value: Any, what: str) -> Any:
    try:
        return kind(str(value).strip().lower().replace("-", "_"))
    except ValueError:
        raise BudgetError(
            f"a budget {what} is one of {', '.join(m.value for m in kind)}, not {value!r}"
        ) from None


def _budget(row: Any, now: datetime, held: dict[str, int]) -> Budget:
    period = BudgetPeriod(row.period)
    current = period.start(now)
    return Budget(
        workspace_id=row.workspace_id,
        name=row.name,
        metric=BudgetMetric(row.metric),
        period=period,
        limit=from_units(row.limit_units),
        hard=bool(row.hard),
        thresholds=parse_thresholds(row.thresholds),
        key_id=row.key_id,
        workflow_id=row.workflow_id,
        # a period that ended but that no operation has rolled over yet starts at zero
        spent=from_units(row.spent_units) if row.period_start >= current else Decimal(0),
        reserved=from_units(held.get(row.id, 0)),
        period_start=max(row.period_start, current),
        updated_by=row.updated_by,
        updated_at=row.updated_at,
        key_gone=row.key_id is not None and not row.key_found,
    )


def _pool_owner(workspace_id: Any) -> Any:
    """The owner id (``org:<id>``) of the key pool of the workspace's organization, if any."""
    m = organization_workspaces
    return (
        sa.select(sa.literal(ORG_PREFIX) + m.c.organization_id)
        .where(m.c.workspace_id == workspace_id)
        .scalar_subquery()
    )


def _key_exists(workspace_id: Any, key_id: Any) -> Any:
    """Whether ``key_id`` is one of the workspace's stored keys or of its organization's."""
    k = workspace_keys
    return sa.exists().where(
        k.c.id == key_id,
        sa.or_(k.c.workspace_id == workspace_id, k.c.workspace_id == _pool_owner(workspace_id)),
    )


def _check_budget_key(conn: Connection, workspace_id: str, key_id: str) -> None:
    """Refuse a key id that serves none of the workspace's calls: not one of its stored keys,
    nor of the pool of its organization (unless it opted out of the pool)."""
    k, m = workspace_keys, organization_workspaces
    owner = conn.execute(sa.select(k.c.workspace_id).where(k.c.id == key_id)).scalar()
    if owner == workspace_id:
        return
    member = conn.execute(
        sa.select(m.c.organization_id, m.c.opted_out).where(m.c.workspace_id == workspace_id)
    ).first()
    if member is not None and owner == ORG_PREFIX + member.organization_id:
        if not member.opted_out:
            return
        raise BudgetError(
            f"workspace {workspace_id!r} opted out of organization {member.organization_id!r}'s "
            f"key pool: its key {key_id!r} serves none of the workspace's calls"
        )
    pool = f" nor its organization {member.organization_id!r}" if member is not None else ""
    raise BudgetError(
        f"workspace {workspace_id!r} has no key {key_id!r}{pool}: a budget's key id names one "
        f"of the stored keys that serve the workspace (see `byok keys list -w {workspace_id}`)"
    )


class BudgetStore:
    """Defines budgets, and reserves and settles calls against them."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        keep_holds: timedelta = KEEP_HOLDS,
        prune_every: int = PRUNE_EVERY,
        writers: SqliteWriters | None = None,
    ) -> None:
        """:param writers: on a SQLite file, the connections the direct statements borrow, shared
        with the store's other writers (the ledger's: see
        :mod:`byok_plugin.store.sqlite_connections`); by default the store's own."""
        if keep_holds < timedelta(0):
            raise BudgetError("keep_holds is a duration of 0 or more")
        if not isinstance(prune_every, int) or prune_every < 1:
            raise BudgetError("prune_every is a whole number of reservations, 1 or more")
        self._engine = engine
        self._clock = clock
        self._keep_holds = keep_holds
        self._writers = writers
        #: on PostgreSQL, which workspaces have budgets, while the change listener is connected
        #: (the app follows the listener with it): a workspace without one reserves from memory
        self.presence = BudgetPresence()
        # SQLite: the first reservation of this store and every ``prune_every``-th after it
        # expires the workspace's lapsed holds and prunes its old ones (see :meth:`reserve`)
        self._prune_every = prune_every
        self._reservations = itertools.count()
        # SQLite: the workspaces this store last found budgets for, whose next reservation reads
        # them inside its write transaction (one transaction, no separate read); only a hint of
        # the order, the read in the transaction decides
        self._budgeted: set[str] = set()

    def __repr__(self) -> str:
        return f"BudgetStore(dialect={self._engine.dialect.name!r})"

    def close(self) -> None:
        """Release the direct SQLite connections (the engine is its owner's to close)."""
        direct = self.__dict__.pop("_direct", None)
        if direct is not None:
            direct.close()

    # --- definitions ------------------------------------------------------------------------------
    def set_budget(
        self,
        workspace_id: str,
        name: str,
        *,
        limit: Decimal | str,
        metric: BudgetMetric | str = BudgetMetric.CHARGE,
        period: BudgetPeriod | str = BudgetPeriod.MONTH,
        hard: bool = True,
        thresholds: str | Iterable[int] = DEFAULT_THRESHOLDS,
        key_id: str | None = None,
        workflow_id: str | None = None,
        actor_id: str | None = None,
    ) -> Budget:
        """Create or change a budget. What is spent is kept, unless the metric, period or scope
        changes (then it starts again from zero); the calls in flight keep their holds."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise BudgetError(
                f"a budget name is 1-64 letters, digits, '.', '_' or '-' (starting with a letter "
                f"or digit), not {name!r}"
            )
        try:
            check_workspace_id(workspace_id)  # the budget's and its audit event's columns
        except InvalidInput as exc:
            raise BudgetError(str(exc)) from None
        if workspace_id.startswith(ORG_PREFIX):
            raise BudgetError(
                f"{workspace_id!r} is an organization's key pool, not a workspace: budgets on an "
                "organization are not supported (a budget set there would limit nothing); set "
                "one on each of its workspaces instead"
            )
        for what, value, longest in (("workflow id", workflow_id, 200),):
            if value is not None and (
                not isinstance(value, str)
                or len(value) > longest
                or any(ord(c) < 32 or ord(c) == 127 for c in value)
            ):
                raise BudgetError(
                    f"a budget's {what} is text of at most {longest} characters, without control "
                    "characters"
                )
        key_id = key_id or None
        if key_id is not None:
            try:
                check_key_id(key_id)
            except InvalidInput:
                # not quoted: what was given in its place may be a secret (an API key)
                raise BudgetError(
                    f"workspace {workspace_id!r}: a budget's key id is the id of one of the "
                    "workspace's stored keys, 'key_' followed by letters and digits (see `byok "
                    "keys list`); what was given is not one"
                ) from None
        chosen_limit = parse_limit(limit)
        chosen_metric: BudgetMetric = _enum(BudgetMetric, metric, "metric")
        chosen_period: BudgetPeriod = _enum(BudgetPeriod, period, "period")
        chosen_thresholds = check_thresholds(thresholds)
        now = self._clock()
        values = {
            "metric": chosen_metric.value,
            "period": chosen_period.value,
            "hard": bool(hard),
            "limit_units": to_units(chosen_limit),
            "thresholds": ",".join(str(t) for t in chosen_thresholds),
            "key_id": key_id,
            "workflow_id": workflow_id or None,
            "updated_by": actor_id,
            "updated_at": now,
        }
        t = budgets
        with (
            store_errors("writing a budget", workspace_id=workspace_id),
            write_transaction(self._engine) as conn,
        ):
            lock_in_transaction(conn, "budgets", workspace_id)
            if key_id is not None:
                _check_budget_key(conn, workspace_id, key_id)
            row = conn.execute(
                sa.select(t).where(t.c.workspace_id == workspace_id, t.c.name == name)
            ).first()
            if row is None:
                conn.execute(
                    sa.insert(t).values(
                        id=f"bud_{secrets.token_hex(8)}",
                        workspace_id=workspace_id,
                        name=name,
                        spent_units=0,
                        reserved_units=0,
                        alerted="",
                        period_start=chosen_period.start(now),
                        **values,
                    )
                )
            else:
                reset = (row.metric, row.period, row.key_id, row.workflow_id) != (
                    values["metric"],
                    values["period"],
                    values["key_id"],
                    values["workflow_id"],
                )
                if reset:
                    values.update(spent_units=0, alerted="", period_start=chosen_period.start(now))
                conn.execute(sa.update(t).where(t.c.id == row.id).values(**values))
            notify_key_change(conn, workspace_id, None)  # every worker forgets it has none
        self.presence.changed_elsewhere(workspace_id)
        found = self.get(workspace_id, name)
        assert found is not None
        return found

    def delete(self, workspace_id: str, name: str) -> bool:
        """Delete a budget (and its holds); ``False`` when there was none of that name."""
        t = budgets
        with (
            store_errors("deleting a budget", workspace_id=workspace_id),
            write_transaction(self._engine) as conn,
        ):
            lock_in_transaction(conn, "budgets", workspace_id)
            ids = [
                r.id
                for r in conn.execute(
                    sa.select(t.c.id).where(t.c.workspace_id == workspace_id, t.c.name == name)
                )
            ]
            if not ids:
                return False
            # explicit, not only ON DELETE CASCADE: the same on a SQLite file opened elsewhere
            conn.execute(sa.delete(budget_holds).where(budget_holds.c.budget_id.in_(ids)))
            conn.execute(sa.delete(t).where(t.c.id.in_(ids)))
            notify_key_change(conn, workspace_id, None)
        self.presence.changed_elsewhere(workspace_id)
        return True

    def scoped_to_keys(self, key_ids: Iterable[str]) -> list[tuple[str, str, str]]:
        """``(workspace id, budget name, key id)`` of the budgets narrowed to one of these keys
        (what to warn about when the keys are replaced or deleted), by workspace and name."""
        wanted = sorted(set(key_ids))
        if not wanted:
            return []
        t = budgets
        query = (
            sa.select(t.c.workspace_id, t.c.name, t.c.key_id)
            .where(t.c.key_id.in_(wanted))
            .order_by(t.c.workspace_id, t.c.name)
        )
        with store_errors("reading budgets"), self._engine.connect() as conn:
            return [(r.workspace_id, r.name, r.key_id) for r in conn.execute(query)]

    def get(self, workspace_id: str, name: str) -> Budget | None:
        found = [b for b in self.list_budgets(workspace_id) if b.name == name]
        return found[0] if found else None

    def list_budgets(self, workspace_id: str | None = None) -> list[Budget]:
        """The budgets of a workspace (of all when ``None``), by workspace and name."""
        now = self._clock()
        t, h = budgets, budget_holds
        query = sa.select(t, _key_exists(t.c.workspace_id, t.c.key_id).label("key_found"))
        query = query.order_by(t.c.workspace_id, t.c.name)
        held = (
            sa.select(h.c.budget_id, sa.func.sum(h.c.amount_units))
            .where(h.c.state == "held", h.c.expires_at >= now)
            .group_by(h.c.budget_id)
        )
        if workspace_id is not None:
            query = query.where(t.c.workspace_id == workspace_id)
            held = held.where(h.c.workspace_id == workspace_id)
        with store_errors("reading budgets"), self._engine.connect() as conn:
            rows = conn.execute(query).all()
            amounts = {bid: int(total or 0) for bid, total in conn.execute(held)}
        return [_budget(row, now, amounts) for row in rows]

    # --- reserve and settle --------------------------------------------------------------------
    @cached_property
    def _sql(self) -> SimpleNamespace:
        """The statements of a reservation and a settlement, built once (they run on every call)."""
        t, h = budgets, budget_holds
        p = sa.bindparam
        # a call's holds named by their whole key: the idempotency key and the workspace's
        # budgets (a hold's workspace is its budget's). Naming the holds' own ``workspace_id``
        # instead made SQLite read them through the (workspace, state, expiry) index, that is
        # every hold of the workspace kept (a day's), on every reservation and settlement
        of_workspace = h.c.budget_id.in_(sa.select(t.c.id).where(t.c.workspace_id == p("b_ws")))
        # what a reservation reads of each budget: which calls it counts, and its period
        scope = (
            t.c.id,
            t.c.name,
            t.c.metric,
            t.c.hard,
            t.c.period,
            t.c.period_start,
            t.c.key_id,
            t.c.workflow_id,
        )
        return SimpleNamespace(
            budgets=sa.select(*scope).where(t.c.workspace_id == p("b_ws")),
            # the workspace's budgets, each with this call's hold on it if it has one (a hold's
            # budget is of its workspace): one statement, inside the reservation's transaction
            budgets_held=sa.select(*scope, t.c.reserved_units, h.c.state, h.c.amount_units)
            .select_from(
                t.outerjoin(h, sa.and_(h.c.budget_id == t.c.id, h.c.idempotency_key == p("b_key")))
            )
            .where(t.c.workspace_id == p("b_ws")),
            # the workspace's lapsed holds, but the reserving call's own (freed and replaced by
            # the reservation itself)
            expire=sa.update(h)
            .where(
                h.c.workspace_id == p("b_ws"),
                h.c.state == "held",
                h.c.expires_at < p("b_now"),
                h.c.idempotency_key != p("b_key"),
            )
            .values(state="expired")
            .returning(h.c.budget_id, h.c.amount_units),
            # the settled and expired holds kept long enough (:data:`KEEP_HOLDS`), a bounded batch
            prune=sa.delete(h).where(
                sa.tuple_(h.c.idempotency_key, h.c.budget_id).in_(
                    sa.select(h.c.idempotency_key, h.c.budget_id)
                    .where(
                        h.c.workspace_id == p("b_ws"),
                        # two equalities, not ``!= "held"``: SQLite then seeks its (workspace,
                        # state, expiry) index instead of reading every hold of the workspace
                        sa.or_(h.c.state == "settled", h.c.state == "expired"),
                        h.c.expires_at < p("b_cutoff"),
                        sa.or_(h.c.settled_at.is_(None), h.c.settled_at < p("b_cutoff")),
                        h.c.idempotency_key != p("b_key"),
                    )
                    .limit(p("b_batch", type_=sa.Integer))
                )
            ),
            free=sa.update(t)
            .where(t.c.id == p("b_id"))
            .values(reserved_units=t.c.reserved_units - p("b_amount", type_=sa.BigInteger)),
            rollover=sa.update(t)
            .where(
                t.c.workspace_id == p("b_ws"),
                t.c.period == p("b_period"),
                t.c.period_start < p("b_start"),
            )
            .values(spent_units=0, alerted="", period_start=p("b_start")),
            # every statement on holds names the workspace: a run id (and so an idempotency key)
            # chosen by two workspaces never reaches the other's holds
            forget=sa.delete(h).where(h.c.idempotency_key == p("b_key"), of_workspace),
            admit_hard=sa.update(t)
            .where(
                t.c.id == p("b_id"),
                t.c.spent_units + t.c.reserved_units + p("b_need", type_=sa.BigInteger)
                <= t.c.limit_units,
            )
            .values(reserved_units=t.c.reserved_units + p("b_need", type_=sa.BigInteger))
            .returning(t.c.id),
            admit_soft=sa.update(t)
            .where(t.c.id == p("b_id"))
            .values(reserved_units=t.c.reserved_units + p("b_need", type_=sa.BigInteger))
            .returning(t.c.id),
            hold=sa.insert(h),
            held=sa.select(
                h.c.budget_id, h.c.state, h.c.amount_units, t.c.metric, t.c.period, t.c.period_start
            )
            .join(t, t.c.id == h.c.budget_id)
            .where(
                h.c.idempotency_key == p("b_key"),
                t.c.workspace_id == p("b_ws"),
                h.c.state != "settled",
            ),
            spend=sa.update(t)
            .where(t.c.id == p("b_id"))
            .values(
                # saturating at MAX_UNITS (b_spent is at most that: MAX_UNITS - b_spent never
                # overflows; SQLite would turn an overflowing sum into a REAL in the column)
                spent_units=sa.case(
                    (
                        t.c.spent_units > _MAX_UNITS_SQL - p("b_spent", type_=sa.BigInteger),
                        _MAX_UNITS_SQL,
                    ),
                    else_=t.c.spent_units + p("b_spent", type_=sa.BigInteger),
                ),
                reserved_units=t.c.reserved_units - p("b_release", type_=sa.BigInteger),
            )
            .returning(
                t.c.id,
                t.c.name,
                t.c.metric,
                t.c.hard,
                t.c.limit_units,
                t.c.spent_units,
                t.c.thresholds,
                t.c.alerted,
            ),
            row=sa.select(t.c.name, t.c.limit_units, t.c.spent_units, t.c.reserved_units).where(
                t.c.id == p("b_id")
            ),
            alert=sa.update(t)
            .where(t.c.id == p("b_id"), t.c.alerted == p("b_was"))
            .values(alerted=p("b_alerted"))
            .returning(t.c.id),
            settle=sa.update(h)
            .where(
                h.c.workspace_id == p("b_ws"),
                h.c.idempotency_key == p("b_key"),
                h.c.budget_id == p("b_id"),
            )
            .values(state=p("b_state"), settled_at=p("b_now"), spent_units=p("b_spent")),
        )

    @cached_property
    def _direct(self) -> _SqliteStatements | None:
        """On a SQLite file, the statements compiled once and run on ``sqlite3`` connections of
        the store's file (SQLAlchemy's own work per statement cost several times the statement's):
        the same SQL, the same values."""
        path = sqlite_file_of(self._engine)
        if path is None:
            return None
        return _SqliteStatements(
            path, self._engine.dialect, self._sql, lock_backoff(self._engine), self._writers
        )

    def _reading(self, what: str, ws: str) -> AbstractContextManager[Query]:
        direct = self._direct
        if direct is not None:
            return direct.reading(what, ws)
        return self._sqlalchemy_reading(what, ws)

    def _writing(self, what: str, ws: str) -> AbstractContextManager[Query]:
        direct = self._direct
        if direct is not None:
            return direct.writing(what, ws)
        return self._sqlalchemy_writing(what, ws)

    @contextmanager
    def _sqlalchemy_reading(self, what: str, ws: str) -> Iterator[Query]:
        with store_errors(what, workspace_id=ws), self._engine.connect() as conn:
            yield _sqlalchemy_query(conn, self._sql)

    @contextmanager
    def _sqlalchemy_writing(self, what: str, ws: str) -> Iterator[Query]:
        with store_errors(what, workspace_id=ws), write_transaction(self._engine) as conn:
            lock_in_transaction(conn, "budgets", ws)
            yield _sqlalchemy_query(conn, self._sql)

    @staticmethod
    def _rollover(q: Query, ws: str, rows: Iterable[Any], now: datetime) -> None:
        """Start the periods that began since these budgets' (a conditional update: once)."""
        for period in {BudgetPeriod(r.period) for r in rows} - {BudgetPeriod.NONE}:
            start = period.start(now)
            if any(r.period == period.value and r.period_start < start for r in rows):
                q("rollover", {"b_ws": ws, "b_period": period.value, "b_start": start})

    @staticmethod
    def _expire(q: Query, ws: str, key: str, now: datetime) -> None:
        """Expire the workspace's lapsed holds (not those of the call ``key``): their amounts
        leave ``reserved``."""
        freed: dict[str, int] = {}
        for budget_id, amount in q("expire", {"b_ws": ws, "b_key": key, "b_now": now}):
            freed[budget_id] = freed.get(budget_id, 0) + int(amount)
        for budget_id in sorted(freed):
            q("free", {"b_id": budget_id, "b_amount": freed[budget_id]})

    def _applicable(self, rows: Iterable[Any], reservation: BudgetReservation) -> list[Any]:
        """The budgets that count this call, in id order (the order rows are locked in)."""
        byok = reservation.source in _BYOK_SOURCES
        return sorted(
            (
                r
                for r in rows
                if (r.metric == BudgetMetric.CHARGE.value or byok)
                and r.key_id in (None, reservation.key_id)
                and r.workflow_id in (None, reservation.workflow_id)
            ),
            key=lambda r: r.id,
        )

    def reserve(self, reservation: BudgetReservation) -> BudgetHold | None:
        """Hold the call's worst case on every budget that applies to it, or refuse it.

        A worst case can be more than a budget's BIGINT columns hold (:data:`MAX_UNITS`, about
        9.2e9 USD: a price file's top rates, a huge request, a multiplier of 1000). A hard budget
        refuses it (``BudgetExceeded``, as any call that does not fit: no limit is higher). A soft
        budget never refuses: it holds the worst case capped at what its ``reserved`` can still
        take (:data:`MAX_UNITS` less what its holds reserve, possibly nothing), so that
        ``reserved`` and the sum of its holds never pass :data:`MAX_UNITS`; the call still spends
        what it cost when it settles (saturating at :data:`MAX_UNITS`).

        :returns: the hold, or ``None`` when no budget applies.
        :raises BudgetExceeded: a hard budget has not room for it (nothing is held then).
        :raises StoreUnavailable: the store did not answer.
        """
        ws = reservation.workspace_id
        key = reservation.idempotency_key
        now = self._clock()
        if self._postgresql:
            if not self._may_have_budgets(ws):
                return None  # known from memory: no budget, nothing to hold
            return self._reserve_postgresql(reservation, now)
        if ws not in self._budgeted:
            with self._reading("reading budgets", ws) as q:
                if not q("budgets", {"b_ws": ws}):
                    return None  # the common case costs one read, and no write lock
            if len(self._budgeted) >= _BUDGETED_HINTS:
                self._budgeted.clear()
            self._budgeted.add(ws)
        prune = next(self._reservations) % self._prune_every == 0
        expires_at = now + timedelta(seconds=reservation.hold_seconds)
        needs = {
            BudgetMetric.CHARGE.value: to_units(reservation.amount),
            BudgetMetric.LIST_COST.value: to_units(reservation.list_cost),
        }
        held: list[str] = []
        largest = 0
        with self._writing("reserving budget", ws) as q:
            # under the write lock (the authority: budgets found last time need not be there
            # now), the budgets with the call's previous holds on them
            rows = q("budgets_held", {"b_ws": ws, "b_key": key})
            if not rows:
                self._budgeted.discard(ws)
                return None
            applicable = self._applicable(rows, reservation)
            expired = prune
            if prune:
                # every ``prune_every``-th reservation: lapsed holds leave ``reserved``, and old
                # settled and expired holds go, a bounded batch, in the same transaction
                self._expire(q, ws, key, now)
                q(
                    "prune",
                    {
                        "b_ws": ws,
                        "b_key": key,
                        "b_cutoff": now - self._keep_holds,
                        "b_batch": PRUNE_BATCH * self._prune_every,
                    },
                )
            self._rollover(q, ws, applicable, now)
            previous = sorted((r for r in rows if r.state is not None), key=lambda r: r.id)
            if any(p.state == "settled" for p in previous):
                # the call completed and was settled already (a run repeated under the same run
                # id): nothing more to hold. A released hold (the call did not complete) is
                # "expired", not "settled": the call is held again below.
                return BudgetHold(key, ws, (), Decimal(0), now)
            if previous:  # another credential for the same call: the new hold replaces the old
                for p in previous:
                    if p.state == "held":  # (even lapsed: the expiry leaves the call's own)
                        q("free", {"b_id": p.id, "b_amount": p.amount_units})
                q("forget", {"b_ws": ws, "b_key": key})
            for budget in applicable:
                need = needs[budget.metric]
                if not budget.hard:
                    # what the column can still take (read above in this transaction: since
                    # then only freed, so this never overflows it)
                    need = min(need, max(MAX_UNITS - int(budget.reserved_units), 0))
                # a worst case past MAX_UNITS fits no hard budget (no limit is higher): refused
                # as one that does not fit, without binding it
                beyond = need > MAX_UNITS
                admit = "admit_hard" if budget.hard else "admit_soft"
                admitted = [] if beyond else q(admit, {"b_id": budget.id, "b_need": need})
                if not admitted and not expired and not beyond:
                    # lapsed holds (their workers died) may still count in ``reserved``: they
                    # are expired now, and the call admitted if that made room
                    self._expire(q, ws, key, now)
                    expired = True
                    admitted = q(admit, {"b_id": budget.id, "b_need": need})
                if not admitted:
                    found = q("row", {"b_id": budget.id})
                    if not found:  # deleted meanwhile
                        continue
                    row = found[0]
                    raise BudgetExceeded(
                        ws,
                        row.name,
                        limit=from_units(row.limit_units),
                        spent=from_units(row.spent_units),
                        reserved=from_units(row.reserved_units),
                        needed=from_units(need),
                    )
                q(
                    "hold",
                    {
                        "idempotency_key": key,
                        "budget_id": budget.id,
                        "workspace_id": ws,
                        "state": "held",
                        "amount_units": need,
                        "spent_units": None,
                        "expires_at": expires_at,
                        "created_at": now,
                        "settled_at": None,
                    },
                )
                held.append(budget.name)
                largest = max(largest, need)
        if not held:
            return None
        return BudgetHold(key, ws, tuple(held), from_units(largest), expires_at)

    def settle(self, settlement: BudgetSettlement) -> tuple[bool, list[AuditEvent]]:
        """Replace the call's holds by what it cost.

        :returns: whether anything changed (``False`` when settled already, or nothing held),
            and the threshold events to audit (once the transaction has committed).
        """
        if self._postgresql:
            return self._settle_postgresql(settlement)
        with self._writing("settling budget", settlement.workspace_id) as q:
            return self._settle_in(q, settlement, self._clock())

    @property
    def settles_on_sqlite(self) -> bool:
        """Whether :meth:`settle_on` can settle on a connection of the store's SQLite file."""
        return self._direct is not None

    def settle_on(
        self, conn: sqlite3.Connection, settlements: Sequence[BudgetSettlement]
    ) -> tuple[bool, list[AuditEvent]]:
        """:meth:`settle` on ``conn``, a ``sqlite3`` connection of the store's file, inside the
        transaction it is in (the ledger's row of the same call: one commit for both). Its
        ``sqlite3`` errors are the caller's (who rolls the transaction back).

        :returns: whether anything changed, and the threshold events to audit once committed.
        """
        direct = self._direct
        if direct is None:
            raise BudgetError("settle_on needs a store on a SQLite file (settles_on_sqlite)")
        q = direct._query(conn)
        now = self._clock()
        changed = False
        events: list[AuditEvent] = []
        for settlement in settlements:
            done, crossed = self._settle_in(q, settlement, now)
            changed = changed or done
            events.extend(crossed)
        return changed, events

    def _settle_in(
        self, q: Query, settlement: BudgetSettlement, now: datetime
    ) -> tuple[bool, list[AuditEvent]]:
        """The settlement's statements, in the transaction ``q`` runs in."""
        ws = settlement.workspace_id
        key = settlement.idempotency_key
        spent = _settled_units(settlement)
        events: list[AuditEvent] = []
        rows = q("held", {"b_ws": ws, "b_key": key})
        if not settlement.completed:
            # a release: the amount leaves ``reserved`` and the hold is marked ``expired``,
            # not ``settled``, so that the same call made again is held again, and a
            # completed settlement arriving later (a record that outlived a cancelled run)
            # still spends what the call cost
            rows = [r for r in rows if r.state == "held"]
        if not rows:
            return False, []
        self._rollover(q, ws, rows, now)
        for row in sorted(rows, key=lambda r: r.budget_id):
            amount = spent[row.metric]
            # a hold still marked held past its expiry was never freed: it is freed here
            release = int(row.amount_units) if row.state == "held" else 0
            updated = q("spend", {"b_id": row.budget_id, "b_spent": amount, "b_release": release})
            q(
                "settle",
                {
                    "b_ws": ws,
                    "b_key": key,
                    "b_id": row.budget_id,
                    "b_now": now,
                    "b_spent": amount,
                    "b_state": "settled" if settlement.completed else "expired",
                },
            )
            if updated:
                event = self._crossed(q, ws, updated[0], now)
                if event is not None:
                    events.append(event)
        return True, events

    @cached_property
    def _postgresql(self) -> bool:
        return self._engine.dialect.name == "postgresql"

    def _may_have_budgets(self, ws: str) -> bool:
        """On PostgreSQL, whether a reservation of ``ws`` must ask the store: not when
        :attr:`presence` knows the workspace has no budget. Called on an event loop
        (:func:`~byok_hookspecs.called_inline`) for a workspace that has budgets, or one not known
        yet, it gives up at once (``StoreUnavailable``: the host reserves off the loop, where a
        miss is one read, remembered while nothing was announced meanwhile)."""
        presence = self.presence
        known = presence.has_budgets(ws)
        if known is False:
            return False
        if called_inline():
            raise StoreUnavailable(
                "reserving budget",
                workspace_id=ws,
                cause="the workspace's budgets are in PostgreSQL: reserved off the event loop",
            )
        if known is None and presence.listening:
            generation = presence.generation
            found = self._one_statement("reading budgets", ws, _PG_HAS_BUDGETS, {"ws": ws})
            known = bool(found[0][0])
            presence.remember(ws, known, generation)
        return known is not False

    def _one_statement(self, what: str, ws: str, sql: str, params: dict[str, Any]) -> list[Any]:
        """``sql`` as one autocommitted statement: one round trip (after the pool's ping)."""
        with (
            store_errors(what, workspace_id=ws),
            self._engine.connect() as conn,
        ):
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            return list(conn.exec_driver_sql(sql, params).all())

    @staticmethod
    def _period_starts(now: datetime) -> dict[str, datetime]:
        return {"day": BudgetPeriod.DAY.start(now), "month": BudgetPeriod.MONTH.start(now)}

    def _reserve_params(self, reservation: BudgetReservation, now: datetime) -> dict[str, Any]:
        """The parameters of :data:`_PG_RESERVE` for ``reservation`` at ``now``."""
        return {
            "ws": reservation.workspace_id,
            "key": reservation.idempotency_key,
            "byok": reservation.source in _BYOK_SOURCES,
            "key_id": reservation.key_id,
            "workflow_id": reservation.workflow_id,
            "need_charge": to_units(reservation.amount),
            "need_list": to_units(reservation.list_cost),
            "now": now,
            "expires_at": now + timedelta(seconds=reservation.hold_seconds),
            "cutoff": now - self._keep_holds,
            **self._period_starts(now),
        }

    def _reserve_postgresql(
        self, reservation: BudgetReservation, now: datetime
    ) -> BudgetHold | None:
        """:meth:`reserve` as one statement (:data:`_PG_RESERVE`)."""
        ws = reservation.workspace_id
        key = reservation.idempotency_key
        params = self._reserve_params(reservation, now)
        rows = self._one_statement("reserving budget", ws, _PG_RESERVE, params)
        applicable = [r for r in rows if r.applies]
        if not rows:
            return None
        if not rows[0].fresh:  # settled already (a run repeated under the same run id)
            return BudgetHold(key, ws, (), Decimal(0), now)
        if not rows[0].fits:
            row = next(
                r
                for r in applicable
                if r.hard and r.spent_now + r.reserved + r.need > r.limit_units
            )
            raise BudgetExceeded(
                ws,
                row.name,
                limit=from_units(row.limit_units),
                spent=from_units(row.spent_now),
                reserved=from_units(row.reserved),
                needed=from_units(row.need),
            )
        if not applicable:
            return None
        return BudgetHold(
            key,
            ws,
            tuple(r.name for r in applicable),
            from_units(max(int(r.held) for r in applicable)),
            params["expires_at"],
        )

    def _settle_postgresql(self, settlement: BudgetSettlement) -> tuple[bool, list[AuditEvent]]:
        """:meth:`settle` as one statement (:data:`_PG_SETTLE`)."""
        with (
            store_errors("settling budget", workspace_id=settlement.workspace_id),
            self._engine.connect() as conn,
        ):
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            changed, events = self.settle_in(conn, [settlement], transaction=False)
        return bool(changed), events

    def settle_in(
        self,
        conn: Connection,
        settlements: Sequence[BudgetSettlement],
        *,
        transaction: bool = True,
    ) -> tuple[set[tuple[str, str]], list[AuditEvent]]:
        """Settle a group of calls in one statement on ``conn`` (PostgreSQL), inside the
        transaction ``conn`` is in: the ledger's group commit settles its calls in its own. There
        the statement runs on its generic plan (:data:`_PG_GENERIC_PLAN`, for the rest of the
        transaction); with ``transaction=False`` (``conn`` in autocommit) it is the one statement.

        :returns: the ``(workspace, idempotency key)`` of the calls this changed, and the
            threshold events to audit once the transaction has committed.
        """
        now = self._clock()
        unique = list({(s.workspace_id, s.idempotency_key): s for s in settlements}.values())
        units = [_settled_units(s) for s in unique]
        if transaction:
            conn.exec_driver_sql(_PG_GENERIC_PLAN)
        rows = conn.exec_driver_sql(
            _PG_SETTLE,
            {
                "wss": [s.workspace_id for s in unique],
                "keys": [s.idempotency_key for s in unique],
                "completed": [s.completed for s in unique],
                "charges": [u[BudgetMetric.CHARGE.value] for u in units],
                "lists": [u[BudgetMetric.LIST_COST.value] for u in units],
                "now": now,
                **self._period_starts(now),
            },
        ).all()
        changed: set[tuple[str, str]] = set()
        events: list[AuditEvent] = []
        for row in rows:
            changed.update(zip(row.settled_workspaces or (), row.settled_keys or (), strict=True))
            crossed = set(parse_thresholds(row.alerted)) - set(parse_thresholds(row.was))
            if crossed:
                events.append(self._threshold_event(row.workspace_id, row, crossed, now))
        return changed, events

    @staticmethod
    def _threshold_event(ws: str, row: Any, crossed: Iterable[int], now: datetime) -> AuditEvent:
        kind = "hard" if row.hard else "soft"
        return AuditEvent(
            action="budget.threshold",
            workspace_id=ws,
            actor_id=None,
            outcome="ok",
            detail=(
                f"{kind} budget {row.name!r} ({row.metric}) reached {max(crossed)}% of its "
                f"limit: {from_units(int(row.spent_units))} of "
                f"{from_units(int(row.limit_units))} USD spent"
            ),
            occurred_at=now,
        )

    @staticmethod
    def _crossed(q: Query, ws: str, row: Any, now: datetime) -> AuditEvent | None:
        """The audit event of the thresholds this settlement crossed, marked as announced."""
        thresholds = parse_thresholds(row.thresholds)
        announced = set(parse_thresholds(row.alerted))
        spent, limit = int(row.spent_units), int(row.limit_units)
        crossed = [p for p in thresholds if p not in announced and spent * 100 >= p * limit]
        if not crossed:
            return None
        alerted = ",".join(str(p) for p in sorted(announced | set(crossed)))
        if not q("alert", {"b_id": row.id, "b_was": row.alerted, "b_alerted": alerted}):
            return None
        return BudgetStore._threshold_event(ws, row, crossed, now)


# --- PostgreSQL: a reservation and a settlement are one statement each -------------------------
#: Said before the settlement in its transaction (the rest of it only: ``SET LOCAL``): its plan is
#: the generic one, made once per connection (psycopg prepares a statement run five times on it),
#: not planned again for every group. PostgreSQL's own choice keeps planning it (its generic plan
#: assumes arrays of ten calls where each group's plan knows their number), about 0.4 ms of
#: server time per settlement, more than its execution.
_PG_GENERIC_PLAN = "SET LOCAL plan_cache_mode = force_generic_plan"
#: whether a workspace has any budget (read on a miss of :attr:`BudgetStore.presence`)
_PG_HAS_BUDGETS = "SELECT EXISTS (SELECT 1 FROM byok_budgets WHERE workspace_id = %(ws)s)"
#: A reservation on PostgreSQL, one statement: lock the budgets that apply to the call (and those
#: a previous hold of the same call is on) in id order; expire their lapsed holds; decide whether
#: every hard one has room (under the row locks, on the rows' latest versions); then, only if all
#: fit and the call was not settled already, move the amounts into ``reserved`` and write the
#: holds; and delete a bounded batch of old settled and expired holds on the locked budgets. A
#: refusal changes nothing but the lapsed holds (expired and freed), the pruned ones and a period
#: rollover. Every read of the holds seeks an index on equalities (the call's holds by their
#: primary key), so that its cost does not grow with the day's holds of the workspace.
_PG_RESERVE = """
WITH prev AS (
  -- the call's holds by their primary key (the key, then the workspace's budgets): naming the
  -- holds' workspace_id let the planner read every hold of the workspace through its index
  SELECT budget_id, state, amount_units FROM byok_budget_holds
  WHERE idempotency_key = %(key)s
    AND budget_id IN (SELECT id FROM byok_budgets WHERE workspace_id = %(ws)s)
), target AS (
  SELECT b.id, b.name, b.hard, b.limit_units, b.spent_units, b.reserved_units, b.period_start,
    ((b.metric = 'charge' OR %(byok)s)
      AND (b.key_id IS NULL OR b.key_id = %(key_id)s)
      AND (b.workflow_id IS NULL OR b.workflow_id = %(workflow_id)s)) AS applies,
    -- numeric: a worst case may be more than a bigint holds (refused by a hard budget, capped
    -- by a soft one below)
    CASE b.metric WHEN 'charge' THEN %(need_charge)s::numeric ELSE %(need_list)s::numeric END
      AS need_if,
    CASE b.period WHEN 'day' THEN %(day)s::timestamptz WHEN 'month' THEN %(month)s::timestamptz
      ELSE b.period_start END AS cur_start
  FROM byok_budgets b
  WHERE b.workspace_id = %(ws)s AND (
    ((b.metric = 'charge' OR %(byok)s)
      AND (b.key_id IS NULL OR b.key_id = %(key_id)s)
      AND (b.workflow_id IS NULL OR b.workflow_id = %(workflow_id)s))
    OR b.id IN (SELECT budget_id FROM prev WHERE state = 'held'))
  ORDER BY b.id
  FOR UPDATE
), lapsed AS (
  -- (the lower bounds on expires_at here and below are always true: with them the planner
  -- estimates a range, not a third of the workspace's holds, for the generic plan, which it then
  -- chooses, planning the statement once per connection instead of on every call)
  UPDATE byok_budget_holds h SET state = 'expired'
  WHERE h.workspace_id = %(ws)s AND h.state = 'held' AND h.expires_at < %(now)s
    AND h.expires_at > '-infinity'
    AND h.idempotency_key <> %(key)s AND h.budget_id IN (SELECT id FROM target)
  RETURNING h.budget_id, h.amount_units
), pruned AS (
  -- holds settled or expired more than keep_holds ago on the locked budgets (not this call's),
  -- a bounded batch; the conditions are repeated outside the batch so that a row a concurrent
  -- late settlement changed meanwhile is checked again on its new version
  -- (each state by its own equality, so that both seek the (workspace, state, expiry) index:
  -- with state IN (...) the planner may read every hold of the workspace; the rows are then
  -- found by ctid, the outer conditions leaving the workspace out for the same reason: a
  -- hold's workspace never changes)
  DELETE FROM byok_budget_holds h
  WHERE h.ctid = ANY (ARRAY(
      SELECT o.ctid FROM byok_budget_holds o
      WHERE o.workspace_id = %(ws)s AND o.state = 'expired' AND o.expires_at < %(cutoff)s
        AND o.expires_at > '-infinity'
        AND (o.settled_at IS NULL OR o.settled_at < %(cutoff)s)
        AND o.idempotency_key <> %(key)s AND o.budget_id IN (SELECT id FROM target)
      UNION ALL
      SELECT o.ctid FROM byok_budget_holds o
      WHERE o.workspace_id = %(ws)s AND o.state = 'settled' AND o.expires_at < %(cutoff)s
        AND o.expires_at > '-infinity'
        AND (o.settled_at IS NULL OR o.settled_at < %(cutoff)s)
        AND o.idempotency_key <> %(key)s AND o.budget_id IN (SELECT id FROM target)
      LIMIT 64))  -- PRUNE_BATCH, a literal: a generic plan takes a LIMIT parameter for a tenth of the rows
    AND h.state IN ('expired', 'settled')
    AND h.expires_at < %(cutoff)s AND (h.settled_at IS NULL OR h.settled_at < %(cutoff)s)
    AND h.idempotency_key <> %(key)s
  RETURNING 1
), base AS (
  SELECT t.id, t.name, t.hard, t.applies, t.limit_units, t.period_start, t.cur_start,
    CASE WHEN t.period_start < t.cur_start THEN 0 ELSE t.spent_units END AS spent_now,
    t.reserved_units
      - COALESCE((SELECT sum(l.amount_units) FROM lapsed l WHERE l.budget_id = t.id), 0)
      AS reserved_now,
    COALESCE((SELECT sum(p.amount_units) FROM prev p
              WHERE p.budget_id = t.id AND p.state = 'held'), 0) AS replaced,
    CASE WHEN t.applies THEN t.need_if ELSE 0 END AS need
  FROM target t
), calc AS (
  -- held: the need capped at what reserved can still take (MAX_UNITS, a literal: a bigint's
  -- largest); the need itself for a hard budget that fits (its limit is at most that)
  SELECT b.*, LEAST(b.need, GREATEST(9223372036854775807 - (b.reserved_now - b.replaced), 0))
    AS held
  FROM base b
), verdict AS (
  SELECT NOT EXISTS (SELECT 1 FROM prev WHERE state = 'settled') AS fresh,
    -- in numeric (need is): a sum past a bigint's range refuses, it does not fail
    COALESCE(bool_and(NOT c.hard OR NOT c.applies
                      OR c.spent_now + c.reserved_now - c.replaced + c.need <= c.limit_units),
             true) AS fits
  FROM calc c
), moved AS (
  UPDATE byok_budgets b SET
    spent_units = c.spent_now,
    reserved_units = c.reserved_now
      - CASE WHEN v.fresh AND v.fits THEN c.replaced - c.held ELSE 0 END,
    alerted = CASE WHEN c.period_start < c.cur_start THEN '' ELSE b.alerted END,
    period_start = greatest(c.period_start, c.cur_start)
  FROM calc c, verdict v
  WHERE b.id = c.id
  RETURNING b.id
), gone AS (
  DELETE FROM byok_budget_holds h USING verdict v
  WHERE h.idempotency_key = %(key)s AND h.budget_id IN (SELECT budget_id FROM prev)
    AND v.fresh AND v.fits AND h.budget_id NOT IN (SELECT id FROM calc WHERE applies)
  RETURNING h.budget_id
), held AS (
  INSERT INTO byok_budget_holds (idempotency_key, budget_id, workspace_id, state, amount_units,
    spent_units, expires_at, created_at, settled_at)
  SELECT %(key)s, c.id, %(ws)s, 'held', c.held, NULL, %(expires_at)s, %(now)s, NULL
  FROM calc c, verdict v WHERE c.applies AND v.fresh AND v.fits
  ON CONFLICT (idempotency_key, budget_id) DO UPDATE SET state = 'held',
    amount_units = excluded.amount_units, spent_units = NULL, expires_at = excluded.expires_at,
    created_at = excluded.created_at, settled_at = NULL
  RETURNING budget_id
)
SELECT c.id, c.name, c.applies, c.hard, c.limit_units, c.spent_now,
  c.reserved_now - c.replaced AS reserved, c.need, c.held, v.fresh, v.fits,
  (SELECT count(*) FROM moved) + (SELECT count(*) FROM gone) + (SELECT count(*) FROM held)
    AS written
FROM calc c, verdict v
ORDER BY c.id
"""

#: Settlements on PostgreSQL (one call's, or a group's), one statement: lock the budgets the
#: calls' unsettled holds are on (id order), lock those holds (a concurrent settlement of the same
#: call finds them settled then), mark them, and move the amounts from ``reserved`` to ``spent``
#: (summed per budget), announcing in ``alerted`` the thresholds crossed (under the row lock: once
#: each). It returns the budgets changed, each with every settled call's workspace and key.
_PG_SETTLE = """
WITH s AS (
  SELECT * FROM unnest(%(wss)s::text[], %(keys)s::text[], %(completed)s::boolean[],
    %(charges)s::bigint[], %(lists)s::bigint[]) AS s(ws, key, completed, charge, list)
), mine AS (
  SELECT h.budget_id FROM byok_budget_holds h JOIN s
    ON h.workspace_id = s.ws AND h.idempotency_key = s.key
  WHERE h.state <> 'settled'
), target AS (
  SELECT b.id, b.metric, b.limit_units, b.spent_units, b.alerted, b.period_start,
    CASE b.period WHEN 'day' THEN %(day)s::timestamptz WHEN 'month' THEN %(month)s::timestamptz
      ELSE b.period_start END AS cur_start
  FROM byok_budgets b WHERE b.id IN (SELECT budget_id FROM mine)
  ORDER BY b.id
  FOR UPDATE
), cur AS (
  SELECT h.workspace_id, h.idempotency_key, h.budget_id, h.state, h.amount_units,
    s.completed, s.charge, s.list
  FROM byok_budget_holds h JOIN s ON h.workspace_id = s.ws AND h.idempotency_key = s.key
  WHERE h.budget_id IN (SELECT id FROM target)
    AND h.state <> 'settled' AND (s.completed OR h.state = 'held')
  FOR UPDATE OF h
), each AS (
  SELECT cur.workspace_id, cur.idempotency_key, cur.budget_id, cur.completed,
    CASE t.metric WHEN 'charge' THEN cur.charge ELSE cur.list END AS amount,
    CASE WHEN cur.state = 'held' THEN cur.amount_units ELSE 0 END AS release
  FROM cur JOIN target t ON t.id = cur.budget_id
), calc AS (
  SELECT t.id, t.limit_units, t.period_start, t.cur_start, e.release,
    -- saturating at MAX_UNITS (a bigint's largest): e.amount is a numeric sum, which may pass it
    LEAST(CASE WHEN t.period_start < t.cur_start THEN 0 ELSE t.spent_units END + e.amount,
          9223372036854775807) AS new_spent,
    CASE WHEN t.period_start < t.cur_start THEN '' ELSE t.alerted END AS was
  FROM target t JOIN (
    SELECT budget_id, sum(amount) AS amount, sum(release) AS release FROM each GROUP BY budget_id
  ) e ON e.budget_id = t.id
), marked AS (
  UPDATE byok_budget_holds h SET
    state = CASE WHEN e.completed THEN 'settled' ELSE 'expired' END,
    settled_at = %(now)s, spent_units = e.amount
  FROM each e
  WHERE h.workspace_id = e.workspace_id AND h.idempotency_key = e.idempotency_key
    AND h.budget_id = e.budget_id
  RETURNING h.workspace_id, h.idempotency_key
), moved AS (
  UPDATE byok_budgets b SET
    spent_units = c.new_spent,
    reserved_units = b.reserved_units - c.release,
    period_start = greatest(c.period_start, c.cur_start),
    alerted = (
      SELECT COALESCE(string_agg(s.p::text, ',' ORDER BY s.p), '') FROM (
        SELECT a::int AS p FROM unnest(string_to_array(c.was, ',')) a WHERE a <> ''
        UNION
        SELECT a::int FROM unnest(string_to_array(b.thresholds, ',')) a
        WHERE a <> '' AND c.new_spent * 100 >= a::numeric * c.limit_units
      ) s)
  FROM calc c
  WHERE b.id = c.id
  RETURNING b.id, b.workspace_id, b.name, b.metric, b.hard, b.limit_units, b.spent_units,
    b.alerted
)
SELECT m.id, m.workspace_id, m.name, m.metric, m.hard, m.limit_units, m.spent_units, m.alerted,
  c.was, (SELECT array_agg(workspace_id) FROM marked) AS settled_workspaces,
  (SELECT array_agg(idempotency_key) FROM marked) AS settled_keys
FROM moved m JOIN calc c ON c.id = m.id
ORDER BY m.id
"""


def _settled_units(settlement: BudgetSettlement) -> dict[str, int]:
    """What a settlement spends, per metric, in :data:`UNIT` (nothing for a release), at most
    :data:`MAX_UNITS`: a call that cost more (a provider's huge reported usage, a hostile price)
    spends what a budget's column can hold, and the statements add it saturating there, so that
    the settlement, and the ledger row committed with it, never fail on it (the ledger keeps the
    real amount)."""
    return {
        BudgetMetric.CHARGE.value: (
            min(to_units(settlement.amount), MAX_UNITS) if settlement.completed else 0
        ),
        BudgetMetric.LIST_COST.value: (
            min(to_units(settlement.list_cost), MAX_UNITS)
            if settlement.completed and settlement.source in _BYOK_SOURCES
            else 0
        ),
    }


#: ``q(statement name, parameters) -> rows``: one statement of :attr:`BudgetStore._sql`
Query = Callable[[str, dict[str, Any]], list[Any]]


def _sqlalchemy_query(conn: Connection, sql: SimpleNamespace) -> Query:
    def q(name: str, params: dict[str, Any]) -> list[Any]:
        result = conn.execute(getattr(sql, name), params)
        return list(result.all()) if result.returns_rows else []

    return q


class _SqliteStatements:
    """The budget statements compiled once for SQLite, run on ``sqlite3`` connections of the
    store's file: the values bound and read back by the columns' own SQLAlchemy processors."""

    def __init__(
        self,
        path: Path,
        dialect: Dialect,
        sql: SimpleNamespace,
        backoff: LockBackoff | None,
        writers: SqliteWriters | None = None,
    ) -> None:
        self._compiled: dict[str, tuple[str, tuple[str, ...], dict[str, Any], dict[str, Any]]] = {}
        for name, statement in vars(sql).items():
            compiled = statement.compile(dialect=dialect)
            processors = {
                key: processor
                for key, bind in compiled.binds.items()
                if (processor := bind.type._cached_bind_processor(dialect)) is not None
            }
            order = tuple(compiled.positiontup or ())
            self._compiled[name] = (str(compiled), order, dict(compiled.params), processors)
        # the one column read back that needs converting: a period's start (a UTC datetime)
        self._period_start = budgets.c.period_start.type._cached_result_processor(dialect, None)
        self._rows: dict[tuple[str, ...], Any] = {}
        self._owns_writers = writers is None
        self._writers = writers if writers is not None else SqliteWriters(str(path))
        self._backoff = backoff if backoff is not None else LockBackoff()

    def __repr__(self) -> str:
        return f"_SqliteStatements(statements={len(self._compiled)})"

    def _query(self, conn: sqlite3.Connection) -> Query:
        def q(name: str, params: dict[str, Any]) -> list[Any]:
            text, order, defaults, processors = self._compiled[name]
            values = []
            for key in order:
                value = params[key] if key in params else defaults.get(key)
                processor = processors.get(key)
                values.append(processor(value) if processor is not None else value)
            cursor = conn.execute(text, values)
            if cursor.description is None:
                return []
            fields = tuple(d[0] for d in cursor.description)
            row_type = self._rows.get(fields)
            if row_type is None:
                row_type = self._rows[fields] = collections.namedtuple("Row", fields)
            found = cursor.fetchall()
            if "period_start" in fields and self._period_start is not None:
                at = fields.index("period_start")
                found = [(*r[:at], self._period_start(r[at]), *r[at + 1 :]) for r in found]
            return [row_type(*r) for r in found]

        return q

    def reading(self, what: str, ws: str) -> _Borrowed:
        """A connection's statements, in autocommit."""
        return _Borrowed(self, what, ws, write=False)

    def writing(self, what: str, ws: str) -> _Borrowed:
        """One ``BEGIN IMMEDIATE`` transaction, committed when the block ends, rolled back when it
        raises (a refusal holds nothing)."""
        return _Borrowed(self, what, ws, write=True)

    def close(self) -> None:
        if self._owns_writers:
            self._writers.close()


class _Borrowed:
    """``with``: a connection of the statements' file borrowed for the block (a
    ``BEGIN IMMEDIATE`` transaction around it when writing), its statements as a :data:`Query`;
    a ``sqlite3`` error becomes :class:`StoreUnavailable` naming what and whose. A plain class,
    not a generator context manager: it runs twice on every call with a budget."""

    __slots__ = ("_conn", "_pool", "_prompt", "_statements", "_what", "_write", "_ws")

    def __init__(self, statements: _SqliteStatements, what: str, ws: str, *, write: bool) -> None:
        self._statements = statements
        self._what = what
        self._ws = ws
        self._write = write
        self._prompt = False
        self._pool: SqliteConnections | None = None
        self._conn: sqlite3.Connection | None = None

    def __enter__(self) -> Query:
        statements = self._statements
        prompt = self._prompt = called_inline()
        if prompt and statements._backoff.active:
            raise StoreUnavailable(
                self._what, workspace_id=self._ws, cause=str(statements._backoff.refusal())
            )
        pool = self._pool = statements._writers.pool(prompt)
        try:
            conn = self._conn = pool.acquire()
            if self._write:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except BaseException:
                    self._conn = None
                    pool.release(conn)
                    raise
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from None
        return statements._query(conn)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _tb: Any
    ) -> None:
        conn, pool = self._conn, self._pool
        assert conn is not None
        assert pool is not None
        self._conn = None
        try:
            try:
                if self._write:
                    try:
                        if kind is None:
                            conn.execute("COMMIT")
                    finally:
                        if conn.in_transaction:  # never lend it on with a transaction open
                            conn.execute("ROLLBACK")
            finally:
                pool.release(conn)
        except sqlite3.Error as failed:
            raise self._unavailable(failed) from None
        if isinstance(exc, sqlite3.Error):
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: sqlite3.Error) -> StoreUnavailable:
        if self._prompt and store_busy(exc):
            self._statements._backoff.hit()
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return StoreUnavailable(
            self._what, workspace_id=self._ws, cause=f"{type(exc).__name__}: {first_line[:300]}"
        )
