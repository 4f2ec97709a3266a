"""Which provider serves a model, inferred from the model's name where that is unambiguous.

The host keeps this small prefix table of its own instead of importing the plugin's catalog: the
host reaches the plugin only through the hooks, and the hooks have no "which provider" question.
Whether a model *exists* is a separate question, asked through ``byok_is_hosted`` (see
:func:`byok_plugin.host.workflow.check_models`); the table only routes.
"""

from __future__ import annotations

import re

__all__ = ["MODEL_PROVIDERS", "TOOL_PROVIDERS", "infer_provider"]

#: providers an agent block can call
MODEL_PROVIDERS = ("openai", "anthropic", "google", "mistral")
#: tools a block can call, with the provider and the catalog name they are billed under
TOOL_PROVIDERS = {"exa_search": ("exa", "exa-search")}

_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(ft:)?(gpt-|chatgpt-)"), "openai"),
    (re.compile(r"^(ft:)?o[1-9](-|$)"), "openai"),
    (re.compile(r"^claude-"), "anthropic"),
    (re.compile(r"^(models/)?gemini-"), "google"),
    (
        re.compile(
            r"^(ft:)?(mistral-|ministral-|codestral|magistral-|devstral-|pixtral-|open-mistral-)"
        ),
        "mistral",
    ),
)


def infer_provider(model: str) -> str | None:
    """The provider whose naming the model follows, or ``None`` when no rule (or more than one)
    matches."""
    found = {provider for pattern, provider in _RULES if pattern.match(model.strip().lower())}
    return found.pop() if len(found) == 1 else None
