"""``byok budget set|show|list|delete``: through click's runner, on a real store."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from byok_plugin.app import App
from byok_plugin.cli import main
from byok_plugin.cli.context import CliContext
from byok_plugin.settings import Settings


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"BYOK_HOME": str(tmp_path), "BYOK_DATABASE_URL": f"sqlite:///{tmp_path / 'byok.db'}"}


def _run(env: dict[str, str], *args: str, ok: bool = True) -> Result:
    result = CliRunner().invoke(main, list(args), env=env)
    assert (result.exit_code == 0) is ok, result.output
    return result


def test_budget_set_show_list_delete(env: dict[str, str]) -> None:
    assert "has no budgets" in _run(env, "budget", "list", "-w", "acme").output
    made = _run(env, "budget", "set", "-w", "acme", "monthly", "--limit", "25.50").output
    assert (
        "monthly: hard charge limit $25.50 per month: spent $0.00, reserved $0.00, left $25.50"
        in made
    )
    _run(
        env,
        "budget",
        "set",
        "-w",
        "acme",
        "own-keys",
        "--limit",
        "100",
        "--metric",
        "list_cost",
        "--period",
        "day",
        "--soft",
        "--workflow",
        "triage",
    )
    listed = _run(env, "budget", "list", "-w", "acme").output.splitlines()
    assert listed[0] == "budgets of workspace acme, amounts in USD"
    rows = [" ".join(line.split()) for line in listed if line.startswith(("monthly", "own-"))]
    assert rows == [
        "monthly hard charge month all calls $25.50 $0.00 $0.00 $25.50",
        "own-keys soft list_cost day workflow triage $100.00 $0.00 $0.00 $100.00",
    ]
    shown = json.loads(_run(env, "budget", "show", "-w", "acme", "monthly", "--json").output)
    assert shown["limit"] == "25.5"
    assert shown["left"] == "25.5"
    assert shown["thresholds"] == [50, 80, 100]
    everything = json.loads(_run(env, "budget", "list", "-w", "acme", "--json").output)["budgets"]
    assert [b["name"] for b in everything] == ["monthly", "own-keys"]
    assert (
        "budget 'monthly' deleted" in _run(env, "budget", "delete", "-w", "acme", "monthly").output
    )
    gone = _run(env, "budget", "delete", "-w", "acme", "monthly", ok=False).output
    assert "workspace 'acme' has no budget 'monthly'" in gone
    assert "has no budget" in _run(env, "budget", "show", "-w", "acme", "monthly", ok=False).output
    app = App(Settings.from_environ(env))
    try:
        actions = [e.action for e in app.audit_store.events("acme")]
    finally:
        app.close()
    assert actions == ["budget.deleted", "budget.set", "budget.set"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--limit", "abc"], "amount in USD such as 25.00"),
        (["--limit", "0"], "more than 0"),
        (["--limit", "5", "--thresholds", "50,x"], "whole percentages"),
        (["--limit", "5", "--period", "week"], "Invalid value for '--period'"),
    ],
)
def test_budget_set_refuses_bad_input_clearly(
    env: dict[str, str], args: list[str], message: str
) -> None:
    result = _run(env, "budget", "set", "-w", "acme", "b", *args, ok=False)
    assert message in result.output
    assert "Traceback" not in result.output
    assert "has no budgets" in _run(env, "budget", "list", "-w", "acme").output


def test_budget_and_fallback_changes_are_audited_at_the_apps_time(env: dict[str, str]) -> None:
    # the app's clock, not the wall clock, dates the events (as it dates the budgets' periods)
    now = datetime(2026, 3, 15, 13, 30, tzinfo=UTC)
    for args in (
        ["budget", "set", "-w", "acme", "monthly", "--limit", "5"],
        ["budget", "delete", "-w", "acme", "monthly"],
        ["fallback", "set", "-w", "acme", "on_error"],
    ):
        cli = CliContext(Settings.from_environ(env), clock=lambda: now)
        result = CliRunner().invoke(main, args, env=env, obj=cli)
        assert result.exit_code == 0, result.output
    app = App(Settings.from_environ(env))
    try:
        events = [(e.action, e.occurred_at) for e in app.audit_store.events("acme")]
    finally:
        app.close()
    assert events == [
        ("settings.fallback_policy", now),
        ("budget.deleted", now),
        ("budget.set", now),
    ]


# --- review findings 9, 6, 4: the CLI refuses what the HTTP API refuses -------------------------


@pytest.fixture
def store_env(database_url: str, tmp_path: Path) -> dict[str, str]:
    """A real SQLite file or PostgreSQL database, with a master key to store provider keys."""
    from keys_support import keyring_value, master_key

    return {
        "BYOK_HOME": str(tmp_path),
        "BYOK_DATABASE_URL": database_url,
        "BYOK_ENCRYPTION_KEYS": keyring_value(master_key()),
        "BYOK_KEY_CACHE_SECONDS": "0",
    }


def _budgets(env: dict[str, str], workspace: str = "acme") -> list[dict[str, object]]:
    listed = _run(env, "budget", "list", "-w", workspace, "--json").output
    budgets: list[dict[str, object]] = json.loads(listed)["budgets"]
    return budgets


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--limit", "1_000"], "amount in USD such as 25.00"),
        (["--limit", "\u0663"], "amount in USD such as 25.00"),
        (["--limit", "1e3"], "amount in USD such as 25.00"),
        (["--limit", "0.0000000001"], "whole number of nano-dollars"),
        (["--limit", "0." + "0" * 30 + "1"], "whole number of nano-dollars"),
        (["--limit", "5", "--thresholds", ",".join(map(str, range(1, 41)))], "at most 10"),
        (["--limit", "5", "--thresholds", "50,\u0668\u0660"], "whole percentages"),
    ],
)
def test_budget_set_refuses_what_the_api_refuses(
    store_env: dict[str, str], args: list[str], message: str
) -> None:
    result = _run(store_env, "budget", "set", "-w", "acme", "b", *args, ok=False)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert _budgets(store_env) == []


def test_budget_set_on_an_organization_is_refused(store_env: dict[str, str]) -> None:
    result = _run(
        store_env,
        "budget",
        "set",
        "-w",
        "org:acme",
        "pool-cap",
        "--limit",
        "0.01",
        "--metric",
        "list_cost",
        ok=False,
    )
    assert "'org:acme' is an organization's key pool" in result.output
    assert "not supported" in result.output
    assert _budgets(store_env, "org:acme") == []


def _store_key(env: dict[str, str]) -> tuple[str, Result]:
    from keys_support import random_key

    result = CliRunner().invoke(
        main,
        ["keys", "set", "-w", "acme", "-p", "openai", "--no-test"],
        env=env,
        input=random_key("openai"),
    )
    assert result.exit_code == 0, result.output
    listed = json.loads(_run(env, "keys", "list", "-w", "acme", "--json").output)["keys"]
    return listed[0]["id"], result


def test_a_key_scoped_budget_names_a_stored_key_and_says_when_it_is_gone(
    store_env: dict[str, str],
) -> None:
    typo = _run(
        store_env,
        "budget",
        "set",
        "-w",
        "acme",
        "guard",
        "--limit",
        "1",
        "--key-id",
        "key_doesnotexist",
        ok=False,
    ).output
    assert "workspace 'acme' has no key 'key_doesnotexist'" in typo
    first, _ = _store_key(store_env)
    made = _run(
        store_env, "budget", "set", "-w", "acme", "guard", "--limit", "1", "--key-id", first
    ).output
    assert f"key {first}" in made
    assert "gone" not in made
    # the key is replaced under its label: a new id, and a warning about the budget
    second, replaced = _store_key(store_env)
    assert second != first
    assert (
        f"warning: budget 'guard' of workspace 'acme' is narrowed to the replaced key {first}"
        in replaced.stderr
    )
    assert f"byok budget set -w acme guard --key-id {second}" in replaced.stderr
    (listed,) = _budgets(store_env)
    assert (listed["key_id"], listed["key_gone"]) == (first, True)
    table = _run(store_env, "budget", "list", "-w", "acme").output
    assert "(gone)" in table
    assert f"note: budget 'guard' names key {first}, which no longer exists" in table
    shown = _run(store_env, "budget", "show", "-w", "acme", "guard").output
    assert f"key {first} (gone: applies to no call)" in shown
    # set again on the new key; deleting that key warns too
    _run(store_env, "budget", "set", "-w", "acme", "guard", "--limit", "1", "--key-id", second)
    assert _budgets(store_env)[0]["key_gone"] is False
    deleted = CliRunner().invoke(
        main, ["keys", "delete", "-w", "acme", "--key-id", second], env=store_env
    )
    assert deleted.exit_code == 0, deleted.output
    assert f"is narrowed to the deleted key {second}" in deleted.stderr
    assert _budgets(store_env)[0]["key_gone"] is True


def test_replacing_or_deleting_an_organization_key_warns_about_member_budgets(
    store_env: dict[str, str],
) -> None:
    from keys_support import random_key

    _run(store_env, "org", "create", "acme-org")
    _run(store_env, "org", "attach", "acme-org", "--workspace", "acme")

    def set_key() -> Result:
        result = CliRunner().invoke(
            main,
            ["org", "set-key", "acme-org", "-p", "openai", "--no-test"],
            env=store_env,
            input=random_key("openai"),
        )
        assert result.exit_code == 0, result.output
        return result

    set_key()
    (pooled,) = json.loads(_run(store_env, "org", "keys", "acme-org", "--json").output)["keys"]
    _run(store_env, "budget", "set", "-w", "acme", "pool", "--limit", "1", "--key-id", pooled["id"])
    replaced = set_key()
    assert (
        f"budget 'pool' of workspace 'acme' is narrowed to the replaced key {pooled['id']}"
        in replaced.stderr
    )
    assert _budgets(store_env)[0]["key_gone"] is True
    (current,) = json.loads(_run(store_env, "org", "keys", "acme-org", "--json").output)["keys"]
    _run(
        store_env, "budget", "set", "-w", "acme", "pool", "--limit", "1", "--key-id", current["id"]
    )
    deleted = CliRunner().invoke(
        main,
        ["org", "delete-key", "acme-org", "-p", "openai", "--key-id", current["id"]],
        env=store_env,
    )
    assert deleted.exit_code == 0, deleted.output
    assert f"is narrowed to the deleted key {current['id']}" in deleted.stderr
    assert _budgets(store_env)[0]["key_gone"] is True
