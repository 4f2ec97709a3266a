"""The ``byok`` hook contract: markers, hook specifications and the values that cross them.

Host engines and third-party plugins depend on this package alone.
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "byok"
ENTRY_POINT_GROUP = "byok"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

from byok_hookspecs.blocking import (  # noqa: E402
    NONBLOCKING_ATTRIBUTE,
    blocking_implementations,
    called_inline,
    calling_inline,
    declared_nonblocking,
)
from byok_hookspecs.errors import (  # noqa: E402  (the markers must exist first)
    BudgetExceeded,
    ByokError,
    CredentialUnavailable,
    NoCredential,
    NotAuthorized,
    UnpricedModel,
)
from byok_hookspecs.manager import (  # noqa: E402
    add_to,
    get_plugin_manager,
    selected_plugins,
    unmatched_plugin_names,
)
from byok_hookspecs.redaction import redact  # noqa: E402
from byok_hookspecs.types import (  # noqa: E402
    RECORD_STATUSES,
    USAGE_COUNTS,
    Action,
    Actor,
    AuditEvent,
    BudgetHold,
    BudgetReservation,
    BudgetSettlement,
    Charge,
    Credential,
    CredentialRequest,
    CredentialSource,
    FailureReason,
    KeyCheck,
    KeyCheckStatus,
    ProviderFailure,
    RecordedCall,
    Role,
    Usage,
    UsageRecord,
    WrappedDataKey,
)

__version__ = "0.1.0"

__all__ = [
    "ENTRY_POINT_GROUP",
    "NONBLOCKING_ATTRIBUTE",
    "PROJECT_NAME",
    "RECORD_STATUSES",
    "USAGE_COUNTS",
    "Action",
    "Actor",
    "AuditEvent",
    "BudgetExceeded",
    "BudgetHold",
    "BudgetReservation",
    "BudgetSettlement",
    "ByokError",
    "Charge",
    "Credential",
    "CredentialRequest",
    "CredentialSource",
    "CredentialUnavailable",
    "FailureReason",
    "KeyCheck",
    "KeyCheckStatus",
    "NoCredential",
    "NotAuthorized",
    "ProviderFailure",
    "RecordedCall",
    "Role",
    "UnpricedModel",
    "Usage",
    "UsageRecord",
    "WrappedDataKey",
    "add_to",
    "blocking_implementations",
    "called_inline",
    "calling_inline",
    "declared_nonblocking",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "redact",
    "selected_plugins",
    "unmatched_plugin_names",
]
