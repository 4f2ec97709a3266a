"""The CLI's manners: a bad variable never blocks ``--help``; input mistakes exit 2; Ctrl-C exits
130; destructive commands ask on a terminal and take ``--yes``; ``--key-id`` needs no
``--provider``.

The terminal cases run ``byok`` as a real process on a pseudo-terminal; Ctrl-C is a real SIGINT.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from keys_support import random_key

from byok_plugin.cli import main

BYOK = [sys.executable, "-m", "byok_plugin"]
SUBCOMMANDS = ["keys", "usage", "run", "validate", "serve", "plugins", "fallback", "init", "demo"]


def _run(args: list[str], env: dict[str, str], stdin: str | None = None) -> Result:
    result = CliRunner().invoke(main, args, input=stdin, env=env, catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> dict[str, str]:
    environ = {
        "BYOK_HOME": str(tmp_path / "home"),
        "BYOK_DATABASE_URL": database_url,
        "BYOK_VALIDATE_KEYS": "0",
    }
    assert _run(["init"], environ).exit_code == 0
    return environ


def _store(env: dict[str, str], provider: str, label: str) -> str:
    result = _run(
        ["keys", "set", "-w", "acme", "-p", provider, "-l", label, "--no-test"],
        env,
        random_key(provider),
    )
    assert result.exit_code == 0, result.output
    return result.output.split("(")[1].split(",")[0]  # "stored ... 'label' (key_..., hint)"


def _labels(env: dict[str, str]) -> list[str]:
    import json

    listed = _run(["keys", "list", "-w", "acme", "--json"], env)
    return sorted(k["label"] for k in json.loads(listed.output)["keys"])


# --- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_a_bad_variable_never_blocks_help(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"], env={"BYOK_CHARGE_MULTIPLIER": "abc"})
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_a_bad_variable_stops_a_command_that_reads_settings_naming_it() -> None:
    result = CliRunner().invoke(main, ["usage"], env={"BYOK_CHARGE_MULTIPLIER": "abc"})
    assert result.exit_code == 2
    assert "BYOK_CHARGE_MULTIPLIER must be a decimal number, not 'abc'" in result.output
    assert "Traceback" not in result.output


# --- exit codes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["keys", "list", "-w", " padded"], 2, "must not start or end with whitespace"),
        (["keys", "delete", "-w", "acme", "--key-id", "nope"], 2, "a key id looks like"),
        (["keys", "delete", "-w", "acme", "--label", "x"], 2, "--provider is required"),
        (["keys", "disable", "-w", "acme", "--key-id", "key_abcdefgh123"], 1, "no stored key"),
        (["usage", "--since", "last-week"], 2, "is not a date"),
        (["fallback", "set", "-w", "acme", "sometimes"], 2, "is not one of"),
    ],
)
def test_input_mistakes_exit_2_and_not_found_exits_1(
    env: dict[str, str], args: list[str], code: int, expected: str
) -> None:
    result = _run(args, env)
    assert result.exit_code == code, result.output
    assert expected in result.output


# --- --key-id without --provider ---------------------------------------------------------------


def test_key_id_alone_picks_the_key_of_any_provider(env: dict[str, str]) -> None:
    openai_id = _store(env, "openai", "main")
    mistral_id = _store(env, "mistral", "main")
    disabled = _run(["keys", "disable", "-w", "acme", "--key-id", mistral_id], env)
    assert disabled.exit_code == 0, disabled.output
    assert f"disabled mistral key 'main' ({mistral_id}" in disabled.output
    deleted = _run(["keys", "delete", "-w", "acme", "--key-id", openai_id], env)
    assert deleted.exit_code == 0, deleted.output
    assert f"deleted openai key 'main' ({openai_id}" in deleted.output
    assert _labels(env) == ["main"]  # the mistral key is still there
    # a provider given that is not the key's: not found, nothing changed
    wrong = _run(["keys", "delete", "-w", "acme", "-p", "openai", "--key-id", mistral_id], env)
    assert wrong.exit_code == 1
    assert _labels(env) == ["main"]


# --- on a terminal -----------------------------------------------------------------------------


class Terminal:
    """``byok ARGS`` with its standard input and error on a pseudo-terminal."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(
            [*BYOK, *args],
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=slave,
            env={**os.environ, **env},
            cwd=Path(__file__).resolve().parents[1],
        )
        os.close(slave)
        self.screen = b""

    def read_until(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout  # a guard against a hang, not a measurement
        while text.encode() not in self.screen:
            assert time.monotonic() < deadline, self.screen.decode(errors="replace")
            ready, _, _ = select.select([self.master], [], [], 0.5)
            if ready:
                try:
                    self.screen += os.read(self.master, 4096)
                except OSError:  # the process ended and closed the terminal
                    assert text.encode() in self.screen, self.screen.decode(errors="replace")
        return self.screen.decode(errors="replace")

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def finish(self) -> tuple[int, str]:
        out, _ = self.process.communicate(timeout=120)
        try:
            while select.select([self.master], [], [], 0.2)[0]:
                self.screen += os.read(self.master, 4096)
        except OSError:
            pass
        os.close(self.master)
        return self.process.returncode, out.decode()


def test_delete_all_asks_on_a_terminal_and_a_no_changes_nothing(env: dict[str, str]) -> None:
    _store(env, "openai", "one")
    _store(env, "openai", "two")
    args = ["keys", "delete", "-w", "acme", "-p", "openai", "--all"]
    refused = Terminal(args, env)
    refused.read_until("Delete all 2 openai keys of workspace 'acme'? [y/N]")
    refused.type("n\n")
    code, _ = refused.finish()
    assert code == 1
    assert "nothing was changed" in refused.screen.decode()
    assert _labels(env) == ["one", "two"]

    accepted = Terminal(args, env)
    accepted.read_until("[y/N]")
    accepted.type("y\n")
    code, out = accepted.finish()
    assert code == 0, accepted.screen
    assert out.count("deleted openai key") == 2
    assert _labels(env) == []


def test_yes_does_not_ask(env: dict[str, str]) -> None:
    _store(env, "openai", "one")
    terminal = Terminal(["keys", "delete", "-w", "acme", "-p", "openai", "--all", "--yes"], env)
    code, out = terminal.finish()
    assert code == 0, terminal.screen
    assert "deleted openai key 'one'" in out
    assert b"[y/N]" not in terminal.screen


def test_replacing_a_label_asks_before_the_key_is_typed(env: dict[str, str]) -> None:
    key_id = _store(env, "openai", "main")
    terminal = Terminal(["keys", "set", "-w", "acme", "-p", "openai", "-l", "main"], env)
    screen = terminal.read_until("[y/N]")
    assert f"Replace openai key 'main' ({key_id}" in screen
    assert "API key" not in screen  # asked first: nothing typed in vain
    terminal.type("n\n")
    code, _ = terminal.finish()
    assert code == 1
    listed = _run(["keys", "list", "-w", "acme", "--json"], env)
    assert key_id in listed.output  # still the same key


def test_ctrl_c_exits_130(env: dict[str, str]) -> None:
    # `keys set` reads the key from a pipe that stays open: interrupted while it waits
    process = subprocess.Popen(
        [*BYOK, "keys", "set", "-w", "acme", "-p", "openai"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **env},
    )
    deadline = time.monotonic() + 120  # a guard against a hang, not a measurement
    syscall = Path(f"/proc/{process.pid}/syscall")
    while not syscall.read_text().startswith("0 0x0 "):  # read(0, ...): waiting for the key
        assert process.poll() is None
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert b"interrupted" in err
    assert b"Traceback" not in err
