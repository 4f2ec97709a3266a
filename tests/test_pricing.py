"""The price table: shipped coverage, agreement with LiteLLM, user files and the LiteLLM loader."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from byok_hookspecs import Usage

from byok_plugin.billing.catalog import shipped_catalog
from byok_plugin.billing.pricing import (
    Price,
    PriceError,
    TokenRates,
    list_cost,
    load_price_file,
    parse_litellm_prices,
    prices_for,
    shipped_prices,
)
from byok_plugin.settings import Settings

FIXTURES = Path(__file__).parent / "fixtures"
LITELLM_EXCERPT = FIXTURES / "litellm_prices_excerpt.json"
SHIPPED_JSON = Path(__file__).parents[1] / "byok_plugin" / "data" / "prices.json"
RATE_NAMES = ("input", "cached_input", "cache_write", "cache_write_1h", "output", "reasoning")


def _shipped_raw() -> dict:
    return json.loads(SHIPPED_JSON.read_text(), parse_float=Decimal)


def test_every_catalog_model_and_tool_has_a_dated_price() -> None:
    catalog = shipped_catalog()
    table = shipped_prices()
    assert table.version == "2026-12-05"
    for info in catalog.models.values():
        price = table.price(info.provider, info.id)
        assert price is not None, f"no price for {info.provider}/{info.id}"
        assert price.as_of, f"{info.provider}/{info.id} is not dated"
        assert price.source, f"{info.provider}/{info.id} does not say where its price comes from"
        if info.kind == "tool":
            assert price.per_request is not None
        else:
            assert price.rates.input is not None
            assert price.rates.output is not None
    # and nothing priced that the catalog does not know
    for provider, model in table.entries:
        assert catalog.model(provider, model) is not None, f"{provider}/{model} not in catalog"


def test_amounts_are_decimals_read_from_the_text_not_floats() -> None:
    for price in shipped_prices().entries.values():
        for name in RATE_NAMES:
            value = getattr(price.rates, name)
            assert value is None or type(value) is Decimal
    gpt5 = shipped_prices().price("openai", "gpt-5")
    assert gpt5 is not None
    assert gpt5.rates.cached_input == Decimal("0.125")
    assert str(gpt5.rates.cached_input) == "0.125"  # not 0.12500000000000000694...


def _litellm_view(price: Price) -> dict[str, Decimal | None]:
    view: dict[str, Decimal | None] = {name: getattr(price.rates, name) for name in RATE_NAMES}
    view["per_request"] = price.per_request
    if price.long_context is not None:
        view["long_context_threshold"] = Decimal(price.long_context_threshold or 0)
        for name in RATE_NAMES:
            view[f"long_{name}"] = getattr(price.long_context, name)
    return view


def test_shipped_prices_agree_with_litellm_or_say_why_not() -> None:
    """For every model both have: equal prices, or a documented, sourced difference."""
    raw = _shipped_raw()["models"]
    litellm = json.loads(LITELLM_EXCERPT.read_text(), parse_float=Decimal)
    litellm_table = parse_litellm_prices(litellm, source=str(LITELLM_EXCERPT))
    compared = 0
    documented = 0
    for key, entry in raw.items():
        litellm_key = entry.get("litellm_key")
        assert litellm_key, f"{key} does not say which LiteLLM entry it was checked against"
        assert litellm_key in litellm, f"{litellm_key} missing from the LiteLLM excerpt"
        ours = shipped_prices().price(*key.split("/", 1))
        assert ours is not None
        theirs = next(
            p for p in litellm_table.entries.values() if p.source == f"litellm:{litellm_key}"
        )
        ours_view, theirs_view = _litellm_view(ours), _litellm_view(theirs)
        compared += 1
        if ours_view == theirs_view:
            assert "litellm_difference" not in entry, f"{key} documents a difference it has not"
            continue
        difference = entry.get("litellm_difference")
        assert difference, f"{key} differs from LiteLLM {litellm_key} without saying why"
        assert difference["source"].startswith("https://")
        assert len(difference["why"]) > 20
        # the note must state LiteLLM's numbers as they are
        for name, value in difference["litellm"].items():
            quoted = None if value is None else Decimal(str(value))  # null: LiteLLM has no price
            assert theirs_view[name] == quoted, f"{key}: LiteLLM's {name} misquoted"
        # and every rate that differs is quoted
        differing = {n for n in ours_view if ours_view[n] != theirs_view[n]}
        assert differing <= set(difference["litellm"]), f"{key}: {differing} not all explained"
        documented += 1
    assert compared == len(raw) == 25
    # the five Mistral models (cache reads at 10%; codestral-latest's price too)
    assert documented == 5


def test_litellm_loader_converts_per_token_to_per_million_exactly() -> None:
    table = load_price_file(LITELLM_EXCERPT)
    assert table.version.startswith("litellm@sha256:")
    sonnet = table.price("anthropic", "claude-sonnet-4-5")
    assert sonnet is not None
    assert sonnet.rates == TokenRates(
        input=Decimal("3"),
        cached_input=Decimal("0.3"),
        cache_write=Decimal("3.75"),
        cache_write_1h=Decimal("6"),
        output=Decimal("15"),
    )
    assert sonnet.long_context_threshold == 200_000
    assert sonnet.long_context == TokenRates(
        input=Decimal("6"),
        cached_input=Decimal("0.6"),
        cache_write=Decimal("7.5"),
        cache_write_1h=Decimal("12"),
        output=Decimal("22.5"),
    )
    nano = table.price("openai", "gpt-5-nano")
    assert nano is not None
    assert nano.rates.cached_input == Decimal("0.005")
    # gemini/ becomes google; a reasoning price equal to the output price is not kept apart
    flash = table.price("google", "gemini-2.5-flash")
    assert flash is not None
    assert flash.rates.reasoning is None
    assert flash.rates.output == Decimal("2.5")
    # a search tool: the cheapest tier is the default request's price
    exa = table.price("exa", "exa-search")
    assert exa is not None
    assert exa.per_request == Decimal("0.005")
    assert exa.reported_cost
    # other providers keep LiteLLM's name; images, embeddings and sample_spec are skipped
    assert table.price("bedrock", "us.anthropic.claude-3-5-haiku-20241022-v1:0") is not None
    assert table.price("openai", "1024-x-1024/dall-e-2") is None
    assert table.price("google", "gemini-embedding-001") is None
    assert all(model != "sample_spec" for _, model in table.entries)


def test_litellm_file_as_the_price_source(tmp_path: Path) -> None:
    settings = Settings.from_environ(
        {"BYOK_HOME": str(tmp_path), "BYOK_PRICE_FILE": str(LITELLM_EXCERPT)}
    )
    table = prices_for(settings)
    assert table.version.startswith("2026-12-05+litellm@sha256:")
    codestral = table.price("mistral", "codestral-latest")
    assert codestral is not None
    assert codestral.rates.input == Decimal("1")


def test_user_price_file_replaces_whole_entries_and_is_versioned(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps(
            {
                "version": "acme-2026-12",
                "models": {
                    "openai/gpt-4o": {"input": "2.00", "output": "8.00"},
                    "acme/house-model": {"input": 1, "output": 2},
                },
            }
        )
    )
    table = prices_for(
        Settings.from_environ({"BYOK_HOME": str(tmp_path), "BYOK_PRICE_FILE": str(path)})
    )
    assert table.version == "2026-12-05+acme-2026-12"
    gpt4o = table.price("openai", "gpt-4o")
    assert gpt4o is not None
    assert gpt4o.rates == TokenRates(input=Decimal("2.00"), output=Decimal("8.00"))  # no cached
    assert table.price("acme", "house-model") is not None
    assert table.price("openai", "gpt-4.1") == shipped_prices().price("openai", "gpt-4.1")

    unversioned = tmp_path / "u.json"
    unversioned.write_text(json.dumps({"models": {"openai/gpt-4o": {"input": 1, "output": 1}}}))
    assert load_price_file(unversioned).version.startswith("sha256:")


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        ({"gpt-4o": {"input": 1}}, "models.gpt-4o: the key must be 'provider/model'"),
        ({"openai/x": {"input": -1}}, "models.openai/x.input: must be a finite number >= 0"),
        ({"openai/x": {"input": "cheap"}}, "models.openai/x.input: must be a number"),
        ({"openai/x": {"input": True}}, "models.openai/x.input: must be a number"),
        ({"openai/x": {"inptu": 1}}, "models.openai/x: unknown fields ['inptu']"),
        ({"openai/x": {}}, "models.openai/x: has no price"),
        (
            {"openai/x": {"input": 1, "long_context": {"threshold": 0}}},
            "models.openai/x.long_context.threshold: must be a positive integer",
        ),
    ],
)
def test_bad_price_file_names_the_file_and_the_json_path(
    tmp_path: Path, models: dict, expected: str
) -> None:
    path = tmp_path / "bad-prices.json"
    path.write_text(json.dumps({"models": models}))
    with pytest.raises(PriceError) as info:
        load_price_file(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_unreadable_price_file(tmp_path: Path) -> None:
    with pytest.raises(PriceError, match="cannot be read"):
        load_price_file(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(PriceError, match=r"broken\.json: not valid JSON"):
        load_price_file(broken)
    wrong_currency = tmp_path / "eur.json"
    wrong_currency.write_text(json.dumps({"currency": "EUR", "models": {}}))
    with pytest.raises(PriceError, match="only USD"):
        load_price_file(wrong_currency)


def test_long_context_prices_apply_above_the_threshold_only() -> None:
    sonnet = shipped_prices().price("anthropic", "claude-sonnet-4-5")
    assert sonnet is not None
    at = Usage("anthropic", "claude-sonnet-4-5", input_tokens=150_000, cached_input_tokens=50_000)
    above = Usage(
        "anthropic", "claude-sonnet-4-5", input_tokens=150_001, cached_input_tokens=50_000
    )
    # at 200,000 prompt tokens: 150000 * 3 + 50000 * 0.30 per 1M
    assert list_cost(sonnet, at)[0] == Decimal("0.45") + Decimal("0.015")
    # at 200,001: 150001 * 6 + 50000 * 0.60 per 1M
    assert list_cost(sonnet, above)[0] == Decimal("0.900006") + Decimal("0.03")


def test_missing_kind_of_price_falls_back_as_the_provider_bills() -> None:
    price = Price("acme", "m", rates=TokenRates(input=Decimal("2"), output=Decimal("10")))
    usage = Usage(
        "acme", "m", cached_input_tokens=1000, cache_write_tokens=1000, reasoning_tokens=1000
    )
    total, breakdown = list_cost(price, usage)
    # cached and cache-write tokens at the input price, reasoning at the output price
    assert dict(breakdown) == {
        "cached_input": Decimal("0.002"),
        "cache_write": Decimal("0.002"),
        "reasoning": Decimal("0.01"),
    }
    assert total == Decimal("0.014")
