"""Exa's search API (``POST /search``) and a cheap authenticated listing for key checks.

Wire format as in https://exa.ai/docs/reference/search : the key in ``x-api-key`` (or
``Authorization: Bearer``); the answer carries ``requestId``, ``resolvedSearchType``, ``results``
(``id``, ``url``, ``title``, ``publishedDate``, ``author``, ``score``, optional ``text``) and
``costDollars`` (``total``, ``search`` and ``contents`` by kind, as a live answer recorded in
``shared/fixtures/provider-recordings/exa/recorded_search.json`` has it and exa-py reads it; the
reference's ``breakDown`` list is not what the API sends). Errors: ``{"requestId", "error", "tag"}``
(https://exa.ai/docs/admin/error-codes).

Exa has no models to list. For a key check the emulator answers ``GET /websets/v0/websets`` (the
Websets API's listing, authenticated and free of charge) with an empty page.

Cost rule of the emulator: $0.005 per search (up to 25 results, $0.025 above), plus $0.001 per
result whose text is returned — the shape of Exa's published per-request and per-page prices.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from byok_plugin.host.emulator.apis.base import (
    BadRequest,
    Exchange,
    ProviderAPI,
    json_response,
    new_id,
)

_TAGS = {
    "auth": "INVALID_API_KEY",
    "rate_limit": "RATE_LIMIT_EXCEEDED",
    "server": "INTERNAL_ERROR",
    "bad_request": "INVALID_REQUEST_BODY",
    "not_found": "NOT_FOUND",
    "route": "NOT_FOUND",
    "method": "INVALID_REQUEST",
}


def _search_type(request: Request, body: Mapping[str, Any]) -> str | None:
    return str(body.get("type") or "auto") if request.method == "POST" else None


def wants_text(body: Mapping[str, Any]) -> bool:
    contents = body.get("contents")
    if isinstance(contents, Mapping) and contents.get("text"):
        return True
    return bool(body.get("text"))


def search_cost(num_results: int, with_text: bool) -> tuple[Decimal, Decimal, Decimal]:
    """(total, search, contents) in USD for a search returning ``num_results`` results."""
    search = Decimal("0.005") if num_results <= 25 else Decimal("0.025")
    contents = Decimal("0.001") * num_results if with_text else Decimal(0)
    return search + contents, search, contents


def search_cost_dollars(num_results: int, with_text: bool, search_type: str) -> dict[str, Any]:
    """``costDollars`` as Exa answers it (and exa-py reads it into ``CostDollars``): ``total``, and
    ``search`` and ``contents`` broken down by kind (``{"neural": 0.005}``, ``{"text": 0.01}``)."""
    total, search, contents = search_cost(num_results, with_text)
    kind = "keyword" if search_type == "keyword" else "neural"
    cost: dict[str, Any] = {"total": float(total), "search": {kind: float(search)}}
    if with_text:
        cost["contents"] = {"text": float(contents)}
    return cost


class ExaAPI(ProviderAPI):
    name = "exa"
    models = ("auto", "neural", "fast", "deep", "keyword")

    def key_from(self, request: Request) -> str | None:
        return request.headers.get("x-api-key") or super().key_from(request)

    def error(self, status: int, kind: str, message: str) -> Response:
        if kind == "auth":
            message = "Invalid API key"
        return json_response(
            {
                "requestId": new_id("")[:32],
                "error": message,
                "tag": _TAGS.get(kind, "INTERNAL_ERROR"),
            },
            status,
        )

    def routes(self) -> list[Route]:
        return [
            self.route("/search", self.search, model_of=_search_type, stream_of=lambda r, b: False),
            self.route(
                "/websets/v0/websets",
                self.list_websets,
                methods=("GET",),
                model_of=lambda r, b: None,
            ),
        ]

    async def list_websets(self, ex: Exchange) -> Response:
        return json_response({"data": [], "hasMore": False, "nextCursor": None})

    async def search(self, ex: Exchange) -> Response:
        body = ex.body
        query = body.get("query")
        if not isinstance(query, str) or not query.strip():
            raise BadRequest("query: Required")
        num = body.get("numResults", 10)
        if not isinstance(num, int) or not 1 <= num <= 100:
            raise BadRequest("numResults: must be an integer between 1 and 100")
        requested = str(body.get("type") or "auto")
        resolved = "neural" if requested == "auto" else requested
        with_text = wants_text(body)
        digest = hashlib.sha256(query.encode()).hexdigest()
        results = []
        for i in range(num):
            slug = f"{digest[:8]}-{i + 1}"
            result: dict[str, Any] = {
                "id": f"https://example.com/emulated/{slug}",
                "url": f"https://example.com/emulated/{slug}",
                "title": f"Emulated result {i + 1} for {query[:60]}",
                "publishedDate": f"2025-0{1 + i % 9}-1{i % 10}T00:00:00.000Z",
                "author": "Exa Emulator",
                "score": round(0.9 - i * 0.01, 4),
            }
            if with_text:
                result["text"] = f"Emulated page text about {query}. Result {i + 1}."
            results.append(result)
        return json_response(
            {
                "requestId": new_id("")[:32],
                "resolvedSearchType": resolved,
                "searchType": resolved,
                "results": results,
                "costDollars": search_cost_dollars(num, with_text, resolved),
            }
        )
