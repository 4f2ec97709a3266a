"""What every subcommand shares: settings read once from the environment, and the app."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import click
import pluggy
from byok_hookspecs import Actor

from byok_plugin.app import App
from byok_plugin.manager import plugin_manager_for
from byok_plugin.settings import Settings, SettingsError

#: the CLI acts as the local operator who holds the master key
OPERATOR = Actor(id="local-operator", operator=True)


@dataclass
class CliContext:
    settings: Settings
    actor: Actor = field(default=OPERATOR)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> CliContext:
        try:
            return cls(Settings.from_environ(environ))
        except SettingsError as exc:
            raise click.UsageError(str(exc)) from None

    @cached_property
    def app(self) -> App:
        return App(self.settings)

    @cached_property
    def pm(self) -> pluggy.PluginManager:
        from byok_plugin.catalog import CatalogError
        from byok_plugin.pricing import PriceError

        try:
            return plugin_manager_for(self.app)
        except (CatalogError, PriceError) as exc:  # read at start-up: one line, no traceback
            raise click.ClickException(str(exc)) from None


pass_cli = click.make_pass_decorator(CliContext)
