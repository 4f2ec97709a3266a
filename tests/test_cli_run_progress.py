"""``byok run`` tells of a provider client's retries and waits (attempt n of m, the seconds it
waits and whether the provider's Retry-After set them), takes ``--timeout`` per provider
request, and ``byok -v`` shows the package's log. Real HTTP against the emulator's faults."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from byok_plugin.cli import main
from byok_plugin.cli.demo import BYOK_WORKSPACE, PLATFORM_WORKSPACE, DemoStack
from byok_plugin.host.emulator import EmulatorServer, Fault, FaultKind

ROOT = Path(__file__).resolve().parents[1]
TRIAGE = str(ROOT / "sample_workflows" / "support-ticket-triage.json")
TICKET = "ticket=My invoice is wrong"


@pytest.fixture
def stack(emulator: EmulatorServer, tmp_path: Path) -> Iterator[DemoStack]:
    built = DemoStack(tmp_path / "home", emulator)
    built.store_workspace_keys(BYOK_WORKSPACE)
    yield built
    built.close()


def run(stack: DemoStack, *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=stack.environ)


def test_a_rate_limit_wait_shows_the_attempt_and_the_retry_after(stack: DemoStack) -> None:
    stack.emulator.add_fault(
        Fault(FaultKind.RATE_LIMIT, provider="openai", retry_after=0.2, times=2)
    )
    result = run(stack, "run", TRIAGE, "-w", PLATFORM_WORKSPACE, "-i", TICKET)
    assert result.exit_code == 0, result.output
    waits = [line for line in result.stderr.splitlines() if " waiting " in line]
    assert len(waits) == 2, result.stderr
    assert re.search(
        r"\] classify\s+waiting\s+openai attempt 1 of 4 failed \(rate limit 429\): "
        r"waiting 0\.2 s \(Retry-After\)",
        waits[0],
    ), waits
    assert "attempt 2 of 4" in waits[1]
    assert "INFO" not in result.stderr  # no log without -v


def test_timeout_bounds_each_request_and_the_waits_are_shown(stack: DemoStack) -> None:
    # every openai answer takes 1.5 s: --timeout 0.2 gives up on each request, the client retries
    # (on the workspace's own key: on the platform's, a request the provider may have run is not
    # sent again, see test_platform_retries)
    stack.emulator.add_fault(Fault(FaultKind.SLOW, provider="openai", delay=1.5, times=None))
    result = run(stack, "-v", "run", TRIAGE, "-w", BYOK_WORKSPACE, "-i", TICKET, "--timeout", "0.2")
    assert result.exit_code == 1, result.output
    waits = [line for line in result.stderr.splitlines() if " waiting " in line]
    assert any("openai attempt 1 of 4 failed (timeout)" in line for line in waits), result.stderr
    assert not any("Retry-After" in line for line in waits)  # backoff, not the provider's hint
    # -v: the package's log (information: the runner logs each wait) reaches stderr
    assert "byok: INFO: block classify: openai attempt 1 of 4 failed (timeout)" in result.stderr
    assert "Error: " in result.stderr


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_a_bad_timeout_is_an_input_mistake(stack: DemoStack, value: str) -> None:
    result = run(stack, "run", TRIAGE, "-w", BYOK_WORKSPACE, "-i", TICKET, "--timeout", value)
    assert result.exit_code == 2
    assert "--timeout" in result.output
