"""``byok budget set|show|list|delete``: a workspace's spending limits, and where they stand.

Reading a budget is authorized as reading usage (``usage.read``: members may), changing one as
managing keys (``keys.manage``: admins may); changes are audited (``budget.set``,
``budget.deleted``) through the hooks, as key changes are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from byok_hookspecs import Action, AuditEvent, NotAuthorized

from byok_plugin.cli.context import CliContext, pass_cli
from byok_plugin.cli.json_output import echo_json
from byok_plugin.cli.keys import handles_errors, workspace_option
from byok_plugin.cli.tables import Column, TableSpec, console_for, show
from byok_plugin.cli.text import money

if TYPE_CHECKING:
    from byok_plugin.billing.budgets import Budget

__all__ = ["budget_group"]

#: byok_plugin.billing.budgets' metrics and periods (the store loads when a command runs)
METRICS = ("charge", "list_cost")
PERIODS = ("day", "month", "none")


def _authorize(cli: CliContext, workspace_id: str, action: Action) -> None:
    allowed = cli.pm.hook.byok_authorize(actor=cli.actor, workspace_id=workspace_id, action=action)
    if allowed is not True:
        raise NotAuthorized(cli.actor.id, workspace_id, action.value)


def _line(budget: Budget) -> str:
    scope = ""
    if budget.key_id:
        scope += f" key {budget.key_id}"
        if budget.key_gone:
            scope += " (gone: applies to no call)"
    if budget.workflow_id:
        scope += f" workflow {budget.workflow_id}"
    kind = "hard" if budget.hard else "soft"
    period = "no period" if budget.period.value == "none" else f"per {budget.period.value}"
    return (
        f"{budget.name}: {kind} {budget.metric.value} limit {money(budget.limit)} {period}"
        f"{scope}: spent {money(budget.spent)}, reserved {money(budget.reserved)}, "
        f"left {money(budget.left)}"
    )


@click.group("budget")
def budget_group() -> None:
    """Spending limits per workspace: hard ones refuse a call before it is sent."""


@budget_group.command("set")
@workspace_option
@click.argument("name")
@click.option("--limit", "limit", required=True, help="The limit in USD, such as 25.00.")
@click.option(
    "--metric",
    type=click.Choice(METRICS),
    default="charge",
    show_default=True,
    help="charge: what the platform bills; list_cost: what the workspace's own keys spent.",
)
@click.option("--period", type=click.Choice(PERIODS), default="month", show_default=True)
@click.option("--soft", is_flag=True, help="Never refuse a call; only announce the thresholds.")
@click.option(
    "--thresholds",
    default="50,80,100",
    show_default=True,
    help="Percentages of the limit audited once per period (budget.threshold).",
)
@click.option(
    "--key-id",
    default=None,
    help="Only the calls this stored key serves: the id of one of the workspace's keys or of "
    "its organization's (byok keys list). Replacing or deleting that key leaves the budget "
    "applying to no call (budget list marks it gone).",
)
@click.option(
    "--workflow",
    "workflow_id",
    default=None,
    help="Only the calls of the workflows of this name (their author chooses it: a convenience "
    "scope, not a boundary).",
)
@pass_cli
@handles_errors
def set_command(
    cli: CliContext,
    workspace_id: str,
    name: str,
    limit: str,
    metric: str,
    period: str,
    soft: bool,
    thresholds: str,
    key_id: str | None,
    workflow_id: str | None,
) -> None:
    """Create or change the workspace's budget NAME."""
    from byok_plugin.billing.budgets import BudgetError

    _authorize(cli, workspace_id, Action.MANAGE_KEYS)
    try:
        budget = cli.app.budgets.set_budget(
            workspace_id,
            name,
            limit=limit,
            metric=metric,
            period=period,
            hard=not soft,
            thresholds=thresholds,
            key_id=key_id,
            workflow_id=workflow_id,
            actor_id=cli.actor.id,
        )
    except BudgetError as exc:
        raise click.UsageError(str(exc)) from None
    cli.pm.hook.byok_audit(
        event=AuditEvent(
            action="budget.set",
            workspace_id=workspace_id,
            actor_id=cli.actor.id,
            key_id=budget.key_id,
            detail=_line(budget),
            occurred_at=cli.clock(),
        )
    )
    click.echo(f"workspace {workspace_id!r}: {_line(budget)}")


@budget_group.command("show")
@workspace_option
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_cli
@handles_errors
def show_command(cli: CliContext, workspace_id: str, name: str, as_json: bool) -> None:
    """Print one budget: its limit, what is spent, reserved by calls in flight, and left."""
    _authorize(cli, workspace_id, Action.READ_USAGE)
    budget = cli.app.budgets.get(workspace_id, name)
    if budget is None:
        raise click.ClickException(f"workspace {workspace_id!r} has no budget {name!r}")
    if as_json:
        echo_json(budget.as_dict())
    else:
        click.echo(f"workspace {workspace_id!r}: {_line(budget)}")
        if budget.key_gone:
            click.echo(_gone(budget))


@budget_group.command("list")
@workspace_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_cli
@handles_errors
def list_command(cli: CliContext, workspace_id: str, as_json: bool) -> None:
    """Print the workspace's budgets."""
    _authorize(cli, workspace_id, Action.READ_USAGE)
    found = cli.app.budgets.list_budgets(workspace_id)
    if as_json:
        echo_json({"workspace": workspace_id, "budgets": [b.as_dict() for b in found]})
        return
    if not found:
        click.echo(f"workspace {workspace_id!r} has no budgets")
        return
    show(console_for(), _budget_table(workspace_id, found))
    for budget in found:
        if budget.key_gone:
            click.echo(_gone(budget))


def _gone(budget: Budget) -> str:
    return (
        f"note: budget {budget.name!r} names key {budget.key_id}, which no longer exists "
        "(deleted, or replaced by `byok keys set`): it applies to no call until it is set "
        "again with --key-id of a current key"
    )


def _budget_table(workspace_id: str, found: list[Budget]) -> TableSpec:
    rows = []
    for budget in found:
        scope = " ".join(
            part
            for part in (
                f"key {budget.key_id}{' (gone)' if budget.key_gone else ''}"
                if budget.key_id
                else "",
                f"workflow {budget.workflow_id}" if budget.workflow_id else "",
            )
            if part
        )
        rows.append(
            (
                budget.name,
                "hard" if budget.hard else "soft",
                budget.metric.value,
                budget.period.value,
                scope or "all calls",
                money(budget.limit),
                money(budget.spent),
                money(budget.reserved),
                money(budget.left),
            )
        )
    return TableSpec(
        columns=(
            Column("name", "id"),
            Column("kind", "id", priority=2),
            Column("metric", "id", priority=3),
            Column("period", "id", priority=1),
            Column("applies to", "text", priority=4),
            Column("limit", "money"),
            Column("spent", "money"),
            Column("reserved", "money", priority=5),
            Column("left", "money"),
        ),
        rows=tuple(rows),
        title=f"budgets of workspace {workspace_id}, amounts in USD",
    )


@budget_group.command("delete")
@workspace_option
@click.argument("name")
@pass_cli
@handles_errors
def delete_command(cli: CliContext, workspace_id: str, name: str) -> None:
    """Delete the workspace's budget NAME (calls are no longer limited by it)."""
    _authorize(cli, workspace_id, Action.MANAGE_KEYS)
    if not cli.app.budgets.delete(workspace_id, name):
        raise click.ClickException(f"workspace {workspace_id!r} has no budget {name!r}")
    cli.pm.hook.byok_audit(
        event=AuditEvent(
            action="budget.deleted",
            workspace_id=workspace_id,
            actor_id=cli.actor.id,
            detail=f"budget {name!r}",
            occurred_at=cli.clock(),
        )
    )
    click.echo(f"workspace {workspace_id!r}: budget {name!r} deleted")
