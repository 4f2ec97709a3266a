"""The request pipeline every emulated provider shares: parse, check the key, inject faults, record.

A provider module subclasses :class:`ProviderAPI` with its own key header, error shape, routes and
answers; this module does the rest in one place so that every provider checks keys, records calls
and injects faults the same way.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Match, Route

from byok_plugin.host.emulator.faults import Fault, FaultKind
from byok_plugin.host.emulator.state import EmulatorState, RecordedCall


class StreamMode:
    """How a stream ends: whole, cut before its terminal event, or with one broken event."""

    WHOLE = "whole"
    TRUNCATED = "truncated"
    MALFORMED = "malformed"


class BadRequest(Exception):
    """The request is invalid for this provider (answered 400 in the provider's shape)."""


@dataclass(slots=True)
class Exchange:
    """One request as a handler sees it."""

    request: Request
    body: Mapping[str, Any]
    path: str
    key_label: str | None
    stream_mode: str = StreamMode.WHOLE
    malformed: bool = False

    @property
    def query(self) -> Mapping[str, str]:
        return self.request.query_params


Handler = Callable[[Exchange], Awaitable[Response]]

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

MALFORMED_BODY = b'{"id": "emulated", "object": "chat.completion", "choices": [{"index": 0, "mess'


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def json_response(
    payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return JSONResponse(payload, status_code=status, headers=dict(headers or {}))


def sse_response(events: AsyncIterator[str]) -> Response:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"cache-control": "no-cache"}
    )


def sse(data: Any, event: str | None = None, *, crlf: bool = False) -> str:
    """One server-sent event: an optional ``event:`` line and one ``data:`` line."""
    nl = "\r\n" if crlf else "\n"
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}{nl}" if event else ""
    return f"{head}data: {payload}{nl}{nl}"


class ProviderAPI:
    """One emulated provider. Subclasses set :attr:`name`, the key header and the error shape."""

    name: ClassVar[str]
    #: the provider's models, as its listing endpoint returns them
    models: ClassVar[tuple[str, ...]]

    def __init__(self, state: EmulatorState) -> None:
        self.state = state

    # to override ----------------------------------------------------------------------------
    def key_from(self, request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def error(self, status: int, kind: str, message: str) -> Response:
        """An error in the provider's own shape. ``kind``: auth, rate_limit, server, bad_request,
        not_found (a model), route (no such path: 404), method (405)."""
        raise NotImplementedError

    def auth_failure(self, api_key: str | None) -> Response:
        return self.error(401, "auth", "Invalid API key.")

    def routes(self) -> list[Route]:
        raise NotImplementedError

    def preflight(self, request: Request) -> Response | None:
        """A provider-specific check before the key (e.g. Anthropic's version header)."""
        return None

    # shared pipeline --------------------------------------------------------------------------
    def all_routes(self) -> list[Route]:
        """:meth:`routes`, then one that answers every other path under the provider's prefix in
        the provider's own error shape: 404, or 405 with ``Allow`` for a known path."""
        routes = self.routes()

        async def unknown(request: Request) -> Response:
            allowed = sorted(
                {
                    method
                    for route in routes
                    if route.matches(request.scope)[0] is Match.PARTIAL
                    for method in route.methods or ()
                }
            )
            rel_path = request.url.path[len(self.name) + 1 :]
            if allowed:
                response = self.error(
                    405, "method", f"Method {request.method} is not allowed for {rel_path}."
                )
                response.headers["allow"] = ", ".join(allowed)
            else:
                response = self.error(404, "route", f"Invalid URL ({request.method} {rel_path})")
            _, label, fingerprint = self.state.check_key(self.name, self.key_from(request))
            self.state.record(
                RecordedCall(
                    provider=self.name,
                    method=request.method,
                    path=rel_path,
                    model=None,
                    key_label=label,
                    key_fingerprint=fingerprint,
                    stream=False,
                    status=response.status_code,
                )
            )
            return response

        return [*routes, Route(f"/{self.name}/{{rest:path}}", unknown, methods=ALL_METHODS)]

    def route(
        self,
        path: str,
        handler: Handler,
        *,
        methods: tuple[str, ...] = ("POST",),
        model_of: Callable[[Request, Mapping[str, Any]], str | None] = lambda r, b: b.get("model"),
        stream_of: Callable[[Request, Mapping[str, Any]], bool] = lambda r, b: bool(
            b.get("stream")
        ),
    ) -> Route:
        async def endpoint(request: Request) -> Response:
            return await self._serve(request, path, handler, model_of, stream_of)

        return Route(f"/{self.name}{path}", endpoint, methods=list(methods))

    async def _serve(
        self,
        request: Request,
        path: str,
        handler: Handler,
        model_of: Callable[[Request, Mapping[str, Any]], str | None],
        stream_of: Callable[[Request, Mapping[str, Any]], bool],
    ) -> Response:
        rel_path = request.url.path[len(self.name) + 1 :]
        epoch = self.state.epoch
        raw = await request.body()
        body: Mapping[str, Any] = {}
        parse_error = None
        if raw:
            try:
                parsed = json.loads(raw)
            except ValueError as exc:
                parse_error = f"request body is not valid JSON: {exc}"
            else:
                if isinstance(parsed, dict):
                    body = parsed
                else:
                    parse_error = "request body must be a JSON object"
        model = _safe(model_of, request, body)
        stream = bool(_safe(stream_of, request, body))
        api_key = self.key_from(request)
        accepted, label, fingerprint = self.state.check_key(self.name, api_key)

        def record(status: int, fault: FaultKind | None = None) -> None:
            self.state.record(
                RecordedCall(
                    provider=self.name,
                    method=request.method,
                    path=rel_path,
                    model=model if isinstance(model, str) else None,
                    key_label=label,
                    key_fingerprint=fingerprint,
                    stream=stream,
                    status=status,
                    fault=fault,
                    body=body or None,
                ),
                epoch=epoch,
            )

        early = self.preflight(request)
        if early is not None:
            record(early.status_code)
            return early
        if not accepted:
            response = self.auth_failure(api_key)
            record(response.status_code)
            return response
        if parse_error is not None:
            record(400)
            return self.error(400, "bad_request", parse_error)

        fault = self.state.take_fault(self.name, rel_path, fingerprint)
        exchange = Exchange(request=request, body=body, path=rel_path, key_label=label)
        if fault is not None:
            early = await self._apply_fault(fault, exchange, stream)
            if early is not None:
                record(early.status_code, fault.kind)
                return early
        try:
            response = await handler(exchange)
        except BadRequest as exc:
            record(400, fault.kind if fault else None)
            return self.error(400, "bad_request", str(exc))
        record(response.status_code, fault.kind if fault else None)
        return response

    def no_credit(self) -> Response:
        """The provider's answer when the key's account has no credit left."""
        return self.error(429, "rate_limit", "You exceeded your current quota.")

    async def _apply_fault(self, fault: Fault, exchange: Exchange, stream: bool) -> Response | None:
        if fault.kind is FaultKind.NO_CREDIT:
            return self.no_credit()
        if fault.kind is FaultKind.RATE_LIMIT:
            response = self.error(429, "rate_limit", "Rate limit reached; please try again later.")
            response.headers["retry-after"] = _seconds(fault.retry_after)
            return response
        if fault.kind is FaultKind.SERVER_ERROR:
            return self.error(
                fault.status, "server", "The server had an error processing the request."
            )
        if fault.kind is FaultKind.SLOW:
            await asyncio.sleep(fault.delay)
            return None
        if fault.kind is FaultKind.TRUNCATED_STREAM:
            exchange.stream_mode = StreamMode.TRUNCATED
            return None
        if fault.kind is FaultKind.MALFORMED_JSON:
            if stream:
                exchange.stream_mode = StreamMode.MALFORMED
                return None
            return Response(MALFORMED_BODY, status_code=200, media_type="application/json")
        return None


def _safe(
    fn: Callable[[Request, Mapping[str, Any]], Any], request: Request, body: Mapping[str, Any]
) -> Any:
    try:
        return fn(request, body)
    except (AttributeError, TypeError, ValueError, KeyError):
        return None


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


async def stream_events(events: list[str], mode: str, *, terminal: int) -> AsyncIterator[str]:
    """Yield ``events``; the last ``terminal`` ones are the stream's end marker(s).

    ``truncated`` stops before them; ``malformed`` replaces the event in the middle with broken JSON.
    """
    if mode == StreamMode.TRUNCATED:
        events = events[: max(1, len(events) - terminal - 1)]
    elif mode == StreamMode.MALFORMED:
        middle = max(0, (len(events) - terminal) // 2)
        events = [*events[:middle], 'data: {"broken": \n\n', *events[middle + 1 :]]
    for event in events:
        yield event
