"""A third-party plugin distribution, installed for real, is found through the entry-point group.

The test builds tests/plugins/byok-fee-plugin with pip into a directory of its own and runs a host
in a fresh interpreter with that directory on its path, so the plugin is seen exactly as an
installed distribution is: through its dist-info entry points, and nowhere else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SOURCE = ROOT / "tests" / "plugins" / "byok-fee-plugin"

HOST = textwrap.dedent(
    """
    import json, sys
    from byok_hookspecs import Credential, CredentialSource, Usage, get_plugin_manager

    pm = get_plugin_manager()
    usage = Usage(provider="openai", model="gpt-4o-mini",
                  input_tokens=1_000_000, output_tokens=1_000_000)
    out = {"plugins": sorted(name for name, _ in pm.list_name_plugin())}
    for source in CredentialSource:
        credential = Credential(api_key="k", provider="openai", source=source)
        charge = pm.hook.byok_compute_charge(usage=usage, credential=credential)
        out[source.value] = None if charge is None else {
            "amount": str(charge.amount), "reason": charge.reason,
            "list_cost": None if charge.list_cost is None else str(charge.list_cost),
        }
    out["host_imports"] = sorted(m for m in sys.modules if m.startswith("byok"))
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """byok-fee-plugin built from source and installed with pip into its own directory."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
            "--no-build-isolation", "--target", str(target), str(PLUGIN_SOURCE),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    assert list(target.glob("byok_fee_plugin-1.0.0.dist-info/entry_points.txt"))
    return target


def run_host(site: Path | None, isolated_home: Path, **env: str) -> dict:
    environ = {**os.environ, "BYOK_HOME": str(isolated_home), **env}
    environ.pop("PYTHONPATH", None)
    if site is not None:
        environ["PYTHONPATH"] = str(site)
    done = subprocess.run(
        [sys.executable, "-c", HOST], env=environ, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def test_installed_plugin_is_found_and_its_charge_wins(plugin_site: Path, isolated_home: Path):
    without = run_host(None, isolated_home)
    with_plugin = run_host(plugin_site, isolated_home)

    assert "byok_fee" not in without["plugins"]
    assert {"byok_fee", "byok_plugin"} <= set(with_plugin["plugins"])

    # the default: BYOK is free, and says what the call cost at list price
    assert Decimal(without["workspace"]["amount"]) == 0
    list_cost = Decimal(without["workspace"]["list_cost"])
    assert list_cost > 0
    # the plugin's tryfirst wrapper wins: 5% of list price on BYOK usage
    assert with_plugin["workspace"]["reason"] == "byok_fee"
    assert Decimal(with_plugin["workspace"]["amount"]) == (list_cost * Decimal("0.05")).quantize(
        Decimal("0.000001")
    )
    # and leaves the other sources as the default priced them
    assert with_plugin["platform"] == without["platform"]
    assert with_plugin["block"] == without["block"]


def test_a_blocked_plugin_stays_out(plugin_site: Path, isolated_home: Path) -> None:
    out = run_host(plugin_site, isolated_home, BYOK_BLOCK_PLUGINS="byok_fee")
    assert "byok_fee" not in out["plugins"]
    assert out["workspace"]["reason"] == "byok"
    assert Decimal(out["workspace"]["amount"]) == 0


def test_byok_plugins_lists_the_installed_plugin(plugin_site: Path, isolated_home: Path) -> None:
    environ = {**os.environ, "BYOK_HOME": str(isolated_home), "PYTHONPATH": str(plugin_site)}
    done = subprocess.run(
        [sys.executable, "-m", "byok_plugin", "plugins", "--json"],
        env=environ,
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {row["name"]: row for row in json.loads(done.stdout)["plugins"]}
    assert rows["byok_fee"]["distribution"] == "byok-fee-plugin"
    assert rows["byok_fee"]["version"] == "1.0.0"
    assert rows["byok_fee"]["hooks"] == [
        {"hook": "byok_compute_charge", "order": "tryfirst", "wrapper": True, "nonblocking": True}
    ]
    assert rows["byok_plugin"]["distribution"] == "byok-plugin"


def test_the_installed_plugin_keeps_the_runner_on_its_event_loop(
    plugin_site: Path, isolated_home: Path
) -> None:
    """The fee plugin declares its wrapper non-blocking: with it installed beside the default
    plugin (SQLite store), no implementation of the hooks a run goes through may block."""
    environ = {**os.environ, "BYOK_HOME": str(isolated_home), "PYTHONPATH": str(plugin_site)}
    host = textwrap.dedent(
        """
        from byok_hookspecs import blocking_implementations, get_plugin_manager
        from byok_plugin.host.runner import RUN_HOOKS, WorkflowRunner

        pm = get_plugin_manager()
        assert pm.get_plugin("byok_fee") is not None
        print(blocking_implementations(pm, RUN_HOOKS), WorkflowRunner(pm, {}).hooks_in_thread())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", host], env=environ, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["[]", "False"]


RECORDING_HOST = textwrap.dedent(
    """
    from byok_hookspecs import (Credential, CredentialSource, Usage, UsageRecord,
                                get_plugin_manager)

    pm = get_plugin_manager()
    usage = Usage(provider="anthropic", model="claude-sonnet-4-5",
                  input_tokens=120_000, cached_input_tokens=40_000, output_tokens=9_000)
    credential = Credential(api_key="k", provider="anthropic", source=CredentialSource.WORKSPACE,
                            key_id="key_1")
    charge = pm.hook.byok_compute_charge(usage=usage, credential=credential)
    for attempt in (1, 1):  # the same record twice: written once
        pm.hook.byok_record_usage(record=UsageRecord(
            idempotency_key="run-1:draft:1", workspace_id="acme", usage=usage, charge=charge,
            source=credential.source, key_id=credential.key_id, run_id="run-1",
            block_id="draft", attempt=attempt))
    print(charge.amount, charge.list_cost)
    """
)


def test_the_ledger_records_the_installed_plugins_charge(
    plugin_site: Path, isolated_home: Path
) -> None:
    environ = {**os.environ, "BYOK_HOME": str(isolated_home), "PYTHONPATH": str(plugin_site)}
    done = subprocess.run(
        [sys.executable, "-c", RECORDING_HOST],
        env=environ,
        capture_output=True,
        text=True,
        check=True,
    )
    amount, list_cost = (Decimal(v) for v in done.stdout.split())
    assert list_cost > 0
    assert amount == (list_cost * Decimal("0.05")).quantize(Decimal("0.000001"))

    report = subprocess.run(
        [sys.executable, "-m", "byok_plugin", "usage", "--json", "--workspace", "acme"],
        env=environ,
        capture_output=True,
        text=True,
        check=True,
    )
    totals = json.loads(report.stdout)["totals"]
    assert totals["calls"] == 1
    assert totals["byok_calls"] == 1
    assert Decimal(totals["charged"]) == amount
    assert Decimal(totals["list_cost"]) == list_cost


def test_a_plugin_name_that_matches_nothing_is_said_not_silently_ignored(
    plugin_site: Path, isolated_home: Path
) -> None:
    # a typo in BYOK_BLOCK_PLUGINS blocks nothing, in BYOK_LOAD_PLUGINS loads nothing: both are
    # warned about, by the host's manager (its log) and by `byok plugins`
    environ = {
        **os.environ,
        "BYOK_HOME": str(isolated_home),
        "PYTHONPATH": str(plugin_site),
        "BYOK_BLOCK_PLUGINS": "byok_fe",
        "BYOK_LOAD_PLUGINS": "byok_plugin,byok_fee,byok-billing",
    }
    host = subprocess.run(
        [sys.executable, "-c", HOST], env=environ, capture_output=True, text=True, check=True
    )
    assert "byok_fee" in json.loads(host.stdout)["plugins"]  # the misspelt block blocked nothing
    for variable, name in (
        ("BYOK_BLOCK_PLUGINS", "byok_fe"),
        ("BYOK_LOAD_PLUGINS", "byok-billing"),
    ):
        assert f"{variable} names {name}, which no installed plugin is called" in host.stderr
    assert "installed: byok-fee-plugin, byok-plugin, byok_fee, byok_plugin" in host.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "byok_plugin", "plugins"],
        env=environ,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "warning: BYOK_BLOCK_PLUGINS names byok_fe" in listed.stderr
    as_json = subprocess.run(
        [sys.executable, "-m", "byok_plugin", "plugins", "--json"],
        env=environ,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(as_json.stdout)["unmatched"] == {
        "BYOK_LOAD_PLUGINS": ["byok-billing"],
        "BYOK_BLOCK_PLUGINS": ["byok_fe"],
    }
    # names that all match: nothing said
    environ.update(BYOK_BLOCK_PLUGINS="byok_fee", BYOK_LOAD_PLUGINS="byok-plugin,byok_fee")
    quiet = subprocess.run(
        [sys.executable, "-c", HOST], env=environ, capture_output=True, text=True, check=True
    )
    assert "no installed plugin" not in quiet.stderr
