"""What every provider client shares: base URL, one pooled ``httpx.AsyncClient``, retries,
timeouts, error classification and stream reading. A provider module supplies the wire format.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import httpx
from byok_hookspecs import Usage

from byok_plugin.host.providers.common import (
    CompletionRequest,
    CompletionResult,
    StreamDone,
    StreamEvent,
    TextDelta,
)
from byok_plugin.host.providers.errors import (
    AuthError,
    BadRequestError,
    ProtocolError,
    ProviderError,
    ProviderTimeout,
    ProviderUnreachable,
    RateLimitError,
    ServerError,
    error_text,
    redact,
    redact_bounded,
    scrubbed,
)
from byok_plugin.host.providers.retry import (
    RetryPolicy,
    RetryWait,
    parse_retry_after,
    retry_listener,
    retry_once_sent,
)
from byok_plugin.host.providers.sse import ServerSentEvent, StreamTooLarge, iter_sse

#: what an API key may hold to travel in an HTTP header: printable ASCII, no spaces
_SENDABLE_KEY = re.compile(r"[\x21-\x7e]+")
#: request bodies as compact JSON: what ``json.dumps(body, separators=(",", ":"))`` writes, with
#: one encoder for every request instead of a new one each (it keeps no state between calls)
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))
#: how many parsed request URLs a client keeps
_PARSED_URLS = 256

__all__ = [
    "ANSWER_SHAPE_ERRORS",
    "DEFAULT_TIMEOUT",
    "MAX_ANSWER_BYTES",
    "MAX_ERROR_BODY_BYTES",
    "MAX_STREAM_BYTES",
    "ProviderClient",
    "StreamAccumulator",
    "base_url_var",
    "resolve_base_url",
]

#: connect within 5 s; 60 s between bytes of an answer (between events of a stream)
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=5.0)

#: the largest answer body a client reads, and the largest event of a stream: 32 MiB (decoded),
#: far more than any real completion (128k tokens of output are well under 1 MB of JSON). A
#: larger answer is refused unread (a :class:`ProtocolError`, the call ``maybe_executed``)
MAX_ANSWER_BYTES = 32 * 1024 * 1024
#: the most a stream may carry in all: 128 MiB (a stream frames every few tokens as one event, of
#: some 150 to 300 bytes: 128k tokens of output make 20 to 40 MB)
MAX_STREAM_BYTES = 4 * MAX_ANSWER_BYTES
#: how much of an error answer is read: its message and code are near the start, and an error
#: keeps at most 1,000 characters of them; the rest is not read
MAX_ERROR_BODY_BYTES = 64 * 1024
#: what reading a decoded answer of an unexpected shape may raise (a field of the wrong type, one
#: missing, nesting deeper than Python recurses): a :class:`ProtocolError`, never a traceback
ANSWER_SHAPE_ERRORS: tuple[type[Exception], ...] = (
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    ValueError,
    ArithmeticError,
    RecursionError,
)


def base_url_var(provider: str) -> str:
    """The environment variable naming ``provider``'s base URL: ``BYOK_OPENAI_BASE_URL``..."""
    return f"BYOK_{provider.upper()}_BASE_URL"


def resolve_base_url(
    provider: str, default: str, explicit: str | None, environ: Mapping[str, str] | None
) -> str:
    """The constructor's ``base_url``, else ``BYOK_<PROVIDER>_BASE_URL`` from ``environ``, else the
    provider's public API."""
    url = explicit or (environ or {}).get(base_url_var(provider)) or default
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{base_url_var(provider)} must be an http(s) URL, not {url!r}")
    return url.rstrip("/")


class StreamAccumulator(ABC):
    """Reads one provider's stream events, collecting text, tool calls, finish reason and usage.

    :meth:`feed` returns the visible text of the event; :meth:`result` fails with
    :class:`ProtocolError` unless the stream reached its end marker and reported usage.
    """

    @abstractmethod
    def feed(self, event: ServerSentEvent) -> str: ...

    @abstractmethod
    def result(self) -> CompletionResult: ...

    def partial_usage(self) -> Usage | None:
        """What the provider is known to bill for the stream read so far, should it break now:
        the input the start event reported, the output counted from the deltas received (or the
        provider's own running count where it sends one); ``None`` before anything billable was
        seen. Each provider's accumulator says what it knows."""
        return None


class ProviderClient(ABC):
    """An async client of one provider's API, sharing the host's ``httpx.AsyncClient``.

    :param http: the shared client (its pool and keep-alive serve every provider).
    :param base_url: overrides ``BYOK_<PROVIDER>_BASE_URL`` and the public URL.
    :param environ: where ``BYOK_<PROVIDER>_BASE_URL`` is read (``Settings.environ``); never
        ``os.environ`` implicitly.
    :param retry: the retry policy (4 attempts with backoff by default).
    :param timeout: connect/read/write/pool timeouts, per request.
    :param max_answer_bytes: the largest answer body (and stream event) read
        (:data:`MAX_ANSWER_BYTES`); a stream may carry four times as much in all.
    """

    provider: ClassVar[str]
    default_base_url: ClassVar[str]

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        base_url: str | None = None,
        environ: Mapping[str, str] | None = None,
        retry: RetryPolicy | None = None,
        timeout: httpx.Timeout | float | None = None,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self.http = http
        self.max_answer_bytes = max_answer_bytes
        self.base_url = resolve_base_url(self.provider, self.default_base_url, base_url, environ)
        self.retry = retry if retry is not None else RetryPolicy()
        self.timeout = timeout if timeout is not None else DEFAULT_TIMEOUT
        # request URLs parsed once each (see _parsed_url)
        self._urls: dict[str, httpx.URL] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    # --- wire format, per provider -----------------------------------------------------------
    @abstractmethod
    def headers(self, api_key: str) -> dict[str, str]:
        """The request headers, the key included."""

    def error_details(self, payload: Any) -> tuple[str | None, str | None]:
        """``(message, code)`` from an error body in the provider's shape."""
        return None, None

    def classify(self, status: int, code: str | None, payload: Any) -> type[ProviderError]:
        if status in (401, 403):
            return AuthError
        if status == 429:
            return RateLimitError
        if status == 408:
            return ProviderTimeout
        if status >= 500:
            return ServerError
        return BadRequestError

    def quota_exhausted(self, code: str | None, payload: Any) -> bool:
        """A 429 that waiting will not fix (no credit left)."""
        return False

    # --- model calls (overridden by the model providers) ---------------------------------------
    async def complete(self, request: CompletionRequest, *, api_key: str) -> CompletionResult:
        """One non-streamed call."""
        raise NotImplementedError(f"{self.provider} has no chat completions")

    def stream(self, request: CompletionRequest, *, api_key: str) -> AsyncIterator[StreamEvent]:
        """A streamed call: :class:`TextDelta` events, then one :class:`StreamDone` with the whole
        result and its usage. A stream that ends early raises :class:`ProtocolError`."""
        raise NotImplementedError(f"{self.provider} has no chat completions")

    async def complete_streamed(
        self,
        request: CompletionRequest,
        *,
        api_key: str,
        on_text: Callable[[str], Awaitable[None] | None] | None = None,
    ) -> CompletionResult:
        """Stream the call, hand each piece of text to ``on_text``, return the complete result."""
        async for event in self.stream(request, api_key=api_key):
            if isinstance(event, TextDelta):
                if on_text is not None:
                    maybe = on_text(event.text)
                    if maybe is not None:
                        await maybe
            else:
                return event.result
        raise ProtocolError(self.provider, "the stream ended without a result")  # pragma: no cover

    async def list_models(self, *, api_key: str) -> list[str]:
        """The models the key may use (the provider's cheap authenticated listing)."""
        raise NotImplementedError

    async def check_key(self, *, api_key: str) -> None:
        """Raise :class:`AuthError` if the provider refuses ``api_key`` (one cheap call)."""
        await self.list_models(api_key=api_key)

    def listed(self, payload: Any, field: str, key: str) -> list[str]:
        """The ``key`` of each object in a listing's ``payload[field]`` (the models' ids); a
        :class:`ProtocolError` if the listing is not a list (an entry without a string ``key``
        is skipped)."""
        entries = payload.get(field, []) if isinstance(payload, Mapping) else None
        if not isinstance(entries, list):
            raise ProtocolError(self.provider, f"the listing has no {field!r} list")
        return [e[key] for e in entries if isinstance(e, Mapping) and isinstance(e.get(key), str)]

    # --- HTTP with retries ---------------------------------------------------------------------
    def url(self, path: str) -> str:
        return self.base_url + path

    def _parsed_url(self, url: str) -> httpx.URL:
        """``httpx.URL(url)``, kept: httpx parses and checks a URL given as text at every request
        (half of building one), and an ``httpx.URL`` builds the same request. Keyed by the whole
        text, so nothing can make an entry wrong; bounded, since Gemini's paths name the model."""
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = httpx.URL(url)
            if len(self._urls) < _PARSED_URLS:
                self._urls[url] = parsed
        return parsed

    async def request_json(
        self,
        method: str,
        path: str,
        *,
        api_key: str,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        parse_float: Callable[[str], Any] | None = None,
    ) -> Any:
        """Send with retries; the decoded JSON body of a 2xx answer."""
        headers = self.headers(api_key)
        content = _COMPACT_JSON.encode(body).encode() if body is not None else None
        if content is not None:
            headers["content-type"] = "application/json"
        response, answer = await self._send_with_retries(
            method,
            self.url(path),
            headers=headers,
            content=content,
            params=params,
            api_key=api_key,
            stream=False,
        )
        # a 2xx answer the client cannot read was executed all the same: maybe_executed
        try:
            return json.loads(answer, parse_float=parse_float)
        except ValueError as exc:
            problem = _json_problem(exc)
        except RecursionError:
            problem = "nested deeper than it can be read"
        raise ProtocolError(
            self.provider,
            f"the answer is not valid JSON ({problem})",
            status=response.status_code,
            maybe_executed=True,
        )

    @asynccontextmanager
    async def open_stream(
        self,
        path: str,
        *,
        api_key: str,
        body: Mapping[str, Any],
        params: Mapping[str, str] | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """POST and hand over the open streamed response (retrying only before the first byte)."""
        headers = {
            **self.headers(api_key),
            "content-type": "application/json",
            "accept": "text/event-stream",
        }
        content = _COMPACT_JSON.encode(body).encode()
        response, _ = await self._send_with_retries(
            "POST",
            self.url(path),
            headers=headers,
            content=content,
            params=params,
            api_key=api_key,
            stream=True,
        )
        try:
            yield response
        finally:
            await response.aclose()

    async def iter_stream(
        self,
        path: str,
        accumulator: StreamAccumulator,
        *,
        api_key: str,
        body: Mapping[str, Any],
        params: Mapping[str, str] | None = None,
    ) -> AsyncIterator[StreamEvent]:
        async with self.open_stream(path, api_key=api_key, body=body, params=params) as response:
            try:
                async for event in iter_sse(
                    response,
                    max_event=self.max_answer_bytes,
                    max_stream=4 * self.max_answer_bytes,
                ):
                    try:
                        text = accumulator.feed(event)
                    except ProviderError as exc:  # an error event may echo the key too
                        raise scrubbed(exc, api_key) from None
                    except ANSWER_SHAPE_ERRORS as exc:
                        raise self._unexpected("a stream event", exc, api_key) from None
                    if text:
                        yield TextDelta(text)
            except ProviderError as exc:  # an error event in the stream, or an unreadable one
                _broke_off(exc, accumulator)
                raise
            except StreamTooLarge as exc:
                raise _broke_off(
                    ProtocolError(self.provider, f"the answer is too large: {exc}"), accumulator
                ) from None
            except httpx.TimeoutException as exc:
                raise _broke_off(
                    ProviderTimeout(self.provider, f"the stream stalled ({type(exc).__name__})"),
                    accumulator,
                ) from None
            except httpx.TransportError as exc:
                raise _broke_off(
                    ProtocolError(
                        self.provider,
                        f"the stream broke off ({type(exc).__name__}: {redact(str(exc), api_key)})",
                    ),
                    accumulator,
                ) from None
            except asyncio.CancelledError as exc:  # the run was cancelled mid-stream
                exc.partial_usage = _partial_usage(accumulator)  # type: ignore[attr-defined]
                raise
        try:
            try:
                result = accumulator.result()
            except ANSWER_SHAPE_ERRORS as exc:
                raise self._unexpected("the stream", exc, api_key) from None
        except ProviderError as exc:  # the stream ended early, or its events do not add up
            _broke_off(exc, accumulator)
            raise
        yield StreamDone(result)

    def _unexpected(self, what: str, exc: Exception, api_key: str) -> ProtocolError:
        """The error of an answer the client could decode but not read (``what`` is the part:
        ``a stream event``...): a field of the wrong type or missing, nesting too deep."""
        detail = redact_bounded(str(exc), api_key, limit=200)
        return ProtocolError(
            self.provider,
            f"{what} has an unexpected shape ({type(exc).__name__}: {detail})",
            maybe_executed=True,
        )

    async def _send_with_retries(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None,
        params: Mapping[str, str] | None,
        api_key: str,
        stream: bool,
    ) -> tuple[httpx.Response, bytes]:
        """The response to the request, tried again as the policy says. Always received as a
        stream: a 2xx answer ``stream`` asks for is handed over open (with ``b""``); any other
        is read (at most :attr:`max_answer_bytes`, a :class:`ProtocolError` beyond) and closed,
        and handed over with its body."""
        if not _SENDABLE_KEY.fullmatch(api_key):
            # h11 would refuse the header, and its message quotes the whole key
            raise AuthError(
                self.provider,
                "the key has characters an HTTP header cannot carry (whitespace, control or "
                "non-ASCII characters): it cannot be sent",
            )
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            try:
                request = self.http.build_request(
                    method,
                    self._parsed_url(url),
                    headers=headers,
                    content=content,
                    params=params,
                    timeout=self.timeout,
                )
                response = await self.http.send(request, stream=True)
                if response.is_success:
                    if stream:
                        return response, b""
                    return response, await self._read_answer(response)
                error_body = await _read_body(response, MAX_ERROR_BODY_BYTES)
            except httpx.TimeoutException as exc:
                error: ProviderError = ProviderTimeout(
                    self.provider, f"no answer in time ({type(exc).__name__})", attempts=attempt
                )
                # sent, then no answer: the provider may be executing it
                error.maybe_executed = isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout)
                retryable = self.retry.retry_timeouts
            except httpx.LocalProtocolError as exc:
                # our own request is malformed: retrying cannot help, and the text may quote headers
                raise ProtocolError(
                    self.provider, f"the request could not be sent ({type(exc).__name__})"
                ) from None
            except httpx.TransportError as exc:
                error = ProviderUnreachable(
                    self.provider,
                    f"cannot reach {self.base_url} ({type(exc).__name__}: {redact(str(exc), api_key)})",
                    attempts=attempt,
                )
                # a reset after the request went out (not a refused connection): maybe executed
                error.maybe_executed = not isinstance(exc, httpx.ConnectError)
                retryable = self.retry.retry_timeouts
            else:
                error = self.status_error(_with_body(response, error_body), api_key, attempt)
                retryable = error.retryable
                if isinstance(error, RateLimitError):
                    retry_after = error.retry_after
            if error.maybe_executed and not retry_once_sent.get():
                retryable = False  # the provider may have run it: not again, blindly
            wait = self.retry.delay(attempt, retry_after) if retryable else None
            if wait is None:
                raise error
            listener = retry_listener.get()
            if listener is not None:
                status = getattr(error, "status", None)
                listener(
                    RetryWait(
                        provider=self.provider,
                        attempt=attempt,
                        max_attempts=self.retry.max_attempts,
                        wait=wait,
                        retry_after=retry_after,
                        reason=error.kind + (f" {status}" if status else ""),
                    )
                )
            await self.retry.sleep(wait)

    async def _read_answer(self, response: httpx.Response) -> bytes:
        """The body of a 2xx answer, read and closed: a :class:`ProtocolError` if it is larger
        than :attr:`max_answer_bytes` (decoded), refused unread when its length says so."""
        limit = self.max_answer_bytes
        declared = response.headers.get("content-length", "")
        too_large = (
            declared.isdigit()
            and int(declared) > limit
            and "content-encoding" not in response.headers
        )
        if too_large:
            await response.aclose()
        else:
            body = await _read_body(response, limit)
            too_large = len(body) > limit
        if too_large:
            raise ProtocolError(
                self.provider,
                f"the answer is larger than {limit} bytes: not read",
                status=response.status_code,
                maybe_executed=True,
            )
        return body

    def status_error(self, response: httpx.Response, api_key: str, attempt: int) -> ProviderError:
        """The exception for an error answer, from the provider's own error body (read: at most
        :data:`MAX_ERROR_BODY_BYTES` of it)."""
        status = response.status_code
        try:
            payload: Any = response.json()
        except (ValueError, RecursionError):
            payload = None
        message: str | None = None
        code: str | None = None
        if payload is not None:
            # the details are the provider's words, read as well as they can be
            with contextlib.suppress(*ANSWER_SHAPE_ERRORS):
                message, code = self.error_details(payload)
        # any JSON may stand in a message or a code ("code": 400): text, or nothing
        message, code = error_text(message), error_text(code)
        if not message:
            message = response.text.strip() or response.reason_phrase or "no message"
            message = redact_bounded(message, api_key, limit=300)
        else:
            message = redact_bounded(message, api_key)
        request_id = response.headers.get("x-request-id") or response.headers.get("request-id")
        kind = self.classify(status, code, payload)
        # an echoing provider or gateway may put the key anywhere, codes and ids included
        common: dict[str, Any] = {
            "status": status,
            "code": redact_bounded(code, api_key) if code is not None else None,
            "request_id": redact_bounded(request_id, api_key) if request_id is not None else None,
            "attempts": attempt,
        }
        if kind is RateLimitError:
            return RateLimitError(
                self.provider,
                message,
                retry_after=parse_retry_after(response.headers),
                quota_exhausted=self.quota_exhausted(code, payload),
                **common,
            )
        return kind(self.provider, message, **common)

    def decode_event(self, event: ServerSentEvent) -> Any:
        try:
            return json.loads(event.data)
        except ValueError as exc:
            problem = _json_problem(exc, at=False)
        except RecursionError:
            problem = "nested deeper than it can be read"
        raise ProtocolError(self.provider, f"a stream event is not valid JSON ({problem})")


async def _read_body(response: httpx.Response, limit: int) -> bytes:
    """``response``'s body (decoded), read and the response closed; once it passes ``limit``
    bytes it is read no further, and what was read (over ``limit``) is returned."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                break
    finally:
        await response.aclose()
    return b"".join(chunks)


#: headers that describe the body as it was sent, not as it was read
_TRANSFER_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})


def _with_body(response: httpx.Response, body: bytes) -> httpx.Response:
    """A read response like ``response`` (status, headers, request), holding ``body``: the part
    of an error answer that was read (at most :data:`MAX_ERROR_BODY_BYTES`)."""
    return httpx.Response(
        response.status_code,
        headers=[
            (name, value)
            for name, value in response.headers.multi_items()
            if name.lower() not in _TRANSFER_HEADERS
        ],
        content=body[:MAX_ERROR_BODY_BYTES],
        request=response.request,
        extensions={
            name: response.extensions[name]
            for name in ("http_version", "reason_phrase")
            if name in response.extensions
        },
    )


def _partial_usage(accumulator: StreamAccumulator) -> Usage | None:
    """What ``accumulator`` knows the provider bills for the stream so far; ``None`` if the
    events it kept cannot tell (a hostile stream's fields of the wrong type)."""
    try:
        return accumulator.partial_usage()
    except ANSWER_SHAPE_ERRORS:
        return None


def _broke_off(error: ProviderError, accumulator: StreamAccumulator) -> ProviderError:
    """``error``, for a stream that had started: the provider executed the request, and bills
    what the accumulator saw of it."""
    error.partial_usage = _partial_usage(accumulator)
    error.maybe_executed = True
    return error


#: no call reads or writes this many tokens of one kind: a larger count in a usage field is a
#: broken (or hostile) answer, refused before it is priced (it could price beyond what the
#: ledger stores)
MAX_TOKEN_COUNT = 10**10
#: nor makes this many requests of one server-side tool (web searches of an Anthropic call)
MAX_TOOL_USES = 10**4


def as_int(value: Any, *, limit: int = MAX_TOKEN_COUNT, what: str = "token count") -> int:
    """A count from a usage field: missing or null is 0; anything else must be an int up to
    ``limit`` (negatives are floored by the callers, :func:`nonneg`).

    :raises TypeError: not an int.
    :raises ValueError: more than ``limit``.
    """
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected a {what}, got {value!r}")
    if value > limit:
        raise ValueError(f"a {what} of {value} is beyond any call's (at most {limit})")
    return value


def nonneg(value: int) -> int:
    return value if value > 0 else 0


def _json_problem(exc: ValueError, *, at: bool = True) -> str:
    """What is wrong with a JSON text: a ``JSONDecodeError``'s message (and where); another
    ``ValueError`` (an answer that is not UTF-8) says it itself."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at char {exc.pos}" if at else exc.msg
    return str(exc)
