"""The byok command: version, help for every subcommand, and `byok plugins`."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from byok_plugin import __version__
from byok_plugin.cli import main


def _all_commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _all_commands(command, (*prefix, name))


COMMANDS = list(_all_commands(main))


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"byok, version {__version__}"


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_subcommand_has_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: main " + " ".join(path) in result.output or "Usage: byok" in result.output
    assert len(result.output.splitlines()) > 3


def test_plugins_table(isolated_home) -> None:
    result = CliRunner().invoke(main, ["plugins"], env={"BYOK_HOME": str(isolated_home)})
    assert result.exit_code == 0, result.output
    assert "byok_plugin" in result.output
    assert "byok_authorize (trylast) *" in result.output  # non-blocking
    assert "byok_validate_key (trylast)" in result.output  # it calls the provider
    assert "byok_validate_key (trylast) *" not in result.output


def test_plugins_json_lists_every_default_hook(isolated_home) -> None:
    result = CliRunner().invoke(main, ["plugins", "--json"], env={"BYOK_HOME": str(isolated_home)})
    assert result.exit_code == 0, result.output
    (row,) = [r for r in json.loads(result.output)["plugins"] if r["name"] == "byok_plugin"]
    assert row["distribution"] == "byok-plugin"
    assert row["version"] == __version__
    hooks = {h["hook"] for h in row["hooks"]}
    assert {"byok_authorize", "byok_audit"} <= hooks
    assert all(h["order"] == "trylast" for h in row["hooks"])
    # on the default SQLite store every hook but the live key check never waits on the network
    blocking = {h["hook"] for h in row["hooks"] if not h["nonblocking"]}
    assert blocking == {"byok_validate_key"}


def test_a_malformed_setting_is_a_clear_error_not_a_traceback(isolated_home) -> None:
    result = CliRunner().invoke(
        main,
        ["plugins"],
        env={"BYOK_HOME": str(isolated_home), "BYOK_CHARGE_MULTIPLIER": "lots"},
    )
    assert result.exit_code == 2
    assert "BYOK_CHARGE_MULTIPLIER" in result.output
    assert "Traceback" not in result.output


def test_a_warning_is_printed_once_and_errors_of_the_package_reach_stderr(isolated_home) -> None:
    import logging
    import os
    import subprocess
    import sys

    env = {**os.environ, "BYOK_HOME": str(isolated_home)}
    byok = [sys.executable, "-m", "byok_plugin"]
    subprocess.run([*byok, "init"], env=env, capture_output=True, check=True)
    done = subprocess.run(
        [*byok, "keys", "set", "-w", "acme", "-p", "mistral", "--no-test"],
        input="MISTRALKEYSECRET0123456789abcdefXYQ",
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stderr.count("unusual Mistral key shape") == 1, done.stderr

    # in-process: the command's handler shows the package's errors, once, however often it runs
    for _ in range(2):
        CliRunner().invoke(main, ["plugins"], env={"BYOK_HOME": str(isolated_home)})
    logger = logging.getLogger("byok")
    assert sum(getattr(h, "_byok_cli", False) for h in logger.handlers) == 1
