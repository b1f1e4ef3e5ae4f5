"""``FactoryConfig.from_env()`` (issue 15): every option from a ``SESSIONFORGE_<OPTION>``
variable, parsed by the option's declared type; keyword arguments win; errors name the
variable; unknown ``SESSIONFORGE_`` variables are refused, the tooling's prefixes aside.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionforge import FactoryConfig, SessionFactory
from sessionforge.cli import main
from sessionforge.config import OPTIONS
from sessionforge.errors import ConfigurationError

from .test_readme import block_tested_by

PG = "postgresql://app@db:5432/app"  # never connected
MYSQL = "mysql://app@db:3306/app"
SQLITE = "sqlite:///app.db"


class EnvSession(AsyncSession):
    pass


class EnvSyncSession(Session):
    pass


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment without DATABASE_URL or option variables (the tooling's stay)."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    for name in os.environ:
        if name.startswith("SESSIONFORGE_") and not name.startswith(
            ("SESSIONFORGE_TEST_", "SESSIONFORGE_BENCH_")
        ):
            monkeypatch.delenv(name)
    return monkeypatch


def from_env(env: pytest.MonkeyPatch, url: str, **variables: str) -> FactoryConfig:
    env.setenv("DATABASE_URL", url)
    for name, value in variables.items():
        env.setenv(f"SESSIONFORGE_{name}", value)
    return FactoryConfig.from_env()


# Every option: the URL it is for, the variable's text, and the value the config gets.
CASES: dict[str, tuple[str, str, Any]] = {
    "pool_size": (PG, "7", 7),
    "max_overflow": (PG, "-1", -1),
    "pool_timeout": (PG, "2.5", 2.5),
    "pool_recycle": (PG, "300", 300),
    "pool_use_lifo": (PG, "yes", True),
    "echo": (PG, "debug", "debug"),
    "isolation_level": (PG, "SERIALIZABLE", "SERIALIZABLE"),
    "password": (PG, "s3cret p@ss:w/rd", "s3cret p@ss:w/rd"),
    "connect_args": (PG, '{"command_timeout": 10}', {"command_timeout": 10}),
    "sync_connect_args": (PG, '{"connect_timeout": 3}', {"connect_timeout": 3}),
    "engine_options": (PG, '{"pool_pre_ping": true}', {"pool_pre_ping": True}),
    "autoflush": (PG, "false", False),
    "expire_on_commit": (PG, "1", True),
    "info": (PG, '{"tenant": "acme"}', {"tenant": "acme"}),
    "class_": (PG, "tests.test_from_env:EnvSession", EnvSession),
    "sync_class_": (PG, "tests.test_from_env:EnvSyncSession", EnvSyncSession),
    "session_options": (PG, '{"twophase": true}', {"twophase": True}),
    "ping_after": (PG, "", None),
    "pgbouncer": (PG, "TRUE", True),
    "application_name": (PG, "web", "web"),
    "sqlite_journal_mode": (SQLITE, "truncate", "TRUNCATE"),
    "sqlite_synchronous": (SQLITE, "", None),
    "sqlite_busy_timeout": (SQLITE, "1.5", 1.5),
    "sqlite_foreign_keys": (SQLITE, "no", False),
    "sqlite_begin": (SQLITE, "DEFERRED", "deferred"),
    "connect_timeout": (PG, "10", 10.0),
    "mysql_snapshot_isolation": (MYSQL, "0", False),
    "replicas": (
        PG,
        '["postgresql://app@replica1/app", "postgresql://app@replica2:5433/app"]',
        (
            make_url("postgresql+asyncpg://app@replica1/app"),
            make_url("postgresql+asyncpg://app@replica2:5433/app"),
        ),
    ),
    "read_your_writes": (PG, "false", False),
    "replica_wait": (PG, "0.2", 0.2),
    "replica_recheck": (PG, "30", 30.0),
    "track_session_origin": (PG, "true", True),
}


def test_every_option_has_a_case() -> None:
    assert set(CASES) == set(OPTIONS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_option_is_read_from_its_variable(env: pytest.MonkeyPatch, name: str) -> None:
    url, raw, expected = CASES[name]
    config = from_env(env, url, **{name.upper(): raw})
    assert getattr(config, name) == expected
    # and it is what the keyword argument would have made
    keyword = FactoryConfig.from_url(url, **{name: expected})
    assert config == keyword


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        *[pytest.param(word, True, id=word) for word in ("true", "True", "1", "yes", " YES ")],
        *[pytest.param(word, False, id=word) for word in ("false", "FALSE", "0", "no")],
    ],
)
def test_bools_take_true_false_1_0_yes_no_in_any_case(
    env: pytest.MonkeyPatch, raw: str, expected: bool
) -> None:
    assert from_env(env, PG, PGBOUNCER=raw).pgbouncer is expected


def test_echo_is_a_bool_or_debug(env: pytest.MonkeyPatch) -> None:
    assert from_env(env, PG, ECHO="yes").echo is True
    assert from_env(env, PG, ECHO="DEBUG").echo == "debug"
    with pytest.raises(ConfigurationError, match=r"true/false .* or one of debug"):
        from_env(env, PG, ECHO="loud")


def test_an_empty_value_is_none_where_the_option_takes_none(env: pytest.MonkeyPatch) -> None:
    config = from_env(env, PG, POOL_SIZE="", APPLICATION_NAME="", INFO="", SYNC_CLASS_="")
    assert (config.pool_size, config.application_name, config.info, config.sync_class_) == (
        None,
        None,
        None,
        None,
    )
    with pytest.raises(
        ConfigurationError,
        match=r"SESSIONFORGE_PGBOUNCER is empty, and option pgbouncer cannot be None: "
        r"expected true/false .*; unset the variable for the default",
    ):
        from_env(env, PG, PGBOUNCER="")


def test_no_variable_leaves_every_option_at_its_default(env: pytest.MonkeyPatch) -> None:
    assert from_env(env, PG) == FactoryConfig.from_url(PG)
    env.delenv("DATABASE_URL")
    assert FactoryConfig.from_env() == FactoryConfig.from_url("sqlite:///sessionforge.db")


# --- precedence ------------------------------------------------------------------------


def test_keyword_arguments_win_over_the_environment(env: pytest.MonkeyPatch) -> None:
    env.setenv("DATABASE_URL", PG)
    env.setenv("SESSIONFORGE_POOL_SIZE", "3")
    env.setenv("SESSIONFORGE_MAX_OVERFLOW", "4")
    env.setenv("SESSIONFORGE_CLASS_", "tests.test_from_env:EnvSession")
    config = FactoryConfig.from_env(pool_size=7, class_=AsyncSession)
    assert (config.pool_size, config.max_overflow, config.class_) == (7, 4, AsyncSession)
    # A variable a keyword argument overrides is not even parsed.
    env.setenv("SESSIONFORGE_POOL_SIZE", "many")
    assert FactoryConfig.from_env(pool_size=2).pool_size == 2
    with pytest.raises(ConfigurationError, match="SESSIONFORGE_POOL_SIZE"):
        FactoryConfig.from_env()


def test_the_url_comes_from_var_even_when_it_has_the_prefix(env: pytest.MonkeyPatch) -> None:
    env.setenv("SESSIONFORGE_DB", PG)
    env.setenv("SESSIONFORGE_POOL_SIZE", "3")
    config = FactoryConfig.from_env("SESSIONFORGE_DB")
    assert (str(config.url), config.pool_size) == ("postgresql+asyncpg://app@db:5432/app", 3)


def test_the_tooling_prefixes_are_not_options(env: pytest.MonkeyPatch) -> None:
    env.setenv("SESSIONFORGE_TEST_POSTGRES_URL", "postgresql://elsewhere/test")
    env.setenv("SESSIONFORGE_TEST_ANYTHING", "x")
    env.setenv("SESSIONFORGE_BENCH_URL", "sqlite")
    assert from_env(env, PG) == FactoryConfig.from_url(PG)


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        pytest.param(
            {"POOL_SIZE": "five"},
            r"^environment variable SESSIONFORGE_POOL_SIZE='five' is invalid for option "
            r"pool_size: expected an int or an empty value for None$",
            id="not-an-int",
        ),
        pytest.param(
            {"POOL_SIZE": "-5"},
            r"^environment variable SESSIONFORGE_POOL_SIZE: option pool_size=-5 \(int\) is "
            r"invalid: expected an int from 0 to",
            id="out-of-range",
        ),
        pytest.param(
            {"PING_AFTER": "soon"},
            r"SESSIONFORGE_PING_AFTER='soon' is invalid for option ping_after: expected a "
            "number or an empty value for None",
            id="not-a-number",
        ),
        pytest.param(
            {"PING_AFTER": "nan"},
            r"SESSIONFORGE_PING_AFTER: option ping_after=nan \(float\) is invalid",
            id="nan",
        ),
        pytest.param(
            {"POOL_USE_LIFO": "maybe"},
            r"SESSIONFORGE_POOL_USE_LIFO='maybe' is invalid for option pool_use_lifo: "
            r"expected true/false \(or 1/0, yes/no\)$",
            id="not-a-bool",
        ),
        pytest.param(
            {"INFO": "[1, 2]"},
            r"SESSIONFORGE_INFO='\[1, 2\]' is invalid for option info: expected a JSON "
            r'object \(\{"key": "value"\}\) or an empty value for None',
            id="json-list-for-a-dict",
        ),
        pytest.param(
            {"REPLICAS": "postgresql://app@replica1/app"},
            r"SESSIONFORGE_REPLICAS='postgresql://app@replica1/app' is invalid for option "
            r"replicas: expected a JSON list \(\[",
            id="a-url-for-a-list",
        ),
        pytest.param(
            {"SQLITE_BEGIN": "exclusive"},
            r"expected one of immediate, deferred",
            id="not-a-choice",
        ),
        pytest.param(
            {"CLASS_": "AsyncSession"},
            r"SESSIONFORGE_CLASS_='AsyncSession' is invalid for option class_: expected "
            r"module:attr \(a class or callable to import, e\.g\. myapp\.db:AppSession\)",
            id="no-colon",
        ),
        pytest.param(
            {"CLASS_": "no_such_module_here:Session"},
            r"^environment variable SESSIONFORGE_CLASS_: could not import module "
            r"'no_such_module_here'",
            id="no-module",
        ),
        pytest.param(
            {"CLASS_": "tests.test_from_env:Missing"},
            r"SESSIONFORGE_CLASS_: module 'tests.test_from_env' has no attribute 'Missing'",
            id="no-attribute",
        ),
        pytest.param(
            {"CLASS_": "tests.test_from_env:EnvSyncSession"},
            r"SESSIONFORGE_CLASS_: option class_=.* is invalid: expected a subclass of "
            r"sqlalchemy\.ext\.asyncio\.session\.AsyncSession",
            id="wrong-class",
        ),
    ],
)
def test_an_error_names_the_variable_and_what_it_expected(
    env: pytest.MonkeyPatch, variables: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        from_env(env, SQLITE if "SQLITE_BEGIN" in variables else PG, **variables)


@pytest.mark.parametrize(
    ("variables", "secret"),
    [
        pytest.param({"CONNECT_ARGS": '{"password": "s3cret"'}, "s3cret", id="bad-json"),
        pytest.param({"ENGINE_OPTIONS": '["s3cret"]'}, "s3cret", id="wrong-json"),
        pytest.param({"SYNC_CONNECT_ARGS": "password=s3cret"}, "s3cret", id="not-json"),
    ],
)
def test_a_value_that_may_be_a_secret_is_never_shown(
    env: pytest.MonkeyPatch, variables: dict[str, str], secret: str
) -> None:
    with pytest.raises(ConfigurationError, match=r"SESSIONFORGE_.*=\.\.\. is invalid") as raised:
        from_env(env, PG, **variables)
    assert secret not in str(raised.value)


def test_a_password_from_the_environment_is_never_shown(env: pytest.MonkeyPatch) -> None:
    config = from_env(env, PG, PASSWORD="s3cret")
    assert config.password == "s3cret"
    assert "s3cret" not in repr(config)
    assert config.describe()["password"] == "***"
    # A password in the URL as well: the error says which variable gave the other one.
    env.setenv("DATABASE_URL", "postgresql://app:other@db/app")
    with pytest.raises(
        ConfigurationError,
        match=r"holds a password, and password= gives one too; .* \(options read from the "
        r"environment: SESSIONFORGE_PASSWORD\)",
    ) as raised:
        FactoryConfig.from_env()
    assert "s3cret" not in str(raised.value)
    assert "other" not in str(raised.value)


def test_an_option_of_another_dialect_names_its_variable(env: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        ConfigurationError,
        match=r"option sqlite_busy_timeout= is for SQLite only.*\(options read from the "
        r"environment: SESSIONFORGE_SQLITE_BUSY_TIMEOUT\)$",
    ):
        from_env(env, PG, SQLITE_BUSY_TIMEOUT="1")


@pytest.mark.parametrize(
    ("variable", "message"),
    [
        pytest.param(
            "SESSIONFORGE_POOL_SIZ",
            r"^unknown environment variable SESSIONFORGE_POOL_SIZ; did you mean "
            r"SESSIONFORGE_POOL_SIZE\? sessionforge reads SESSIONFORGE_<OPTION> for each "
            r"option of FactoryOptions, in upper case \(SESSIONFORGE_POOL_SIZE\); "
            r"SESSIONFORGE_TEST_\* and SESSIONFORGE_BENCH_\* are left to the project's "
            r"tooling\. Rename or unset it$",
            id="typo",
        ),
        pytest.param(
            "SESSIONFORGE_pool_size", "did you mean SESSIONFORGE_POOL_SIZE\\?", id="lower-case"
        ),
        pytest.param("SESSIONFORGE_CLASS", "did you mean SESSIONFORGE_CLASS_\\?", id="class"),
        pytest.param(
            "SESSIONFORGE_URL",
            "SESSIONFORGE_URL is not read: the URL comes from DATABASE_URL",
            id="url",
        ),
        pytest.param("SESSIONFORGE_XYZZY", r"SESSIONFORGE_XYZZY\. sessionforge", id="no-hint"),
    ],
)
def test_an_unknown_variable_is_refused(
    env: pytest.MonkeyPatch, variable: str, message: str
) -> None:
    env.setenv(variable, "3")
    with pytest.raises(ConfigurationError, match=message):
        from_env(env, PG)


# --- in use ----------------------------------------------------------------------------


async def test_a_factory_from_the_environment_runs_with_its_options(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = from_env(
        env,
        f"sqlite:///{tmp_path / 'env.db'}",
        SQLITE_JOURNAL_MODE="truncate",
        SQLITE_BEGIN="deferred",
        EXPIRE_ON_COMMIT="true",
        CLASS_="tests.test_from_env:EnvSession",
    )
    async with SessionFactory(config) as db:
        async with db.begin() as session:
            assert isinstance(session, EnvSession)
            assert session.sync_session.expire_on_commit is True
            assert await session.scalar(text("PRAGMA journal_mode")) == "truncate"


def test_sessionforge_check_reads_the_option_variables(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "check.db"
    sqlite3.connect(path).close()
    env.setenv("DATABASE_URL", f"sqlite:///{path}")
    env.setenv("SESSIONFORGE_POOL_SIZE", "3")
    assert main(["check"]) == 0
    assert "size=3 " in capsys.readouterr().out
    env.setenv("SESSIONFORGE_POOL_SIZ", "3")
    assert main(["check"]) == 2
    assert "unknown environment variable SESSIONFORGE_POOL_SIZ" in capsys.readouterr().err


async def test_the_readme_environment_block_runs(env: pytest.MonkeyPatch) -> None:
    env.setenv("DATABASE_URL", "postgresql://app@db/app")
    env.setenv("SESSIONFORGE_POOL_SIZE", "10")
    env.setenv("SESSIONFORGE_PGBOUNCER", "yes")
    block = block_tested_by("tests/test_from_env.py::test_the_readme_environment_block_runs")
    namespace: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), namespace)
    db = namespace["db"]
    assert db.config.pgbouncer is True
    await db.dispose()
