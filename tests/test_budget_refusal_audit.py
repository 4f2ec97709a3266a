"""A budget refusal is audited: after a fallback to the platform key whose reservation does not
fit, the audit log says the fallback was chosen and then refused, not only that it was used.

The reference runner and the real plugin on a SQLite file and on PostgreSQL, over real HTTP
against the emulator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from byok_hookspecs import CredentialSource
from test_budgets_runner import ANTHROPIC_CALL

from byok_plugin.cli.demo import BYOK_WORKSPACE, DemoStack
from byok_plugin.host.emulator import EmulatorServer
from byok_plugin.host.run_result import RunStatus


@pytest.fixture
def stack(emulator: EmulatorServer, tmp_path: Path, database_url: str) -> Iterator[DemoStack]:
    built = DemoStack(tmp_path / "home", emulator, database_url=database_url)
    built.store_workspace_keys(BYOK_WORKSPACE)
    yield built
    built.close()


def test_a_fallback_refused_by_a_budget_is_audited_after_the_fallback(stack: DemoStack) -> None:
    # the workspace's own key is refused; on_error would let the platform serve the call, but the
    # workspace's platform-charge budget has no room for it
    stack.app.budgets.set_budget(BYOK_WORKSPACE, "charges", limit="0.000001")
    stack.emulator.state.remove_key("anthropic", stack.workspace_keys["anthropic"])
    stack.set_fallback_policy(BYOK_WORKSPACE, "on_error")
    sent = len([c for c in stack.emulator.calls() if c.method == "POST"])

    result = stack.run(ANTHROPIC_CALL, BYOK_WORKSPACE, {})

    assert result.status is RunStatus.FAILED
    assert "budget 'charges'" in (result.blocks["answer"].error or "")
    # the refused workspace-key attempt went out; the platform call never did
    assert len([c for c in stack.emulator.calls() if c.method == "POST"]) == sent + 1
    events = stack.app.audit_store.events(BYOK_WORKSPACE)  # newest first
    actions = [e.action for e in events]
    assert "fallback.used" in actions
    assert "budget.refused" in actions
    assert actions.index("budget.refused") < actions.index("fallback.used")  # written after it
    refused = events[actions.index("budget.refused")]
    assert refused.outcome == "denied"
    assert refused.provider == "anthropic"
    assert "budget 'charges'" in refused.detail
    assert CredentialSource.PLATFORM.value in refused.detail
    assert f"run {result.run_id}" in refused.detail
    assert "block answer" in refused.detail
