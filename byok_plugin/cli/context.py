"""What every subcommand shares: settings read once from the environment, and the app.

The settings are read and checked when a command that needs them starts (:data:`pass_cli`), not
when ``byok`` itself does: a malformed variable stops that command with a message naming the
variable (exit 2), and never ``--help`` or a command that reads no settings (``byok demo``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any, TypeVar

import click
import pluggy
from byok_hookspecs import Actor

from byok_plugin.app import App, utc_now
from byok_plugin.manager import plugin_manager_for
from byok_plugin.settings import Settings, SettingsError

#: the CLI acts as the local operator who holds the master key
OPERATOR = Actor(id="local-operator", operator=True)


@dataclass
class CliContext:
    settings: Settings
    actor: Actor = field(default=OPERATOR)
    #: what "now" is for the app and for relative dates such as ``--since today``
    clock: Callable[[], datetime] = field(default=utc_now)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> CliContext:
        try:
            return cls(Settings.from_environ(environ))
        except SettingsError as exc:
            raise click.UsageError(str(exc)) from None

    @cached_property
    def app(self) -> App:
        return App(self.settings, clock=self.clock)

    @cached_property
    def pm(self) -> pluggy.PluginManager:
        from byok_plugin.billing.catalog import CatalogError
        from byok_plugin.billing.pricing import PriceError

        try:
            return plugin_manager_for(self.app)
        except (CatalogError, PriceError) as exc:  # read at start-up: one line, no traceback
            raise click.ClickException(str(exc)) from None


F = TypeVar("F", bound=Callable[..., Any])


def pass_cli(command: F) -> F:
    """Pass the command the :class:`CliContext`, reading the settings from the environment the
    first time a command of this process needs them (a caller may also give ``obj=``)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        cli = ctx.find_object(CliContext)
        if cli is None:
            cli = CliContext.from_environ()
            ctx.find_root().obj = cli
        return ctx.invoke(command, cli, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
