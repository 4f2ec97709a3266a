"""Settings read from an explicit environment mapping."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from byok_plugin.settings import Settings, SettingsError


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
