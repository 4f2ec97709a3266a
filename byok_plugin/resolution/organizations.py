"""Organizations: an organization owns workspaces and holds a pool of provider keys they inherit.

**Where the keys live.** An organization's keys are ordinary stored keys whose owner is the
reserved id ``org:<organization id>`` (:func:`org_owner`): the same table, the same encryption
(bound to that owner, provider and key id), the same limits, labels, cooldowns and audit as a
workspace's keys, all through :class:`~byok_plugin.keys.service.KeyService`. Workspace ids that start
with ``org:`` are therefore reserved: resolution refuses to run in such a "workspace".

**Who may do what.** ``byok_authorize`` decides, asked about the owner id ``org:<id>``: the host
puts the actor's organization role in ``Actor.roles`` under that id (``{"org:acme": "admin"}``).
Organization admins manage the organization's keys (``keys.manage``); its members list them
masked (``keys.read``). A workspace's admins and members see the keys their workspace inherits,
masked, through :meth:`Organizations.inherited_keys` (``keys.read`` on the workspace); nobody but
the resolution of a call ever decrypts one.

**Resolution** (:mod:`byok_plugin.resolution.resolver`): block > workspace > organization > platform. A
workspace that opted out of its organization's pool (:meth:`Organizations.set_opt_out`) never
uses it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import sqlalchemy as sa
from byok_hookspecs import Action, Actor, ByokError
from sqlalchemy.engine import Engine

from byok_plugin.core.errors import InvalidInput
from byok_plugin.core.key_format import check_provider, check_workspace_id
from byok_plugin.store.engine import store_errors, write_transaction
from byok_plugin.store.key_events import notify_key_change
from byok_plugin.store.keys_repo import KeyInfo, KeyStore
from byok_plugin.store.tables import UTCDateTime, metadata

if TYPE_CHECKING:
    from byok_plugin.keys.service import KeyService

__all__ = [
    "ORG_PREFIX",
    "InheritedKey",
    "Membership",
    "OrganizationNotFound",
    "OrganizationStore",
    "Organizations",
    "check_org_id",
    "is_org_owner",
    "org_owner",
]

#: the prefix of an organization's owner id in the key store and in ``Actor.roles``
ORG_PREFIX = "org:"
_ORG_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

organizations = sa.Table(
    "byok_organizations",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("created_by", sa.String(200), nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

organization_workspaces = sa.Table(
    "byok_organization_workspaces",
    metadata,
    # a workspace belongs to one organization at most
    sa.Column("workspace_id", sa.String(200), primary_key=True),
    sa.Column("organization_id", sa.String(64), nullable=False),
    # the workspace does not use its organization's key pool
    sa.Column("opted_out", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("updated_by", sa.String(200), nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Index(None, "organization_id"),
)


class OrganizationNotFound(ByokError, LookupError):
    """No such organization."""

    def __init__(self, org_id: str) -> None:
        self.org_id = org_id
        super().__init__(f"no organization {org_id!r} (create it with `byok org create {org_id}`)")


def check_org_id(org_id: str) -> str:
    """The organization id, or :class:`InvalidInput`: 1-63 letters, digits, ``.``, ``_``, ``-``."""
    if not isinstance(org_id, str) or not _ORG_ID_RE.match(org_id):
        raise InvalidInput(
            "an organization id is 1 to 63 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return org_id


def org_owner(org_id: str) -> str:
    """The owner id of an organization's keys (and its scope in ``Actor.roles``)."""
    return ORG_PREFIX + check_org_id(org_id)


def is_org_owner(owner_id: str) -> bool:
    return owner_id.startswith(ORG_PREFIX)


def check_member_workspace(workspace_id: str) -> str:
    workspace_id = check_workspace_id(workspace_id)
    if is_org_owner(workspace_id):
        raise InvalidInput(
            f"workspace ids starting with {ORG_PREFIX!r} are reserved for organizations"
        )
    return workspace_id


@dataclass(frozen=True, slots=True)
class Membership:
    """A workspace's organization, and whether it opted out of the organization's key pool."""

    workspace_id: str
    organization_id: str
    opted_out: bool = False

    @property
    def owner_id(self) -> str:
        return ORG_PREFIX + self.organization_id

    @property
    def uses_pool(self) -> bool:
        return not self.opted_out


@dataclass(frozen=True, slots=True)
class InheritedKey:
    """An organization key as a workspace sees it: masked, never its value."""

    organization_id: str
    key: KeyInfo
    #: False when the workspace opted out: listed, but never used
    active: bool

    def to_dict(self) -> dict[str, object]:
        out = self.key.to_dict()
        out.pop("workspace_id", None)
        out.pop("master_key_id", None)
        return {
            **out,
            "organization_id": self.organization_id,
            "inherited": True,
            "active": self.active,
        }


class OrganizationStore:
    """Rows of ``byok_organizations`` and ``byok_organization_workspaces``; no authorization."""

    def __init__(
        self, engine: Engine, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._engine = engine
        self._clock = clock

    def __repr__(self) -> str:
        return f"OrganizationStore(dialect={self._engine.dialect.name!r})"

    def create(self, org_id: str, *, actor_id: str | None) -> bool:
        """Create the organization; False if it already exists."""
        org_id = check_org_id(org_id)
        with store_errors("creating an organization"), write_transaction(self._engine) as conn:
            t = organizations
            if conn.execute(sa.select(t.c.id).where(t.c.id == org_id)).first() is not None:
                return False
            conn.execute(
                t.insert().values(id=org_id, created_by=actor_id, created_at=self._clock())
            )
        return True

    def exists(self, org_id: str) -> bool:
        t = organizations
        with store_errors("reading organizations"), self._engine.connect() as conn:
            return conn.execute(sa.select(t.c.id).where(t.c.id == org_id)).first() is not None

    def attach(self, org_id: str, workspace_id: str, *, actor_id: str | None) -> Membership:
        """Make the workspace one of the organization's (moving it from another one; an opt-out
        is kept only within the same organization)."""
        org_id = check_org_id(org_id)
        workspace_id = check_member_workspace(workspace_id)
        t = organization_workspaces
        with (
            store_errors("attaching a workspace", workspace_id=workspace_id),
            write_transaction(self._engine) as conn,
        ):
            if (
                conn.execute(
                    sa.select(organizations.c.id).where(organizations.c.id == org_id)
                ).first()
                is None
            ):
                raise OrganizationNotFound(org_id)
            row = conn.execute(sa.select(t).where(t.c.workspace_id == workspace_id)).first()
            opted_out = (
                bool(row.opted_out) if row is not None and row.organization_id == org_id else False
            )
            values = {
                "organization_id": org_id,
                "opted_out": opted_out,
                "updated_by": actor_id,
                "updated_at": self._clock(),
            }
            if row is None:
                conn.execute(t.insert().values(workspace_id=workspace_id, **values))
            else:
                conn.execute(t.update().where(t.c.workspace_id == workspace_id).values(**values))
            # the workspace's pool changed: every worker's resolution, at commit
            notify_key_change(conn, workspace_id, None)
        return Membership(workspace_id, org_id, opted_out)

    def detach(self, workspace_id: str) -> bool:
        t = organization_workspaces
        with (
            store_errors("detaching a workspace", workspace_id=workspace_id),
            write_transaction(self._engine) as conn,
        ):
            detached = conn.execute(t.delete().where(t.c.workspace_id == workspace_id)).rowcount > 0
            if detached:
                notify_key_change(conn, workspace_id, None)
            return detached

    def membership(self, workspace_id: str) -> Membership | None:
        """The workspace's organization, or None (one indexed read).

        :raises StoreUnavailable: the store did not answer.
        """
        t = organization_workspaces
        with (
            store_errors("reading the workspace's organization", workspace_id=workspace_id),
            self._engine.connect() as conn,
        ):
            row = conn.execute(sa.select(t).where(t.c.workspace_id == workspace_id)).first()
        if row is None:
            return None
        return Membership(workspace_id, row.organization_id, bool(row.opted_out))

    def set_opt_out(
        self, workspace_id: str, opted_out: bool, *, actor_id: str | None
    ) -> Membership:
        t = organization_workspaces
        with (
            store_errors("writing the workspace's organization", workspace_id=workspace_id),
            write_transaction(self._engine) as conn,
        ):
            row = conn.execute(sa.select(t).where(t.c.workspace_id == workspace_id)).first()
            if row is None:
                raise InvalidInput(
                    f"workspace {workspace_id!r} belongs to no organization (attach it with "
                    f"`byok org attach ORG --workspace {workspace_id}`)"
                )
            conn.execute(
                t.update()
                .where(t.c.workspace_id == workspace_id)
                .values(opted_out=opted_out, updated_by=actor_id, updated_at=self._clock())
            )
            notify_key_change(conn, workspace_id, None)
        return Membership(workspace_id, row.organization_id, opted_out)

    def workspaces(self, org_id: str) -> list[Membership]:
        t = organization_workspaces
        with store_errors("reading organizations"), self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(t).where(t.c.organization_id == org_id).order_by(t.c.workspace_id)
            ).all()
        return [Membership(r.workspace_id, r.organization_id, bool(r.opted_out)) for r in rows]


class Organizations:
    """Organizations with authorization and audit: the library API under ``byok org`` and the
    HTTP routes. Key changes go through :class:`KeyService` on the owner id ``org:<id>``."""

    def __init__(self, store: OrganizationStore, keys: KeyService, key_store: KeyStore) -> None:
        self.store = store
        self.keys = keys
        self._key_store = key_store

    def __repr__(self) -> str:
        return f"Organizations({self.store!r})"

    def _require_org(self, org_id: str) -> str:
        org_id = check_org_id(org_id)
        if not self.store.exists(org_id):
            raise OrganizationNotFound(org_id)
        return org_id

    def create(self, actor: Actor | None, org_id: str) -> bool:
        """Create an organization: its admins (``keys.manage`` on ``org:<id>``) may."""
        owner = org_owner(org_id)
        self.keys.authorize(actor, owner, Action.MANAGE_KEYS, what="create the organization")
        created = self.store.create(org_id, actor_id=actor.id if actor else None)
        if created:
            self.keys.audit("org.created", actor, owner, detail=f"organization {org_id!r}")
        return created

    def attach(self, actor: Actor | None, org_id: str, workspace_id: str) -> Membership:
        """Put a workspace in an organization: an admin of both."""
        org_id = self._require_org(org_id)
        workspace_id = check_member_workspace(workspace_id)
        owner = org_owner(org_id)
        what = f"attach workspace {workspace_id!r} to organization {org_id!r}"
        self.keys.authorize(actor, owner, Action.MANAGE_KEYS, what=what)
        self.keys.authorize(actor, workspace_id, Action.MANAGE_KEYS, what=what)
        membership = self.store.attach(org_id, workspace_id, actor_id=actor.id if actor else None)
        self.keys.audit(
            "org.workspace_attached", actor, workspace_id, detail=f"organization {org_id!r}"
        )
        return membership

    def set_opt_out(self, actor: Actor | None, workspace_id: str, opted_out: bool) -> Membership:
        """A workspace admin opts the workspace out of (or back into) its organization's pool."""
        workspace_id = check_member_workspace(workspace_id)
        self.keys.authorize(
            actor, workspace_id, Action.MANAGE_KEYS, what="opt out of the organization's keys"
        )
        membership = self.store.set_opt_out(
            workspace_id, opted_out, actor_id=actor.id if actor else None
        )
        self.keys.audit(
            "org.opted_out" if opted_out else "org.opted_in",
            actor,
            workspace_id,
            detail=f"organization {membership.organization_id!r}",
        )
        return membership

    def list_keys(
        self, actor: Actor | None, org_id: str, provider: str | None = None
    ) -> list[KeyInfo]:
        """The organization's keys, masked (its members and admins)."""
        return self.keys.list_keys(actor, org_owner(self._require_org(org_id)), provider)

    def inherited_keys(
        self, actor: Actor | None, workspace_id: str, provider: str | None = None
    ) -> tuple[Membership | None, list[InheritedKey]]:
        """The keys a workspace inherits from its organization, masked: the workspace's members
        and admins may see them (``keys.read`` on the workspace), never their values."""
        workspace_id = check_member_workspace(workspace_id)
        provider = check_provider(provider) if provider is not None else None
        self.keys.authorize(
            actor, workspace_id, Action.READ_KEYS, what="list inherited keys", provider=provider
        )
        membership = self.store.membership(workspace_id)
        if membership is None:
            return None, []
        infos = self._key_store.list_keys(membership.owner_id, provider)
        return membership, [
            InheritedKey(membership.organization_id, info, membership.uses_pool) for info in infos
        ]
