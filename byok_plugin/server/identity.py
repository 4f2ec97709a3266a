"""Who is calling: the host turns a request into an :class:`~byok_hookspecs.Actor`.

The API never decides identity itself. A host passes ``identify`` to
:func:`~byok_plugin.server.create_app`: a function (plain or ``async``) that reads the request's
headers or cookies with the host's own authentication and returns the actor with its workspace
roles, or ``None`` for an anonymous request (answered 401). The workspace id in a URL is only
ever a question; the actor's roles, checked by ``byok_authorize``, are the answer.

Two ready-made identities:

- :class:`BearerTokens`: fixed ``Authorization: Bearer`` tokens mapped to actors (service
  accounts, tests, a quick demo).
- :class:`LocalLogin`: what ``byok serve`` uses for the local operator. It prints a random
  one-time token in the URL's fragment (never sent in a request line, so never in an access log),
  good for a few minutes; the page trades it once for a random session token, which it keeps in
  ``sessionStorage`` and sends as ``Authorization: Bearer``. Not a cookie: cookies are not
  port-scoped, so one for ``127.0.0.1`` would go to every other server on that address.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta

from byok_hookspecs import Actor
from starlette.requests import Request

__all__ = [
    "DEFAULT_LINK_LIFETIME",
    "DEFAULT_SESSION_IDLE",
    "BearerTokens",
    "Identify",
    "LocalLogin",
    "bearer_token",
    "resolve_actor",
]

#: turns a request into the actor who sent it, or None when it carries no valid identity
Identify = Callable[[Request], "Actor | Awaitable[Actor | None] | None"]

#: how long the sign-in link ``byok serve`` prints can be used
DEFAULT_LINK_LIFETIME = timedelta(minutes=10)
#: a ``byok serve`` session unused this long has ended
DEFAULT_SESSION_IDLE = timedelta(hours=12)


async def resolve_actor(identify: Identify | None, request: Request) -> Actor | None:
    """Ask the host who sent ``request``. No ``identify`` at all means nobody is authenticated."""
    if identify is None:
        return None
    result = identify(request)
    if inspect.isawaitable(result):
        result = await result
    if result is not None and not isinstance(result, Actor):
        raise TypeError(
            f"identify() must return a byok_hookspecs.Actor or None, not {type(result)}"
        )
    return result


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def bearer_token(request: Request) -> str | None:
    """The token of the request's ``Authorization: Bearer`` header, if it has one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class BearerTokens:
    """``Authorization: Bearer <token>`` -> actor, for fixed tokens.

    Tokens are kept as SHA-256 digests and looked up by digest, so neither the lookup's timing nor
    this object's repr reveals them.
    """

    def __init__(self, tokens: Mapping[str, Actor]) -> None:
        self._actors = {_digest(token): actor for token, actor in tokens.items()}

    def __repr__(self) -> str:
        return f"BearerTokens({len(self._actors)} tokens)"

    def __call__(self, request: Request) -> Actor | None:
        """The actor of the request's bearer token, or ``None``."""
        token = bearer_token(request)
        return None if token is None else self._actors.get(_digest(token))


class LocalLogin:
    """The local operator's browser login for ``byok serve``.

    :param actor: who a logged-in browser acts as (the CLI's local operator).
    :param link_lifetime: how long a token from :meth:`issue_token` can be exchanged.
    :param session_idle: a session unused this long has ended.
    :param clock: monotonic seconds (``time.monotonic``); tests pass their own.

    :meth:`issue_token` makes the one-time token to print. It works once, within
    ``link_lifetime``: :meth:`exchange` turns it into a session token, and later attempts fail.
    A request is the actor's when it carries a live session as ``Authorization: Bearer``; each
    such request keeps the session alive for another ``session_idle``. :meth:`sign_out` ends one.
    Sessions live at most as long as this object (the ``byok serve`` process). Tokens are kept as
    SHA-256 digests only.
    """

    def __init__(
        self,
        actor: Actor,
        *,
        link_lifetime: timedelta = DEFAULT_LINK_LIFETIME,
        session_idle: timedelta = DEFAULT_SESSION_IDLE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if link_lifetime <= timedelta(0):
            raise ValueError(f"link_lifetime must be positive, not {link_lifetime}")
        if session_idle <= timedelta(0):
            raise ValueError(f"session_idle must be positive, not {session_idle}")
        self.actor = actor
        self.link_lifetime = link_lifetime
        self.session_idle = session_idle
        self._clock = clock
        self._token_digest: bytes | None = None
        self._token_expires = 0.0
        self._sessions: dict[bytes, float] = {}  # digest -> when it ends unless used again
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalLogin(actor={self.actor.id!r}, sessions={len(self._sessions)})"

    def issue_token(self) -> str:
        """A fresh one-time login token (replacing any unused one), to print with the URL; it
        expires after ``link_lifetime``."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._token_digest = _digest(token)
            self._token_expires = self._clock() + self.link_lifetime.total_seconds()
        return token

    def exchange(self, token: str) -> str | None:
        """Trade the one-time token for a new session token; ``None`` if it is wrong, used or
        expired."""
        with self._lock:
            if self._token_digest is None or not hmac.compare_digest(
                self._token_digest, _digest(token)
            ):
                return None
            self._token_digest = None  # spent, whether or not it was still good
            now = self._clock()
            if now > self._token_expires:
                return None
            session = secrets.token_urlsafe(32)
            self._sessions[_digest(session)] = now + self.session_idle.total_seconds()
            return session

    def sign_out(self, session: str) -> None:
        """End ``session`` (nothing happens if it is unknown or has ended)."""
        with self._lock:
            self._sessions.pop(_digest(session), None)

    def __call__(self, request: Request) -> Actor | None:
        """The actor, if the request carries a live session as its bearer token."""
        session = bearer_token(request)
        if session is None:
            return None
        digest = _digest(session)
        with self._lock:
            now = self._clock()
            for ended in [d for d, ends in self._sessions.items() if ends < now]:
                del self._sessions[ended]
            if digest not in self._sessions:
                return None
            self._sessions[digest] = now + self.session_idle.total_seconds()
        return self.actor
