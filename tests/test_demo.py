"""``byok demo``: on a machine with nothing configured, offline, it runs a sample in a BYOK
workspace and a platform one and shows BYOK charged $0.00 and the platform the priced amount;
it prints no secret and leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner

from byok_plugin.cli import demo as demo_module
from byok_plugin.cli import main
from byok_plugin.core.crypto import MasterKey

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted(p.stem for p in (ROOT / "sample_workflows").glob("*.json"))
SUMMARY = re.compile(
    r"acme-byok charged \$(?P<byok>[\d.]+) \(its own provider accounts paid the \$(?P<listed>[\d.]+) "
    r"list cost\); globex-platform charged \$(?P<platform>[\d.]+) at list price"
)


def test_demo_runs_on_a_fresh_machine_with_nothing_configured(tmp_path: Path) -> None:
    home = tmp_path / "home"
    tmp = tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    # no BYOK_* variable, no provider key, an empty HOME; proxies set to a dead address, so that
    # any attempt to leave the machine would fail the run
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "",
    }
    done = subprocess.run(
        [sys.executable, "-m", "byok_plugin", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = " ".join(done.stdout.split())
    summary = SUMMARY.search(out)
    assert summary, done.stdout
    assert Decimal(summary["byok"]) == 0
    assert Decimal(summary["platform"]) == Decimal(summary["listed"]) > 0
    assert "acme-byok: support-ticket-triage" in out
    assert "globex-platform: support-ticket-triage" in out
    assert re.search(r"acme-byok \d+ workspace \$0\.00", out)
    assert re.search(rf"globex-platform \d+ platform \${re.escape(summary['platform'])}", out)
    # progress went to stderr as plain lines
    assert re.search(r"\]\s+classify\s+completed\s+workspace key", done.stderr)
    assert re.search(r"\]\s+classify\s+completed\s+platform key", done.stderr)
    # nothing left behind: no user data directory, no temporary directory
    assert list(home.iterdir()) == []
    assert list(tmp.iterdir()) == []


def test_demo_prints_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    real_key = demo_module.realistic_key
    real_master = demo_module.generate_master_key

    def recording_key(provider: str) -> str:
        made.append(real_key(provider))
        return made[-1]

    def recording_master(key_id: str | None = None) -> MasterKey:
        master = real_master(key_id)
        import base64

        made.append(base64.b64encode(master.secret).decode())
        made.append(master.secret.hex())
        return master

    monkeypatch.setattr(demo_module, "realistic_key", recording_key)
    monkeypatch.setattr(demo_module, "generate_master_key", recording_master)
    result = CliRunner().invoke(
        main, ["demo", "--workflow", "release-notes-translation", "--stream"]
    )
    assert result.exit_code == 0, result.output
    assert len(made) == 5 * 2 + 1 + 2
    for secret in made:
        assert secret not in result.output
        assert secret[-12:] not in result.output


@pytest.mark.parametrize("name", SAMPLES)
def test_demo_runs_every_sample(name: str) -> None:
    result = CliRunner().invoke(main, ["demo", "--workflow", name])
    assert result.exit_code == 0, result.output
    summary = SUMMARY.search(" ".join(result.stdout.split()))
    assert summary, result.stdout
    assert Decimal(summary["byok"]) == 0
    assert Decimal(summary["platform"]) > 0


def test_demo_names_the_samples_when_a_workflow_is_unknown() -> None:
    result = CliRunner().invoke(main, ["demo", "--workflow", "nope"])
    assert result.exit_code == 2
    assert "no sample workflow 'nope'" in result.output
    for name in SAMPLES:
        assert name in result.output
