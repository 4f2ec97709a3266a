"""``byok serve``: the settings page and the key API for the local operator, on loopback."""

from __future__ import annotations

from datetime import datetime, timedelta

import click

from byok_plugin.cli.context import CliContext, pass_cli
from byok_plugin.cli.listen import is_loopback, listen_on, url_host

DEFAULT_PORT = 8765


@click.command("serve")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="A loopback address to listen on (127.0.0.1, ::1 or localhost).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="The port; 0 picks a free one.",
)
@click.option("--workspace", "-w", default=None, help="The workspace the printed link opens.")
@click.option(
    "--link-minutes",
    type=click.IntRange(1, 24 * 60),
    default=10,
    show_default=True,
    help="How long the printed sign-in link works, in minutes (it works once).",
)
@pass_cli
def serve_command(
    cli: CliContext, host: str, port: int, workspace: str | None, link_minutes: int
) -> None:
    """Manage workspace keys in a browser: serve the settings page and the key API on loopback.

    Prints a link (to stderr, apart from the access log) that signs one browser tab in, once,
    within --link-minutes, as the local operator (who may manage every workspace of this store).
    The tab keeps its session until you sign out, it goes 12 hours unused, or byok serve stops.
    Serving to other people is a host's job: mount byok_plugin.server.create_app in your web app,
    with your own authentication.
    """
    if not is_loopback(host):
        raise click.UsageError(
            f"--host {host} is not a loopback address: byok serve signs the browser in as the "
            "local operator, so it only listens on 127.0.0.1, ::1 or localhost. To serve the "
            "key API to others, mount byok_plugin.server.create_app in your web app with your "
            "own authentication."
        )
    try:
        import uvicorn

        from byok_plugin.server import LocalLogin
        from byok_plugin.server.local import LOOPBACK_HOSTS, create_local_app, login_url
    except ImportError:
        raise click.ClickException(
            "byok serve needs the server extra: pip install 'byok-plugin[server]'"
        ) from None
    from byok_plugin.cli.context import OPERATOR
    from byok_plugin.core.errors import KeyringError

    try:
        cli.app.keyring  # noqa: B018 - load it now, to warn before the browser opens
    except KeyringError as exc:
        click.secho(f"warning: {exc}", fg="yellow", err=True)
        click.secho("keys can be listed but not added until a master key exists", err=True)

    login = LocalLogin(OPERATOR, link_lifetime=timedelta(minutes=link_minutes))
    # the Host check: the usual loopback names, and the one asked for (127.0.0.2, say)
    allowed_hosts = (*LOOPBACK_HOSTS, url_host(host))
    asgi = create_local_app(cli.app, login, pm=cli.pm, allowed_hosts=allowed_hosts)
    sock = listen_on(host, port)
    bound_port = sock.getsockname()[1]
    url = login_url(
        "localhost" if host == "localhost" else host, bound_port, login.issue_token(), workspace
    )
    expires = (datetime.now() + timedelta(minutes=link_minutes)).strftime("%H:%M")
    # stderr: the link is a credential, and stdout carries uvicorn's access log
    click.echo(f"byok serve: open {url}", err=True)
    click.echo(
        f"The link signs in one browser tab, once, within {link_minutes} "
        f"minute{'s' if link_minutes != 1 else ''} (until {expires}); restart byok serve for a "
        "new one. Ctrl+C stops.",
        err=True,
    )
    config = uvicorn.Config(asgi, log_level="info", access_log=True, lifespan="off")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn has shut down cleanly and re-raised the Ctrl+C it caught
    finally:
        sock.close()
        cli.app.close()
    click.echo("byok serve: stopped", err=True)
