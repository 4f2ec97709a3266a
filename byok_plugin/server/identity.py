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
  good for a few minutes; the page trades it once for a random session cookie (``HttpOnly``, ``SameSite=Strict``).
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

__all__ = ["SESSION_COOKIE", "BearerTokens", "Identify", "LocalLogin", "resolve_actor"]

#: turns a request into the actor who sent it, or None when it carries no valid identity
Identify = Callable[[Request], "Actor | Awaitable[Actor | None] | None"]

SESSION_COOKIE = "byok_session"
#: how long the sign-in link ``byok serve`` prints can be used
DEFAULT_LINK_LIFETIME = timedelta(minutes=10)


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
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self._actors.get(_digest(token.strip()))


class LocalLogin:
    """The local operator's browser login for ``byok serve``.

    :param actor: who a logged-in browser acts as (the CLI's local operator).
    :param link_lifetime: how long a token from :meth:`issue_token` can be exchanged.
    :param clock: monotonic seconds (``time.monotonic``); tests pass their own.

    :meth:`issue_token` makes the one-time token to print. It works once, within
    ``link_lifetime``: :meth:`exchange` turns it into a session id, and later attempts fail.
    Sessions live as long as this object (the ``byok serve`` process).
    """

    def __init__(
        self,
        actor: Actor,
        *,
        link_lifetime: timedelta = DEFAULT_LINK_LIFETIME,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if link_lifetime <= timedelta(0):
            raise ValueError(f"link_lifetime must be positive, not {link_lifetime}")
        self.actor = actor
        self.link_lifetime = link_lifetime
        self._clock = clock
        self._token_digest: bytes | None = None
        self._token_expires = 0.0
        self._sessions: set[bytes] = set()
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
        """Trade the one-time token for a new session id; ``None`` if it is wrong, used or
        expired."""
        with self._lock:
            if self._token_digest is None or not hmac.compare_digest(
                self._token_digest, _digest(token)
            ):
                return None
            self._token_digest = None  # spent, whether or not it was still good
            if self._clock() > self._token_expires:
                return None
            session = secrets.token_urlsafe(32)
            self._sessions.add(_digest(session))
            return session

    def __call__(self, request: Request) -> Actor | None:
        session = request.cookies.get(SESSION_COOKIE)
        if not session:
            return None
        with self._lock:
            known = _digest(session) in self._sessions
        return self.actor if known else None
