"""``byok init`` and ``byok keys ...`` through click's runner (and one real subprocess)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from keys_support import keyring_value, leaks, master_key, random_key

from byok_plugin.cli import main
from byok_plugin.core.crypto import Keyring


def _run(args: list[str], env: dict[str, str], stdin: str | None = None) -> Result:
    result = CliRunner().invoke(main, args, input=stdin, env=env, catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


@pytest.fixture
def env(isolated_home: Path, database_url: str) -> dict[str, str]:
    return {
        "BYOK_HOME": str(isolated_home),
        "BYOK_DATABASE_URL": database_url,
        "BYOK_VALIDATE_KEYS": "0",
    }


def test_init_creates_a_private_key_file_once(env: dict[str, str], isolated_home: Path) -> None:
    first = _run(["init"], env)
    assert first.exit_code == 0, first.output
    key_file = isolated_home / "master.keys"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert "IMPORTANT: back up the master key file" in first.stderr
    assert "database ready" in first.stdout
    content = key_file.read_bytes()

    again = _run(["init"], env)
    assert again.exit_code == 0
    assert "already exists: kept as it is" in again.stdout
    assert key_file.read_bytes() == content

    rotated = _run(["init", "--new-master-key"], env)
    assert rotated.exit_code == 0
    assert "byok keys rewrap" in rotated.stdout
    assert key_file.read_bytes() != content
    assert content.splitlines()[-1] in key_file.read_bytes().splitlines()
    for result in (first, again, rotated):
        assert leaks(result.output, [content.decode().splitlines()[-1].split(":", 1)[1]]) == []


def test_init_with_keys_in_the_environment_writes_no_file(
    env: dict[str, str], isolated_home: Path
) -> None:
    env = {**env, "BYOK_ENCRYPTION_KEYS": keyring_value(master_key("envkey"))}
    result = _run(["init"], env)
    assert result.exit_code == 0
    assert "from BYOK_ENCRYPTION_KEYS (current: envkey)" in result.stdout
    assert not (isolated_home / "master.keys").exists()
    refused = _run(["init", "--new-master-key"], env)
    assert refused.exit_code == 2
    assert "add the new key first in that variable" in refused.output


def _master_ids(key_file: Path) -> list[str]:
    lines = key_file.read_text().splitlines()
    return [line.split(":", 1)[0] for line in lines if line and not line.startswith("#")]


def test_a_rotation_ends_with_retiring_the_old_master_key(
    env: dict[str, str], isolated_home: Path
) -> None:
    key_file = isolated_home / "master.keys"
    assert _run(["init"], env).exit_code == 0
    (old,) = _master_ids(key_file)
    api_key = random_key("anthropic")
    assert _run(["keys", "set", "-w", "acme", "-p", "anthropic"], env, api_key).exit_code == 0
    assert _run(["init", "--new-master-key"], env).exit_code == 0
    new, kept = _master_ids(key_file)
    assert kept == old
    secrets_in_file = [line.split(":", 1)[1] for line in key_file.read_text().splitlines()[-2:]]

    too_early = _run(["keys", "retire-master-key", old], env)
    assert too_early.exit_code == 1
    assert f"1 stored keys are still encrypted under master key {old}" in too_early.output
    assert "byok keys rewrap" in too_early.output
    current = _run(["keys", "retire-master-key", new], env)
    assert current.exit_code == 1
    assert f"master key {new} is the current one" in current.output
    unknown = _run(["keys", "retire-master-key", "mk_nope"], env)
    assert unknown.exit_code == 1
    assert f"holds no master key 'mk_nope' (it holds {new}, {old})" in unknown.output
    assert _master_ids(key_file) == [new, old]  # nothing changed by a refusal

    rewrap = _run(["keys", "rewrap"], env)
    assert "retire them with `byok keys retire-master-key ID`" in rewrap.stdout
    retired = _run(["keys", "retire-master-key", old], env)
    assert retired.exit_code == 0, retired.output
    assert f"retired master key {old}" in retired.stdout
    assert _master_ids(key_file) == [new]
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # the retired key is kept alone beside the file, private, in the key file's own format
    kept = isolated_home / f"master.keys.retired-{old}"
    assert f"kept alone in {kept}" in retired.stderr
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert Keyring.from_file(kept).ids == (old,)
    # the stored key still decrypts under what is left, and nothing printed a secret
    listed = json.loads(_run(["keys", "list", "-w", "acme", "--json"], env).stdout)["keys"]
    assert listed[0]["master_key_id"] == new
    outputs = "".join(r.output for r in (too_early, current, unknown, rewrap, retired))
    assert leaks(outputs, [api_key, *secrets_in_file]) == []
    audit = _run(["keys", "list", "-w", "acme"], env)  # the store still opens with one key
    assert audit.exit_code == 0


def test_retiring_a_master_key_from_the_environment_says_where_to_remove_it(
    env: dict[str, str], isolated_home: Path
) -> None:
    first, second = master_key("mk_new"), master_key("mk_old")
    env = {**env, "BYOK_ENCRYPTION_KEYS": f"{keyring_value(first)},{keyring_value(second)}"}
    assert _run(["init"], env).exit_code == 0
    refused = _run(["keys", "retire-master-key", "mk_old"], env)
    assert refused.exit_code == 1
    assert "no stored key uses master key mk_old any more" in refused.output
    assert "remove its entry from that variable" in refused.output
    assert not (isolated_home / "master.keys").exists()


def test_the_whole_flow(env: dict[str, str]) -> None:
    assert _run(["init"], env).exit_code == 0
    key = random_key("openai")
    stored = _run(["keys", "set", "--workspace", "acme", "--provider", "openai"], env, key + "\n")
    assert stored.exit_code == 0, stored.output
    assert "stored openai key 'default'" in stored.stdout
    assert f"{key[:6]}...{key[-4:]}" in stored.stdout

    second = random_key("openai")
    _run(["keys", "set", "-w", "acme", "-p", "openai", "-l", "backup", "--no-test"], env, second)
    table = _run(["keys", "list", "--workspace", "acme"], env)
    assert table.exit_code == 0
    assert "default" in table.stdout
    assert "backup" in table.stdout
    assert f"{second[:6]}...{second[-4:]}" in table.stdout
    listed = json.loads(_run(["keys", "list", "-w", "acme", "--json"], env).stdout)["keys"]
    assert [k["label"] for k in listed] == ["default", "backup"]
    assert all(k["hint"].startswith("sk-pro...") for k in listed)

    replaced = _run(["keys", "set", "-w", "acme", "-p", "openai"], env, random_key("openai"))
    assert "replaced openai key 'default'" in replaced.stdout
    assert f"the previous key {listed[0]['id']}" in replaced.stdout

    disabled = _run(["keys", "disable", "-w", "acme", "-p", "openai", "--label", "backup"], env)
    assert "disabled openai key 'backup'" in disabled.stdout
    enabled = _run(
        ["keys", "enable", "-w", "acme", "-p", "openai", "--key-id", listed[1]["id"]], env
    )
    assert "enabled openai key 'backup'" in enabled.stdout

    rewrap = _run(["keys", "rewrap", "--dry-run"], env)
    assert rewrap.exit_code == 0
    assert "2 keys under master key" in rewrap.stdout
    assert "dry run: 0 rows would be rewrapped" in rewrap.stdout

    deleted = _run(["keys", "delete", "-w", "acme", "-p", "openai", "--all"], env)
    assert deleted.stdout.count("deleted openai key") == 2
    empty = _run(["keys", "list", "-w", "acme"], env)
    assert "no keys stored for workspace 'acme'" in empty.stdout
    everything = "".join(r.output for r in (stored, table, replaced, disabled, enabled, rewrap))
    assert leaks(everything, [key, second]) == []


def test_keys_test_checks_live_against_the_emulator(env: dict[str, str], emulator) -> None:
    good, bad = random_key("anthropic"), random_key("anthropic")
    emulator.add_key("anthropic", good)
    env = {**env, **emulator.environ(), "BYOK_VALIDATE_KEYS": "1"}
    _run(["init"], env)
    assert (
        _run(["keys", "set", "-w", "acme", "-p", "anthropic", "-l", "good"], env, good).exit_code
        == 0
    )
    rejected = _run(["keys", "set", "-w", "acme", "-p", "anthropic", "-l", "bad"], env, bad)
    assert rejected.exit_code == 1
    assert "not stored: the live check said invalid" in rejected.output
    assert (
        _run(
            ["keys", "set", "-w", "acme", "-p", "anthropic", "-l", "bad", "--no-test"], env, bad
        ).exit_code
        == 0
    )

    passing = _run(["keys", "test", "-w", "acme", "-p", "anthropic", "-l", "good"], env)
    assert passing.exit_code == 0
    assert "valid: anthropic accepted the key" in passing.stdout
    failing = _run(["keys", "test", "-w", "acme", "-p", "anthropic"], env)
    assert failing.exit_code == 1
    assert "1 of 2 keys did not pass the live check" in failing.output
    assert leaks(rejected.output + passing.output + failing.output, [good, bad]) == []


@pytest.mark.parametrize(
    ("args", "stdin", "code", "expected"),
    [
        (
            ["keys", "set", "-w", "acme", "-p", "openai", "{key}"],
            "",
            2,
            "never read from the command line",
        ),
        (["keys", "set", "-w", "acme", "-p", "openai"], "", 2, "no key given"),
        (["keys", "set", "-w", "acme", "-p", "azure"], "{key}", 2, "'azure' is not one of"),
        (["keys", "set", "-w", "acme", "-p", "anthropic"], "{key}", 2, "start with 'sk-ant-'"),
        (
            ["keys", "set", "-w", "acme", "-p", "openai"],
            "{key} {key}",
            2,
            "whitespace at character",
        ),
        (["keys", "delete", "-w", "acme", "-p", "openai"], None, 2, "exactly one of --label"),
        (
            ["keys", "delete", "-w", "acme", "-p", "openai", "--all"],
            None,
            1,
            "no stored openai key",
        ),
        (
            ["keys", "enable", "-w", "acme", "-p", "openai", "--key-id", "{key}"],
            None,
            2,
            "a key id looks like",
        ),
        (
            ["keys", "test", "-w", "acme", "-p", "openai", "-l", "x"],
            None,
            1,
            "no stored openai key labelled",
        ),
    ],
)
def test_user_mistakes_are_clear_errors_without_the_key(  # exit 2: input; 1: not found
    env: dict[str, str], args: list[str], stdin: str | None, code: int, expected: str
) -> None:
    _run(["init"], env)
    key = random_key("openai")
    result = _run(
        [a.format(key=key) for a in args], env, stdin.format(key=key) if stdin is not None else None
    )
    assert result.exit_code == code, result.output
    assert expected in result.output
    assert leaks(result.output, [key]) == []


def test_without_a_master_key_the_error_says_how_to_make_one(env: dict[str, str]) -> None:
    result = _run(["keys", "set", "-w", "acme", "-p", "openai"], env, random_key("openai"))
    assert result.exit_code == 1
    assert "run `byok init`" in result.output
    assert "BYOK_ENCRYPTION_KEYS" in result.output


def test_an_unreachable_database_is_a_clear_error(isolated_home: Path) -> None:
    env = {
        "BYOK_HOME": str(isolated_home),
        "BYOK_DATABASE_URL": "postgresql://byok:pw-not-shown@127.0.0.1:1/byok",
        "BYOK_ENCRYPTION_KEYS": keyring_value(master_key()),
    }
    result = _run(["keys", "list", "-w", "acme"], env)
    assert result.exit_code == 1
    assert "the key store did not answer" in result.output
    assert "pw-not-shown" not in result.output


def test_the_real_command_reads_the_key_from_a_pipe(env: dict[str, str]) -> None:
    """The README's commands, as a user types them (a real process, a real pipe)."""
    full_env = {**os.environ, **env}
    byok = [sys.executable, "-m", "byok_plugin"]
    subprocess.run([*byok, "init"], env=full_env, check=True, capture_output=True)
    key = random_key("mistral")
    done = subprocess.run(
        [*byok, "keys", "set", "--workspace", "acme", "--provider", "mistral"],
        input=key,
        env=full_env,
        capture_output=True,
        text=True,
        check=True,
    )
    listed = subprocess.run(
        [*byok, "keys", "list", "--workspace", "acme"],
        env=full_env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"{key[:6]}...{key[-4:]}" in listed.stdout
    assert leaks(done.stdout + done.stderr + listed.stdout + listed.stderr, [key]) == []


def test_on_a_terminal_the_key_is_asked_for_without_echo(
    sqlite_url: str, isolated_home: Path
) -> None:
    """A real pseudo-terminal: the prompt shows, the typed key is not echoed, and it is stored."""
    import select

    env = {
        **os.environ,
        "BYOK_HOME": str(isolated_home),
        "BYOK_DATABASE_URL": sqlite_url,
        "BYOK_VALIDATE_KEYS": "0",
    }
    byok = [sys.executable, "-m", "byok_plugin"]
    subprocess.run([*byok, "init"], env=env, check=True, capture_output=True)
    key = random_key("mistral")
    primary, secondary = os.openpty()
    proc = subprocess.Popen(
        [*byok, "keys", "set", "-w", "acme", "-p", "mistral"],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env=env,
        start_new_session=True,  # no controlling terminal: getpass uses this pty
    )
    os.close(secondary)

    def read_until(marker: bytes | None, timeout: float = 30) -> bytes:
        out = b""
        while marker is None or marker not in out:
            ready, _, _ = select.select([primary], [], [], timeout)
            if not ready:
                break
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # the other side closed
                break
            if not chunk:
                break
            out += chunk
        return out

    try:
        shown = read_until(b"(input hidden)")
        assert b"mistral API key for workspace acme (input hidden)" in shown
        os.write(primary, key.encode() + b"\n")
        shown += read_until(None)
        assert proc.wait(timeout=30) == 0, shown
    finally:
        os.close(primary)
        if proc.poll() is None:
            proc.kill()
    text = shown.decode(errors="replace")
    assert "stored mistral key 'default'" in text
    assert leaks(text, [key]) == []  # not echoed, not printed


def test_an_unusable_home_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {"BYOK_HOME": str(blocker / "home")}
    init = _run(["init"], env)
    assert init.exit_code == 1
    assert "cannot create master key file" in init.output
    env["BYOK_ENCRYPTION_KEYS"] = keyring_value(master_key())
    listed = _run(["keys", "list", "-w", "acme"], env)
    assert listed.exit_code == 1
    assert "while creating the database file" in listed.output
