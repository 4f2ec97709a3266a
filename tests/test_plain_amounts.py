"""Every amount given to a user as text is in plain notation: ``0.0000001``, never ``1E-7``.

A price of 0.1 USD per 1M tokens and one token cost 1E-7 USD, which ``str(Decimal)`` writes in
exponent form (and PostgreSQL's NUMERIC(30, 12) reads back as ``1.00000E-7``). The API's OpenAPI
``Money`` pattern, the CSV a spreadsheet reads and the JSON a script parses all want the plain
form. Checked on a real store (SQLite and PostgreSQL), the API over real HTTP on loopback, and
the CLI commands, with amounts that pass through the pricing, the ledger and the reports.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from byok_hookspecs import Actor, Charge, Credential, CredentialSource, Usage, UsageRecord
from click.testing import CliRunner
from server_support import Stack, live_server, make_stack

from byok_plugin.cli import main
from byok_plugin.cli.demo import PLATFORM_WORKSPACE, DemoStack
from byok_plugin.host.emulator import EmulatorServer
from byok_plugin.server import BearerTokens, create_app
from byok_plugin.server.models import DECIMAL

ROOT = Path(__file__).resolve().parents[1]
MONEY = re.compile(DECIMAL)
TINY = Decimal("1E-7")
#: 0.1 USD per 1M tokens: one token costs 1E-7; an Exa search 1E-7 at the table's price
PRICES = {
    "version": "tiny",
    "models": {
        "openai/gpt-4o": {"input": 0.1, "output": 0.1},
        "exa/exa-search": {"per_request": 1e-7, "reported_cost": True},
    },
}
TOKEN = "alice-token"


def _price_file(tmp_path: Path, prices: dict[str, Any]) -> Path:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(prices))  # 1e-07: the loader reads the JSON text as a Decimal
    return path


def _amounts(document: Any, names: frozenset[str], where: str = "$") -> Iterator[tuple[str, Any]]:
    """Every ``(json path, value)`` under one of ``names`` in ``document``."""
    if isinstance(document, dict):
        for key, value in document.items():
            if key in names and not isinstance(value, dict | list):
                yield f"{where}.{key}", value
            else:
                yield from _amounts(value, names, f"{where}.{key}")
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from _amounts(value, names, f"{where}[{index}]")


def _assert_plain(found: list[tuple[str, Any]]) -> None:
    assert found, "no amounts found"
    bad = [(path, value) for path, value in found if not MONEY.fullmatch(str(value))]
    assert bad == [], bad


@pytest.fixture
def recorded(tmp_path: Path, database_url: str) -> Iterator[tuple[Stack, dict[str, str]]]:
    """A store with tiny amounts in every column a report sums: a platform call charged 1E-7, a
    workspace call whose list cost (what BYOK saved) is 1E-7, an uncertain call estimated at
    1E-7, and an Exa search whose reported cost (3E-7) differs from the table's (1E-7)."""
    prices = _price_file(tmp_path, PRICES)
    stack = make_stack(tmp_path, database_url, BYOK_PRICE_FILE=str(prices))
    hook = stack.pm.hook

    def record(key: str, usage: Usage, source: CredentialSource, **extra: Any) -> None:
        credential = Credential(
            api_key="sk-not-a-real-key-000000",
            provider=usage.provider,
            source=source,
            key_id="platform:1" if source is CredentialSource.PLATFORM else "key_tiny0001",
        )
        charge = hook.byok_compute_charge(usage=usage, credential=credential)
        if extra.get("status") == "uncertain":  # never answered: not charged, estimated apart
            charge = Charge(amount=Decimal(0), reason="uncertain", list_cost=charge.list_cost)
        hook.byok_record_usage(
            record=UsageRecord(
                idempotency_key=key,
                workspace_id="acme",
                usage=usage,
                charge=charge,
                source=source,
                key_id=credential.key_id,
                **extra,
            )
        )

    one_token = Usage("openai", "gpt-4o", input_tokens=1)
    record("r1:platform", one_token, CredentialSource.PLATFORM)
    record("r1:own", one_token, CredentialSource.WORKSPACE)
    record("r1:lost", one_token, CredentialSource.PLATFORM, status="uncertain")
    exa = Usage("exa", "exa-search", tool_requests=1, reported_cost=Decimal("3E-7"))
    record("r1:search", exa, CredentialSource.PLATFORM)
    charged = stack.app.ledger.get("r1:platform")
    assert charged is not None
    assert charged.amount == TINY  # the amount the reports sum
    environ = {
        "BYOK_HOME": str(tmp_path),
        "BYOK_DATABASE_URL": database_url,
        "BYOK_PRICE_FILE": str(prices),
        "BYOK_VALIDATE_KEYS": "0",
    }
    yield stack, environ
    stack.app.close()


def test_the_http_usage_view_gives_tiny_amounts_in_plain_notation(
    recorded: tuple[Stack, dict[str, str]],
) -> None:
    stack, _ = recorded
    identify = BearerTokens({TOKEN: Actor("alice", roles={"acme": "admin"})})
    with live_server(create_app(stack.app, identify=identify, pm=stack.pm)) as url:
        response = httpx.get(
            f"{url}/api/workspaces/acme/byok-usage",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
    assert response.status_code == 200, response.text
    body = response.json()
    names = frozenset({"byok_cost", "platform_charged", "byok_saved"})
    _assert_plain(list(_amounts(body, names)))
    totals = body["totals"]
    assert Decimal(totals["byok_cost"]) == TINY
    assert Decimal(totals["byok_saved"]) == TINY
    # the platform call (1E-7) and the search at its reported cost (3E-7)
    assert Decimal(totals["platform_charged"]) == Decimal("4E-7")


USAGE_AMOUNTS = frozenset(
    {"list_cost", "charged", "byok_saved", "uncertain_estimated_cost", "byok_share"}
)


def test_byok_usage_json_and_csv_give_tiny_amounts_in_plain_notation(
    recorded: tuple[Stack, dict[str, str]],
) -> None:
    _, environ = recorded
    result = CliRunner().invoke(main, ["usage", "--json"], env=environ)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    _assert_plain(list(_amounts(document, USAGE_AMOUNTS)))
    totals = document["totals"]
    assert Decimal(totals["byok_saved"]) == TINY
    assert Decimal(totals["uncertain_estimated_cost"]) == TINY
    assert Decimal(totals["charged"]) == Decimal("4E-7")

    result = CliRunner().invoke(main, ["usage", "--csv", "--by", "source,model"], env=environ)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 3  # platform and workspace gpt-4o, platform exa-search
    cells = [(f"row {i} {name}", row[name]) for i, row in enumerate(rows) for name in USAGE_AMOUNTS]
    _assert_plain(cells)
    own = next(row for row in rows if row["source"] == "workspace")
    assert Decimal(own["byok_saved"]) == TINY


def test_byok_reconcile_json_gives_tiny_amounts_in_plain_notation(
    recorded: tuple[Stack, dict[str, str]],
) -> None:
    _, environ = recorded
    result = CliRunner().invoke(main, ["reconcile", "--json"], env=environ)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    names = frozenset(
        {"list_cost", "reported_cost", "table_cost", "difference", "uncertain_estimated_cost"}
    )
    _assert_plain(list(_amounts(document, names)))
    (search,) = document["differences"]
    assert search["provider"] == "exa"
    assert (Decimal(search["reported_cost"]), Decimal(search["table_cost"])) == (
        Decimal("3E-7"),
        TINY,
    )
    assert Decimal(search["difference"]) == Decimal("2E-7")


def test_byok_run_json_gives_tiny_charges_in_plain_notation(
    emulator: EmulatorServer, tmp_path: Path
) -> None:
    # every model of the sample workflow priced at 0.000001 USD per 1M tokens: each call of the
    # emulator's few dozen tokens costs about 1E-11
    tiny = {"input": 1e-6, "output": 1e-6}
    prices = _price_file(
        tmp_path,
        {
            "version": "tiny",
            "models": {
                "openai/gpt-4o-mini": tiny,
                "anthropic/claude-haiku-4-5": tiny,
                "anthropic/claude-sonnet-4-5": tiny,
            },
        },
    )
    stack = DemoStack(tmp_path / "home", emulator)
    try:
        workflow = str(ROOT / "sample_workflows" / "support-ticket-triage.json")
        result = CliRunner().invoke(
            main,
            ["run", workflow, "-w", PLATFORM_WORKSPACE, "-i", "ticket=Invoice wrong", "--json"],
            env={**stack.environ, "BYOK_PRICE_FILE": str(prices)},
        )
    finally:
        stack.close()
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    found = list(_amounts(document, frozenset({"amount", "list_cost", "charge", "USD"})))
    _assert_plain(found)
    total = Decimal(document["totals"]["charge"])
    assert 0 < total < Decimal("1E-6")  # small enough that str() would write it as 1E-...


def test_a_tiny_budget_limit_is_plain_in_the_api_and_its_audit_event(
    recorded: tuple[Stack, dict[str, str]],
) -> None:
    stack, _ = recorded
    identify = BearerTokens({TOKEN: Actor("alice", roles={"acme": "admin"})})
    with live_server(create_app(stack.app, identify=identify, pm=stack.pm)) as url:
        response = httpx.put(
            f"{url}/api/workspaces/acme/byok-budgets/tiny",
            headers={"Authorization": f"Bearer {TOKEN}"},
            json={"limit": "0.000000001", "hard": False},
            timeout=30,
        )
    assert response.status_code == 200, response.text
    budget = response.json()["budget"]
    _assert_plain(list(_amounts(budget, frozenset({"limit", "spent", "reserved", "left"}))))
    (event,) = [e for e in stack.audit.events if e.action == "budget.set"]
    assert event.detail == "budget 'tiny': limit 0.000000001 USD"
