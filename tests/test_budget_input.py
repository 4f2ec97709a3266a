"""What a budget definition accepts (review findings 9, 6, 4), on a real SQLite file and a real
PostgreSQL database: limits are whole nano-dollars and never rounded, thresholds fit their
column, an organization's pool is not a workspace, and a key scope names a key that serves the
workspace (a budget whose key is replaced or deleted says so)."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pluggy
import pytest
import sqlalchemy as sa
from byok_hookspecs import BudgetReservation, CredentialSource
from keys_support import OPERATOR, keyring_value, master_key, random_key

from byok_plugin.app import App
from byok_plugin.billing.budgets import (
    LIMIT_PATTERN,
    LIMIT_TEXT_LENGTH,
    MAX_LIMIT,
    MAX_THRESHOLDS,
    BudgetError,
    budgets,
    to_units,
)
from byok_plugin.keys.service import KeyService
from byok_plugin.manager import plugin_manager_for
from byok_plugin.resolution.organizations import org_owner
from byok_plugin.settings import Settings

WS = "acme"


@pytest.fixture
def app(database_url: str, tmp_path: Path) -> Iterator[App]:
    settings = Settings.from_environ(
        {
            "BYOK_HOME": str(tmp_path),
            "BYOK_DATABASE_URL": database_url,
            "BYOK_LOAD_PLUGINS": "byok_plugin",
            "BYOK_ENCRYPTION_KEYS": keyring_value(master_key()),
            "BYOK_KEY_CACHE_SECONDS": "0",
        }
    )
    built = App(settings)
    yield built
    built.close()


@pytest.fixture
def pm(app: App) -> pluggy.PluginManager:
    return plugin_manager_for(app, load_entrypoints=False)


@pytest.fixture
def keys(app: App, pm: pluggy.PluginManager) -> KeyService:
    return app.key_service(pm)


def store_key(keys: KeyService, owner: str, label: str = "default") -> str:
    return keys.set_key(
        OPERATOR, owner, "openai", random_key("openai"), label=label, test=False
    ).key.id


def stored_rows(app: App) -> list[tuple[str, str, int, str, str | None]]:
    t = budgets
    with app.engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.c.workspace_id, t.c.name, t.c.limit_units, t.c.thresholds, t.c.key_id)
        )
        return [tuple(r) for r in rows]  # type: ignore[misc]


# --- limits (finding 9) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        # finer than a nano-dollar: used to be rounded up to 0.000000001 and stored
        ("0.0000000001", "whole number of nano-dollars"),
        ("1.0000000005", "whole number of nano-dollars"),
        # more than 0, but nothing once counted in nano-dollars: used to be stored as $0.00
        (Decimal("1E-1000000000"), "whole number of nano-dollars"),
        # what the HTTP API's pattern refuses, the store refuses too
        ("1E-9", "amount in USD"),
        ("1_000", "amount in USD"),
        ("\u0663", "amount in USD"),  # ARABIC-INDIC DIGIT THREE: int() and Decimal() take it
        ("\uff15", "amount in USD"),  # FULLWIDTH DIGIT FIVE
        (" 5", "amount in USD"),
        ("5\n", "amount in USD"),
        ("NaN", "amount in USD"),
        ("-1", "amount in USD"),
        ("1" * 41, "amount in USD"),
    ],
)
def test_a_limit_that_is_not_whole_nano_dollars_or_not_plain_digits_is_refused(
    app: App, limit: str | Decimal, message: str
) -> None:
    with pytest.raises(BudgetError, match=message):
        app.budgets.set_budget(WS, "b", limit=limit)
    assert stored_rows(app) == []


@pytest.mark.parametrize(
    ("limit", "units"),
    [
        ("0.000000001", 1),
        ("25.50", 25_500_000_000),
        ("1.000000000000000000000000000000", 1_000_000_000),  # trailing zeros change nothing
        (Decimal("1E-9"), 1),
        (Decimal("2.5E+1"), 25_000_000_000),
        (str(MAX_LIMIT), 2**63 - 1),
    ],
)
def test_a_limit_is_stored_exactly_and_a_finer_one_refused(
    app: App, limit: str | Decimal, units: int
) -> None:
    made = app.budgets.set_budget(WS, "b", limit=limit)
    assert made.limit == Decimal(limit)
    assert to_units(made.limit) == units
    # a tenth of a nano-dollar less: used to be rounded up to the same limit
    finer = Decimal(limit) - Decimal("0.0000000001")
    with pytest.raises(BudgetError, match="whole number of nano-dollars"):
        app.budgets.set_budget(WS, "b", limit=format(finer, "f"))
    assert [row[2] for row in stored_rows(app)] == [units]


def test_the_store_and_the_http_api_accept_the_same_limit_text() -> None:
    from byok_plugin.server.models import SetBudgetRequest

    field = SetBudgetRequest.model_fields["limit"]
    patterns = [getattr(m, "pattern", None) for m in field.metadata]
    assert f"^{LIMIT_PATTERN}$" in patterns
    lengths = [getattr(m, "max_length", None) for m in field.metadata]
    assert LIMIT_TEXT_LENGTH in lengths


# --- thresholds (finding 9) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [
        (",".join(str(n) for n in range(1, 41)), "at most 10 thresholds, not 40"),
        (list(range(1, 12)), "at most 10 thresholds, not 11"),
        ("50,\u0668\u0660", "whole percentages"),  # Arabic-Indic 80
        ("1_0", "whole percentages"),
        ([50, True], "whole percentages"),
        ([50.7], "whole percentages"),
        ("00001001", "whole percentages"),
    ],
)
def test_thresholds_are_bounded_as_the_http_api_bounds_them(
    app: App, thresholds: str | list[object], message: str
) -> None:
    with pytest.raises(BudgetError, match=message):
        app.budgets.set_budget(WS, "b", limit="10", thresholds=thresholds)  # type: ignore[arg-type]
    assert stored_rows(app) == []


def test_the_most_thresholds_fit_their_column(app: App) -> None:
    most = ",".join(str(n) for n in range(1000, 1000 - MAX_THRESHOLDS, -1))
    made = app.budgets.set_budget(WS, "b", limit="10", thresholds=most)
    assert made.thresholds == tuple(range(991, 1001))
    assert stored_rows(app)[0][3] == ",".join(str(n) for n in range(991, 1001))
    # duplicates and blanks count as given: "50,,50" is one threshold
    assert app.budgets.set_budget(WS, "b", limit="10", thresholds="50,,50").thresholds == (50,)
    # one more is refused, and what was stored stays
    with pytest.raises(BudgetError, match="at most 10 thresholds, not 11"):
        app.budgets.set_budget(WS, "b", limit="10", thresholds=most + ",990")
    assert stored_rows(app)[0][3] == "50"


# --- an organization's pool is not a workspace (finding 6) ----------------------------------


def test_a_budget_on_an_organization_is_refused(app: App, pm: pluggy.PluginManager) -> None:
    orgs = app.organizations(pm)
    orgs.create(OPERATOR, "acme-org")
    orgs.attach(OPERATOR, "acme-org", WS)
    with pytest.raises(BudgetError, match=r"organization's key pool.*not supported"):
        app.budgets.set_budget(org_owner("acme-org"), "pool-cap", limit="0.01")
    # even an organization that does not exist: the id is reserved
    with pytest.raises(BudgetError, match="'org:nobody'"):
        app.budgets.set_budget("org:nobody", "pool-cap", limit="1")
    assert stored_rows(app) == []


# --- key scopes (finding 4) -----------------------------------------------------------------


def test_a_key_scope_names_a_key_of_the_workspace(app: App, keys: KeyService) -> None:
    own = store_key(keys, WS)
    elsewhere = store_key(keys, "globex")
    assert app.budgets.set_budget(WS, "own", limit="1", key_id=own).key_id == own
    with pytest.raises(BudgetError) as missing:
        app.budgets.set_budget(WS, "typo", limit="1", key_id="key_doesnotexist")
    assert "workspace 'acme' has no key 'key_doesnotexist'" in str(missing.value)
    # another workspace's key is refused the same way: nothing says that it exists
    with pytest.raises(BudgetError) as foreign:
        app.budgets.set_budget(WS, "foreign", limit="1", key_id=elsewhere)
    assert f"workspace 'acme' has no key {elsewhere!r}" in str(foreign.value)
    # not a key id at all (100 characters: more than the audit's key_id column holds)
    with pytest.raises(BudgetError, match="'key_' followed by letters and digits"):
        app.budgets.set_budget(WS, "long", limit="1", key_id="k" * 100)
    assert [(r[1], r[4]) for r in stored_rows(app)] == [("own", own)]


def test_a_key_scope_that_is_not_a_key_id_is_not_quoted(app: App) -> None:
    secret = random_key("openai")  # pasted where the key id goes
    with pytest.raises(BudgetError) as refused:
        app.budgets.set_budget(WS, "b", limit="1", key_id=secret)
    assert secret[8:] not in str(refused.value)
    assert "workspace 'acme'" in str(refused.value)


def test_a_key_scope_may_name_a_key_of_the_organizations_pool_that_serves_the_workspace(
    app: App, pm: pluggy.PluginManager, keys: KeyService
) -> None:
    orgs = app.organizations(pm)
    orgs.create(OPERATOR, "acme-org")
    orgs.attach(OPERATOR, "acme-org", WS)
    pooled = store_key(keys, org_owner("acme-org"))
    assert app.budgets.set_budget(WS, "pool", limit="1", key_id=pooled).key_gone is False
    # a workspace outside the organization may not name it
    with pytest.raises(BudgetError, match="workspace 'globex' has no key"):
        app.budgets.set_budget("globex", "pool", limit="1", key_id=pooled)
    # nor one that opted out of the pool (the key serves none of its calls)
    orgs.set_opt_out(OPERATOR, WS, True)
    with pytest.raises(BudgetError, match="opted out of organization 'acme-org'"):
        app.budgets.set_budget(WS, "pool", limit="2", key_id=pooled)
    assert [(r[1], r[2]) for r in stored_rows(app)] == [("pool", 1_000_000_000)]


def test_a_budget_whose_key_is_replaced_or_deleted_says_its_key_is_gone(
    app: App, pm: pluggy.PluginManager, keys: KeyService
) -> None:
    first = store_key(keys, WS)
    app.budgets.set_budget(WS, "guard", limit="0.01", metric="list_cost", key_id=first)
    app.budgets.set_budget(WS, "all", limit="1")
    assert [b.key_gone for b in app.budgets.list_budgets(WS)] == [False, False]
    # rotated the usual way: same label, new value, new id
    second = store_key(keys, WS)
    assert second != first
    guard = app.budgets.get(WS, "guard")
    assert guard is not None
    assert (guard.key_id, guard.key_gone, guard.as_dict()["key_gone"]) == (first, True, True)
    assert app.budgets.get(WS, "all").key_gone is False  # type: ignore[union-attr]
    assert app.budgets.scoped_to_keys([first]) == [(WS, "guard", first)]
    assert app.budgets.scoped_to_keys([second]) == []
    # it applies to no call: the new key's calls are not held by it
    hold = pm.hook.byok_reserve_budget(
        reservation=BudgetReservation(
            "r:1",
            WS,
            "openai",
            "gpt-4o",
            CredentialSource.WORKSPACE,
            amount=Decimal(0),
            list_cost=Decimal("5"),
            key_id=second,
        )
    )
    assert hold is not None
    assert hold.budgets == ("all",)  # the workspace-wide budget only
    # changing the budget keeps refusing the gone key until it names a current one
    with pytest.raises(BudgetError, match=f"has no key {first!r}"):
        app.budgets.set_budget(WS, "guard", limit="0.02", metric="list_cost", key_id=first)
    renewed = app.budgets.set_budget(WS, "guard", limit="0.01", metric="list_cost", key_id=second)
    assert (renewed.key_id, renewed.key_gone) == (second, False)
    keys.delete_keys(OPERATOR, WS, "openai", key_id=second)
    assert app.budgets.get(WS, "guard").key_gone is True  # type: ignore[union-attr]


def test_an_organization_key_gone_marks_the_member_workspaces_budget(
    app: App, pm: pluggy.PluginManager, keys: KeyService
) -> None:
    orgs = app.organizations(pm)
    orgs.create(OPERATOR, "acme-org")
    orgs.attach(OPERATOR, "acme-org", WS)
    pooled = store_key(keys, org_owner("acme-org"))
    app.budgets.set_budget(WS, "pool", limit="1", key_id=pooled)
    assert app.budgets.get(WS, "pool").key_gone is False  # type: ignore[union-attr]
    keys.delete_keys(OPERATOR, org_owner("acme-org"), "openai", key_id=pooled)
    assert app.budgets.get(WS, "pool").key_gone is True  # type: ignore[union-attr]
    assert app.budgets.scoped_to_keys([pooled]) == [(WS, "pool", pooled)]


def test_the_budgets_view_of_organizations_is_the_resolutions() -> None:
    # billing may not import resolution: it names the prefix and the membership table itself
    from byok_plugin.billing import budgets as module
    from byok_plugin.resolution import organizations

    assert module.ORG_PREFIX == organizations.ORG_PREFIX
    real = organizations.organization_workspaces
    assert module.organization_workspaces.name == real.name
    for column in module.organization_workspaces.c:
        assert type(column.type) is type(real.c[column.name].type)


@pytest.mark.parametrize(
    ("workspace", "message"),
    [("w" * 201, "longer than 200"), (" acme", "whitespace"), ("ac\x00me", "control")],
)
def test_a_budget_of_a_malformed_workspace_id_is_refused(
    app: App, workspace: str, message: str
) -> None:
    # the CLI passes -w as given: the budget row and its audit event must hold it
    with pytest.raises(BudgetError, match=message):
        app.budgets.set_budget(workspace, "b", limit="1")
    assert stored_rows(app) == []
