"""The workspace views of the settings page: its usage (spend by day, BYOK against platform,
what its own keys saved; by model and by workflow, block and key) and its fallback policy.

Members read both (``usage.read``, ``keys.read``); admins change the fallback policy
(``keys.manage``), audited as ``settings.fallback_policy``, as ``byok fallback set`` does.
Amounts are decimal strings in plain notation (``0.0000001``, never ``1E-7``: the API's
``Money`` pattern), never floats.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from byok_hookspecs import Action, Actor, AuditEvent, CredentialSource
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from byok_plugin.core.errors import InvalidInput
from byok_plugin.core.key_format import check_workspace_id
from byok_plugin.server.errors import ApiError, ErrorCode

if TYPE_CHECKING:
    from byok_plugin.billing.ledger import LedgerRow
    from byok_plugin.server.routes import Api

__all__ = ["DEFAULT_DAYS", "MAX_DAYS", "WorkspaceViews", "usage_summary"]

#: how many days of usage the page shows unless it asks for another number
DEFAULT_DAYS = 30
#: the most days one usage request covers
MAX_DAYS = 366


class _Sums:
    """Exact sums over some ledger rows."""

    __slots__ = ("byok_calls", "byok_cost", "calls", "platform_calls", "platform_charged")

    def __init__(self) -> None:
        self.calls = 0
        self.byok_calls = 0
        self.platform_calls = 0
        self.byok_cost = Decimal(0)  # own keys' calls at list price: billed by the provider
        self.platform_charged = Decimal(0)  # what the platform charged the workspace

    def add(self, row: LedgerRow) -> None:
        self.calls += 1
        if row.source is CredentialSource.WORKSPACE:
            self.byok_calls += 1
            # an uncertain row's list cost is an estimate of a call that may not have run:
            # kept out of the totals, as `byok usage` keeps it (usage_report.Totals)
            if row.status != "uncertain":
                self.byok_cost += row.list_cost or Decimal(0)
        else:
            self.platform_calls += 1
        self.platform_charged += row.amount

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "byok_calls": self.byok_calls,
            "platform_calls": self.platform_calls,
            "byok_cost": format(self.byok_cost, "f"),
            "platform_charged": format(self.platform_charged, "f"),
            # the platform would have charged the own keys' calls at least their list price
            "byok_saved": format(self.byok_cost, "f"),
        }


def usage_summary(rows: Iterable[LedgerRow], *, first_day: date, days: int) -> dict[str, Any]:
    """Sum a workspace's ledger rows from ``first_day`` over ``days`` days: every day (a day
    without calls is zero), by provider and model, and by workflow, block and key."""
    by_day = {first_day + timedelta(days=n): _Sums() for n in range(days)}
    by_model: dict[tuple[str, str], _Sums] = {}
    by_block: dict[tuple[str, str, str], _Sums] = {}
    totals = _Sums()
    currencies: set[str] = set()
    for row in rows:
        currencies.add(row.currency)
        sums = by_day.get(row.occurred_at.astimezone(UTC).date())
        if sums is not None:
            sums.add(row)
        by_model.setdefault((row.provider, row.model), _Sums()).add(row)
        block = (row.workflow_id or "", row.block_id or "", row.key_id or "")
        by_block.setdefault(block, _Sums()).add(row)
        totals.add(row)
    if len(currencies) > 1:
        raise ApiError(
            ErrorCode.INTERNAL_ERROR,
            "the workspace's usage in these days is in several currencies",
        )

    def spend(item: tuple[Any, _Sums]) -> tuple[Decimal, Any]:
        return (-(item[1].byok_cost + item[1].platform_charged), item[0])

    return {
        "currency": currencies.pop() if currencies else "USD",
        "since": first_day.isoformat(),
        "days": days,
        "totals": totals.as_dict(),
        "by_day": [{"day": d.isoformat(), **s.as_dict()} for d, s in by_day.items()],
        "by_model": [
            {"provider": p, "model": m, **s.as_dict()}
            for (p, m), s in sorted(by_model.items(), key=spend)
        ],
        "by_block": [
            {"workflow_id": w or None, "block_id": b or None, "key_id": k or None, **s.as_dict()}
            for (w, b, k), s in sorted(by_block.items(), key=spend)
        ],
    }


def _query_days(request: Request) -> int:
    text = request.query_params.get("days")
    if text is None:
        return DEFAULT_DAYS
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_DAYS:
        raise ApiError(
            ErrorCode.VALIDATION_ERROR, f"days must be a whole number from 1 to {MAX_DAYS}", "days"
        )
    return int(text)


def _query_period(request: Request, today: date) -> tuple[date, int]:
    """The first day and the number of days the usage request asks for: ``days=N`` (the last N
    days, today included; 30 by default) or ``period=month`` (this calendar month, in UTC)."""
    period = request.query_params.get("period")
    if period is None:
        days = _query_days(request)
        return today - timedelta(days=days - 1), days
    if period != "month":
        raise ApiError(
            ErrorCode.VALIDATION_ERROR, "period must be month (or ask for days=N)", "period"
        )
    if "days" in request.query_params:
        raise ApiError(
            ErrorCode.VALIDATION_ERROR, "ask for days=N or period=month, not both", "period"
        )
    return today.replace(day=1), today.day


class WorkspaceViews:
    """The usage and fallback routes."""

    def __init__(self, api: Api) -> None:
        self.api = api

    @staticmethod
    def _workspace(request: Request) -> str:
        try:
            return check_workspace_id(request.path_params["workspace_id"])
        except InvalidInput as exc:
            raise ApiError(ErrorCode.VALIDATION_ERROR, str(exc), "workspace_id") from None

    async def usage(self, request: Request) -> Response:
        """``GET .../byok-usage?days=N``: the last N days (UTC, today included); or
        ``?period=month``: this month (UTC) so far."""
        from byok_plugin.server.routes import ok

        actor = await self.api.actor(request)
        workspace_id = self._workspace(request)
        first_day, days = _query_period(request, self.api.app.clock().date())

        def work() -> dict[str, Any]:
            self.api.authorize(actor, workspace_id, Action.READ_USAGE, "usage")
            since = datetime.combine(first_day, time.min, tzinfo=UTC)
            rows = self.api.app.ledger.rows(workspaces=[workspace_id], since=since)
            return {
                "workspace_id": workspace_id,
                **usage_summary(rows, first_day=first_day, days=days),
            }

        return ok(await run_in_threadpool(work))

    def _fallback_json(self, actor: Actor, workspace_id: str) -> dict[str, Any]:
        settings = self.api.app.workspace_settings.get(workspace_id)
        return {
            "workspace_id": workspace_id,
            "policy": settings.fallback_policy.value,
            "updated_by": settings.updated_by,
            "updated_at": settings.updated_at.isoformat() if settings.updated_at else None,
            "can_manage": self.api.allowed(actor, workspace_id, Action.MANAGE_KEYS),
        }

    async def get_fallback(self, request: Request) -> Response:
        """``GET .../byok-fallback``: the workspace's fallback policy."""
        from byok_plugin.server.routes import ok

        actor = await self.api.actor(request)
        workspace_id = self._workspace(request)

        def work() -> dict[str, Any]:
            self.api.authorize(actor, workspace_id, Action.READ_KEYS, "fallback policy")
            return self._fallback_json(actor, workspace_id)

        return ok(await run_in_threadpool(work))

    async def set_fallback(self, request: Request) -> Response:
        """``PUT .../byok-fallback``: change the policy (admins), audited."""
        from byok_plugin.server.routes import ok

        actor = await self.api.actor(request)
        workspace_id = self._workspace(request)
        body = await self.api.body(request, "SetFallbackRequest")

        def work() -> dict[str, Any]:
            self.api.authorize(actor, workspace_id, Action.MANAGE_KEYS, "fallback policy")
            store = self.api.app.workspace_settings
            before = store.fallback_policy(workspace_id)
            after = store.set_fallback_policy(workspace_id, body["policy"], actor_id=actor.id)
            self.api.pm.hook.byok_audit(
                event=AuditEvent(
                    action="settings.fallback_policy",
                    workspace_id=workspace_id,
                    actor_id=actor.id,
                    detail=f"{before.value} -> {after.fallback_policy.value}",
                    occurred_at=self.api.app.clock(),
                )
            )
            return self._fallback_json(actor, workspace_id)

        return ok(await run_in_threadpool(work))
