"""Reading a mutating request's body: JSON content type required, size limited, then validated
by the operation's pydantic model (:mod:`byok_plugin.server.models`).

This runs in the route, before anything reads the body, so that the content type and the size are
checked first (415 and 413, as documented) and broken JSON is a 400 that says where it breaks.

The JSON content type is the CSRF defence for hosts that authenticate with cookies: a cross-site
form can only send ``text/plain``, ``application/x-www-form-urlencoded`` or
``multipart/form-data``, and a cross-site ``fetch`` with ``application/json`` needs a CORS
preflight this app never grants. It is required on every mutating method, even with an empty
body.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pydantic
from starlette.requests import Request

from byok_plugin.server.errors import ApiError, ErrorCode
from byok_plugin.server.models import REQUEST_MODELS

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "MUTATING_METHODS",
    "read_json_body",
    "require_json",
    "validation_error",
]

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
    """The request's JSON object body, validated by the request model named ``schema_name``
    (as a dict of the fields sent, defaults left out).

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
    model = REQUEST_MODELS[schema_name]
    try:
        # JSON mode: strict types, and an enum field takes its value as a string
        parsed = model.model_validate_json(json.dumps(body))
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        raise validation_error(errors, accepted=tuple(model.model_fields)) from None
    return parsed.model_dump(mode="json", exclude_unset=True)


def _describe(error: Mapping[str, Any], accepted: tuple[str, ...]) -> tuple[str | None, str]:
    """The field at fault and a message for one pydantic error, from its ``type``, ``loc`` and
    the model's constraints in ``ctx``: never from the input, which may be an API key."""
    loc = [str(part) for part in error.get("loc", ()) if part not in ("body",)]
    field = ".".join(loc) or None
    name = field or "the body"
    ctx = error.get("ctx") or {}
    match error.get("type"):
        case "missing":
            return field, f"{name} is required"
        case "extra_forbidden":
            shown = ", ".join(sorted(accepted)) if accepted else "none"
            return field, f"{name} is not an accepted field (accepted: {shown})"
        case "model_type" | "model_attributes_type" | "dict_type" if field is None:
            return None, "the body must be an object"
        case "json_invalid":
            return None, "the request body is not valid JSON"
        case "string_type":
            return field, f"{name} must be a string"
        case "bool_type":
            return field, f"{name} must be a boolean"
        case "int_type" | "int_parsing" | "int_from_float":
            return field, f"{name} must be an integer"
        case "list_type":
            return field, f"{name} must be an array"
        case "model_type" | "model_attributes_type" | "dict_type":
            return field, f"{name} must be an object"
        case "enum" | "literal_error":
            return field, f"{name} must be one of: {ctx.get('expected', '')}"
        case "string_too_short":
            wanted = ctx.get("min_length", 1)
            if wanted == 1:
                return field, f"{name} must not be empty"
            return field, f"{name} must be at least {wanted} characters"
        case "string_too_long":
            return field, f"{name} must be at most {ctx.get('max_length')} characters"
        case "string_pattern_mismatch":
            return field, f"{name} does not have the expected form ({ctx.get('pattern')})"
        case "too_long":
            return field, f"{name} must have at most {ctx.get('max_length')} items"
        case "greater_than_equal":
            return field, f"{name} must be at least {ctx.get('ge')}"
        case "less_than_equal":
            return field, f"{name} must be at most {ctx.get('le')}"
        case _:
            return field, f"{name} is not valid"


def validation_error(
    errors: Sequence[Mapping[str, Any]], *, accepted: tuple[str, ...] = ()
) -> ApiError:
    """The API error for pydantic's errors: the first one, as a 422 naming its field (broken
    JSON is a 400)."""
    if not errors:
        return ApiError(ErrorCode.VALIDATION_ERROR, "the request is not valid")
    first = errors[0]
    field, message = _describe(first, accepted)
    if first.get("type") == "json_invalid":
        return ApiError(ErrorCode.INVALID_JSON, message)
    return ApiError(ErrorCode.VALIDATION_ERROR, message, field)
