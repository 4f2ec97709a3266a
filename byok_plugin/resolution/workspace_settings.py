"""Per-workspace settings kept in the store: for now, the fallback policy.

When a workspace's own (BYOK) key fails at the provider, may the platform's key serve the call
(and bill it)?

- ``never`` (the default): no; the call fails with an error that names the key;
- ``on_rate_limit``: only when the provider answered 429 (rate limit or quota);
- ``on_error``: on any refusal (429, an auth failure, a server error).

A fallback is audited (``fallback.used``) and recorded in the ledger as a platform call.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from byok_hookspecs import FailureReason
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from byok_plugin.store.engine import store_errors, write_transaction
from byok_plugin.store.key_events import notify_key_change
from byok_plugin.store.tables import UTCDateTime, metadata

__all__ = [
    "FallbackPolicy",
    "WorkspaceSettings",
    "WorkspaceSettingsStore",
    "workspace_settings",
]


class FallbackPolicy(enum.StrEnum):
    """May the platform key serve a call after the workspace's own key failed?"""

    NEVER = "never"
    ON_RATE_LIMIT = "on_rate_limit"
    ON_ERROR = "on_error"

    def allows(self, reason: FailureReason) -> bool:
        if self is FallbackPolicy.ON_ERROR:
            return True
        if self is FallbackPolicy.ON_RATE_LIMIT:
            return reason is FailureReason.RATE_LIMIT
        return False

    @classmethod
    def parse(cls, value: str) -> FallbackPolicy:
        try:
            return cls(value.strip().lower().replace("-", "_"))
        except ValueError:
            raise ValueError(
                f"fallback policy must be one of {', '.join(p.value for p in cls)}, not {value!r}"
            ) from None


workspace_settings = sa.Table(
    "byok_workspace_settings",
    metadata,
    sa.Column("workspace_id", sa.String(200), primary_key=True),
    sa.Column("fallback_policy", sa.String(16), nullable=False, server_default="never"),
    sa.Column("updated_by", sa.String(200), nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.CheckConstraint(
        "fallback_policy IN ('never', 'on_rate_limit', 'on_error')", name="fallback_policy"
    ),
)


@dataclass(frozen=True, slots=True)
class WorkspaceSettings:
    workspace_id: str
    fallback_policy: FallbackPolicy = FallbackPolicy.NEVER
    updated_by: str | None = None
    updated_at: datetime | None = None


class WorkspaceSettingsStore:
    """Reads and writes ``byok_workspace_settings``; a workspace without a row has the defaults."""

    def __init__(
        self, engine: Engine, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._engine = engine
        self._clock = clock
        t = workspace_settings
        self._select = sa.select(t).where(t.c.workspace_id == sa.bindparam("workspace_id"))

    def __repr__(self) -> str:
        return f"WorkspaceSettingsStore(dialect={self._engine.dialect.name!r})"

    def get(self, workspace_id: str) -> WorkspaceSettings:
        """The workspace's settings (the defaults when it has none stored).

        :raises StoreUnavailable: the store did not answer.
        """
        with (
            store_errors("reading workspace settings", workspace_id=workspace_id),
            self._engine.connect() as conn,
        ):
            row = conn.execute(self._select, {"workspace_id": workspace_id}).first()
        if row is None:
            return WorkspaceSettings(workspace_id)
        return WorkspaceSettings(
            workspace_id=workspace_id,
            fallback_policy=FallbackPolicy(row.fallback_policy),
            updated_by=row.updated_by,
            updated_at=row.updated_at,
        )

    def fallback_policy(self, workspace_id: str) -> FallbackPolicy:
        return self.get(workspace_id).fallback_policy

    def set_fallback_policy(
        self, workspace_id: str, policy: FallbackPolicy | str, *, actor_id: str | None
    ) -> WorkspaceSettings:
        """Store the workspace's policy (insert or update, safe under concurrent writers)."""
        chosen = policy if isinstance(policy, FallbackPolicy) else FallbackPolicy.parse(policy)
        now = self._clock()
        values = {
            "workspace_id": workspace_id,
            "fallback_policy": chosen.value,
            "updated_by": actor_id,
            "updated_at": now,
        }
        with (
            store_errors("writing workspace settings", workspace_id=workspace_id),
            write_transaction(self._engine) as conn,
        ):
            insert = (
                postgresql.insert(workspace_settings)
                if conn.dialect.name == "postgresql"
                else sqlite.insert(workspace_settings)
            )
            conn.execute(
                insert.values(**values).on_conflict_do_update(
                    index_elements=["workspace_id"],
                    set_={k: v for k, v in values.items() if k != "workspace_id"},
                )
            )
            notify_key_change(conn, workspace_id, None)  # every worker's resolution, at commit
        return WorkspaceSettings(workspace_id, chosen, actor_id, now)
