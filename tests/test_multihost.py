"""Multi-host PostgreSQL URLs (DESIGN.md §9, "Primary failover"): both spellings.

libpq's ``db1:5432,db2:5432`` (which SQLAlchemy cannot parse) and SQLAlchemy's
``?host=db1:5432&host=db2:5432`` give the same URL; each twin's driver gets its own
form of the host list; bad lists are refused without showing the password; a URL whose
first host is down reaches the second on both twins.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url

from sessionforge import FactoryConfig, SessionFactory
from sessionforge.cli import main
from sessionforge.config import mask_url
from sessionforge.errors import ConfigurationError

PASSWORD = "s3cr/et:pw"
USER_INFO = f"app:{quote(PASSWORD, safe='')}"
CANONICAL = (
    f"postgresql+asyncpg://{USER_INFO}@/app?host=db1:5432&host=db2:6432"
    "&target_session_attrs=read-write"
)

SPELLINGS = [
    pytest.param(
        f"postgresql://{USER_INFO}@db1:5432,db2:6432/app?target_session_attrs=read-write",
        id="libpq-comma",
    ),
    pytest.param(
        f"postgres://{USER_INFO}@db1,db2:6432/app?target_session_attrs=read-write",
        id="libpq-comma-default-port",
    ),
    pytest.param(
        f"postgresql://{USER_INFO}@/app?host=db1:5432&host=db2:6432"
        "&target_session_attrs=read-write",
        id="sqlalchemy-host-params",
    ),
    pytest.param(
        f"postgresql://{USER_INFO}@/app?host=db1&host=db2:6432&target_session_attrs=read-write",
        id="sqlalchemy-host-params-default-port",
    ),
    pytest.param(
        f"postgresql://{USER_INFO}@/app?host=db1,db2&port=5432,6432"
        "&target_session_attrs=read-write",
        id="sqlalchemy-host-and-port-lists",
    ),
]


def parsed(raw: str | URL) -> URL:
    url = FactoryConfig.from_url(raw).url
    assert url is not None
    return url


# --- parsing --------------------------------------------------------------------------


@pytest.mark.parametrize("raw", SPELLINGS)
def test_both_spellings_give_the_same_url(raw: str) -> None:
    url = parsed(raw)
    assert url == make_url(CANONICAL)
    assert url.password == PASSWORD
    assert url.query["host"] == ("db1:5432", "db2:6432")
    assert parsed(url) == url  # parsing again changes nothing


@pytest.mark.parametrize("raw", SPELLINGS)
def test_each_twin_driver_gets_the_host_list_it_understands(raw: str) -> None:
    db = SessionFactory(raw)
    async_engine, sync_engine = db.engine.sync_engine, db.sync.engine
    _, asyncpg_args = async_engine.dialect.create_connect_args(async_engine.url)
    _, psycopg_args = sync_engine.dialect.create_connect_args(sync_engine.url)

    assert (async_engine.dialect.driver, sync_engine.dialect.driver) == ("asyncpg", "psycopg")
    assert asyncpg_args["host"] == ["db1", "db2"]
    assert asyncpg_args["port"] == [5432, 6432]
    assert asyncpg_args["target_session_attrs"] == "read-write"
    assert psycopg_args["host"] == "db1,db2"  # libpq's own lists
    assert psycopg_args["port"] == "5432,6432"
    assert psycopg_args["target_session_attrs"] == "read-write"
    assert psycopg_args["password"] == asyncpg_args["password"] == PASSWORD


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("postgresql://app@db1:5433/app", id="host-and-port"),
        pytest.param("postgresql://app@db1/app", id="host-only"),
        pytest.param("postgresql://app@/app?host=/var/run/postgresql", id="socket-dir"),
        pytest.param("postgresql://app@/app?host=db1:5433", id="one-host-param"),
        pytest.param("postgresql://app@db1/app?target_session_attrs=any", id="attrs"),
    ],
)
def test_a_single_host_url_is_left_as_it_was(raw: str) -> None:
    expected = make_url(raw).set(drivername="postgresql+asyncpg")
    assert parsed(raw) == expected


# --- validation -----------------------------------------------------------------------

INVALID = [
    pytest.param(
        f"postgresql://{USER_INFO}@db1:5432,db2:99999/app",
        "host 2 ('db2:99999')",
        id="port-too-big",
    ),
    pytest.param(f"postgresql://{USER_INFO}@db1,db2:0/app", "port '0'", id="port-zero"),
    pytest.param(f"postgresql://{USER_INFO}@db1,db2:x/app", "port 'x'", id="port-not-a-number"),
    pytest.param(f"postgresql://{USER_INFO}@db1,db2:/app", "port ''", id="port-empty"),
    pytest.param(f"postgresql://{USER_INFO}@db1,,db2/app", "host 2 ('')", id="empty-host"),
    pytest.param(f"postgresql://{USER_INFO}@db1:5432,/app", "no host name", id="trailing-comma"),
    pytest.param(f"postgresql://{USER_INFO}@:5432,db2/app", "host 1", id="port-without-host"),
    pytest.param(
        f"postgresql://{USER_INFO}@/app?host=db1&host=:5432", "host 2", id="empty-host-param"
    ),
    pytest.param(
        f"postgresql://{USER_INFO}@/app?host=db1&host=db2:65536", "port '65536'", id="param-port"
    ),
    pytest.param(f"postgresql://{USER_INFO}@db1,[::1]:5432/app", "IPv6", id="ipv6"),
    pytest.param(
        f"postgresql://{USER_INFO}@db1,db2/app?host=db3", "both before the path", id="mixed-forms"
    ),
    pytest.param(
        f"postgresql://{USER_INFO}@db0/app?host=db1&host=db2",
        "host before the path",
        id="url-host",
    ),
    pytest.param(
        f"postgresql://{USER_INFO}@/app?host=db1,db2&port=5432", "2 hosts and 1 ports", id="ports"
    ),
    pytest.param(
        f"postgresql://{USER_INFO}@/app?host=db1:5432&host=db2&port=5432,5432",
        "ports both in host= and in port=",
        id="port-twice",
    ),
    pytest.param(
        f"postgresql://{USER_INFO}@db1,db2/app?target_session_attrs=primry",
        "target_session_attrs='primry'",
        id="bad-target-session-attrs",
    ),
    pytest.param(
        f"mysql+aiomysql://{USER_INFO}@db1,db2/app", "only PostgreSQL", id="not-postgresql"
    ),
]


@pytest.mark.parametrize(("raw", "fragment"), INVALID)
def test_a_bad_host_list_is_refused_without_the_password(raw: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        SessionFactory(raw)
    message = str(caught.value)
    assert fragment in message
    for secret in (PASSWORD, quote(PASSWORD, safe=""), "s3cr"):
        assert secret not in message


# --- showing it -----------------------------------------------------------------------

SHOWN = "postgresql+asyncpg://app:***@db1:5432,db2:6432/app?target_session_attrs=read-write"


@pytest.mark.parametrize("raw", SPELLINGS)
def test_repr_and_mask_url_show_the_hosts_not_the_password(raw: str) -> None:
    db = SessionFactory(raw)
    assert mask_url(db.url) == SHOWN
    assert f"url='{SHOWN}'" in repr(db)
    assert f"url='{SHOWN.replace('+asyncpg', '+psycopg')}'" in repr(db.sync)
    assert PASSWORD not in repr(db) + repr(db.sync)
    assert db.engine is not None  # built: status lists it
    assert db.sync.engine is not None
    assert [engine.url for engine in db.status().engines] == [
        SHOWN,
        SHOWN.replace("+asyncpg", "+psycopg"),
    ]


def test_check_shows_the_hosts(capsys: pytest.CaptureFixture[str]) -> None:
    # Both hosts are closed ports: check reports the failure, naming every host.
    assert main(["check", f"postgresql://{USER_INFO}@127.0.0.1:1,127.0.0.1:2/app"]) == 1
    captured = capsys.readouterr()
    shown = captured.out + captured.err
    assert "127.0.0.1:1,127.0.0.1:2" in shown
    assert "s3cr" not in shown


# --- against the server ---------------------------------------------------------------


def server_urls(pg_url: str) -> dict[str, str]:
    """Multi-host URLs whose first host is a closed port and second the test server."""
    server = make_url(pg_url)
    user = quote(server.username or "postgres", safe="")
    if server.password is not None:
        user += ":" + quote(str(server.password), safe="")
    where = f"{server.host or '127.0.0.1'}:{server.port or 5432}"
    database = server.database or "test"
    return {
        "libpq-comma": f"postgresql://{user}@127.0.0.1:1,{where}/{database}",
        "sqlalchemy-host-params": f"postgresql://{user}@/{database}?host=127.0.0.1:1&host={where}",
    }


SERVER_CASES = [
    pytest.param(spelling, attrs, id=f"{spelling}{'-read-write' if attrs else ''}")
    for spelling in ("libpq-comma", "sqlalchemy-host-params")
    for attrs in ("", "target_session_attrs=read-write")
]


def with_query(url: str, query: str) -> str:
    if not query:
        return url
    return f"{url}{'&' if '?' in url else '?'}{query}"


async def writable_server(db: SessionFactory[Any]) -> tuple[Any, ...]:
    async with db.begin() as session:
        row = (await session.execute(text(_SERVER_QUERY))).one()
    return tuple(row)


def writable_server_sync(db: SessionFactory[Any]) -> tuple[Any, ...]:
    with db.sync.begin() as session:
        row = session.execute(text(_SERVER_QUERY)).one()
    return tuple(row)


_SERVER_QUERY = (
    "SELECT inet_server_port(), pg_is_in_recovery(), current_setting('transaction_read_only')"
)


@pytest.mark.postgres
@pytest.mark.parametrize(("spelling", "attrs"), SERVER_CASES)
async def test_a_dead_first_host_is_skipped_on_both_twins(
    pg_url: str, spelling: str, attrs: str
) -> None:
    port = make_url(pg_url).port or 5432
    db = SessionFactory(with_query(server_urls(pg_url)[spelling], attrs), pool_size=1)
    try:
        expected = (port, False, "off")
        assert await writable_server(db) == expected
        assert writable_server_sync(db) == expected
        assert await db.ping() >= 0
        assert db.sync.ping() >= 0
    finally:
        db.sync.dispose()
        await db.dispose()
