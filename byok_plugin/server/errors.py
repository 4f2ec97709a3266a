"""The HTTP API's errors: a JSON body with a stable code, and the mapping from library errors.

Every error answers ``{"error": {"code": ..., "message": ..., "field": ...}}``. The ``code`` is
part of the API (documented in the OpenAPI document; clients branch on it); the ``message`` is for
people and may change. ``field`` names the request field at fault (``api_key``, ``label``,
``workspace_id``...) when there is one.

No message ever carries a plaintext key: library errors are written not to quote keys, and
schema errors are described from the schema, never by quoting the value that failed. Nor does a
message carry a database driver's words (a host, a port, a database name): a store that does not
answer is ``store_unavailable`` with a fixed message, and the cause goes to the server's log.
"""

from __future__ import annotations

import enum
import logging
import traceback

from byok_hookspecs import ByokError, CredentialUnavailable, NotAuthorized
from starlette.responses import JSONResponse

from byok_plugin.core import errors as key_errors
from byok_plugin.resolution.organizations import OrganizationNotFound

log = logging.getLogger("byok.server")

__all__ = ["ApiError", "ErrorCode", "error_from_library", "error_response", "log_unexpected"]


class ErrorCode(enum.StrEnum):
    """The stable error codes, with their HTTP status in :data:`STATUS`."""

    INVALID_JSON = "invalid_json"
    INVALID_HOST = "invalid_host"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    KEY_NOT_FOUND = "key_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    DUPLICATE_KEY = "duplicate_key"
    KEY_LIMIT_REACHED = "key_limit_reached"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    VALIDATION_ERROR = "validation_error"
    UNKNOWN_PROVIDER = "unknown_provider"
    INVALID_KEY_FORMAT = "invalid_key_format"
    KEY_REJECTED = "key_rejected"
    KEY_UNDECRYPTABLE = "key_undecryptable"
    INTERNAL_ERROR = "internal_error"
    KEYRING_UNAVAILABLE = "keyring_unavailable"
    STORE_UNAVAILABLE = "store_unavailable"


STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_JSON: 400,
    ErrorCode.INVALID_HOST: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.KEY_NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.DUPLICATE_KEY: 409,
    ErrorCode.KEY_LIMIT_REACHED: 409,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.VALIDATION_ERROR: 422,
    ErrorCode.UNKNOWN_PROVIDER: 422,
    ErrorCode.INVALID_KEY_FORMAT: 422,
    ErrorCode.KEY_REJECTED: 422,
    ErrorCode.KEY_UNDECRYPTABLE: 500,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.KEYRING_UNAVAILABLE: 503,
    ErrorCode.STORE_UNAVAILABLE: 503,
}


#: what a caller is told when the store does not answer (the details go to the server's log)
STORE_UNAVAILABLE_MESSAGE = "the key store is not available; see the server's log"


class ApiError(Exception):
    """An error the API answers with; raise it from a route."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        field: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers

    @property
    def status(self) -> int:
        """The HTTP status this error answers with."""
        return STATUS[self.code]

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def error_response(error: ApiError) -> JSONResponse:
    """The JSON answer for ``error``: its status, its code and message, never cached."""
    body = {"error": {"code": str(error.code), "message": error.message, "field": error.field}}
    headers = dict(error.headers)
    headers.setdefault("Cache-Control", "no-store")
    return JSONResponse(body, status_code=error.status, headers=headers)


def _field_of(exc: Exception, default: str | None) -> str | None:
    text = str(exc)
    if "workspace id" in text:
        return "workspace_id"
    if "label" in text:
        return "label"
    if "key id" in text:
        return "key_id"
    return default


def error_from_library(exc: ByokError) -> ApiError:
    """The API error for an error the key service raised. Messages are the library's own, which
    name the workspace, the provider and the key id, never a key."""
    message = str(exc)
    if isinstance(exc, NotAuthorized):
        return ApiError(ErrorCode.FORBIDDEN, message)
    if isinstance(exc, key_errors.KeyNotFound):
        return ApiError(ErrorCode.KEY_NOT_FOUND, message)
    if isinstance(exc, key_errors.UnknownProvider):
        return ApiError(ErrorCode.UNKNOWN_PROVIDER, message, "provider")
    if isinstance(exc, key_errors.InvalidKeyFormat):
        return ApiError(ErrorCode.INVALID_KEY_FORMAT, message, "api_key")
    if isinstance(exc, key_errors.InvalidInput):
        return ApiError(ErrorCode.VALIDATION_ERROR, message, _field_of(exc, None))
    if isinstance(exc, key_errors.KeyRejected):
        return ApiError(ErrorCode.KEY_REJECTED, message, "api_key")
    if isinstance(exc, key_errors.DuplicateKey):
        return ApiError(ErrorCode.DUPLICATE_KEY, message, "api_key")
    if isinstance(exc, key_errors.KeyLimitReached):
        return ApiError(ErrorCode.KEY_LIMIT_REACHED, message, "label")
    if isinstance(exc, key_errors.KeyringError):
        return ApiError(ErrorCode.KEYRING_UNAVAILABLE, message)
    if isinstance(exc, key_errors.StoreUnavailable):
        # the cause is the driver's (a host, a port, a database name): the operator's business,
        # in the server's log; the caller learns only that the store is down
        log.warning("%s", message)
        return ApiError(ErrorCode.STORE_UNAVAILABLE, STORE_UNAVAILABLE_MESSAGE)
    if isinstance(exc, CredentialUnavailable):
        return ApiError(ErrorCode.KEY_UNDECRYPTABLE, message)
    if isinstance(exc, OrganizationNotFound):
        return ApiError(ErrorCode.NOT_FOUND, message)
    log_unexpected(exc, "a key service error the API does not map")
    return ApiError(ErrorCode.INTERNAL_ERROR, "the server failed; see its log")


def log_unexpected(exc: BaseException, what: str) -> None:
    """Log an unexpected exception by type and stack, not by message: a third-party message (a
    database driver's, say) may quote the values of a statement."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("%s: %s.%s\n%s", what, type(exc).__module__, type(exc).__qualname__, frames)
