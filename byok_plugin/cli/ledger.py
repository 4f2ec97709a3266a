"""``byok ledger``: the local ledger spool (usage the store refused, kept in ``BYOK_HOME``).

``byok ledger replay`` writes the spooled rows into the store (idempotently: a row the store
already has is not written twice) and deletes each once the store has it; ``byok ledger spool``
says how many rows wait there, and lists the rows *held* aside: those the store refused for their
own sake (a value it cannot store), which no replay writes until ``byok ledger replay
--retry-held`` tries them again.
"""

from __future__ import annotations

import click

from byok_plugin.cli.context import CliContext, pass_cli
from byok_plugin.cli.json_output import echo_json
from byok_plugin.cli.keys import handles_errors

__all__ = ["ledger_group"]


@click.group("ledger")
def ledger_group() -> None:
    """The local ledger spool: usage the store could not take yet."""


@ledger_group.command("spool")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_cli
@handles_errors
def spool_command(cli: CliContext, as_json: bool) -> None:
    """How many usage rows wait in the local spool for the store, and the rows held aside."""
    from byok_plugin.billing.spool import LedgerSpool

    settings = cli.settings  # the spool only: the store need not answer
    spool = LedgerSpool(settings.ledger_spool or settings.home / "ledger-spool.db")
    pending = spool.pending()
    held = spool.held()
    if as_json:
        echo_json(
            {
                "spool": str(spool.path),
                "pending": pending,
                "held": [
                    {
                        "idempotency_key": row.idempotency_key,
                        "workspace_id": row.workspace_id,
                        "held_at": row.held_at.isoformat(),
                        "error": row.error,
                    }
                    for row in held
                ],
            },
            indent=None,
        )
        return
    click.echo(f"{pending} usage rows waiting in {spool.path}")
    if held:
        click.echo(
            f"{len(held)} usage rows held aside: the store refused them (`byok ledger replay "
            f"--retry-held` tries them again)"
        )
        for row in held:
            click.echo(
                f"  {row.idempotency_key} ({row.held_at:%Y-%m-%d %H:%M:%S} UTC): {row.error}"
            )


@ledger_group.command("replay")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--retry-held",
    is_flag=True,
    help="Try the rows held aside (the store refused them) again, with the others.",
)
@pass_cli
@handles_errors
def replay_command(cli: CliContext, as_json: bool, retry_held: bool) -> None:
    """Write the spooled usage rows into the store; exit 1 if some could not be written (the
    store down, or rows held aside because the store refused them)."""
    try:
        durable = cli.app.durable_ledger
        if retry_held:
            durable.spool.retry_held()
        result = durable.replay()
        held = len(durable.spool.held())
    finally:
        cli.app.close()
    if as_json:
        echo_json(
            {
                "spool": str(durable.spool.path),
                "replayed": result.replayed,
                "already_recorded": result.already_recorded,
                "remaining": result.remaining,
                "held": held,
                "error": result.error,
            },
            indent=None,
        )
    else:
        click.echo(
            f"replayed {result.replayed} usage rows into the store "
            f"({result.already_recorded} were already there); {max(result.remaining, 0)} "
            f"still spooled in {durable.spool.path}"
            + (f"; {held} held aside ({result.held} by this replay)" if held else "")
        )
    if result.error is not None:
        raise click.ClickException(f"the replay stopped: {result.error}")
    if held:
        raise click.ClickException(
            f"{held} usage rows are held aside: the store refused them; `byok ledger spool` "
            f"lists them and why"
        )
