"""The emulator's control API and keys file against a hostile web page or a careless keys file:
a cross-origin ``text/plain`` POST, a foreign ``Host`` (DNS rebinding), a bare key on a line."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import httpx
import pytest
from click.testing import CliRunner

from byok_plugin.cli import main
from byok_plugin.host.emulator import Fault, FaultKind


def _emulator(*args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BYOK_")}
    return subprocess.Popen(
        [sys.executable, "-m", "byok_plugin", "emulator", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**env, "PYTHONUNBUFFERED": "1"},
        text=True,
    )


def _base(emulator) -> str:
    return emulator.url + "/_emulator"


@pytest.mark.parametrize("route", ["/keys", "/faults"])
def test_a_cross_origin_text_plain_post_changes_nothing(emulator, route):
    """What a web page can send without a CORS preflight: a ``text/plain`` POST with its Origin."""
    key = "sk-" + secrets.token_urlsafe(20)
    body = {
        "/keys": f'{{"provider": "openai", "key": "{key}"}}',
        "/faults": '{"kind": "rate_limit"}',
    }
    response = httpx.post(
        _base(emulator) + route,
        content=body[route],
        headers={"content-type": "text/plain", "origin": "https://evil.example"},
    )
    assert response.status_code in (403, 415)
    assert "error" in response.json()
    # the same without an Origin (a local program's or a no-cors form) is refused for its type
    plain = httpx.post(
        _base(emulator) + route, content=body[route], headers={"content-type": "text/plain"}
    )
    assert plain.status_code == 415
    assert "application/json" in plain.json()["error"]
    assert emulator.state.pending_faults == []
    assert not emulator.state.check_key("openai", key)[0]


def test_a_cross_origin_json_post_is_refused_by_its_origin(emulator):
    response = httpx.post(
        _base(emulator) + "/faults",
        json={"kind": "server_error"},
        headers={"origin": "https://evil.example"},
    )
    assert response.status_code == 403
    assert emulator.state.pending_faults == []
    # the emulator's own origin (a page it served, or a client that sends one) is fine
    own = httpx.post(
        _base(emulator) + "/faults", json={"kind": "server_error"}, headers={"origin": emulator.url}
    )
    assert own.status_code == 200
    assert [f.kind for f in emulator.state.pending_faults] == [FaultKind.SERVER_ERROR]


def test_a_foreign_host_header_reads_nothing(emulator):
    """A DNS-rebinding page reaches the port under its own host name: refused on every route."""
    key = emulator.new_key("openai", label="secret-workspace")
    emulator.add_fault(Fault(FaultKind.SLOW, provider="openai", delay=0))
    httpx.get(emulator.base_url("openai") + "/models", headers={"authorization": f"Bearer {key}"})
    port = emulator.port
    for method, route in [
        ("GET", "/calls"),
        ("GET", "/health"),
        ("DELETE", "/calls"),
        ("DELETE", "/faults"),
    ]:
        response = httpx.request(
            method, _base(emulator) + route, headers={"host": f"rebind.evil.example:{port}"}
        )
        assert response.status_code == 400, route
        assert "secret-workspace" not in response.text
    assert len(emulator.calls("openai")) == 1  # nothing was cleared
    posted = httpx.post(
        _base(emulator) + "/keys",
        json={"provider": "openai", "key": "sk-evil"},
        headers={"host": "rebind.evil.example"},
    )
    assert posted.status_code == 400
    assert not emulator.state.check_key("openai", "sk-evil")[0]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST"):
        response = httpx.get(_base(emulator) + "/calls", headers={"host": host})
        assert response.status_code == 200, host
        assert response.json()[0]["key_label"] == "secret-workspace"


@pytest.mark.parametrize(
    "line",
    [
        "{key}",  # a bare key
        "{key}==",  # a bare base64 key: '=' splits it into an unknown "provider"
        "sk-ant-{key}=",  # a key ending in '=' padding
        "openai {key}",
        "openai:{key}",  # ':' where '=' belongs
        "=={key}",
    ],
)
def test_a_keys_file_with_a_bare_key_line_never_echoes_it(tmp_path, line):
    secret = secrets.token_urlsafe(24)
    keys = tmp_path / "keys.txt"
    keys.write_text("# keys\nopenai=sk-fine\n" + line.format(key=secret) + "\n")
    result = CliRunner().invoke(main, ["emulator", "--port", "0", "--keys-file", str(keys)])
    assert result.exit_code == 2, result.output
    assert "line 3" in result.output
    assert str(keys) in result.output
    # case-insensitively: a provider name is lower-cased before it is checked
    assert secret.lower() not in result.output.lower()
    assert secret[:8].lower() not in result.output.lower()


def test_a_keys_file_that_is_not_text_is_a_one_line_error(tmp_path):
    keys = tmp_path / "keys.bin"
    keys.write_bytes(b"openai=\xff\xfe\x00sk\n")
    result = CliRunner().invoke(main, ["emulator", "--port", "0", "--keys-file", str(keys)])
    assert result.exit_code == 2, result.output
    assert "not UTF-8" in result.output
    assert "Traceback" not in result.output


def test_byok_emulator_answers_the_control_api_on_its_bound_address_only():
    """``byok emulator --host 127.0.0.2``: its own address and the loopback names, nothing else."""
    proc = _emulator("--host", "127.0.0.2", "--port", "0", "--accept-any-key")
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        base = ""
        while not base:
            assert time.monotonic() < deadline, "the emulator printed no banner"
            line = proc.stderr.readline()
            assert line, "the emulator exited"
            if "byok emulator on " in line:
                base = line.split("byok emulator on ", 1)[1].split(";", 1)[0]
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(base + "/_emulator/health")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the emulator did not start"
                time.sleep(0.1)
        assert health.status_code == 200
        port = base.rsplit(":", 1)[1]
        foreign = httpx.get(base + "/_emulator/calls", headers={"host": f"evil.example:{port}"})
        assert foreign.status_code == 400
        plain = httpx.post(
            base + "/_emulator/faults",
            content='{"kind": "rate_limit"}',
            headers={"content-type": "text/plain"},
        )
        assert plain.status_code == 415
        assert (
            httpx.post(base + "/_emulator/faults", json={"kind": "rate_limit"}).status_code == 200
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
