"""``byok emulator``: keys from a file or stdin (never argv), loopback by default, clear errors."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time

import httpx
from click.testing import CliRunner

from byok_plugin.cli import main


def test_refuses_to_start_without_keys_or_accept_any():
    result = CliRunner().invoke(
        main, ["emulator", "--port", "0"], env={"BYOK_EMULATOR_KEYS_FILE": ""}
    )
    assert result.exit_code == 2
    assert "--keys-file" in result.output
    assert "--accept-any-key" in result.output


def test_refuses_a_non_loopback_address_unless_allowed():
    result = CliRunner().invoke(main, ["emulator", "--host", "0.0.0.0", "--accept-any-key"])
    assert result.exit_code == 2
    assert "--allow-remote" in result.output


def test_a_malformed_keys_file_names_the_line_not_the_key(tmp_path):
    secret = secrets.token_urlsafe(16)
    keys = tmp_path / "keys.txt"
    keys.write_text(f"openai={secret}\nnot-a-provider={secret}\n")
    result = CliRunner().invoke(main, ["emulator", "--keys-file", str(keys)])
    assert result.exit_code == 2
    assert "line 2" in result.output
    assert "not-a-provider" in result.output
    assert secret not in result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serves_the_keys_read_from_stdin(tmp_path):
    key = "sk-" + secrets.token_urlsafe(24)
    port = _free_port()
    env = {**os.environ, "BYOK_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from byok_plugin.cli import main; main()",
            "emulator",
            "--port",
            str(port),
            "--keys-file",
            "-",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(f"openai:demo={key}\n")
        proc.stdin.close()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx.get(url + "/_emulator/health")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the emulator did not start"
                time.sleep(0.1)
        ok = httpx.get(url + "/openai/v1/models", headers={"authorization": f"Bearer {key}"})
        bad = httpx.get(url + "/openai/v1/models", headers={"authorization": "Bearer nope"})
        assert (ok.status_code, bad.status_code) == (200, 401)
        calls = httpx.get(url + "/_emulator/calls").json()
        assert [(c["key_label"], c["status"]) for c in calls] == [("demo", 200), (None, 401)]
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert f"BYOK_OPENAI_BASE_URL=http://127.0.0.1:{port}/openai/v1" in err
    assert key not in err
