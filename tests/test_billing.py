"""The default charge, checked by hand on real token counts for each provider.

Every expected amount below is written out as the arithmetic a person would do with the provider's
price page (USD per 1M tokens), so a wrong price or a wrong rule fails here.
"""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from pathlib import Path

import pytest
from byok_hookspecs import Credential, CredentialSource, UnpricedModel, Usage, UsageRecord

from byok_plugin.app import App
from byok_plugin.billing.catalog import shipped_catalog
from byok_plugin.billing.charges import MAX_MONEY, Billing, IncompletePrice, money
from byok_plugin.billing.pricing import load_price_file, shipped_prices
from byok_plugin.billing.usage_report import build_report
from byok_plugin.manager import plugin_manager_for
from byok_plugin.settings import Settings

D = Decimal


def _billing(multiplier: str = "1", allow_unpriced: bool = False) -> Billing:
    return Billing(
        prices=shipped_prices(),
        catalog=shipped_catalog(),
        multiplier=D(multiplier),
        allow_unpriced=allow_unpriced,
    )


def _credential(source: CredentialSource, provider: str = "openai") -> Credential:
    return Credential(api_key="sk-test-not-real", provider=provider, source=source)


PLATFORM = CredentialSource.PLATFORM

# (usage, expected list cost written as a sum of tokens x USD per 1M tokens)
HAND_CHECKED = [
    pytest.param(
        # gpt-5: $1.25 in, $0.125 cached, $10 out; reasoning tokens are billed as output
        Usage(
            "openai",
            "gpt-5",
            input_tokens=12_000,
            cached_input_tokens=4_096,
            output_tokens=1_500,
            reasoning_tokens=2_304,
        ),
        (12_000 * D("1.25") + 4_096 * D("0.125") + 1_500 * D(10) + 2_304 * D(10)) / 10**6,
        D("0.053552"),
        id="openai-gpt-5-cached-and-reasoning",
    ),
    pytest.param(
        # gpt-4o-mini by its dated alias: $0.15 in, $0.075 cached, $0.60 out
        Usage(
            "openai",
            "gpt-4o-mini-2024-07-18",
            input_tokens=1_000,
            cached_input_tokens=2_048,
            output_tokens=250,
        ),
        (1_000 * D("0.15") + 2_048 * D("0.075") + 250 * D("0.60")) / 10**6,
        D("0.0004536"),
        id="openai-alias",
    ),
    pytest.param(
        # claude-sonnet-4-5: $3 in, $0.30 cache read, $3.75 cache write, $15 out (thinking too)
        Usage(
            "anthropic",
            "claude-sonnet-4-5",
            input_tokens=3_000,
            cached_input_tokens=20_000,
            cache_write_tokens=10_000,
            output_tokens=800,
            reasoning_tokens=1_200,
        ),
        (3_000 * D(3) + 20_000 * D("0.30") + 10_000 * D("3.75") + 2_000 * D(15)) / 10**6,
        D("0.0825"),
        id="anthropic-sonnet-cache-read-write-thinking",
    ),
    pytest.param(
        # over 200k prompt tokens: $6 in, $0.60 cache read, $22.50 out for the whole call
        Usage(
            "anthropic",
            "claude-sonnet-4-5",
            input_tokens=150_000,
            cached_input_tokens=60_000,
            output_tokens=2_000,
        ),
        (150_000 * D(6) + 60_000 * D("0.60") + 2_000 * D("22.50")) / 10**6,
        D("0.981"),
        id="anthropic-long-context",
    ),
    pytest.param(
        # claude-haiku-4-5: $1 in, $0.10 read, $1.25 write, $5 out
        Usage(
            "anthropic",
            "claude-haiku-4-5",
            input_tokens=900,
            cached_input_tokens=5_000,
            cache_write_tokens=4_000,
            output_tokens=300,
        ),
        (900 * D(1) + 5_000 * D("0.10") + 4_000 * D("1.25") + 300 * D(5)) / 10**6,
        D("0.0079"),
        id="anthropic-haiku",
    ),
    pytest.param(
        # gemini-2.5-flash: $0.30 in, $0.03 cached, $2.50 out, thinking at the output price
        Usage(
            "google",
            "gemini-2.5-flash",
            input_tokens=10_000,
            cached_input_tokens=2_000,
            output_tokens=500,
            reasoning_tokens=1_500,
        ),
        (10_000 * D("0.30") + 2_000 * D("0.03") + 2_000 * D("2.50")) / 10**6,
        D("0.00806"),
        id="google-flash-cached-and-thinking",
    ),
    pytest.param(
        # gemini-2.5-pro: $1.25 in, $0.125 cached, $10 out (under 200k)
        Usage(
            "google",
            "gemini-2.5-pro",
            input_tokens=40_000,
            cached_input_tokens=8_000,
            output_tokens=1_000,
            reasoning_tokens=3_000,
        ),
        (40_000 * D("1.25") + 8_000 * D("0.125") + 4_000 * D(10)) / 10**6,
        D("0.091"),
        id="google-pro",
    ),
    pytest.param(
        # mistral-large-latest (Large 3): $0.50 in, $1.50 out
        Usage("mistral", "mistral-large-latest", input_tokens=5_000, output_tokens=1_000),
        (5_000 * D("0.50") + 1_000 * D("1.50")) / 10**6,
        D("0.004"),
        id="mistral-large",
    ),
    pytest.param(
        # mistral-small-latest with a prompt-cache hit: $0.06 in, $0.006 cached (10%), $0.18 out
        Usage(
            "mistral",
            "mistral-small-latest",
            input_tokens=1_000,
            cached_input_tokens=64_000,
            output_tokens=500,
        ),
        (1_000 * D("0.06") + 64_000 * D("0.006") + 500 * D("0.18")) / 10**6,
        D("0.000534"),
        id="mistral-small-cache-hit",
    ),
    pytest.param(
        # magistral-medium-latest: $2 in, $5 out, reasoning billed as output
        Usage(
            "mistral",
            "magistral-medium-latest",
            input_tokens=2_000,
            output_tokens=300,
            reasoning_tokens=700,
        ),
        (2_000 * D(2) + 1_000 * D(5)) / 10**6,
        D("0.009"),
        id="mistral-magistral-reasoning",
    ),
    pytest.param(
        # Exa reports its own cost (a 26-100 result search costs $0.025): the reported cost wins
        Usage("exa", "exa-search", tool_requests=1, reported_cost=D("0.025")),
        D("0.025"),
        D("0.025"),
        id="exa-reported-cost",
    ),
    pytest.param(
        # without a reported cost: $0.005 per search
        Usage("exa", "exa-search", tool_requests=2),
        2 * D("0.005"),
        D("0.01"),
        id="exa-table-price",
    ),
]


@pytest.mark.parametrize(("usage", "arithmetic", "written"), HAND_CHECKED)
def test_platform_charge_is_list_price_checked_by_hand(
    usage: Usage, arithmetic: Decimal, written: Decimal
) -> None:
    assert arithmetic == written  # the test's own sum, done twice
    charge = _billing().charge(usage, _credential(PLATFORM, usage.provider))
    assert charge.amount == written
    assert charge.list_cost == written
    assert charge.reason == "platform"
    assert charge.currency == "USD"
    assert charge.price_version == "2026-12-05"
    assert sum((amount for _, amount in charge.breakdown), D(0)) == written


@pytest.mark.parametrize(("usage", "arithmetic", "written"), HAND_CHECKED)
def test_byok_is_charged_zero_and_keeps_the_list_cost(
    usage: Usage, arithmetic: Decimal, written: Decimal
) -> None:
    charge = _billing().charge(usage, _credential(CredentialSource.WORKSPACE, usage.provider))
    assert charge.amount == D(0)
    assert charge.reason == "byok"
    assert charge.list_cost == written  # what BYOK saved the workspace


def test_block_key_is_charged_zero() -> None:
    usage = Usage("openai", "gpt-4o", input_tokens=1_000, output_tokens=100)
    charge = _billing().charge(usage, _credential(CredentialSource.BLOCK))
    assert (charge.amount, charge.reason) == (D(0), "block_key")
    assert charge.list_cost == (1_000 * D("2.50") + 100 * D(10)) / 10**6


def test_multiplier_applies_to_platform_calls_only() -> None:
    usage = Usage("openai", "gpt-4.1", input_tokens=1_000_000, output_tokens=100_000)
    billing = _billing("1.2")
    # $2.00 + 0.1 x $8.00 = $2.80 at list price; x 1.2 = $3.36
    platform = billing.charge(usage, _credential(PLATFORM))
    assert platform.list_cost == D("2.80")
    assert platform.amount == D("3.36")
    assert billing.charge(usage, _credential(CredentialSource.WORKSPACE)).amount == D(0)


def test_hook_byok_compute_charge_uses_the_multiplier_from_the_environment(tmp_path: Path) -> None:
    settings = Settings.from_environ({"BYOK_HOME": str(tmp_path), "BYOK_CHARGE_MULTIPLIER": "1.05"})
    pm = plugin_manager_for(App(settings), load_entrypoints=False, environ={})
    usage = Usage("mistral", "mistral-large-latest", input_tokens=5_000, output_tokens=1_000)
    charge = pm.hook.byok_compute_charge(usage=usage, credential=_credential(PLATFORM, "mistral"))
    assert charge.list_cost == D("0.004")
    assert charge.amount == D("0.0042")
    byok = pm.hook.byok_compute_charge(
        usage=usage, credential=_credential(CredentialSource.WORKSPACE, "mistral")
    )
    assert byok.amount == D(0)
    assert byok.reason == "byok"


def test_amounts_keep_twelve_decimal_places() -> None:
    # 1 token of gpt-5-nano input costs $0.00000005; x 1.0000001 needs rounding to 12 places
    usage = Usage("openai", "gpt-5-nano", input_tokens=1)
    charge = _billing("1.0000001").charge(usage, _credential(PLATFORM))
    assert charge.list_cost == D("0.00000005")
    assert charge.amount == D("0.000000050000")  # 5.0000005e-8 rounded half-even to 1e-12
    assert money(D("0.0000000000005")) == D("0E-12")
    assert money(D("0.0000000000015")) == D("2E-12")


def test_money_rounds_every_amount_the_ledger_holds_and_refuses_the_rest() -> None:
    # 17 digits before the point and 13 after: beyond the default 28-digit context, which
    # raised decimal.InvalidOperation from 10^16 on
    assert money(D("12345678901234567.0000000000005")) == D("12345678901234567.000000000000")
    assert money(D("-999999999999999999.999999999999")) == D("-999999999999999999.999999999999")
    for amount in (MAX_MONEY, -MAX_MONEY, D("1e30"), D("NaN"), D("Infinity")):
        with pytest.raises(ValueError, match="under 10\\^18"):
            money(amount)


def test_unpriced_platform_call_is_refused_before_the_call_and_recorded_after_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    usage = Usage("openai", "gpt-99-preview", input_tokens=10, output_tokens=10)
    billing = _billing()
    with pytest.raises(UnpricedModel, match="gpt-99-preview"):
        billing.require_price("openai", "gpt-99-preview")
    billing.require_price("openai", "gpt-4o-2024-08-06")  # an alias is priced
    # a completed call that still cannot be priced is charged 0 as "unpriced", loudly, never
    # raised: raising would leave the platform-paid call with no ledger row at all
    with caplog.at_level(logging.ERROR, logger="byok.billing"):
        charge = billing.charge(usage, _credential(PLATFORM))
    assert (charge.amount, charge.reason, charge.list_cost) == (D(0), "unpriced", None)
    assert charge.price_version == billing.price_version
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "gpt-99-preview" in caplog.text
    # the workspace's own key on an unpriced model is fine: 0, and nothing to save
    byok = billing.charge(usage, _credential(CredentialSource.WORKSPACE))
    assert byok.amount == D(0)
    assert byok.list_cost is None


@pytest.mark.parametrize(
    ("provider", "snapshot", "base"),
    [
        ("openai", "gpt-4o-mini-2099-01-31", "gpt-4o-mini"),
        ("anthropic", "claude-sonnet-4-5-20991231", "claude-sonnet-4-5"),
    ],
)
def test_a_dated_snapshot_the_catalog_does_not_list_is_priced_as_its_base_model(
    provider: str, snapshot: str, base: str
) -> None:
    billing = _billing("1.5")
    assert billing.catalog.canonical(provider, snapshot) == snapshot  # not a known alias
    billing.require_price(provider, snapshot)
    counts = {"input_tokens": 1_234, "output_tokens": 567}
    dated = billing.charge(Usage(provider, snapshot, **counts), _credential(PLATFORM, provider))
    plain = billing.charge(Usage(provider, base, **counts), _credential(PLATFORM, provider))
    assert dated.reason == "platform"
    assert dated.list_cost == plain.list_cost > 0
    assert dated.amount == plain.amount == money(plain.list_cost * D("1.5"))
    # only a date suffix is stripped: another name is not guessed at
    with pytest.raises(UnpricedModel):
        billing.require_price(provider, f"{base}-2099")


def _partial_prices(tmp_path: Path, entry: dict[str, object]) -> Billing:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"version": "partial", "models": {"openai/gpt-half": entry}}))
    return Billing(prices=load_price_file(path), catalog=shipped_catalog())


@pytest.mark.parametrize(
    ("entry", "missing"),
    [
        ({"input": 1}, "output"),
        ({"output": 4}, "input"),
        (
            {"input": 1, "output": 4, "long_context": {"threshold": 1000, "input": 2}},
            "long_context.output",
        ),
    ],
)
def test_a_price_entry_without_an_input_or_output_price_is_refused_before_the_call(
    tmp_path: Path, entry: dict[str, object], missing: str
) -> None:
    billing = _partial_prices(tmp_path, entry)
    with pytest.raises(UnpricedModel, match=missing) as info:
        billing.require_price("openai", "gpt-half")
    assert isinstance(info.value, IncompletePrice)
    assert "gpt-half" in str(info.value)
    assert "BYOK_PRICE_FILE" in str(info.value)


def test_a_complete_entry_and_a_tool_priced_per_request_pass_the_price_check(
    tmp_path: Path,
) -> None:
    billing = _partial_prices(tmp_path, {"input": 1, "output": 4})  # cached/reasoning fall back
    billing.require_price("openai", "gpt-half")
    usage = Usage("openai", "gpt-half", cached_input_tokens=10**6, reasoning_tokens=10**6)
    assert billing.charge(usage, _credential(PLATFORM)).list_cost == D(5)
    _billing().require_price("exa", "exa-search")


def test_allowing_unpriced_models_is_loud_in_the_ledger_and_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    usage = Usage("openai", "gpt-99-preview", input_tokens=10, output_tokens=10)
    billing = _billing(allow_unpriced=True)
    billing.require_price("openai", "gpt-99-preview")
    with caplog.at_level(logging.WARNING, logger="byok.billing"):
        charge = billing.charge(usage, _credential(PLATFORM))
    assert (charge.amount, charge.reason, charge.list_cost) == (D(0), "unpriced", None)
    assert "gpt-99-preview" in caplog.text


def test_reported_cost_prices_a_tool_missing_from_the_table() -> None:
    usage = Usage("acme-search", "search", tool_requests=1, reported_cost=D("0.003"))
    charge = _billing().charge(usage, _credential(PLATFORM, "acme-search"))
    assert charge.amount == D("0.003")
    assert charge.breakdown == (("reported_cost", D("0.003")),)


def test_an_unpriced_completed_call_is_in_the_ledger_and_counted_as_unpriced(
    database_url: str, tmp_path: Path
) -> None:
    """The default hooks, one after the other as a host calls them after a completed call: the
    charge does not raise, the record lands, ``byok usage`` counts the call as unpriced."""
    settings = Settings.from_environ(
        {"BYOK_HOME": str(tmp_path), "BYOK_DATABASE_URL": database_url}
    )
    app = App(settings)
    try:
        pm = plugin_manager_for(app, load_entrypoints=False, environ={})
        usage = Usage("openai", "gpt-99-preview", input_tokens=10, output_tokens=10)
        credential = _credential(PLATFORM)
        charge = pm.hook.byok_compute_charge(usage=usage, credential=credential)
        pm.hook.byok_record_usage(
            record=UsageRecord(
                idempotency_key="run-1:ask:1",
                workspace_id="acme",
                usage=usage,
                charge=charge,
                source=PLATFORM,
                key_id="pool-0",
            )
        )
        rows = list(app.ledger.rows(workspaces=["acme"]))
        assert [(r.model, r.reason, r.amount, r.list_cost) for r in rows] == [
            ("gpt-99-preview", "unpriced", D(0), None)
        ]
        assert build_report(rows).totals.unpriced_calls == 1
    finally:
        app.close()
