"""Who pays, exactly: tool prices, parts without a price, and what the ledger keeps of them.

- a platform call that may use a provider tool without a price is refused before it is sent;
- after a call, a part without a price never makes it $0: the rest is charged, the row names
  what was not priced, and ``byok usage`` counts it;
- a fuzz test over usage objects: never a negative charge, never $0 for a platform call that used
  tokens, BYOK always $0, and the breakdown adds up to the total.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from byok_hookspecs import (
    Charge,
    Credential,
    CredentialRequest,
    CredentialSource,
    UnpricedModel,
    Usage,
    UsageRecord,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from keys_support import OPERATOR, make_app, master_key, random_key

from byok_plugin.billing.catalog import shipped_catalog
from byok_plugin.billing.charges import Billing, IncompletePrice
from byok_plugin.billing.ledger import Ledger
from byok_plugin.billing.pricing import parse_price_table, shipped_prices
from byok_plugin.billing.usage_report import build_report
from byok_plugin.manager import plugin_manager_for
from byok_plugin.store import create_store_engine, ensure_migrated

D = Decimal
PLATFORM = Credential(api_key="k", provider="anthropic", source=CredentialSource.PLATFORM)
BYOK = Credential(api_key="k", provider="anthropic", source=CredentialSource.WORKSPACE)

#: a price file without any tool price, and without a 1-hour cache-write price
BARE = parse_price_table(
    {
        "version": "bare",
        "models": {
            "anthropic/claude-sonnet-4-5": {
                "input": 3,
                "cached_input": D("0.3"),
                "cache_write": D("3.75"),
                "output": 15,
            },
            "google/gemini-2.5-pro": {"input": D("1.25"), "output": 10},
        },
    },
    source="bare.json",
)


def test_a_part_without_a_price_is_named_and_the_rest_is_charged() -> None:
    billing = Billing(prices=BARE, catalog=shipped_catalog())
    usage = Usage(
        "anthropic",
        "claude-sonnet-4-5",
        input_tokens=1000,
        output_tokens=100,
        cache_write_1h_tokens=500,
        tool_uses=(("web_search", 3),),
    )
    charge = billing.charge(usage, PLATFORM)
    # 1000 x $3/M + 100 x $15/M; the 1-hour writes and the searches have no price here
    assert charge.amount == D("0.0045")
    assert charge.list_cost == D("0.0045")
    assert charge.reason == "platform"
    assert charge.unpriced == ("cache_write_1h", "tool:web_search")
    # the workspace's own key: nothing charged, and the same parts named
    byok = billing.charge(usage, BYOK)
    assert (byok.amount, byok.list_cost, byok.unpriced) == (D(0), D("0.0045"), charge.unpriced)


def test_a_call_of_which_nothing_has_a_price_is_unpriced_not_a_silent_zero() -> None:
    billing = Billing(prices=BARE, catalog=shipped_catalog())
    usage = Usage("anthropic", "claude-sonnet-4-5", cache_write_1h_tokens=10)
    charge = billing.charge(usage, PLATFORM)
    assert (charge.amount, charge.reason, charge.list_cost) == (D(0), "unpriced", None)
    assert charge.unpriced == ("cache_write_1h",)


def test_a_platform_call_that_may_use_an_unpriced_tool_is_refused_before_it_is_sent() -> None:
    bare = Billing(prices=BARE, catalog=shipped_catalog())
    with pytest.raises(IncompletePrice, match="tool anthropic/web_search per_request"):
        bare.require_price("anthropic", "claude-sonnet-4-5", ("web_search",))
    bare.require_price("anthropic", "claude-sonnet-4-5")  # without the tool it is priced
    shipped = Billing(prices=shipped_prices(), catalog=shipped_catalog())
    shipped.require_price("anthropic", "claude-sonnet-4-5", ("web_search", "web_fetch"))
    shipped.require_price("google", "gemini-2.5-pro", ("google_search",))
    shipped.require_price("openai", "gpt-5", ("web_search",))
    with pytest.raises(IncompletePrice, match="tool openai/code_interpreter"):
        shipped.require_price("openai", "gpt-5", ("code_interpreter",))
    allowed = Billing(prices=BARE, catalog=shipped_catalog(), allow_unpriced=True)
    allowed.require_price("anthropic", "claude-sonnet-4-5", ("web_search",))


def test_resolution_refuses_the_platform_key_for_an_unpriced_tool(
    sqlite_url: str, tmp_path: Path
) -> None:
    app = make_app(
        sqlite_url,
        tmp_path,
        keys=[master_key()],
        extra={"BYOK_PLATFORM_KEYS_ANTHROPIC": random_key("anthropic")},
    )
    try:
        pm = plugin_manager_for(app, load_entrypoints=False)
        searching = CredentialRequest(
            "acme", "anthropic", "claude-sonnet-4-5", actor=OPERATOR, tools=("web_search",)
        )
        assert (
            pm.hook.byok_resolve_credential(request=searching).source is CredentialSource.PLATFORM
        )
        running_code = CredentialRequest(
            "acme", "anthropic", "claude-sonnet-4-5", actor=OPERATOR, tools=("code_execution",)
        )
        with pytest.raises(UnpricedModel, match="tool anthropic/code_execution per_request"):
            pm.hook.byok_resolve_credential(request=running_code)
    finally:
        app.close()


def test_the_ledger_keeps_tool_uses_1h_writes_and_unpriced_parts(
    database_url: str, tmp_path: Path
) -> None:
    engine = create_store_engine(database_url)
    try:
        ensure_migrated(engine)
        ledger = Ledger(engine)
        billing = Billing(prices=BARE, catalog=shipped_catalog())
        usage = Usage(
            "anthropic",
            "claude-sonnet-4-5",
            input_tokens=1000,
            output_tokens=100,
            cache_write_1h_tokens=500,
            tool_uses=(("web_search", 3), ("web_fetch", 1)),
        )
        charge = billing.charge(usage, PLATFORM)
        assert ledger.record(
            UsageRecord(
                idempotency_key="run:b:1",
                workspace_id="acme",
                usage=usage,
                charge=charge,
                source=CredentialSource.PLATFORM,
                status="interrupted",
            )
        )
        priced = Usage("anthropic", "claude-sonnet-4-5", input_tokens=10)
        assert ledger.record(
            UsageRecord(
                idempotency_key="run:b2:1",
                workspace_id="acme",
                usage=priced,
                charge=billing.charge(priced, PLATFORM),
                source=CredentialSource.PLATFORM,
            )
        )
        row = ledger.get("run:b:1")
        assert row is not None
        assert row.cache_write_1h_tokens == 500
        assert row.tool_uses == (("web_fetch", 1), ("web_search", 3))
        assert row.unpriced == ("cache_write_1h", "tool:web_fetch", "tool:web_search")
        assert row.amount == D("0.0045")
        assert row.status == "interrupted"
        assert ledger.get("run:b2:1").status == "complete"
        report = build_report(ledger.rows(), group_by=("workspace",))
        assert report.totals.unpriced_calls == 1
        assert report.totals.calls == 2
        assert report.totals.charged == D("0.0045") + D("0.00003")
        assert report.totals.cache_write_1h_tokens == 500
        ledger.close()
    finally:
        engine.dispose()


def test_revision_0004_keeps_rows_written_before_it(database_url: str) -> None:
    from byok_plugin.store.migrate import upgrade

    engine = create_store_engine(database_url)
    try:
        upgrade(engine, "0003")
        now = datetime.now(UTC)
        row = {
            "idempotency_key": "old",
            "workspace_id": "acme",
            "attempt": 1,
            "provider": "openai",
            "model": "gpt-4o",
            "source": "platform",
            "fallback": False,
            "input_tokens": 5,
            "cached_input_tokens": 0,
            "cache_write_tokens": 0,
            "output_tokens": 1,
            "reasoning_tokens": 0,
            "tool_requests": 0,
            "amount": "0.0000225",
            "currency": "USD",
            "reason": "platform",
            "breakdown": "[]",
            "occurred_at": now,
            "recorded_at": now,
        }
        old = sa.table("byok_usage_ledger", *(sa.column(name) for name in row))
        with engine.begin() as conn:
            conn.execute(sa.insert(old).values(**row))
        ensure_migrated(engine)
        read = Ledger(engine).get("old")
        assert read is not None
        assert (read.cache_write_1h_tokens, read.tool_uses, read.unpriced) == (0, (), ())
    finally:
        engine.dispose()


# --- fuzz ---------------------------------------------------------------------------------------

counts = st.integers(min_value=0, max_value=5_000_000)
models = st.sampled_from(
    [
        ("anthropic", "claude-sonnet-4-5"),
        ("anthropic", "claude-haiku-4-5"),
        ("openai", "gpt-5"),
        ("google", "gemini-2.5-pro"),
        ("mistral", "mistral-large-latest"),
    ]
)
tool_names = st.sampled_from(["web_search", "web_fetch", "google_search", "code_execution"])
usages = st.builds(
    lambda pm, n, tools: Usage(
        pm[0],
        pm[1],
        input_tokens=n[0],
        cached_input_tokens=n[1],
        cache_write_tokens=n[2],
        cache_write_1h_tokens=n[3] if pm[0] == "anthropic" else 0,
        output_tokens=n[4],
        reasoning_tokens=n[5],
        tool_uses=tuple(tools.items()),
    ),
    models,
    st.tuples(counts, counts, counts, counts, counts, counts),
    st.dictionaries(tool_names, st.integers(min_value=1, max_value=50), max_size=3),
)
SHIPPED = Billing(prices=shipped_prices(), catalog=shipped_catalog(), multiplier=D("1.2"))


@settings(max_examples=300, deadline=None)
@given(usages)
def test_fuzz_charges(usage: Usage) -> None:
    platform = Credential(api_key="k", provider=usage.provider, source=CredentialSource.PLATFORM)
    byok = Credential(api_key="k", provider=usage.provider, source=CredentialSource.WORKSPACE)
    charge = SHIPPED.charge(usage, platform)
    assert charge.amount >= 0
    priced_tools = [n for n, _ in usage.tool_uses if SHIPPED.prices.tool(usage.provider, n)]
    if usage.total_tokens > 0:
        assert charge.amount > 0, charge
    assert charge.list_cost is not None
    assert sum(amount for _, amount in charge.breakdown) == charge.list_cost
    assert charge.amount == charge.list_cost * D("1.2")
    unpriced_tools = {n for n, _ in usage.tool_uses} - set(priced_tools)
    assert set(charge.unpriced) == {f"tool:{n}" for n in unpriced_tools}
    own = SHIPPED.charge(usage, byok)
    assert own.amount == 0
    assert own.list_cost == charge.list_cost


def test_a_record_status_is_one_of_three() -> None:
    usage = Usage("openai", "gpt-5")
    with pytest.raises(ValueError, match="complete, interrupted, uncertain"):
        UsageRecord("k", "acme", usage, Charge(D(0)), CredentialSource.PLATFORM, status="partial")


def test_a_usage_refuses_malformed_tool_uses() -> None:
    with pytest.raises(ValueError, match="tool_uses"):
        Usage("anthropic", "m", tool_uses=(("web_search", 0),))
    with pytest.raises(ValueError, match="tool_uses"):
        Usage("anthropic", "m", tool_uses=(("web_search", 1), ("web_search", 2)))
    assert Usage("a", "m", tool_uses=(("b", 1), ("a", 2))).tool_uses == (("a", 2), ("b", 1))
