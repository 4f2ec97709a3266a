"""Reading a mutating request's body: JSON content type required, size limited, schema-checked.

The JSON content type is the CSRF defence for hosts that authenticate with cookies: a cross-site
form can only send ``text/plain``, ``application/x-www-form-urlencoded`` or
``multipart/form-data``, and a cross-site ``fetch`` with ``application/json`` needs a CORS
preflight this app never grants. It is required on every mutating method, even with an empty
body.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from byok_plugin.server.errors import ApiError, ErrorCode
from byok_plugin.server.schemas import check_body

__all__ = ["DEFAULT_MAX_BODY_BYTES", "MUTATING_METHODS", "read_json_body", "require_json"]

#: an API key is at most 512 characters; 16 KiB leaves room and nothing more
DEFAULT_MAX_BODY_BYTES = 16 * 1024
MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def require_json(request: Request) -> None:
    """415 unless the request says ``Content-Type: application/json`` (any charset)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            "send the body as JSON with Content-Type: application/json",
            headers=(("Accept", "application/json"),),
        )


def _too_large(limit: int) -> ApiError:
    return ApiError(ErrorCode.PAYLOAD_TOO_LARGE, f"the request body is over {limit} bytes")


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _too_large(limit)
        except ValueError:
            raise ApiError(
                ErrorCode.INVALID_JSON, "the Content-Length header is not a number"
            ) from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def read_json_body(
    request: Request, schema_name: str, *, limit: int, optional: bool = False
) -> dict[str, Any]:
    """The request's JSON object body, checked against ``schema_name`` of the OpenAPI document.

    :param optional: an empty body is read as ``{}`` (the content type is still required).
    """
    require_json(request)
    raw = await _read_limited(request, limit)
    if not raw.strip():
        if not optional:
            raise ApiError(ErrorCode.INVALID_JSON, "the request body is empty; send a JSON object")
        body: Any = {}
    else:
        try:
            body = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
        except UnicodeDecodeError:
            raise ApiError(ErrorCode.INVALID_JSON, "the request body is not UTF-8") from None
        except json.JSONDecodeError as exc:
            raise ApiError(
                ErrorCode.INVALID_JSON,
                f"the request body is not valid JSON (line {exc.lineno}, column {exc.colno}: "
                f"{exc.msg})",
            ) from None
        except (ValueError, RecursionError):
            raise ApiError(ErrorCode.INVALID_JSON, "the request body is not valid JSON") from None
    check_body(schema_name, body)
    checked: dict[str, Any] = body  # check_body refused anything but an object
    return checked
