"""Settings read from an explicit environment mapping."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner

from byok_plugin.cli import main
from byok_plugin.settings import (
    MAX_CACHE_SECONDS,
    MAX_COOLDOWN_SECONDS,
    MAX_POOL_CONNECTIONS,
    MAX_TIMEOUT_SECONDS,
    MAX_WAIT_SECONDS,
    Settings,
    SettingsError,
)

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_live_under_byok_home(tmp_path: Path) -> None:
    settings = Settings.from_environ({"BYOK_HOME": str(tmp_path)})
    assert settings.home == tmp_path
    assert settings.database_url == f"sqlite:///{tmp_path / 'byok.db'}"
    assert settings.key_file == tmp_path / "master.keys"
    assert settings.validate_keys is True
    assert settings.allow_unpriced is False
    assert settings.charge_multiplier == Decimal(1)


def test_explicit_values(tmp_path: Path) -> None:
    settings = Settings.from_environ(
        {
            "BYOK_HOME": str(tmp_path),
            "BYOK_DATABASE_URL": "postgresql+psycopg://u@h/db",
            "BYOK_VALIDATE_KEYS": "off",
            "BYOK_ALLOW_UNPRICED": "yes",
            "BYOK_CHARGE_MULTIPLIER": "1.25",
            "BYOK_PRICE_FILE": str(tmp_path / "prices.json"),
        }
    )
    assert settings.database_url == "postgresql+psycopg://u@h/db"
    assert settings.validate_keys is False
    assert settings.allow_unpriced is True
    assert settings.charge_multiplier == Decimal("1.25")
    assert settings.price_file == tmp_path / "prices.json"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BYOK_VALIDATE_KEYS", "maybe"),
        ("BYOK_ALLOW_UNPRICED", "2"),
        ("BYOK_CHARGE_MULTIPLIER", "x"),
        ("BYOK_CHARGE_MULTIPLIER", "-1"),
        ("BYOK_CHARGE_MULTIPLIER", "NaN"),
        ("BYOK_CHARGE_MULTIPLIER", "1000.01"),
        ("BYOK_CHARGE_MULTIPLIER", "1e30"),
    ],
)
def test_malformed_values_name_the_variable(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_environ({"BYOK_HOME": str(tmp_path), name: value})


def test_master_keys_stay_out_of_repr(tmp_path: Path) -> None:
    secret = "k1:" + "A" * 43 + "="
    settings = Settings.from_environ({"BYOK_HOME": str(tmp_path), "BYOK_ENCRYPTION_KEYS": secret})
    assert settings.encryption_keys == secret
    assert "AAAA" not in repr(settings)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("notaurl", "not a database URL"),
        ("postgresql://u:hunter2@h:abc/db", "not a database URL"),
        ("foo://x", "SQLite or PostgreSQL"),
        ("mysql://u:hunter2@h/db", "SQLite or PostgreSQL"),
    ],
)
def test_a_bad_database_url_is_named_and_its_password_not_repeated(
    tmp_path: Path, url: str, says: str
) -> None:
    with pytest.raises(SettingsError, match="BYOK_DATABASE_URL") as info:
        Settings.from_environ({"BYOK_HOME": str(tmp_path), "BYOK_DATABASE_URL": url})
    assert says in str(info.value)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("url", ["postgresql://u@h/db", "postgresql+psycopg://u:p@h:5432/db"])
def test_postgresql_urls_are_accepted(tmp_path: Path, url: str) -> None:
    assert Settings.from_environ({"BYOK_HOME": str(tmp_path), "BYOK_DATABASE_URL": url})


#: every numeric setting read in seconds, with its maximum, and whether 0 is allowed
SECONDS = [
    ("BYOK_KEY_COOLDOWN_SECONDS", MAX_COOLDOWN_SECONDS, "key_cooldown_seconds", True),
    ("BYOK_KEY_WAIT_SECONDS", MAX_WAIT_SECONDS, "key_wait_seconds", True),
    ("BYOK_KEY_CACHE_SECONDS", MAX_CACHE_SECONDS, "key_cache_seconds", True),
    ("BYOK_DATA_KEY_CACHE_SECONDS", MAX_CACHE_SECONDS, "data_key_cache_seconds", True),
    ("BYOK_VALIDATE_TIMEOUT", MAX_TIMEOUT_SECONDS, "validate_timeout", False),
    ("BYOK_KMS_TIMEOUT", MAX_TIMEOUT_SECONDS, "kms_timeout", False),
    ("BYOK_DB_POOL_TIMEOUT", MAX_TIMEOUT_SECONDS, "db_pool_timeout", False),
    ("BYOK_DB_STATEMENT_TIMEOUT", MAX_TIMEOUT_SECONDS, "db_statement_timeout", True),
    ("BYOK_DB_CONNECT_TIMEOUT", MAX_TIMEOUT_SECONDS, "db_connect_timeout", False),
    ("BYOK_DB_TCP_TIMEOUT", MAX_TIMEOUT_SECONDS, "db_tcp_timeout", False),
]
COUNTS = [
    ("BYOK_DB_POOL_SIZE", 1, MAX_POOL_CONNECTIONS, "db_pool_size"),
    ("BYOK_DB_MAX_OVERFLOW", 0, MAX_POOL_CONNECTIONS, "db_max_overflow"),
]


def test_the_documented_bounds() -> None:
    assert MAX_TIMEOUT_SECONDS == MAX_CACHE_SECONDS == MAX_WAIT_SECONDS == 86_400
    assert MAX_COOLDOWN_SECONDS == 30 * 86_400
    assert MAX_POOL_CONNECTIONS == 1000


@pytest.mark.parametrize(("name", "maximum", "attribute", "zero"), SECONDS)
def test_every_setting_in_seconds_takes_its_whole_range(
    tmp_path: Path, name: str, maximum: float, attribute: str, zero: bool
) -> None:
    for value in (maximum, 0.5, *((0.0,) if zero else ())):
        settings = Settings.from_environ({"BYOK_HOME": str(tmp_path), name: repr(value)})
        assert getattr(settings, attribute) == value


@pytest.mark.parametrize(("name", "maximum", "attribute", "zero"), SECONDS)
@pytest.mark.parametrize("value", ["above", "1e300", "inf", "nan", "-1"])
def test_every_setting_in_seconds_refuses_what_is_out_of_its_range(
    tmp_path: Path, name: str, maximum: float, attribute: str, zero: bool, value: str
) -> None:
    raw = repr(maximum + 0.001) if value == "above" else value
    with pytest.raises(SettingsError) as info:
        Settings.from_environ({"BYOK_HOME": str(tmp_path), name: raw})
    message = str(info.value)
    assert message.startswith(f"{name} must be a number of seconds")
    assert f"{maximum:g}" in message
    assert repr(raw) in message


@pytest.mark.parametrize(("name", "maximum", "attribute", "zero"), SECONDS)
def test_a_zero_is_refused_where_it_means_nothing(
    tmp_path: Path, name: str, maximum: float, attribute: str, zero: bool
) -> None:
    if zero:
        assert (
            getattr(Settings.from_environ({"BYOK_HOME": str(tmp_path), name: "0"}), attribute) == 0
        )
        return
    with pytest.raises(SettingsError, match=f"{name} must be a number of seconds > 0"):
        Settings.from_environ({"BYOK_HOME": str(tmp_path), name: "0"})


@pytest.mark.parametrize(("name", "minimum", "maximum", "attribute"), COUNTS)
def test_every_count_takes_its_range_and_refuses_what_is_outside(
    tmp_path: Path, name: str, minimum: int, maximum: int, attribute: str
) -> None:
    for value in (minimum, maximum):
        settings = Settings.from_environ({"BYOK_HOME": str(tmp_path), name: str(value)})
        assert getattr(settings, attribute) == value
    for raw in (str(minimum - 1), str(maximum + 1), "10" * 40):
        with pytest.raises(SettingsError) as info:
            Settings.from_environ({"BYOK_HOME": str(tmp_path), name: raw})
        assert str(info.value) == (
            f"{name} must be a whole number from {minimum} to {maximum}, not {raw!r}"
        )


@pytest.mark.parametrize(
    "name", ["BYOK_KEY_COOLDOWN_SECONDS", "BYOK_DB_STATEMENT_TIMEOUT", "BYOK_DB_TCP_TIMEOUT"]
)
def test_the_cli_names_a_huge_setting_instead_of_failing_later(tmp_path: Path, name: str) -> None:
    """What the security review met: ``1e300`` reached ``timedelta`` (an OverflowError and a
    traceback) or PostgreSQL ("the key store did not answer")."""
    done = CliRunner().invoke(
        main,
        ["run", str(ROOT / "sample_workflows" / "research-brief.json"), "-w", "acme"],
        env={"BYOK_HOME": str(tmp_path), name: "1e300"},
    )
    assert done.exit_code == 2, done.output
    assert f"{name} must be a number of seconds from 0 to" in done.output
    assert "Traceback" not in done.output
    assert "did not answer" not in done.output
