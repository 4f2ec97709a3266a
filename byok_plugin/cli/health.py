"""``byok keys check``: test every enabled stored key live, record the result, disable dead keys.

The command runs :func:`byok_plugin.keys.health.check_key_health`, the job a host may also run from
cron or its own scheduler. It exits 1 when a key was refused (``invalid``), ran out of credit
(``no_credit``) or could not be checked (``unreachable``).
"""

from __future__ import annotations

import click
from byok_hookspecs import KeyCheckStatus

from byok_plugin.cli.context import CliContext, pass_cli
from byok_plugin.cli.json_output import echo_json
from byok_plugin.cli.keys import handles_errors, keys_group
from byok_plugin.cli.tables import console_for
from byok_plugin.cli.text import plain

__all__ = ["check_command"]

_FAILED = {KeyCheckStatus.INVALID.value, KeyCheckStatus.UNREACHABLE.value, "no_credit"}


@keys_group.command("check")
@click.option(
    "--workspace",
    "-w",
    "owners",
    multiple=True,
    help="Only this workspace's keys (or org:<id> for an organization's); repeatable.",
)
@click.option(
    "--disable-after",
    default=3,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Disable a key after this many consecutive auth refusals.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
@pass_cli
@handles_errors
def check_command(
    cli: CliContext, owners: tuple[str, ...], disable_after: int, as_json: bool
) -> None:
    """Check every enabled stored key live with its provider; disable the ones refused
    --disable-after times in a row (audited: key.disabled, key.unhealthy)."""
    from byok_plugin.keys.health import check_key_health

    results = check_key_health(cli.app, cli.pm, owners=owners or None, disable_after=disable_after)
    if as_json:
        echo_json({"keys": [r.to_dict() for r in results]})
    else:
        console = console_for()
        if not results:
            click.echo("no enabled keys to check")
        for r in results:
            line = plain(
                f"{r.owner_id} {r.provider} {r.label!r} {r.key_id} ({r.hint}): {r.status}"
                + (f" x{r.auth_failures}" if r.auth_failures else "")
                + (", DISABLED" if r.disabled else "")
                + (f": {r.message}" if r.message else "")
            )
            console.print(line, soft_wrap=True)
    failed = sum(r.status in _FAILED for r in results)
    if failed:
        raise click.ClickException(f"{failed} of {len(results)} keys did not pass the live check")
