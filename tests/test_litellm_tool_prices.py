"""Tool prices imported from a LiteLLM-shaped price file: a model entry's
``search_context_cost_per_query`` prices its provider's own web-search tool, where the
provider's models agree; overlaid on the shipped table, a platform call using the tool is charged
that price."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from byok_hookspecs import Credential, CredentialSource, Usage

from byok_plugin.billing.catalog import shipped_catalog
from byok_plugin.billing.charges import Billing
from byok_plugin.billing.pricing import PriceError, load_price_file, shipped_prices

D = Decimal


def _entry(provider: str, medium: float | None, **extra: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "litellm_provider": provider,
        "mode": "chat",
        "input_cost_per_token": 3e-06,
        "output_cost_per_token": 1.5e-05,
        **extra,
    }
    if medium is not None:
        entry["search_context_cost_per_query"] = {
            "search_context_size_low": medium,
            "search_context_size_medium": medium,
            "search_context_size_high": medium,
        }
    return entry


def _write(tmp_path: Path, data: dict[str, object]) -> Path:
    path = tmp_path / "model_prices_and_context_window.json"
    path.write_text(json.dumps({"sample_spec": {}, **data}))
    return path


def test_web_search_prices_come_from_the_models_where_they_agree(tmp_path: Path) -> None:
    table = load_price_file(
        _write(
            tmp_path,
            {
                "claude-sonnet-4-5": _entry("anthropic", 0.02),
                "claude-haiku-4-5": _entry("anthropic", 0.02),
                "gemini/gemini-2.5-flash": _entry("gemini", 0.04),
                "gemini/gemini-2.5-pro": _entry("gemini", None),  # none: does not disagree
                "gpt-4o": _entry("openai", 0.035),
                "gpt-4o-search-preview": _entry("openai", 0.025),  # disagrees: not imported
                "mistral/mistral-small-latest": _entry("mistral", 0.01),  # no such tool here
            },
        )
    )
    prices = {key: tool.per_request for key, tool in table.tools.items()}
    assert prices == {
        ("anthropic", "web_search"): D("0.02"),
        ("google", "google_search"): D("0.04"),
    }
    assert table.tool("anthropic", "web_search").source == "litellm:claude-sonnet-4-5"

    # overlaid on the shipped table (Anthropic: $10 per 1,000), the imported price is charged
    billing = Billing(shipped_prices().overlaid(table), shipped_catalog())
    usage = Usage(
        "anthropic",
        "claude-sonnet-4-5",
        input_tokens=1000,
        output_tokens=100,
        tool_uses=(("web_search", 3),),
    )
    platform = Credential("k", "anthropic", CredentialSource.PLATFORM)
    charge = billing.charge(usage, platform)
    assert charge.amount == (D(3) * 1000 + D(15) * 100) / 1_000_000 + D("0.02") * 3
    # OpenAI's models disagreed: the shipped tool price stays
    assert billing.prices.tool("openai", "web_search") == shipped_prices().tool(
        "openai", "web_search"
    )


def test_a_bad_search_price_names_the_file_and_the_json_path(tmp_path: Path) -> None:
    path = _write(tmp_path, {"claude-sonnet-4-5": _entry("anthropic", -1)})
    with pytest.raises(PriceError) as caught:
        load_price_file(path)
    message = str(caught.value)
    assert str(path) in message
    assert "claude-sonnet-4-5.search_context_cost_per_query.search_context_size_medium" in message
