"""``byok emulator``: run the local provider emulator in the foreground.

Keys never go on the command line: they come from a keys file (``--keys-file PATH``, ``-`` for
stdin, or ``BYOK_EMULATOR_KEYS_FILE``), one ``provider[:label]=KEY`` a line; or the emulator accepts
any key, when asked to explicitly with ``--accept-any-key``.
"""

from __future__ import annotations

import sys
from typing import IO

import click

from byok_plugin.cli.listen import is_loopback, listen_on, url_host


@click.command("emulator")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--keys-file",
    type=click.File("r"),
    envvar="BYOK_EMULATOR_KEYS_FILE",
    help="Keys to accept, one provider[:label]=KEY a line; '-' reads stdin.",
)
@click.option("--accept-any-key", is_flag=True, help="Accept any non-empty key (offline demos).")
@click.option(
    "--allow-remote", is_flag=True, help="Allow listening on an address other than loopback."
)
def emulator_command(
    port: int,
    host: str,
    keys_file: IO[str] | None,
    accept_any_key: bool,
    allow_remote: bool,
) -> None:
    """Run the local emulator of OpenAI, Anthropic, Gemini, Mistral and Exa (Ctrl-C stops it)."""
    if not is_loopback(host) and not allow_remote:
        raise click.UsageError(
            f"--host {host} is not a loopback address; add --allow-remote to listen on it"
        )
    try:  # starlette and uvicorn come with the ``server`` extra; the rest of ``byok`` needs neither
        import uvicorn

        from byok_plugin.host.emulator.app import LOOPBACK_HOSTS, build_app
        from byok_plugin.host.emulator.keys import KeysFileError, parse_keys
        from byok_plugin.host.emulator.server import describe
        from byok_plugin.host.emulator.state import EmulatorState
    except ImportError as exc:
        raise click.ClickException(
            f"byok emulator needs the server extra ({exc.name} is missing): "
            "pip install 'byok-plugin[server]'"
        ) from None
    if keys_file is None and not accept_any_key:
        raise click.UsageError(
            "give the keys to accept with --keys-file PATH (or '-' for stdin), "
            "or accept any key with --accept-any-key"
        )
    state = EmulatorState(accept_any_key=accept_any_key)
    if keys_file is not None:
        name = getattr(keys_file, "name", "<keys>")
        try:
            keys = parse_keys(keys_file.read(), source=str(name))
        except KeysFileError as exc:
            raise click.UsageError(str(exc)) from None
        except OSError as exc:
            raise click.UsageError(f"cannot read the keys file {name}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise click.UsageError(f"the keys file {name} is not UTF-8 text") from None
        for key in keys:
            state.add_key(key.provider, key.api_key, key.label)
        click.echo(f"accepting {len(keys)} key(s) from {name}", err=True)
    if accept_any_key:
        click.echo("accepting any non-empty key (--accept-any-key)", err=True)
    # bind first: the URLs printed name the port actually bound (--port 0 picks one), and a
    # taken port is a one-line error, not a banner followed by the server's own failure
    sock = listen_on(host, port)
    base = f"http://{url_host(host)}:{sock.getsockname()[1]}"
    click.echo(f"byok emulator on {base}; point the clients at it with:", err=True)
    for var, url in describe(base).items():
        click.echo(f"  export {var}={url}", err=True)
    sys.stderr.flush()
    # the control API answers to the loopback names and the address asked for, as byok serve does
    app = build_app(state, allowed_hosts=(*LOOPBACK_HOSTS, url_host(host)))
    config = uvicorn.Config(app, log_level="info", lifespan="off")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn has shut down cleanly and re-raised the Ctrl+C it caught
    finally:
        sock.close()
