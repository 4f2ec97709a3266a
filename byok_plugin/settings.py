"""Configuration, read once from the environment into a frozen value and passed in from there.

| variable | meaning | default |
|---|---|---|
| ``BYOK_HOME`` | where the embedded store and the master key file live | the user data directory |
| ``BYOK_DATABASE_URL`` | any SQLAlchemy URL (``postgresql+psycopg://...``) | SQLite file in ``BYOK_HOME`` |
| ``BYOK_ENCRYPTION_KEYS`` | master keys, ``id:base64`` comma-separated, the first encrypts | none |
| ``BYOK_KEY_FILE`` | the master key file ``byok init`` writes (mode 0600) | ``BYOK_HOME/master.keys`` |
| ``BYOK_KEY_ENVELOPES`` | ``1``: new keys are encrypted under a per-workspace data key (envelope) | off (on with a KMS) |
| ``BYOK_KEY_PROVIDER`` | who wraps data keys: ``local`` (the master keys), ``vault-transit``, ``aws-kms`` (:mod:`byok_plugin.keys.kms`) | ``local`` |
| ``BYOK_KEY_PROVIDER_MIGRATION`` | ``1`` while moving a store between the local keyring and a KMS (``byok keys rewrap``): a KMS worker unwraps data keys the keyring wrapped, a keyring worker writes keys outside the KMS | off |
| ``BYOK_DATA_KEY_CACHE_SECONDS`` | how long an unwrapped data key stays in memory (at most 1 day) | ``300`` |
| ``BYOK_KMS_TIMEOUT`` | seconds a KMS call waits (> 0, at most 1 day) | ``5`` |
| ``BYOK_VALIDATE_KEYS`` | ``0`` turns off live key checks (offline use) | on |
| ``BYOK_VALIDATE_TIMEOUT`` | seconds a live key check waits for the provider (> 0, at most 1 day) | ``5`` |
| ``BYOK_<PROVIDER>_BASE_URL`` | a provider's API base URL (key checks, provider clients, emulator) | the provider's own |
| ``BYOK_PRICE_FILE`` | a JSON price file whose entries override the shipped table | none |
| ``BYOK_ALLOW_UNPRICED`` | ``1`` lets a platform-billed call run on a model with no price | off |
| ``BYOK_CHARGE_MULTIPLIER`` | what platform calls are charged, as a multiple of list price (0 to 1000) | ``1`` |
| ``BYOK_CATALOG_FILE`` | a JSON catalog merged over the shipped one (which models are hosted) | none |
| ``BYOK_KEY_COOLDOWN_SECONDS`` | how long a key the provider refused (429, auth) is skipped (at most 30 days) | ``30`` |
| ``BYOK_KEY_WAIT_SECONDS`` | how long resolution may wait for a cooling key when every key is cooling (at most 1 day) | ``0`` |
| ``BYOK_KEY_CACHE_SECONDS`` | how long a worker reuses a workspace's key list read from the store (at most 1 day) | ``2`` |
| ``BYOK_LEDGER_SPOOL`` | the local file where usage the store refused waits to be replayed | ``BYOK_HOME/ledger-spool.db`` |
| ``BYOK_ALLOW_UNRECORDED_BYOK`` | ``1`` lets BYOK calls run while no usage can be recorded (platform calls never do) | off |
| ``BYOK_DB_POOL_SIZE`` | PostgreSQL connections kept open per process (1 to 1000) | ``5`` |
| ``BYOK_DB_MAX_OVERFLOW`` | more PostgreSQL connections per process under load (0 to 1000) | ``10`` |
| ``BYOK_DB_POOL_TIMEOUT`` | seconds a thread waits for a free connection (> 0, at most 1 day) | ``30`` |
| ``BYOK_DB_STATEMENT_TIMEOUT`` | seconds PostgreSQL lets one statement run (``0``: no limit; at most 1 day) | ``30`` |
| ``BYOK_DB_CONNECT_TIMEOUT`` | seconds a new PostgreSQL connection may take (> 0, at most 1 day) | ``10`` |
| ``BYOK_DB_TCP_TIMEOUT`` | seconds of network silence before a PostgreSQL connection is dropped; a statement waits at most the statement timeout plus this for an answer (> 0, at most 1 day) | ``30`` |
| ``BYOK_PLATFORM_KEYS_<PROVIDER>`` | the platform's keys, comma-separated (also ``OPENAI_API_KEY_1..N``) | none |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import platformdirs

APP_NAME = "byok"
#: the key-encryption providers byok-plugin itself implements (``BYOK_KEY_PROVIDER``)
KEY_PROVIDERS = ("local", "vault-transit", "aws-kms")
#: the largest ``BYOK_CHARGE_MULTIPLIER``: a markup, not a typo's order of magnitude (with the
#: price table's and the providers' token counts' own bounds, it keeps every charge within
#: what the ledger stores)
MAX_CHARGE_MULTIPLIER = Decimal(1000)
#: the largest value of each kind of numeric setting: far above any sane value, far below what
#: overflows a ``timedelta`` or a server parameter (PostgreSQL's ``statement_timeout`` and
#: ``tcp_user_timeout`` are 32-bit milliseconds: 24.8 days)
DAY = 86_400.0
MAX_TIMEOUT_SECONDS = DAY
MAX_CACHE_SECONDS = DAY
MAX_WAIT_SECONDS = DAY
MAX_COOLDOWN_SECONDS = 30 * DAY
MAX_POOL_CONNECTIONS = 1000


class SettingsError(ValueError):
    """A configuration value is malformed; the message names the variable."""


def _span(seconds: float) -> str:
    days = seconds / DAY
    return f"{days:g} day" + ("" if days == 1 else "s")


def _seconds(env: Mapping[str, str], name: str, default: float, maximum: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number of seconds, not {raw!r}") from None
    if not 0 <= value <= maximum:  # (NaN and infinity too)
        raise SettingsError(
            f"{name} must be a number of seconds from 0 to {maximum:g} ({_span(maximum)}), "
            f"not {raw!r}"
        )
    return value


def _positive_seconds(env: Mapping[str, str], name: str, default: float, maximum: float) -> float:
    value = _seconds(env, name, default, maximum)
    if value <= 0:
        raise SettingsError(
            f"{name} must be a number of seconds > 0 and at most {maximum:g} "
            f"({_span(maximum)}), not {env.get(name)!r}"
        )
    return value


_DATABASE_URL_EXAMPLES = (
    "postgresql+psycopg://USER:PASSWORD@HOST:5432/DB or sqlite:////absolute/path/byok.db"
)


def _check_database_url(url: str) -> None:
    """A URL SQLAlchemy can parse, for one of the two stores byok-plugin supports. The value is
    never quoted back: it may hold a password."""
    from sqlalchemy.engine import make_url  # only for a URL given by the user: keeps start-up fast
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018 (a port that is not a number fails here)
        backend = parsed.get_backend_name()
    except (ArgumentError, ValueError):
        raise SettingsError(
            f"BYOK_DATABASE_URL is not a database URL; expected {_DATABASE_URL_EXAMPLES}"
        ) from None
    if backend not in {"sqlite", "postgresql", "postgres"}:
        raise SettingsError(
            f"BYOK_DATABASE_URL names a {backend!r} database; byok-plugin stores keys in SQLite or "
            f"PostgreSQL ({_DATABASE_URL_EXAMPLES})"
        )


def _count(env: Mapping[str, str], name: str, default: int, minimum: int, maximum: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, not {raw!r}") from None
    if not minimum <= value <= maximum:
        raise SettingsError(
            f"{name} must be a whole number from {minimum} to {maximum}, not {raw!r}"
        )
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name} must be 1/0, true/false, yes/no or on/off, not {raw!r}")


@dataclass(frozen=True)
class Settings:
    """Everything the plugin reads from its environment."""

    home: Path
    database_url: str
    key_file: Path
    encryption_keys: str | None = field(default=None, repr=False)
    validate_keys: bool = True
    price_file: Path | None = None
    allow_unpriced: bool = False
    charge_multiplier: Decimal = Decimal(1)
    catalog_file: Path | None = None
    key_cooldown_seconds: float = 30.0
    #: how long resolution may wait for a cooling key when every key is cooling (0: never)
    key_wait_seconds: float = 0.0
    key_cache_seconds: float = 2.0
    validate_timeout: float = 5.0
    key_envelopes: bool = False
    key_provider: str = "local"
    #: the operator is moving the store between the local keyring and a KMS: otherwise a KMS
    #: worker refuses data keys the keyring wrapped, and a keyring worker refuses to write keys
    #: outside the KMS that protects the store
    key_provider_migration: bool = False
    data_key_cache_seconds: float = 300.0
    kms_timeout: float = 5.0
    #: where usage the store refused is kept until it is replayed (default: BYOK_HOME)
    ledger_spool: Path | None = None
    allow_unrecorded_byok: bool = False
    db_pool_size: int = 5
    db_max_overflow: int = 10
    db_pool_timeout: float = 30.0
    db_statement_timeout: float = 30.0
    db_connect_timeout: float = 10.0
    db_tcp_timeout: float = 30.0
    #: the whole environment, for provider-specific variables (platform keys, base URLs)
    environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every variable of the table above from ``environ`` (``os.environ`` when None);
        a malformed value raises :class:`SettingsError` naming the variable."""
        env = dict(os.environ if environ is None else environ)
        home = Path(env.get("BYOK_HOME") or platformdirs.user_data_dir(APP_NAME)).expanduser()
        database_url = env.get("BYOK_DATABASE_URL") or f"sqlite:///{home / 'byok.db'}"
        if env.get("BYOK_DATABASE_URL"):
            _check_database_url(database_url)
        key_file = Path(env.get("BYOK_KEY_FILE") or home / "master.keys").expanduser()
        price_file = (
            Path(env["BYOK_PRICE_FILE"]).expanduser() if env.get("BYOK_PRICE_FILE") else None
        )
        raw_multiplier = env.get("BYOK_CHARGE_MULTIPLIER", "1")
        try:
            multiplier = Decimal(raw_multiplier)
        except InvalidOperation:
            raise SettingsError(
                f"BYOK_CHARGE_MULTIPLIER must be a decimal number, not {raw_multiplier!r}"
            ) from None
        if not multiplier.is_finite() or not 0 <= multiplier <= MAX_CHARGE_MULTIPLIER:
            raise SettingsError(
                f"BYOK_CHARGE_MULTIPLIER must be a number from 0 to {MAX_CHARGE_MULTIPLIER}"
            )
        key_provider = (env.get("BYOK_KEY_PROVIDER") or "local").strip().lower()
        if key_provider not in KEY_PROVIDERS:
            raise SettingsError(
                f"BYOK_KEY_PROVIDER must be one of {', '.join(KEY_PROVIDERS)}, not "
                f"{env.get('BYOK_KEY_PROVIDER')!r}"
            )
        return cls(
            home=home,
            database_url=database_url,
            key_file=key_file,
            encryption_keys=env.get("BYOK_ENCRYPTION_KEYS") or None,
            validate_keys=_flag(env, "BYOK_VALIDATE_KEYS", True),
            price_file=price_file,
            allow_unpriced=_flag(env, "BYOK_ALLOW_UNPRICED", False),
            charge_multiplier=multiplier,
            catalog_file=(
                Path(env["BYOK_CATALOG_FILE"]).expanduser()
                if env.get("BYOK_CATALOG_FILE")
                else None
            ),
            key_cooldown_seconds=_seconds(
                env, "BYOK_KEY_COOLDOWN_SECONDS", 30.0, MAX_COOLDOWN_SECONDS
            ),
            key_wait_seconds=_seconds(env, "BYOK_KEY_WAIT_SECONDS", 0.0, MAX_WAIT_SECONDS),
            key_cache_seconds=_seconds(env, "BYOK_KEY_CACHE_SECONDS", 2.0, MAX_CACHE_SECONDS),
            validate_timeout=_positive_seconds(
                env, "BYOK_VALIDATE_TIMEOUT", 5.0, MAX_TIMEOUT_SECONDS
            ),
            key_envelopes=_flag(env, "BYOK_KEY_ENVELOPES", key_provider != "local"),
            key_provider=key_provider,
            key_provider_migration=_flag(env, "BYOK_KEY_PROVIDER_MIGRATION", False),
            data_key_cache_seconds=_seconds(
                env, "BYOK_DATA_KEY_CACHE_SECONDS", 300.0, MAX_CACHE_SECONDS
            ),
            kms_timeout=_positive_seconds(env, "BYOK_KMS_TIMEOUT", 5.0, MAX_TIMEOUT_SECONDS),
            ledger_spool=Path(
                env.get("BYOK_LEDGER_SPOOL") or home / "ledger-spool.db"
            ).expanduser(),
            allow_unrecorded_byok=_flag(env, "BYOK_ALLOW_UNRECORDED_BYOK", False),
            db_pool_size=_count(env, "BYOK_DB_POOL_SIZE", 5, 1, MAX_POOL_CONNECTIONS),
            db_max_overflow=_count(env, "BYOK_DB_MAX_OVERFLOW", 10, 0, MAX_POOL_CONNECTIONS),
            db_pool_timeout=_positive_seconds(
                env, "BYOK_DB_POOL_TIMEOUT", 30.0, MAX_TIMEOUT_SECONDS
            ),
            db_statement_timeout=_seconds(
                env, "BYOK_DB_STATEMENT_TIMEOUT", 30.0, MAX_TIMEOUT_SECONDS
            ),
            db_connect_timeout=_positive_seconds(
                env, "BYOK_DB_CONNECT_TIMEOUT", 10.0, MAX_TIMEOUT_SECONDS
            ),
            db_tcp_timeout=_positive_seconds(env, "BYOK_DB_TCP_TIMEOUT", 30.0, MAX_TIMEOUT_SECONDS),
            environ=env,
        )
