"""What a price (or catalog) file may say is bounded where it ends up: the declared version is
recorded with every charge (VARCHAR(200)), names are shown in messages, and no price passes the
documented cap, whatever the file's format. Each fault is refused as the file is read, in one
printable line naming the file and the JSON path."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from byok_hookspecs import Credential, CredentialSource, Usage, UsageRecord

from byok_plugin.app import App
from byok_plugin.billing.catalog import CatalogError, load_catalog
from byok_plugin.billing.pricing import (
    _MAX_PRICE,
    MAX_VERSION_LENGTH,
    PriceError,
    load_price_file,
    shipped_prices,
)
from byok_plugin.host.providers.base import MAX_TOKEN_COUNT
from byok_plugin.manager import plugin_manager_for
from byok_plugin.settings import MAX_CHARGE_MULTIPLIER, Settings

MODELS = {"openai/gpt-4o": {"input": "2.5", "output": "10"}}


def _app(database_url: str, home: Path, **extra: str) -> App:
    return App(
        Settings.from_environ({"BYOK_HOME": str(home), "BYOK_DATABASE_URL": database_url, **extra})
    )


def _refusal(path: Path, error: type[ValueError] = PriceError) -> str:
    """The one-line message loading ``path`` gives; it names the file and is printable."""
    with pytest.raises(error) as info:
        load_price_file(path) if error is PriceError else load_catalog(path)
    message = str(info.value)
    assert message.startswith(f"{'prices' if error is PriceError else 'catalog'} {path}: ")
    assert message.isprintable(), repr(message)  # no line break, ESC or bidi override
    return message


def _platform(provider: str) -> Credential:
    return Credential(
        api_key="sk-not-a-real-key-000000",
        provider=provider,
        source=CredentialSource.PLATFORM,
        key_id="platform:1",
    )


# --- the declared version ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("v" * (MAX_VERSION_LENGTH + 1), f"must be at most {MAX_VERSION_LENGTH} characters"),
        ("v" * 250 + "\x1b[31mred", "must not hold control characters"),
        ("2026-12\x1b]0;owned\x07", "must not hold control characters"),
        ("line one\nline two", "must not hold control characters"),
        ("2026-12\u202e", "must not hold control characters"),
        ("tab\there", "must not hold control characters"),
    ],
)
def test_a_long_or_unprintable_version_is_refused_as_the_file_is_read(
    tmp_path: Path, version: str, expected: str
) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"version": version, "models": MODELS}))
    message = _refusal(path)
    assert f": version: {expected}" in message, message
    assert len(message) < 300  # the value is quoted in part, not whole


def test_the_longest_version_is_recorded_with_every_charge_and_one_more_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    # what the ledger records is "<shipped version>+<file version>" in a VARCHAR(200): on
    # PostgreSQL a longer one failed every insert while the calls went on
    longest = "é" * MAX_VERSION_LENGTH  # characters, not bytes: the column counts characters
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"version": longest + "x", "models": MODELS}))
    with pytest.raises(PriceError, match=r": version: must be at most"):
        _app(database_url, tmp_path, BYOK_PRICE_FILE=str(prices)).billing  # noqa: B018

    prices.write_text(json.dumps({"version": longest, "models": MODELS}))
    app = _app(database_url, tmp_path, BYOK_PRICE_FILE=str(prices))
    pm = plugin_manager_for(app, load_entrypoints=False)
    try:
        usage = Usage("openai", "gpt-4o", input_tokens=1000, output_tokens=100)
        charge = pm.hook.byok_compute_charge(usage=usage, credential=_platform("openai"))
        assert charge.price_version == f"{shipped_prices().version}+{longest}"
        pm.hook.byok_record_usage(
            record=UsageRecord(
                idempotency_key="run-v:b1",
                workspace_id="acme",
                usage=usage,
                charge=charge,
                source=CredentialSource.PLATFORM,
                key_id="platform:1",
            )
        )
        stored = app.ledger.get("run-v:b1")
        assert stored is not None
        assert stored.price_version == charge.price_version
        assert stored.amount == Decimal("0.0035")
    finally:
        app.close()


# --- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (
            {"models": {"openai/gpt\x1b[2J": {"input": 1, "output": 1}}},
            "models.openai/gpt\\u001b[2J: the name 'gpt\\u001b[2J' holds a control character",
        ),
        (
            {"models": {"open\nai/gpt-4o": {"input": 1, "output": 1}}},
            "models.open\\u000aai/gpt-4o: the provider 'open\\u000aai' holds a control character",
        ),
        (
            {"models": {"openai/" + "m" * 201: {"input": 1, "output": 1}}},
            "the name is longer than 200 characters",
        ),
        (
            {"models": {"p" * 41 + "/m": {"input": 1, "output": 1}}},
            "the provider is longer than 40 characters",
        ),
        (
            {"models": {}, "tools": {"anthropic/web\u2028search": {"per_request": 1}}},
            "tools.anthropic/web\\u2028search: the name",
        ),
        (
            {"gpt\x1b[2J": {"litellm_provider": "openai", "input_cost_per_token": 1e-6}},
            "gpt\\u001b[2J: the name 'gpt\\u001b[2J' holds a control character",
        ),
        (
            # a fault under a key with a line break: still one line
            {"models": {"openai/a\nb": {"input": -1, "output": 1}}},
            "models.openai/a\\u000ab: the name",
        ),
    ],
)
def test_a_price_entry_named_with_control_characters_or_too_long_is_refused(
    tmp_path: Path, document: dict, expected: str
) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(document))
    message = _refusal(path)
    assert expected in message, message


def test_a_catalog_fault_under_a_key_with_a_line_break_is_one_printable_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"models": {"gpt\n\x1b[31m": {"provider": "openai"}}}))
    message = _refusal(path, CatalogError)
    assert "models.gpt\\u000a\\u001b[31m: must not hold control characters" in message
    path.write_text(json.dumps({"providers": {"openai": {"name": "Open\u202eAI"}}}))
    assert "providers.openai.name: must not hold control characters" in _refusal(path, CatalogError)


# --- the price cap, in LiteLLM's format too ------------------------------------------------------


def _litellm(tmp_path: Path, **fields: object) -> Path:
    path = tmp_path / "litellm.json"
    entry = {"litellm_provider": "anthropic", "mode": "chat", **fields}
    path.write_text(json.dumps({"sample_spec": {}, "claude-top": entry}))
    return path


@pytest.mark.parametrize(
    "fields",
    [
        {"input_cost_per_token": 1000000, "output_cost_per_token": 1},
        {"input_cost_per_token": 1.000001, "output_cost_per_token": 1},
        {"input_cost_per_token": 1, "output_cost_per_token": 1, "cache_read_input_token_cost": 2},
        {
            "input_cost_per_token": 1,
            "output_cost_per_token": 1,
            "input_cost_per_token_above_200k_tokens": 1.5,
        },
    ],
)
def test_a_litellm_price_per_token_over_the_cap_per_1m_tokens_is_refused(
    tmp_path: Path, fields: dict
) -> None:
    # LiteLLM prices per token: 1 USD a token is the cap (1,000,000 per 1M tokens); the cap was
    # checked before the conversion, so 1,000,000 a token loaded as 10^12 per 1M tokens
    path = _litellm(tmp_path, **fields)
    message = _refusal(path)
    assert "must be at most 1 (USD per token: 1000000 per 1M tokens)" in message, message
    assert "claude-top." in message


def test_litellm_prices_at_the_cap_give_the_largest_charge_and_one_more_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    # every per-token price at the cap, every count at the most a provider's answer may report
    # (two usage fields can add into one count), the largest multiplier: the same worst case as
    # the package's own format (test_ledger), within NUMERIC(30, 12)
    fields = (
        "input_cost_per_token",
        "cache_read_input_token_cost",
        "cache_creation_input_token_cost",
        "cache_creation_input_token_cost_above_1hr",
        "output_cost_per_token",
        "output_cost_per_reasoning_token",
        "input_cost_per_audio_token",
        "output_cost_per_audio_token",
    )
    over = _litellm(
        tmp_path, **{**dict.fromkeys(fields, 1), "output_cost_per_token": 1.000000000001}
    )
    with pytest.raises(PriceError, match=r"claude-top\.output_cost_per_token: must be at most 1"):
        load_price_file(over)
    prices = _litellm(tmp_path, **dict.fromkeys(fields, 1))
    table = load_price_file(prices)
    price = table.price("anthropic", "claude-top")
    assert price is not None
    assert price.rates.input == price.rates.output_audio == _MAX_PRICE
    app = _app(
        database_url,
        tmp_path,
        BYOK_PRICE_FILE=str(prices),
        BYOK_CHARGE_MULTIPLIER=str(MAX_CHARGE_MULTIPLIER),
    )
    pm = plugin_manager_for(app, load_entrypoints=False)
    try:
        most = 2 * MAX_TOKEN_COUNT
        usage = Usage(
            "anthropic",
            "claude-top",
            input_tokens=most,
            cached_input_tokens=most,
            cache_write_tokens=most,
            cache_write_1h_tokens=most,
            output_tokens=most,
            reasoning_tokens=most,
            input_audio_tokens=most,
            output_audio_tokens=most,
        )
        charge = pm.hook.byok_compute_charge(usage=usage, credential=_platform("anthropic"))
        # reasoning restates the output price, so LiteLLM's reasoning field is dropped: still
        # 8 counts x 2e10 tokens x $1 a token, times 1000
        assert charge.list_cost == Decimal(8 * most)
        assert charge.amount == charge.list_cost * MAX_CHARGE_MULTIPLIER
        pm.hook.byok_record_usage(
            record=UsageRecord(
                idempotency_key="run-litellm-top:b1",
                workspace_id="acme",
                usage=usage,
                charge=charge,
                source=CredentialSource.PLATFORM,
                key_id="platform:1",
            )
        )
        stored = app.ledger.get("run-litellm-top:b1")
        assert stored is not None
        assert (stored.amount, stored.list_cost) == (charge.amount, charge.list_cost)
    finally:
        app.close()


@pytest.mark.parametrize(
    ("providers", "expected"),
    [
        ({"p" * 41: {"name": "P"}}, "a provider id is at most 40 characters"),
        (
            {"openai": {"env_prefixes": ["OPEN AI"]}},
            "providers.openai.env_prefixes[0]: must be 1-40 letters, digits or '_'",
        ),
        (
            {"openai": {"env_prefixes": ["OPENAI", "K" * 41]}},
            "providers.openai.env_prefixes[1]: must be 1-40",
        ),
        ({"openai": {"env_prefixes": ["OPENAI\x1b"]}}, "env_prefixes[0]: must not hold control"),
    ],
)
def test_catalog_text_that_names_platform_keys_fits_the_key_id_columns(
    tmp_path: Path, providers: dict, expected: str
) -> None:
    # a platform key's id is env:<prefix>_API_KEY_<n> or env:BYOK_PLATFORM_KEYS_<PROVIDER>[i],
    # recorded with every call it serves (ledger key_id VARCHAR(120), audit key_id VARCHAR(80))
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"providers": providers}))
    assert expected in _refusal(path, CatalogError)
