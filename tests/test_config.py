"""FactoryConfig: URL rules, the closed option list, and every ConfigurationError path."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from sessionforge import (
    DEFAULT_URL,
    ConfigurationError,
    FactoryConfig,
    SessionFactory,
    SyncSessionFactory,
)


def url_of(config: FactoryConfig) -> URL:
    """``config.url``, which a config made without a target does not have."""
    assert config.url is not None
    return config.url


# --- URL rules ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "async_driver", "sync_driver"),
    [
        pytest.param(
            "postgres://u@h/d", "postgresql+asyncpg", "postgresql+psycopg", id="postgres"
        ),
        pytest.param("postgresql://u@h/d", "postgresql+asyncpg", "postgresql+psycopg", id="pg"),
        pytest.param(
            "postgresql+psycopg://u@h/d", "postgresql+psycopg", "postgresql+psycopg", id="psycopg"
        ),
        pytest.param("sqlite:///app.db", "sqlite+sessionforge", "sqlite+pysqlite", id="sqlite"),
        pytest.param(
            "sqlite+aiosqlite:///app.db", "sqlite+aiosqlite", "sqlite+pysqlite", id="aiosqlite"
        ),
        pytest.param("mysql://u@h/d", "mysql+aiomysql", "mysql+pymysql", id="mysql"),
        pytest.param("mysql+asyncmy://u@h/d", "mysql+asyncmy", "mysql+pymysql", id="asyncmy"),
        pytest.param("mariadb://u@h/d", "mysql+aiomysql", "mysql+pymysql", id="mariadb"),
    ],
)
def test_url_normalisation(given: str, async_driver: str, sync_driver: str) -> None:
    config = FactoryConfig.from_url(given)
    assert config.async_url.drivername == async_driver
    assert config.sync_url.drivername == sync_driver
    assert url_of(config).database == make_url(given).database


@pytest.mark.parametrize("given", ["sqlite://", "sqlite:///:memory:", "sqlite+aiosqlite://"])
def test_memory_sqlite_gets_one_shared_name_per_config(given: str) -> None:
    first, second = FactoryConfig.from_url(given), FactoryConfig.from_url(given)
    assert url_of(first).query == {"mode": "memory", "cache": "shared", "uri": "true"}
    assert url_of(first).database != url_of(second).database
    assert first.sync_url.database == url_of(first).database


def test_sqlalchemy_url_objects_are_accepted() -> None:
    url = make_url("postgresql://app:pw@db/shop")
    assert FactoryConfig.from_url(url).async_url.drivername == "postgresql+asyncpg"


def test_from_env_reads_the_variable_and_falls_back_to_embedded_sqlite(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    default = FactoryConfig.from_env()
    assert default.url == make_url(DEFAULT_URL)
    assert default.url.database == "sessionforge.db"

    monkeypatch.setenv("DATABASE_URL", "postgres://app@db/shop")
    assert url_of(FactoryConfig.from_env()).drivername == "postgresql+asyncpg"
    monkeypatch.setenv("APP_DB", "sqlite:///other.db")
    assert FactoryConfig.from_env("APP_DB", pool_size=2).pool_size == 2


# --- bad URLs and drivers -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param("not a url", r"could not parse the database URL", id="malformed"),
        pytest.param(
            "postgresql://u:pw@host:notaport/db",
            r"the port 'notaport' in the database URL .* is not a number from 1 to 65535",
            id="port",
        ),
        pytest.param("postgresql+nope://u@h/d", r"unknown driver 'nope'.*asyncpg", id="driver"),
        pytest.param("oracel://u@h/d", r"unknown database dialect 'oracel'", id="dialect"),
    ],
)
def test_bad_urls_raise_configuration_error(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        SessionFactory(url)


def test_bad_url_message_never_shows_the_password() -> None:
    with pytest.raises(ConfigurationError) as raised:
        FactoryConfig.from_url("postgresql://app:hunter2@host:port/db")
    assert "hunter2" not in str(raised.value)
    assert "postgresql://***@host:port/db" in str(raised.value)


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("postgresql://u:pa/ss@host:abc/db", id="slash"),
        pytest.param("postgresql://u:pa?ss#x@host:abc/db", id="query-chars"),
    ],
)
def test_unparsable_url_with_odd_password_characters_is_masked(url: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        FactoryConfig.from_url(url)
    assert "ss" not in str(raised.value).split("URL", 1)[1].split(" is ")[0]
    assert "***@host:abc/db" in str(raised.value)


def test_query_string_passwords_and_dsn_values_are_masked() -> None:
    db = SessionFactory(
        "postgresql://app@127.0.0.1/test?password=TOPSECRET",
        connect_args={"dsn": "x", "server_settings": {"options": "postgresql://a:TOPSECRET@h"}},
    )
    for text in (repr(db), repr(db.config), repr(db.sync)):
        assert "TOPSECRET" not in text
    assert "password=%2A%2A%2A" in repr(db) or "password=***" in repr(db)


def test_unencoded_at_in_password_is_refused_without_leaking_it() -> None:
    with pytest.raises(ConfigurationError, match="percent-encode an '@'") as raised:
        SessionFactory("postgresql://app:p@ss@db.internal/shop")
    assert "ss" not in str(raised.value).replace("password", "").replace("percent", "")
    assert SessionFactory("postgresql://app:p%40ss@db.internal/shop").url.password == "p@ss"


def test_non_url_target_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="takes a URL string"):
        SessionFactory(42)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("url", "suggestion"),
    [
        pytest.param("postgresql+psycopg2://u@h/d", "postgresql+asyncpg", id="psycopg2"),
        pytest.param("postgresql+pg8000://u@h/d", "postgresql+asyncpg", id="pg8000"),
        pytest.param("sqlite+pysqlite:///x.db", "sqlite+sessionforge", id="pysqlite"),
        pytest.param("mysql+pymysql://u@h/d", "mysql+aiomysql", id="pymysql"),
        pytest.param("mysql+mysqldb://u@h/d", "mysql+aiomysql", id="mysqldb"),
    ],
)
def test_sync_driver_given_to_async_factory(url: str, suggestion: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        SessionFactory(url)
    message = str(raised.value)
    assert "is a sync driver" in message
    assert f"use {suggestion} with SessionFactory" in message
    assert "SyncSessionFactory for sync code" in message


def test_sync_driver_is_fine_for_the_sync_factory(tmp_path: Any) -> None:
    sdb = SyncSessionFactory(f"sqlite+pysqlite:///{tmp_path / 'x.db'}")
    assert sdb.url.drivername == "sqlite+pysqlite"
    assert sdb.ping() >= 0
    sdb.dispose()


def test_missing_driver_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test extras install every known driver: a None in sys.modules makes the
    # import fail as it does where the package is absent.
    monkeypatch.setitem(sys.modules, "aiomysql", None)
    with pytest.raises(ConfigurationError, match=r"driver aiomysql .* not installed: pip install"):
        SessionFactory("mysql+aiomysql://u@h/d")


def test_missing_sync_twin_driver_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    # The twin's driver (pymysql) is checked when the twin is first reached.
    monkeypatch.setitem(sys.modules, "pymysql", None)
    config = FactoryConfig.from_url("mysql+asyncmy://u@h/d")
    with pytest.raises(ConfigurationError, match=r"sync twin's driver pymysql .* pip install"):
        SyncSessionFactory(config)


def test_sync_engine_given_to_async_factory_and_back() -> None:
    sync_engine = create_engine("sqlite://")
    async_engine = create_async_engine("sqlite+aiosqlite://")
    with pytest.raises(
        ConfigurationError, match="needs an AsyncEngine or AsyncConnection, got Engine"
    ):
        SessionFactory(sync_engine)  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="needs an Engine or Connection, got AsyncEngine"):
        SyncSessionFactory(async_engine)  # type: ignore[call-overload]
    sync_engine.dispose()
    async_engine.sync_engine.dispose()


# --- the closed option list -----------------------------------------------------------


def test_unknown_option_suggests_the_right_name() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown option 'pool_sizes'; did you mean"):
        SessionFactory("sqlite://", pool_sizes=3)  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="bind is set by the factory"):
        SessionFactory("sqlite://", bind=None)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"pool_size": "5"}, r"pool_size='5' \(str\).*an int from 0", id="pool_size"),
        pytest.param({"pool_size": -1}, r"an int from 0 to", id="pool_size-negative"),
        pytest.param({"max_overflow": 1.5}, r"an int from -1 to", id="max_overflow"),
        pytest.param({"pool_timeout": -1}, r"seconds from 0 to", id="pool_timeout"),
        pytest.param({"pool_recycle": "1h"}, r"an int from -1 to", id="pool_recycle"),
        pytest.param({"pool_use_lifo": 1}, r"True or False", id="lifo"),
        pytest.param({"echo": "yes"}, r"True, False or 'debug'", id="echo"),
        pytest.param({"connect_args": [1]}, r"a dict", id="connect_args"),
        pytest.param({"engine_options": None}, r"a dict", id="engine_options"),
        pytest.param({"autoflush": "no"}, r"True or False", id="autoflush"),
        pytest.param({"expire_on_commit": None}, r"True or False", id="expire"),
        pytest.param({"info": "x"}, r"a dict", id="info"),
        pytest.param({"class_": dict}, r"subclass of sqlalchemy.*AsyncSession", id="class_"),
        pytest.param(
            {"sync_class_": AsyncSession},
            r"AsyncSessions come from SessionFactory",
            id="sync_class",
        ),
        pytest.param({"sync_class_": dict}, r"subclass of .*\.Session", id="sync_class-dict"),
        pytest.param({"ping_after": "1s"}, r"seconds from 0 to", id="ping_after"),
        pytest.param({"pgbouncer": "on"}, r"True or False", id="pgbouncer"),
        pytest.param({"application_name": 5}, r"a string or None", id="application_name"),
        pytest.param({"sqlite_journal_mode": "fast"}, r"one of DELETE, MEMORY", id="journal"),
        pytest.param({"sqlite_synchronous": "yes"}, r"one of EXTRA, FULL", id="synchronous"),
        pytest.param({"sqlite_busy_timeout": "5"}, r"seconds from 0 to", id="busy_timeout"),
        pytest.param({"sqlite_foreign_keys": "on"}, r"True or False", id="foreign_keys"),
        pytest.param({"sqlite_begin": "exclusive"}, r"one of deferred, immediate", id="begin"),
        pytest.param({"isolation_level": 3}, r"a string or None", id="isolation-type"),
        pytest.param(
            {"isolation_level": "READ COMMITTED"},
            r"not supported by sqlite; use one of AUTOCOMMIT, READ UNCOMMITTED, SERIALIZABLE",
            id="isolation-sqlite",
        ),
        pytest.param(
            {"engine_options": {"pool_size": 3}}, r"duplicates the option pool_size=", id="dup"
        ),
        pytest.param({"engine_options": {"creator": print}}, r"cannot be set", id="creator"),
        pytest.param(
            {"session_options": {"autoflush": False}}, r"duplicates the option", id="session-dup"
        ),
        pytest.param(
            {"session_options": {"twophase_": True}}, r"unknown session argument", id="session"
        ),
        pytest.param({"pool_size": 3}, r"in-memory SQLite database lives in one", id="memory"),
    ],
)
def test_ill_typed_options_raise_at_construction(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        SessionFactory("sqlite://", **options)


def test_connection_arguments_are_never_echoed() -> None:
    with pytest.raises(ConfigurationError) as raised:
        SessionFactory("sqlite://", connect_args="password=hunter2")  # type: ignore[call-overload]
    assert "hunter2" not in str(raised.value)
    assert "connect_args=... (str) is invalid: expected a dict" in str(raised.value)


def test_isolation_levels_are_normalised_and_checked_per_dialect() -> None:
    config = FactoryConfig.from_url("postgresql://h/d", isolation_level="repeatable_read")
    assert config.isolation_level == "REPEATABLE READ"
    with pytest.raises(ConfigurationError, match="not supported by postgresql"):
        FactoryConfig.from_url("postgresql://h/d", isolation_level="SNAPSHOT")


def test_engine_options_reach_the_engine(tmp_path: Any) -> None:
    db = SessionFactory(
        f"sqlite:///{tmp_path / 'x.db'}",
        pool_size=2,
        max_overflow=1,
        pool_timeout=3,
        engine_options={"pool_reset_on_return": "rollback"},
    )
    pool: Any = db.engine.pool
    assert (pool.size(), pool._max_overflow, pool._timeout) == (2, 1, 3)


def test_bad_engine_options_become_configuration_errors() -> None:
    db = SessionFactory("sqlite://", engine_options={"no_such_engine_option": 1})
    with pytest.raises(ConfigurationError, match="could not build an engine"):
        db()


def test_config_is_immutable_and_replace_validates() -> None:
    config = FactoryConfig.from_url("sqlite://", info={"a": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.pool_size = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.info["b"] = 2  # type: ignore[index]
    assert config.replace(expire_on_commit=True).expire_on_commit is True
    assert config.expire_on_commit is False
    with pytest.raises(ConfigurationError, match="unknown option"):
        config.replace(expire=True)
    with pytest.raises(ConfigurationError, match="url must be a sqlalchemy URL"):
        FactoryConfig(url="sqlite://")  # type: ignore[arg-type]


def test_user_engine_is_used_as_given_and_refuses_engine_options() -> None:
    engine = create_async_engine("sqlite+aiosqlite://")
    with pytest.raises(ConfigurationError, match=r"pool_size shape.*given an engine"):
        SessionFactory(engine, pool_size=3)
    with pytest.raises(ConfigurationError, match="sqlite_begin shape"):
        SessionFactory(engine, sqlite_begin="deferred")
    db = SessionFactory(engine, expire_on_commit=True)
    assert db.engine is engine
    assert db.config.expire_on_commit is True
    engine.sync_engine.dispose()


def test_sync_url_without_known_partner_is_explained() -> None:
    config = FactoryConfig.from_url("sqlite://").replace(url="postgresql+asyncpg://h/d")
    assert config.sync_url.drivername == "postgresql+psycopg"
    odd = dataclasses.replace(config, url=make_url("mssql+aioodbc://h/d"))
    with pytest.raises(ConfigurationError, match="knows no sync driver to pair with mssql"):
        _ = odd.sync_url


# --- issue 11: input validation ---------------------------------------------------------

PG = "postgresql://app@db.invalid/shop"


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("postgresql://u@h:99999/db", id="too-big"),
        pytest.param("postgresql://u@h:65536/db", id="just-too-big"),
        pytest.param("postgresql://u@h:-1/db", id="negative"),
        pytest.param("postgresql://u@h:0/db", id="zero"),
        pytest.param("postgresql://u@h:+5/db", id="plus"),
        pytest.param("postgresql://u@h:\u0665/db", id="arabic-digit"),
        pytest.param("postgresql://u:pw@h:notaport/db", id="word"),
        pytest.param(make_url("postgresql://u@h/db").set(port=70000), id="url-object"),
    ],
)
def test_ports_outside_1_to_65535_are_refused_when_the_config_is_made(url: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"the port .* is not a number from 1 to 65535"):
        FactoryConfig.from_url(url)
    assert url_of(FactoryConfig.from_url("postgresql://u@h:65535/db")).port == 65535


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("postgresql://app@127.0.0.1:notaport/db?password=s3cret", id="query"),
        pytest.param("postgresql://app@h:x/db?sslmode=require&PGPASSWORD=s3cret", id="upper"),
        pytest.param("postgresql://app@h:x/db?pass%77ord=s3cret", id="percent-encoded-key"),
        pytest.param("host=db user=app password=s3cret", id="libpq-dsn"),
        pytest.param("not a url; password = 's3cret'", id="quoted"),
    ],
)
def test_secret_query_values_are_masked_in_urls_that_do_not_parse(url: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        SessionFactory(url)
    assert "s3cret" not in str(raised.value)
    assert "***" in str(raised.value)


def test_a_scheme_with_two_drivers_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"scheme 'postgresql\+asyncpg\+x' is not"):
        SessionFactory("postgresql+asyncpg+x://u@h/db")


@pytest.mark.parametrize(
    ("url", "part"),
    [
        pytest.param("postgresql://u@h\x00st/db", "host", id="host"),
        pytest.param("postgresql://u@h/d\x00b", "database", id="database"),
        pytest.param("postgresql://u@h/db?sslmode=re\x00q", "query parameter 'sslmode'", id="q"),
        pytest.param("postgresql://u:s3c\x00ret@h/db", "password", id="password"),
    ],
)
def test_nul_characters_in_the_url_are_refused(url: str, part: str) -> None:
    with pytest.raises(ConfigurationError, match=f"{part} .*NUL character") as raised:
        FactoryConfig.from_url(url)
    assert "s3c" not in str(raised.value)


def test_the_url_given_twice_is_explained() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown option 'url': the URL is the .*first"):
        SessionFactory("sqlite://", url="sqlite://")  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="unknown option 'url'"):
        FactoryConfig.from_url("sqlite://", url="sqlite://")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"pool_timeout": float("nan")}, "pool_timeout=nan", id="pool_timeout-nan"),
        pytest.param({"pool_timeout": float("inf")}, "pool_timeout=inf", id="pool_timeout-inf"),
        pytest.param({"pool_timeout": True}, "pool_timeout=True", id="pool_timeout-bool"),
        pytest.param({"pool_timeout": 10**400}, r"pool_timeout=1000.*\(int\)", id="huge-int"),
        pytest.param({"ping_after": float("nan")}, "ping_after=nan", id="ping_after-nan"),
        pytest.param({"ping_after": float("inf")}, "ping_after=inf", id="ping_after-inf"),
        pytest.param({"ping_after": False}, "ping_after=False", id="ping_after-bool"),
        pytest.param({"sqlite_busy_timeout": None}, "busy_timeout=None", id="busy-none"),
        pytest.param({"sqlite_busy_timeout": float("nan")}, "busy_timeout=nan", id="busy-nan"),
        pytest.param({"sqlite_busy_timeout": 3e6}, r"busy_timeout=3000000\.0", id="busy-3e6"),
        pytest.param({"pool_size": 10**5000}, r"pool_size=<int that cannot be shown>", id="huge"),
        pytest.param({"max_overflow": 2**31}, r"max_overflow=2147483648", id="overflow-big"),
    ],
)
def test_seconds_and_counts_refuse_nan_inf_bool_and_none_where_not_allowed(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        SessionFactory("sqlite:///app.db", **options)


def test_none_for_sqlite_busy_timeout_fails_at_construction_not_engine_build() -> None:
    # Before: accepted, then a TypeError from round(None * 1000) when the engine was built.
    with pytest.raises(ConfigurationError, match=r"a number of seconds from 0 to 2147483\.647$"):
        SessionFactory("sqlite://", sqlite_busy_timeout=None)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        pytest.param("pool_pre_ping", r"ping_after=.*only after it sat idle", id="pre_ping"),
        pytest.param("future", r"always 'future'; leave it out\.$", id="future"),
        pytest.param("poolclass", r"engine_options=\{'poolclass': \.\.\.\}\.$", id="poolclass"),
        pytest.param("pool_reset_on_return", r"engine_options=\{'pool_reset_on_return'", id="r"),
        pytest.param("json_serializer", r"engine_options=\{'json_serializer'", id="json"),
        pytest.param("creator", r"create the engine yourself", id="creator"),
        pytest.param("autocommit", r"db\.reader\(\)", id="autocommit"),
        pytest.param("twophase", r"session_options=\{'twophase': \.\.\.\}", id="session"),
        pytest.param("retries", r"run_transaction\(fn, retries=", id="retries"),
    ],
)
def test_sqlalchemy_names_point_to_where_they_go(name: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=f"unknown option '{name}': .*{message}"):
        options: dict[str, Any] = {name: True}
        FactoryConfig.from_url("sqlite://", **options)


def test_unknown_option_messages_end_their_sentence() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown option 'zq_xv'\. Options are listed"):
        SessionFactory("sqlite://", zq_xv=1)  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match=r"'zq_xv'\. Sessions accept: "):
        SessionFactory("sqlite://", session_options={"zq_xv": 1})


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        pytest.param("sqlite://", {"pgbouncer": True}, r"pgbouncer= is for PostgreSQL", id="pgb"),
        pytest.param("sqlite:///a.db", {"application_name": "x"}, r"is SQLite", id="app"),
        pytest.param(PG, {"sqlite_busy_timeout": 1}, r"for SQLite only.*is PostgreSQL", id="bt"),
        pytest.param(PG, {"sqlite_begin": "deferred"}, r"sqlite_begin= is for SQLite", id="b"),
        pytest.param(PG, {"sqlite_journal_mode": None}, r"sqlite_journal_mode=", id="journal"),
        pytest.param("mysql+asyncmy://u@h/d", {"pgbouncer": True}, r"is MySQL", id="mysql"),
    ],
)
def test_options_of_another_dialect_are_refused(
    url: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        FactoryConfig.from_url(url, **options)


def test_options_of_another_dialect_left_at_their_defaults_are_fine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    FactoryConfig.from_url(PG, sqlite_journal_mode="wal", sqlite_busy_timeout=5)
    FactoryConfig.from_url("sqlite://", pgbouncer=False, application_name=None)
    # replace(url=...) checks only what it changes: the SQLite options stay, unused.
    moved = FactoryConfig.from_url("sqlite://", sqlite_busy_timeout=1).replace(url=PG)
    assert (url_of(moved).get_backend_name(), moved.sqlite_busy_timeout) == ("postgresql", 1)
    with pytest.raises(ConfigurationError, match="pgbouncer= is for PostgreSQL"):
        FactoryConfig.from_url("sqlite://").replace(pgbouncer=True)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert FactoryConfig.from_env(sqlite_busy_timeout=1).sqlite_busy_timeout == 1
    monkeypatch.setenv("DATABASE_URL", PG)
    with pytest.raises(ConfigurationError, match="sqlite_busy_timeout= is for SQLite"):
        FactoryConfig.from_env(sqlite_busy_timeout=1)


def test_the_engine_level_read_uncommitted_is_passed_as_asyncpg_accepts_it() -> None:
    config = FactoryConfig.from_url(PG, isolation_level="read_uncommitted")
    assert config.isolation_level == "READ UNCOMMITTED"  # as the user asked
    from sessionforge._internal.engines import engine_kwargs

    kwargs = engine_kwargs(config, config.async_url, is_async=True)
    assert kwargs["isolation_level"] == "READ COMMITTED"  # what PostgreSQL runs anyway
    sync_kwargs = engine_kwargs(config, config.sync_url, is_async=False)
    assert sync_kwargs["isolation_level"] == "READ COMMITTED"  # the twins alike
    psycopg = FactoryConfig.from_url(
        "postgresql+psycopg://h/d", isolation_level="READ UNCOMMITTED"
    )
    assert engine_kwargs(psycopg, url_of(psycopg), is_async=True)["isolation_level"] == (
        "READ UNCOMMITTED"  # psycopg takes it as it is
    )


# --- found by tests/test_properties.py ----------------------------------------------------


def test_text_that_is_not_valid_unicode_in_a_url_is_refused() -> None:
    # Before: a UnicodeEncodeError from repr(db) (the URL could not be rendered).
    with pytest.raises(ConfigurationError, match="not valid Unicode"):
        SessionFactory("postgresql://127.0.0.1/\ud800")


def test_a_slash_in_the_user_name_does_not_put_the_password_in_the_database_name() -> None:
    # Before: host "a", database "b:s3cret@h/db", shown by every repr.
    with pytest.raises(ConfigurationError, match="percent-encode") as raised:
        SessionFactory("postgresql://a/b:s3cret@h/db")
    assert "s3cret" not in str(raised.value)


def test_a_secret_key_inside_another_value_is_masked() -> None:
    with pytest.raises(ConfigurationError) as raised:
        SessionFactory("://127.0.0.1/0=?password=s3cret")
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        # Before: SQLAlchemy's "Invalid SQLite URL: <the URL, password and all>".
        pytest.param("sqlite://127.0.0.1/db?password=s3cret", "names a file", id="host"),
        # Before: an SAWarning when the engine was built, and the parameter ignored.
        pytest.param("sqlite:///db?mode=ro", r"'mode' are SQLite URI .*uri=true", id="no-uri"),
        # Before: a bare ValueError when the engine was built.
        pytest.param("sqlite:///db?timeout=abc", r"timeout= must be one float", id="timeout"),
    ],
)
def test_sqlite_urls_are_checked_as_the_driver_would(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as raised:
        SessionFactory(url)
    assert "s3cret" not in str(raised.value)
    assert SessionFactory("sqlite:///file:db?mode=ro&uri=true&timeout=2").url.query["mode"] == "ro"


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"sqlite_journal_mode": {"password": "s3cret"}}, id="dict"),
        pytest.param({"echo": "postgresql://u:s3cret@h/db"}, id="dsn"),
        pytest.param({"sqlite_begin": ["s3cret"]}, id="list"),
    ],
)
def test_ill_typed_values_are_shown_masked(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="is invalid") as raised:
        FactoryConfig.from_url("sqlite://", **options)
    assert "s3cret" not in str(raised.value)


async def test_echo_debug_reaches_both_engines_as_debug() -> None:
    """echo="debug" also logs result rows; it used to reach the engine as echo=True."""
    db = SessionFactory("sqlite://", echo="debug")
    try:
        assert db.engine.echo == "debug"
        assert db.sync.engine.echo == "debug"
    finally:
        await db.dispose()


def test_binds_given_to_a_config_points_to_the_factory() -> None:
    with pytest.raises(ConfigurationError, match=r"binds is not a FactoryConfig option.*"):
        FactoryConfig.from_url("sqlite://", binds={})  # type: ignore[call-arg]
