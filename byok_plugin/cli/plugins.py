"""``byok plugins``: what is installed, its version, and the hooks each plugin implements."""

from __future__ import annotations

from importlib import metadata

import click
import pluggy
from byok_hookspecs import ENTRY_POINT_GROUP, declared_nonblocking, unmatched_plugin_names
from byok_hookspecs.manager import installed_plugin_names

from byok_plugin.cli.context import CliContext, pass_cli
from byok_plugin.cli.json_output import echo_json
from byok_plugin.cli.tables import Column, TableSpec, console_for, show


def key_provider_summary(cli: CliContext) -> str:
    """One line: the active key-encryption provider (``byok_key_provider``) and whether keys are
    stored under envelope encryption. A provider that cannot be set up is described by its
    error, not a traceback."""
    mode = "on" if cli.settings.key_envelopes else "off: keys under the master keys directly"
    try:
        described = cli.pm.hook.byok_key_provider()
    except Exception as exc:  # a misconfigured KMS: say what is wrong, here as everywhere
        described = f"{cli.settings.key_provider} (not usable: {exc})"
    return f"key provider: {described or 'none'} (envelope encryption {mode})"


def describe_plugins(pm: pluggy.PluginManager) -> list[dict[str, object]]:
    """One entry per registered plugin: name, distribution, version and hooks, each with its
    order, whether it is a wrapper, and whether the plugin declares it never waits on the network
    (``byok_nonblocking_hooks``: a host may call it on its event loop)."""
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    # a plugin registered by hand under its entry-point name (as the default plugin is)
    entry_dists = {
        ep.name: (ep.dist.name, ep.dist.version)
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)
        if ep.dist is not None
    }
    rows: list[dict[str, object]] = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        if plugin is None:
            continue
        hooks = []
        nonblocking = declared_nonblocking(plugin)
        for caller in pm.get_hookcallers(plugin) or []:
            impl = next(i for i in caller.get_hookimpls() if i.plugin is plugin)
            order = "tryfirst" if impl.tryfirst else "trylast" if impl.trylast else ""
            wrapper = bool(impl.wrapper or impl.hookwrapper)
            hooks.append(
                {
                    "hook": caller.name,
                    "order": order,
                    "wrapper": wrapper,
                    "nonblocking": caller.name in nonblocking,
                }
            )
        dist = dists.get(id(plugin))
        dist_name: str | None
        version: str | None
        if dist is not None:
            dist_name, version = dist.project_name, dist.version
        elif name.split(".")[0] in entry_dists:  # also what an entry point registers itself
            dist_name, version = entry_dists[name.split(".")[0]]
        else:
            dist_name = version = None
        rows.append(
            {
                "name": name,
                "distribution": dist_name,
                "version": version,
                "hooks": sorted(hooks, key=lambda h: str(h["hook"])),
            }
        )
    return rows


def _hook_name(hook: dict[str, object]) -> str:
    """``byok_authorize (trylast) *``: the hook, its order, ``wrapper``, ``*`` if non-blocking."""
    words = (hook["order"], "wrapper" if hook["wrapper"] else "")
    return (
        str(hook["hook"])
        + "".join(f" ({word})" for word in words if word)
        + (" *" if hook["nonblocking"] else "")
    )


@click.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_cli
def plugins_command(cli: CliContext, as_json: bool) -> None:
    """List the installed plugins, their versions and the hooks each implements."""
    rows = describe_plugins(cli.pm)
    unmatched = unmatched_plugin_names(cli.settings.environ)
    if as_json:
        echo_json({"plugins": rows, "unmatched": unmatched})
        return
    for variable, names in unmatched.items():  # a typo loads (or blocks) nothing: say so first
        click.echo(
            f"warning: {variable} names {', '.join(names)}, which no installed plugin is called; "
            f"installed: {', '.join(sorted(installed_plugin_names())) or 'none'}",
            err=True,
        )
    console = console_for()
    spec = TableSpec(
        columns=(
            Column("plugin", "id"),
            Column("distribution", "id", priority=2),
            Column("version", "id", priority=1),
            Column("hooks", "text"),
        ),
        rows=tuple(
            (
                str(row["name"]),
                str(row["distribution"] or "-"),
                str(row["version"] or "-"),
                ", ".join(_hook_name(h) for h in row["hooks"]),  # type: ignore[attr-defined]
            )
            for row in rows
        ),
        title="byok plugins",
    )
    show(console, spec)
    console.print("* non-blocking: a host may call it on its event loop", style="dim")
    click.echo(key_provider_summary(cli))
