"""The ``byok`` command.

Each subcommand lives in its own module and is added to :data:`main` here.

May import: anything.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import click

from byok_plugin import __version__
from byok_plugin.cli.audit import audit_command
from byok_plugin.cli.budget import budget_group
from byok_plugin.cli.demo import demo_command
from byok_plugin.cli.emulator import emulator_command
from byok_plugin.cli.fallback import fallback_group
from byok_plugin.cli.health import check_command as _check_command  # noqa: F401 (byok keys check)
from byok_plugin.cli.init import init_command
from byok_plugin.cli.keys import keys_group
from byok_plugin.cli.ledger import ledger_group
from byok_plugin.cli.org import org_group
from byok_plugin.cli.plugins import plugins_command
from byok_plugin.cli.reconcile import reconcile_command
from byok_plugin.cli.run import run_command, validate_command
from byok_plugin.cli.serve import serve_command
from byok_plugin.cli.usage import usage_command

#: the exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it
INTERRUPTED = 130


class _ByokGroup(click.Group):
    """Ctrl-C (or the end of input at a prompt) exits 130, not click's 1."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (KeyboardInterrupt, click.Abort):
            click.echo("\nbyok: interrupted", err=True)
            ctx.exit(INTERRUPTED)


@click.group(cls=_ByokGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="byok")
@click.option(
    "--verbose",
    "-v",
    count=True,
    help="Show the package's log on stderr: -v its information (a block tried again, a key "
    "cooled down), -vv its debug messages too. Errors are always shown.",
)
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """Bring your own key (BYOK) for AI workflows: keys, runs, usage and plugins."""
    _log_errors_to_stderr(verbose)
    # the settings are read when a command needs them (cli.context.pass_cli): a malformed
    # variable must not stop --help, nor a command that reads none


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it)."""

    _byok_cli = True

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("byok: %(levelname)s: %(message)s"))

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


#: the level of the package's log shown on stderr, by the number of -v
_LEVELS = (logging.ERROR, logging.INFO, logging.DEBUG)


def _log_errors_to_stderr(verbose: int = 0) -> None:
    """Show the package's errors (an audit row not written, a call left unpriced) on stderr;
    with ``-v`` its information too (a block tried again, a key in cooldown), with ``-vv`` its
    debug messages. The handler is installed once per process; each command sets its level."""
    level = _LEVELS[min(verbose, len(_LEVELS) - 1)]
    logger = logging.getLogger("byok")
    handler = next((h for h in logger.handlers if getattr(h, "_byok_cli", False)), None)
    if handler is None:
        handler = _StderrHandler()
        logger.addHandler(handler)
    handler.setLevel(level)
    logger.setLevel(level if verbose else logging.NOTSET)


main.add_command(plugins_command)
main.add_command(emulator_command)
main.add_command(init_command)
main.add_command(keys_group)
main.add_command(serve_command)
main.add_command(validate_command)
main.add_command(run_command)
main.add_command(demo_command)
main.add_command(usage_command)
main.add_command(reconcile_command)
main.add_command(fallback_group)
main.add_command(ledger_group)
main.add_command(budget_group)
main.add_command(org_group)
main.add_command(audit_command)
