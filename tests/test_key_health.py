"""Key health (``check_key_health``, ``byok keys check``): every enabled key checked live against
the emulator through ``byok_validate_key``, results recorded, a revoked key disabled after N checks
with an audit event, and a key out of credit reported as such (never counted as an auth refusal).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from byok_hookspecs import AuditEvent, CredentialRequest, hookimpl
from click.testing import CliRunner
from keys_support import (
    OPERATOR,
    keyring_value,
    leaks,
    make_app,
    master_key,
    service_for,
    settings_for,
)

from byok_plugin.app import App
from byok_plugin.cli import main
from byok_plugin.host.emulator import EmulatorServer, Fault, FaultKind
from byok_plugin.keys.health import check_key_health, key_health
from byok_plugin.resolution.organizations import org_owner


class Audit:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    @hookimpl
    def byok_audit(self, event: AuditEvent) -> None:
        self.events.append(event)


def test_a_revoked_key_is_disabled_after_n_checks_and_no_credit_is_its_own_reason(
    emulator: EmulatorServer, database_url: str, tmp_path: Path
) -> None:
    app = make_app(
        database_url, tmp_path, keys=[master_key()], validate=True, extra=emulator.environ()
    )
    audit = Audit()
    service, pm = service_for(app, audit)
    secrets_ = {
        "good": emulator.new_key("openai", "good"),
        "revoked": emulator.new_key("openai", "revoked"),
        "broke": emulator.new_key("anthropic", "broke"),
        "pooled": emulator.new_key("openai", "pooled"),
    }
    ids = {
        name: service.set_key(OPERATOR, owner, provider, secrets_[name], label=name).key.id
        for name, owner, provider in [
            ("good", "ws", "openai"),
            ("revoked", "ws", "openai"),
            ("broke", "ws", "anthropic"),
            ("pooled", org_owner("acme"), "openai"),
        ]
    }
    emulator.add_fault(Fault.for_key(FaultKind.NO_CREDIT, secrets_["broke"], times=None))
    try:
        first = {r.label: r for r in check_key_health(app, pm, disable_after=3)}
        assert {k: r.status for k, r in first.items()} == {
            "good": "valid",
            "revoked": "valid",
            "broke": "no_credit",
            "pooled": "valid",
        }
        assert "credit balance is too low" in first["broke"].message
        assert first["pooled"].owner_id == "org:acme"
        # the provider revokes one key: refused at each check, disabled at the third
        emulator.state.remove_key("openai", secrets_["revoked"])
        rounds = [
            {r.label: r for r in check_key_health(app, pm, disable_after=3)} for _ in range(3)
        ]
        assert [r["revoked"].status for r in rounds] == ["invalid"] * 3
        assert [r["revoked"].auth_failures for r in rounds] == [1, 2, 3]
        assert [r["revoked"].disabled for r in rounds] == [False, False, True]
        # out of credit is never an auth refusal: never disabled for it
        assert all(r["broke"].status == "no_credit" for r in rounds)
        assert all(r["broke"].auth_failures == 0 and not r["broke"].disabled for r in rounds)
        assert all(r["good"].status == "valid" for r in rounds)
        # recorded in the store; the key is disabled, audited, and no longer served
        with app.engine.connect() as conn:
            rows = {r.key_id: r for r in conn.execute(sa.select(key_health)).all()}
        assert rows[ids["revoked"]].auth_failures == 3
        assert rows[ids["broke"]].status == "no_credit"
        (info,) = [k for k in service.list_keys(OPERATOR, "ws", "openai") if k.label == "revoked"]
        assert info.status == "disabled"
        unhealthy = [e for e in audit.events if e.action == "key.unhealthy"]
        assert [(e.key_id, e.outcome, e.workspace_id) for e in unhealthy] == [
            (ids["revoked"], "error", "ws")
        ]
        assert "3 consecutive auth refusals" in unhealthy[0].detail
        assert any(e.action == "key.disabled" and e.key_id == ids["revoked"] for e in audit.events)
        for _ in range(3):
            credential = pm.hook.byok_resolve_credential(
                request=CredentialRequest("ws", "openai", "gpt-4o", actor=OPERATOR)
            )
            assert credential.key_id == ids["good"]
        # a fourth round checks the enabled keys only
        assert "revoked" not in {r.label for r in check_key_health(app, pm)}
        shown = json.dumps([r.to_dict() for rnd in rounds for r in rnd.values()])
        shown += "".join(e.detail for e in audit.events)
        assert leaks(shown, list(secrets_.values())) == []
    finally:
        app.close()


def test_byok_keys_check_reports_and_exits_1_on_a_failure(
    emulator: EmulatorServer, isolated_home: Path, sqlite_url: str
) -> None:
    env = {
        "BYOK_HOME": str(isolated_home),
        "BYOK_DATABASE_URL": sqlite_url,
        "BYOK_ENCRYPTION_KEYS": keyring_value(master_key()),
        "BYOK_VALIDATE_KEYS": "1",
        **emulator.environ(),
    }
    runner = CliRunner()
    good, broke = emulator.new_key("openai", "good"), emulator.new_key("openai", "broke")
    for label, key in (("good", good), ("broke", broke)):
        stored = runner.invoke(
            main, ["keys", "set", "-w", "ws", "-p", "openai", "-l", label], input=key, env=env
        )
        assert stored.exit_code == 0, stored.output
    fine = runner.invoke(main, ["keys", "check"], env=env)
    assert fine.exit_code == 0, fine.output
    assert fine.output.count(": valid") == 2
    emulator.add_fault(Fault.for_key(FaultKind.NO_CREDIT, broke, times=None))
    result = runner.invoke(main, ["keys", "check", "-w", "ws", "--json"], env=env)
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["version"] == 1
    assert sorted((r["label"], r["status"]) for r in document["keys"]) == [
        ("broke", "no_credit"),
        ("good", "valid"),
    ]
    assert "1 of 2 keys did not pass" in result.output
    assert leaks(result.output, [good, broke]) == []


def test_a_check_is_dated_by_the_apps_clock(
    emulator: EmulatorServer, database_url: str, tmp_path: Path
) -> None:
    now = datetime(2026, 3, 15, 13, 30, tzinfo=UTC)
    settings = settings_for(
        database_url, tmp_path, keys=[master_key()], validate=True, extra=emulator.environ()
    )
    app = App(settings, clock=lambda: now)
    service, pm = service_for(app, Audit())
    try:
        service.set_key(OPERATOR, "ws", "openai", emulator.new_key("openai", "good"), label="good")
        (result,) = check_key_health(app, pm)
        assert result.status == "valid"
        with app.engine.connect() as conn:
            checked = conn.execute(sa.select(key_health.c.checked_at)).scalars().all()
        assert checked == [now]  # not the wall clock's time
    finally:
        app.close()
