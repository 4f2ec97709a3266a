"""Request bodies are checked against the schemas of the shipped ``openapi.json``: one source of
truth for the document clients read and the checks the server makes.

A failure names the field and says what the schema wants, from the schema alone: the value sent
is never quoted, since it may be an API key.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from byok_plugin.server.errors import ApiError, ErrorCode

__all__ = ["check_body", "openapi_document", "openapi_text"]

_DOC_URI = "urn:byok-plugin:openapi"


@cache
def openapi_text() -> str:
    """The shipped OpenAPI document, as the file holds it."""
    return resources.files("byok_plugin.server").joinpath("openapi.json").read_text("utf-8")


def openapi_document() -> dict[str, Any]:
    """A fresh parsed copy of the shipped OpenAPI document."""
    document: dict[str, Any] = json.loads(openapi_text())
    return document


@cache
def _validator(schema_name: str) -> jsonschema.Draft202012Validator:
    document = openapi_document()
    if schema_name not in document["components"]["schemas"]:
        raise KeyError(f"openapi.json has no schema {schema_name!r}")
    registry: Registry = Registry().with_resource(
        _DOC_URI, Resource.from_contents(document, default_specification=DRAFT202012)
    )
    return jsonschema.Draft202012Validator(
        {"$ref": f"{_DOC_URI}#/components/schemas/{schema_name}"}, registry=registry
    )


def _describe(error: jsonschema.ValidationError) -> tuple[str | None, str]:
    """The field at fault and a message built from the schema, never from the value."""
    path = [str(part) for part in error.absolute_path]
    field = ".".join(path) or None
    name = field or "the body"
    wanted = error.validator_value
    match error.validator:
        case "required":
            present = set(error.instance) if isinstance(error.instance, dict) else set()
            missing = [p for p in wanted if p not in present]
            missing_field = ".".join([*path, missing[0]]) if missing else field
            return missing_field, f"{missing_field} is required"
        case "additionalProperties":
            allowed = sorted(error.schema.get("properties", {}))
            extra = (
                sorted(set(error.instance) - set(allowed))
                if isinstance(error.instance, dict)
                else []
            )
            extra_field = ".".join([*path, extra[0]]) if extra else field
            shown = ", ".join(allowed) if allowed else "none"
            return extra_field, f"{extra_field} is not an accepted field (accepted: {shown})"
        case "type":
            kinds = wanted if isinstance(wanted, str) else " or ".join(wanted)
            article = "an" if kinds[0] in "aeiou" else "a"
            return field, f"{name} must be {article} {kinds}"
        case "enum":
            return field, f"{name} must be one of: {', '.join(map(str, wanted))}"
        case "const":
            return field, f"{name} must be {wanted!r}"
        case "minLength":
            return field, f"{name} must not be empty" if wanted == 1 else (
                f"{name} must be at least {wanted} characters"
            )
        case "maxLength":
            return field, f"{name} must be at most {wanted} characters"
        case "pattern":
            return field, f"{name} does not have the expected form ({wanted})"
        case _:
            return field, f"{name} is not valid ({error.validator})"


def check_body(schema_name: str, body: Any) -> None:
    """Raise a 422 :class:`ApiError` naming the first field of ``body`` that the schema refuses."""
    error = jsonschema.exceptions.best_match(_validator(schema_name).iter_errors(body))
    if error is not None:
        field, message = _describe(error)
        raise ApiError(ErrorCode.VALIDATION_ERROR, message, field)
