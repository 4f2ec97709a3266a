"""Which provider serves a model, inferred from the model's name where that is unambiguous.

The host keeps this small prefix table of its own instead of importing the plugin's catalog: the
host reaches the plugin only through the hooks, and the hooks have no "which provider" question.
Whether a model *exists* is a separate question, asked through ``byok_is_hosted`` (see
:func:`byok_plugin.host.workflow.check_models`); the table only routes.
"""

from __future__ import annotations

import re

__all__ = [
    "ANTHROPIC_MAX_SEARCHES",
    "MODEL_PROVIDERS",
    "TOOL_PROVIDERS",
    "WEB_SEARCH_TOOLS",
    "infer_provider",
    "web_search_refusal",
]

#: providers an agent block can call
MODEL_PROVIDERS = ("openai", "anthropic", "google", "mistral")
#: tools a block can call, with the provider and the catalog name they are billed under
TOOL_PROVIDERS = {"exa_search": ("exa", "exa-search")}
#: the providers whose own web search an agent block can enable (``"web_search"``), and the name
#: the search is billed under (``Usage.tool_uses``, the price table's ``provider/tool``)
WEB_SEARCH_TOOLS = {"anthropic": "web_search", "google": "google_search", "openai": "web_search"}
#: searches an Anthropic call may make when the block names no ``max_uses``: sent as the tool's
#: ``max_uses``, so the call's worst case (its budget hold) is bounded
ANTHROPIC_MAX_SEARCHES = 5

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


def web_search_refusal(provider: str, model: str) -> str | None:
    """Why ``provider``'s ``model`` cannot search the web by itself, or ``None`` when it can.

    OpenAI's Chat Completions search only with its search models (``web_search_options``,
    https://platform.openai.com/docs/guides/tools-web-search?api-mode=chat); Mistral's have no web
    search (it is an Agents API connector).
    """
    if provider not in WEB_SEARCH_TOOLS:
        return (
            f"{provider} chat completions have no web search of their own; use an exa_search tool"
        )
    if provider == "openai" and "search" not in model.lower():
        return (
            f"OpenAI chat completions search the web only with a search model "
            f"(gpt-4o-search-preview, gpt-4o-mini-search-preview...), not {model!r}; use an "
            f"exa_search tool"
        )
    return None
