"""``byok ledger``: the local ledger spool (usage the store refused, kept in ``BYOK_HOME``).

``byok ledger replay`` writes the spooled rows into the store (idempotently: a row the store
already has is not written twice) and deletes each once the store has it; ``byok ledger spool``
says how many rows wait there.
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
    """How many usage rows wait in the local spool for the store."""
    from byok_plugin.billing.spool import LedgerSpool

    settings = cli.settings  # the spool only: the store need not answer
    spool = LedgerSpool(settings.ledger_spool or settings.home / "ledger-spool.db")
    pending = spool.pending()
    if as_json:
        echo_json({"spool": str(spool.path), "pending": pending}, indent=None)
    else:
        click.echo(f"{pending} usage rows waiting in {spool.path}")


@ledger_group.command("replay")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_cli
@handles_errors
def replay_command(cli: CliContext, as_json: bool) -> None:
    """Write the spooled usage rows into the store; exit 1 if some could not be written."""
    try:
        durable = cli.app.durable_ledger
        result = durable.replay()
    finally:
        cli.app.close()
    if as_json:
        echo_json(
            {
                "spool": str(durable.spool.path),
                "replayed": result.replayed,
                "already_recorded": result.already_recorded,
                "remaining": result.remaining,
                "error": result.error,
            },
            indent=None,
        )
    else:
        click.echo(
            f"replayed {result.replayed} usage rows into the store "
            f"({result.already_recorded} were already there); {max(result.remaining, 0)} "
            f"still spooled in {durable.spool.path}"
        )
    if result.error is not None:
        raise click.ClickException(f"the replay stopped: {result.error}")
