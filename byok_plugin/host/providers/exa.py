"""Exa search (``POST {base}/search``).

Base URL: ``https://api.exa.ai``; the key in ``x-api-key``.

Usage, from https://exa.ai/docs/reference/search (response ``costDollars``): Exa bills per request
and reports the cost itself, so the usage is ``Usage(provider="exa", model="exa-search",
tool_requests=1, reported_cost=costDollars.total)``. The model is always ``exa-search`` (the tool's
name in price tables and in ``CredentialRequest``); the search type Exa resolved to (``neural``,
``fast``, ``deep``...) is in ``SearchResult.search_type``, and its price difference is already in
the reported cost. Money is read as ``Decimal`` straight from the JSON text, never via float.

Key check: Exa has no models to list; :meth:`ExaClient.check_key` lists websets
(``GET /websets/v0/websets?limit=1``, authenticated and free of charge).
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from byok_hookspecs import Usage

from byok_plugin.host.providers.base import ANSWER_SHAPE_ERRORS, ProviderClient
from byok_plugin.host.providers.common import SearchHit, SearchRequest, SearchResult
from byok_plugin.host.providers.errors import ProtocolError, error_text

#: the ``model`` of every Exa search's ``Usage``
EXA_SEARCH_MODEL = "exa-search"


#: a search that reports more than this is not a cost Exa could bill for one request
_MAX_REPORTED_COST = Decimal(100)


def exa_usage(payload: Mapping[str, Any]) -> Usage:
    cost = (payload.get("costDollars") or {}).get("total")
    if cost is not None:
        try:
            cost = cost if isinstance(cost, Decimal) else Decimal(str(cost))
        except ArithmeticError:
            cost = None
            valid = False
        else:
            valid = cost.is_finite() and 0 <= cost <= _MAX_REPORTED_COST
        if not valid:
            raise ProtocolError(
                "exa",
                "costDollars.total is not a cost (expected a number from 0 to 100 dollars)",
                maybe_executed=True,  # a 2xx answer: executed
            )
    return Usage(provider="exa", model=EXA_SEARCH_MODEL, tool_requests=1, reported_cost=cost)


def parse_search(payload: Any) -> SearchResult:
    try:
        hits = tuple(
            SearchHit(
                url=r["url"],
                title=r.get("title"),
                id=r.get("id"),
                published_date=r.get("publishedDate"),
                author=r.get("author"),
                score=float(r["score"]) if r.get("score") is not None else None,
                text=r.get("text"),
            )
            for r in payload["results"]
        )
        return SearchResult(
            provider="exa",
            hits=hits,
            usage=exa_usage(payload),
            search_type=payload.get("resolvedSearchType") or payload.get("searchType"),
            request_id=payload.get("requestId"),
        )
    except ANSWER_SHAPE_ERRORS as exc:
        raise ProtocolError(
            "exa",
            f"unexpected search answer shape ({type(exc).__name__}: {exc})",
            maybe_executed=True,  # a 2xx answer: executed
        ) from None


class ExaClient(ProviderClient):
    provider = "exa"
    default_base_url = "https://api.exa.ai"

    def headers(self, api_key: str) -> dict[str, str]:
        return {"x-api-key": api_key}

    def error_details(self, payload: Any) -> tuple[str | None, str | None]:
        if not isinstance(payload, Mapping):
            return None, None
        message = error_text(payload.get("error")) or error_text(payload.get("message"))
        return message, error_text(payload.get("tag"))

    def body(self, request: SearchRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "query": request.query,
            "numResults": request.num_results,
            "type": request.search_type,
        }
        if request.include_text:
            body["contents"] = {
                "text": {"maxCharacters": request.max_characters}
                if request.max_characters
                else True
            }
        return body

    async def search(self, request: SearchRequest, *, api_key: str) -> SearchResult:
        payload = await self.request_json(
            "POST", "/search", api_key=api_key, body=self.body(request), parse_float=Decimal
        )
        return parse_search(payload)

    async def list_models(self, *, api_key: str) -> list[str]:
        """Exa has one billable tool here: ``exa-search`` (after checking the key)."""
        await self.check_key(api_key=api_key)
        return [EXA_SEARCH_MODEL]

    async def check_key(self, *, api_key: str) -> None:
        await self.request_json(
            "GET", "/websets/v0/websets", api_key=api_key, params={"limit": "1"}
        )
