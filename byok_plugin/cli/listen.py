"""Listening on an address, for the commands that serve HTTP (``byok serve``, ``byok emulator``).

Both bind their socket before they print anything, so that what they print (the URL, the
``export`` lines) names the port actually bound (``--port 0`` picks one), and a port already in
use is a one-line error rather than a banner followed by a server's traceback.
"""

from __future__ import annotations

import ipaddress
import socket

import click

__all__ = ["is_loopback", "listen_on", "url_host"]


def _bare(host: str) -> str:
    """``[::1]`` -> ``::1``: the address without the brackets a URL puts around IPv6."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback address (``127.0.0.0/8``, ``::1``, with or
    without brackets)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(_bare(host)).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """The host as a URL writes it: an IPv6 address in brackets, anything else as given."""
    bare = _bare(host)
    return f"[{bare}]" if ":" in bare else bare


def listen_on(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening, ready for ``uvicorn.Server.run``.

    :raises click.ClickException: the address cannot be bound (in use, not local, no permission).
    """
    bare = _bare(host)
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and without it
    # every keep-alive answer waits ~40 ms for a delayed ACK (uvicorn writes headers and body apart)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bare, port))
    except OSError as exc:
        sock.close()
        raise click.ClickException(
            f"cannot listen on {url_host(host)}:{port}: {exc.strerror or exc}"
            + ("; pick another port with --port, or --port 0 for any free one" if port else "")
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
