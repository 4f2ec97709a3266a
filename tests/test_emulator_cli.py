"""``byok emulator``: keys from a file or stdin (never argv), loopback by default, clear errors."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time

import httpx
import pytest
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
    assert "unknown provider" in result.output
    assert "not-a-provider" not in result.output  # nothing of the line is echoed
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


def _emulator(*args: str, **popen: object) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BYOK_")}
    return subprocess.Popen(
        [sys.executable, "-m", "byok_plugin", "emulator", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**env, "PYTHONUNBUFFERED": "1"},
        text=True,
        **popen,  # type: ignore[arg-type]
    )


def test_a_taken_port_is_a_one_line_error_before_any_banner():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = _emulator("--port", str(port), "--accept-any-key")
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert f"Error: cannot listen on 127.0.0.1:{port}" in err
    assert "--port 0" in err
    # nothing that suggests the emulator is up: no banner, no export lines, no server's traceback
    assert "export " not in err
    assert "byok emulator on" not in err
    assert "Traceback" not in err
    assert "ERROR" not in err
    assert out == ""


def test_port_0_prints_the_port_actually_bound():
    proc = _emulator("--port", "0", "--accept-any-key")
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        deadline = time.monotonic() + 30
        while not any("BYOK_OPENAI_BASE_URL=" in line for line in lines):
            assert time.monotonic() < deadline, "no export line:\n" + "".join(lines)
            line = proc.stderr.readline()
            assert line, "the emulator exited:\n" + "".join(lines)
            lines.append(line)
        banner = next(line for line in lines if "byok emulator on " in line)
        base = banner.split("byok emulator on ", 1)[1].split(";", 1)[0]
        assert not base.endswith(":0"), banner
        openai = next(line for line in lines if "BYOK_OPENAI_BASE_URL=" in line)
        assert openai.strip() == f"export BYOK_OPENAI_BASE_URL={base}/openai/v1"
        # the port printed is the one the emulator listens on
        assert httpx.get(base + "/_emulator/health").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.0.0.2", "::1", "[::1]"])
def test_byok_serve_and_the_emulator_agree_on_loopback_addresses(host, tmp_path):
    """Both commands take the same loopback addresses: each gets past the check and fails on the
    port it finds taken, rather than refusing the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bind_host = "127.0.0.1" if host == "localhost" else host.strip("[]")
    with socket.socket(family) as taken:
        taken.bind((bind_host, 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        env = {"BYOK_HOME": str(tmp_path), "BYOK_EMULATOR_KEYS_FILE": ""}
        runner = CliRunner()
        emulator = runner.invoke(
            main, ["emulator", "--host", host, "--port", port, "--accept-any-key"], env=env
        )
        serve = runner.invoke(main, ["serve", "--host", host, "--port", port], env=env)
    for result in (emulator, serve):
        assert result.exit_code == 1, result.output
        assert "cannot listen on" in result.output
        assert f":{port}" in result.output
        assert "not a loopback address" not in result.output


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "example.com", "[::]"])
def test_byok_serve_and_the_emulator_refuse_the_same_other_addresses(host, tmp_path):
    env = {"BYOK_HOME": str(tmp_path), "BYOK_EMULATOR_KEYS_FILE": ""}
    runner = CliRunner()
    emulator = runner.invoke(
        main, ["emulator", "--host", host, "--port", "0", "--accept-any-key"], env=env
    )
    serve = runner.invoke(main, ["serve", "--host", host, "--port", "0"], env=env)
    assert (emulator.exit_code, serve.exit_code) == (2, 2)
    assert "--allow-remote" in emulator.output
    assert "not a loopback address" in serve.output
