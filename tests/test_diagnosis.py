"""Why a connection failed, as ``db.ping()``, ``db.sync.ping()`` and ``check`` word it.

Every failure is provoked for real (a missing database or role on the PostgreSQL
server, a wrong password on a private server that checks passwords, a closed port, a
SQLite path whose directory does not exist), through both twins, and the message is
checked for what it says and for the password it must not hold, in any spelling.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import traceback
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import URL, make_url

from sessionforge import DatabaseUnavailableError, SessionFactory
from sessionforge._internal.diagnosis import diagnose, explain
from sessionforge.cli import main

from .pgcluster import POSTGRES_DRIVERS, WRONG_PASSWORD, PostgresServer, spellings

SECRET = "s3cr3t-marker"
TWINS = [pytest.param("async", id="async"), pytest.param("sync", id="sync")]
NETWORK_ADVICE = "check that the server is up, the host and port, and any firewall in between"


async def ping_error(url: str | URL, twin: str) -> DatabaseUnavailableError:
    """The error ``ping()`` of ``twin`` raises on ``url`` (the test fails if it answers)."""
    db: SessionFactory[Any] = SessionFactory(url)
    try:
        with pytest.raises(DatabaseUnavailableError) as raised:
            if twin == "async":
                await db.ping(timeout=5)
            else:
                db.sync.ping(timeout=5)
    finally:
        await db.dispose()
    return raised.value


def _render(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def with_password(pg_url: str, driver: str, database: str) -> URL:
    """``pg_url`` on ``driver`` and ``database``, holding a password to look for.

    The suite's server trusts local connections (its default URL has no password), so
    a password that is not the role's still lets the server say what else is wrong.
    """
    url = make_url(pg_url)
    return url.set(drivername=driver, password=url.password or SECRET, database=database)


# PostgreSQL: the server answered -----------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("driver", POSTGRES_DRIVERS)
@pytest.mark.parametrize("twin", TWINS)
async def test_ping_names_a_missing_database(pg_url: str, driver: str, twin: str) -> None:
    name = f"sf_missing_{uuid.uuid4().hex[:8]}"
    url = with_password(pg_url, driver, database=name)

    error = await ping_error(url, twin)

    message = str(error)
    assert message.startswith("the server at postgresql+")
    assert f":***@{url.host}:{url.port}/{name} answered, but " in message
    assert message.endswith(
        f'database "{name}" does not exist: create it (CREATE DATABASE "{name}"), '
        "or fix the database name in the URL"
    )
    assert "check that the server is up" not in message
    assert str(url.password) not in message
    assert isinstance(error, ConnectionError)


@pytest.mark.postgres
@pytest.mark.parametrize("driver", POSTGRES_DRIVERS)
@pytest.mark.parametrize("twin", TWINS)
async def test_ping_names_a_missing_role(pg_url: str, driver: str, twin: str) -> None:
    role = f"sf_nobody_{uuid.uuid4().hex[:8]}"
    url = make_url(pg_url).set(drivername=driver, username=role, password=SECRET)

    message = str(await ping_error(url, twin))

    assert f"://{role}:***@{url.host}:{url.port}/" in message
    assert message.endswith(
        f'answered, but role "{role}" does not exist: create it (CREATE ROLE "{role}" '
        "LOGIN), or fix the user name in the URL"
    )
    assert "check that the server is up" not in message
    assert SECRET not in message


@pytest.mark.postgres
@pytest.mark.parametrize("driver", POSTGRES_DRIVERS)
@pytest.mark.parametrize("twin", TWINS)
async def test_ping_shows_a_refusal_it_has_no_advice_for(
    pg_url: str, driver: str, twin: str
) -> None:
    # template0 never accepts connections: the server answered, the network is fine.
    url = with_password(pg_url, driver, database="template0")

    message = str(await ping_error(url, twin))

    assert message.startswith("connecting to the database at postgresql+")
    assert 'database "template0" is not currently accepting connections' in message
    assert message.endswith("; check the URL and the server's log")
    assert "check that the server is up" not in message
    assert str(url.password) not in message


@pytest.mark.postgres
@pytest.mark.parametrize("twin", TWINS)
def test_ping_and_check_say_the_same(
    pg_url: str, twin: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = with_password(
        pg_url, "postgresql+psycopg", database=f"sf_missing_{uuid.uuid4().hex[:8]}"
    )

    message = str(asyncio.run(ping_error(url, twin)))

    assert main(["check", _render(url)]) == 1
    assert capsys.readouterr().err == f"sessionforge check: {message}\n"


@pytest.mark.postgres
async def test_lifespan_with_ping_names_a_missing_database(pg_url: str) -> None:
    name = f"sf_missing_{uuid.uuid4().hex[:8]}"
    url = with_password(pg_url, "postgresql+asyncpg", database=name)
    db: SessionFactory[Any] = SessionFactory(url)

    with pytest.raises(DatabaseUnavailableError) as raised:
        async with db.lifespan.with_ping(timeout=5)(object()):
            pytest.fail("the app started")

    message = str(raised.value)
    assert message.startswith("startup check failed: the server at postgresql+asyncpg://")
    assert f'answered, but database "{name}" does not exist: create it' in message
    assert str(url.password) not in message


# PostgreSQL: a server that checks passwords ------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("driver", POSTGRES_DRIVERS)
@pytest.mark.parametrize("twin", TWINS)
async def test_ping_names_a_wrong_password(
    password_server: PostgresServer, driver: str, twin: str
) -> None:
    url = password_server.login_url.set(drivername=driver, password=WRONG_PASSWORD)

    error = await ping_error(url, twin)

    message = str(error)
    assert message.startswith("the server at postgresql+")  # the sync twin's: psycopg
    assert message.endswith(
        f"://app:***@127.0.0.1:{password_server.port}/postgres answered, but password "
        'authentication failed for user "app": check the password (in the URL, or what '
        "password= returns)"
    )
    # Nor in what a log would show: the traceback, the driver's error chained in it.
    shown = message + "".join(traceback.format_exception(error))
    for spelling in spellings(WRONG_PASSWORD) | {SECRET}:
        assert spelling not in shown


@pytest.mark.postgres
@pytest.mark.parametrize("driver", POSTGRES_DRIVERS)
@pytest.mark.parametrize("twin", TWINS)
async def test_ping_with_the_right_password_answers(
    password_server: PostgresServer, driver: str, twin: str
) -> None:
    db: SessionFactory[Any] = SessionFactory(password_server.login_url.set(drivername=driver))
    try:
        seconds = await db.ping(timeout=5) if twin == "async" else db.sync.ping(timeout=5)
    finally:
        await db.dispose()

    assert 0 < seconds < 5


# the network -------------------------------------------------------------------------


@pytest.mark.parametrize("driver", POSTGRES_DRIVERS)
@pytest.mark.parametrize("twin", TWINS)
async def test_ping_on_a_closed_port_points_at_the_network(driver: str, twin: str) -> None:
    # asyncpg raises ConnectionRefusedError; psycopg an OperationalError saying so.
    url = f"{driver}://app:{SECRET}@127.0.0.1:1/shop"

    message = str(await ping_error(url, twin))

    assert message.startswith("cannot reach the database at postgresql+")
    assert "://app:***@127.0.0.1:1/shop (" in message
    assert message.endswith(NETWORK_ADVICE)
    assert SECRET not in message


# SQLite ------------------------------------------------------------------------------


def aiosqlite_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.endswith("(_connection_worker_thread)")}


@pytest.mark.parametrize("twin", TWINS)
async def test_ping_names_a_missing_sqlite_directory(twin: str, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    before = aiosqlite_threads()

    message = str(await ping_error(f"sqlite:///{missing / 'app.db'}", twin))

    # aiosqlite 0.22.1 stops the worker thread of a failed connect without waiting for
    # it; the thread then posts to the event loop, which may be closed by then ("Event
    # loop is closed" in the thread). The factory refuses the path before any thread.
    assert aiosqlite_threads() <= before

    assert message.startswith("cannot open the SQLite database sqlite")
    assert message.endswith(
        f"/{missing / 'app.db'}: the directory {missing} does not exist; create it, "
        "or fix the path in the URL"
    )
    assert "check that the server is up" not in message


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        pytest.param(
            "missing/dir.db",
            "the directory {tmp}/missing does not exist; create it, or fix the path in the URL",
            id="no-dir",
        ),
        pytest.param("", "{tmp} is a directory; the URL must name a file", id="a-directory"),
    ],
)
def test_diagnose_explains_sqlite_unable_to_open(where: str, reason: str, tmp_path: Path) -> None:
    path = tmp_path / where
    with pytest.raises(sqlite3.OperationalError, match="unable to open database file") as raised:
        sqlite3.connect(path)

    message = diagnose(make_url(f"sqlite+aiosqlite:///{path}"), raised.value)

    assert message == (
        f"cannot open the SQLite database sqlite+aiosqlite:///{path}: "
        + reason.format(tmp=tmp_path)
    )


# the password ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        pytest.param("p@ss:w/rd", id="decoded"),
        pytest.param("p%40ss%3Aw%2Frd", id="percent-encoded"),
    ],
)
def test_a_password_the_driver_echoes_is_masked(spelling: str) -> None:
    # Drivers put connection parameters in some messages (a DSN they could not parse).
    url = URL.create("postgresql+psycopg", "app", "p@ss:w/rd", "db.example", 5432, "shop")

    message = explain(url, ValueError(f"bad conninfo: password={spelling} host=db"), 5)

    assert message == (
        "connecting to the database at postgresql+psycopg://app:***@db.example:5432/shop "
        "failed (ValueError: bad conninfo: password=*** host=db); "
        "check the URL and the server's log"
    )
