"""Connection-class failures reach callers as ``DatabaseUnavailableError`` (DESIGN §9).

Real servers only: the shared PostgreSQL (backends terminated with
``pg_terminate_backend``), private servers that are stopped and started, a primary and
its standby, and ``tests/faultproxy.py`` in front of a server to cut a COMMIT in flight,
refuse connections or hold them silently. Each scenario runs on asyncpg, psycopg (async)
and the sync twin (psycopg).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from sessionforge import (
    AmbiguousCommitError,
    DatabaseUnavailableError,
    FactoryConfig,
    RetryExhaustedError,
    SessionFactory,
)
from sessionforge._internal.engines import engine_kwargs

from .conftest import PG_URL, require_postgres
from .faultproxy import fault_proxy
from .pgcluster import LOGIN, PostgresServer, private_postgres, replicated_postgres, spellings

pytestmark = pytest.mark.postgres

CLIENTS = [
    pytest.param("asyncpg", id="asyncpg"),
    pytest.param("psycopg", id="psycopg"),
    pytest.param("sync", id="sync-psycopg"),
]
PID = text("SELECT pg_backend_pid()")


def client_url(client: str, base: str | URL, port: int | None = None) -> str:
    """``base`` for ``client``'s driver (and on ``port``), password included."""
    driver = "postgresql+asyncpg" if client == "asyncpg" else "postgresql+psycopg"
    url = make_url(base).set(drivername=driver)
    if port is not None:
        url = url.set(port=port)
    return url.render_as_string(hide_password=False)


def pool_of(client: str, db: SessionFactory[Any]) -> Any:
    return db.sync.engine.pool if client == "sync" else db.engine.pool


def driver_error(client: str, db: SessionFactory[Any]) -> type[BaseException]:
    engine = db.sync.engine if client == "sync" else db.engine.sync_engine
    error: type[BaseException] = engine.dialect.loaded_dbapi.Error
    return error


async def backend_pid(client: str, db: SessionFactory[Any], **begin: Any) -> int:
    if client == "sync":
        with db.sync.begin(**begin) as session:
            return int(session.scalar(PID))
    async with db.begin(**begin) as session:
        return int(await session.scalar(PID))


@pytest.fixture
def shared() -> Iterator[Engine]:
    """A plain engine on the shared server: terminate backends, count rows."""
    require_postgres()
    engine = create_engine(
        make_url(PG_URL).set(drivername="postgresql+psycopg"), poolclass=NullPool
    )
    yield engine
    engine.dispose()


@pytest.fixture
def table(shared: Engine, prefix: str) -> Iterator[str]:
    name = f"{prefix}_rows"
    with shared.begin() as connection:
        connection.execute(text(f"CREATE TABLE {name} (id int PRIMARY KEY)"))
    yield name
    with shared.begin() as connection:
        connection.execute(text(f"DROP TABLE IF EXISTS {name}"))


def rows(engine: Engine, table: str) -> list[int]:
    with engine.connect() as connection:
        return list(connection.scalars(text(f"SELECT id FROM {table} ORDER BY id")))


def rows_within(engine: Engine, table: str, seconds: float) -> list[int]:
    """``rows``, polled until there are some or ``seconds`` passed."""
    deadline = time.monotonic() + seconds
    while not (found := rows(engine, table)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return found


def terminate(engine: Engine, pid: int) -> None:
    """End backend ``pid`` and wait (up to 5 s) until its process is gone."""
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid})


def pg_port() -> int:
    port = make_url(PG_URL).port
    return port or 5432


@pytest.fixture
async def make() -> Any:
    """Factories that are disposed at teardown."""
    made: list[SessionFactory[Any]] = []

    def build(url: str, **options: Any) -> SessionFactory[Any]:
        db: SessionFactory[Any] = SessionFactory(url, **options)
        made.append(db)
        return db

    yield build
    for db in made:
        await db.dispose()


# --- a backend terminated mid-transaction ---------------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
async def test_backend_terminated_mid_transaction_is_database_unavailable(
    client: str, make: Any, shared: Engine, table: str
) -> None:
    db = make(client_url(client, PG_URL))
    insert = text(f"INSERT INTO {table} VALUES (1)")
    with pytest.raises(DatabaseUnavailableError) as raised:
        if client == "sync":
            with db.sync.begin() as session:
                session.execute(insert)
                terminate(shared, session.scalar(PID))
                session.execute(text("SELECT 1"))
        else:
            async with db.begin() as session:
                await session.execute(insert)
                pid = await session.scalar(PID)
                await asyncio.to_thread(terminate, shared, pid)
                await session.execute(text("SELECT 1"))
    error = raised.value
    assert not isinstance(error, AmbiguousCommitError)
    assert isinstance(error.__cause__, driver_error(client, db))
    assert str(error).startswith("lost the connection to the database at postgresql+")
    assert "run it again" in str(error)
    assert pool_of(client, db).checkedout() == 0
    assert rows(shared, table) == []  # the server rolled it back
    await backend_pid(client, db)  # the pool serves a fresh connection


# --- a server stopped: open connections lost, new ones refused -------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    with private_postgres() as built:
        yield built


@pytest.mark.parametrize("client", CLIENTS)
async def test_refused_connect_is_database_unavailable_not_a_raw_oserror(
    client: str, make: Any, server: PostgresServer
) -> None:
    if not server.running:
        server.start()
    db = make(client_url(client, server.url))
    connects: list[int] = []
    engine = db.sync.engine if client == "sync" else db.engine.sync_engine
    event.listen(engine, "do_connect", lambda *_: connects.append(1))
    await backend_pid(client, db)
    server.stop("fast")  # a primary restarting: backends terminated (57P01), then no listener

    for attempt in ("pooled connection lost", "connect refused"):
        with pytest.raises(DatabaseUnavailableError) as raised:
            await backend_pid(client, db)
        assert pool_of(client, db).checkedout() == 0, attempt
    refused = raised.value
    assert not isinstance(refused, DBAPIError)
    assert str(refused).startswith(
        f"cannot reach the database at {client_url(client, server.url)} ("
    )
    assert "check that the server is up" in str(refused)
    if client == "asyncpg":
        assert isinstance(refused.__cause__, OSError)  # raw from asyncpg, now chained
    else:
        assert isinstance(refused.__cause__, driver_error(client, db))
    assert len(connects) == 2  # users' do_connect listeners still run

    ping = db.sync.ping if client == "sync" else None
    with pytest.raises(DatabaseUnavailableError) as pinged:
        if ping is not None:
            ping(timeout=5)
        else:
            await db.ping(timeout=5)
    assert str(pinged.value).count("cannot reach the database") == 1

    server.start()
    await backend_pid(client, db)  # back without any reconfiguration


# --- run_transaction: lost before COMMIT re-runs, lost in COMMIT never -----------------


@pytest.mark.parametrize("client", CLIENTS)
async def test_run_transaction_reruns_work_whose_connection_was_lost_before_commit(
    client: str, make: Any, shared: Engine, table: str
) -> None:
    # The backend is terminated after the INSERT and before the COMMIT is sent: the
    # driver knows the connection is gone by the time it would send it, so the COMMIT
    # never leaves, the server rolled back, and the work is re-run.
    db = make(client_url(client, PG_URL))
    insert = text(f"INSERT INTO {table} VALUES (1)")
    attempts: list[int] = []

    def work(session: Session) -> None:
        attempts.append(1)
        session.execute(insert)
        if len(attempts) == 1:
            terminate(shared, session.scalar(PID))

    async def async_work(session: AsyncSession) -> None:
        attempts.append(1)
        await session.execute(insert)
        if len(attempts) == 1:
            await asyncio.to_thread(terminate, shared, await session.scalar(PID))
            await asyncio.sleep(0.05)  # asyncpg reads the goodbye on the event loop

    if client == "sync":
        db.sync.run_transaction(work, retries=3, backoff=0)
    else:
        await db.run_transaction(async_work, retries=3, backoff=0)
    assert len(attempts) == 2
    assert rows(shared, table) == [1]
    assert pool_of(client, db).checkedout() == 0


@pytest.mark.parametrize("client", CLIENTS)
async def test_connection_cut_while_commit_in_flight_is_ambiguous_and_not_rerun(
    client: str, make: Any, shared: Engine, table: str
) -> None:
    with fault_proxy(pg_port()) as proxy:
        db = make(client_url(client, PG_URL, proxy.port))
        insert = text(f"INSERT INTO {table} VALUES (1)")
        attempts: list[int] = []

        def work(session: Session) -> None:
            attempts.append(1)
            session.execute(insert)

        async def async_work(session: AsyncSession) -> None:
            attempts.append(1)
            await session.execute(insert)

        cut = proxy.cut_after(b"COMMIT")
        with pytest.raises(AmbiguousCommitError) as raised:
            if client == "sync":
                db.sync.run_transaction(work, retries=5, backoff=0)
            else:
                await db.run_transaction(async_work, retries=5, backoff=0)
        assert cut.is_set()
        assert len(attempts) == 1  # never re-run
        message = str(raised.value)
        assert message.startswith("the COMMIT was sent to the database at postgresql+")
        assert "may or may not have committed; check before re-running it" in message
        assert isinstance(raised.value.__cause__, driver_error(client, db))
        assert pool_of(client, db).checkedout() == 0
        # The server got the COMMIT and ran it: the row is there, once.
        assert await asyncio.to_thread(rows_within, shared, table, 5.0) == [1]
        await backend_pid(client, db)  # the next transaction gets a fresh connection


@pytest.mark.parametrize("client", CLIENTS)
async def test_retries_spent_on_refused_connects_raise_retry_exhausted(
    client: str, make: Any
) -> None:
    with fault_proxy(pg_port()) as proxy:
        db = make(client_url(client, PG_URL, proxy.port))
        proxy.refuse()
        calls: list[int] = []

        def work(session: Session) -> None:
            calls.append(1)
            session.execute(text("SELECT 1"))

        async def async_work(session: AsyncSession) -> None:
            calls.append(1)
            await session.execute(text("SELECT 1"))

        def run(**options: Any) -> Any:
            if client == "sync":
                return asyncio.to_thread(db.sync.run_transaction, work, backoff=0, **options)
            return db.run_transaction(async_work, backoff=0, **options)

        with pytest.raises(RetryExhaustedError) as raised:
            await run(retries=2)
        assert isinstance(raised.value.last_error, DatabaseUnavailableError)
        assert (raised.value.attempts, len(calls)) == (3, 3)
        assert "the database stayed unreachable" in str(raised.value)

        calls.clear()  # a user's retry_if decides first
        with pytest.raises(DatabaseUnavailableError):
            await run(retries=2, retry_if=lambda exc: False)
        assert len(calls) == 1


# --- connect_timeout ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "bound"),
    [
        pytest.param("asyncpg", 1.0, id="asyncpg"),
        pytest.param("psycopg", 2.0, id="psycopg"),  # libpq's minimum is 2 s
        pytest.param("sync", 2.0, id="sync-psycopg"),
    ],
)
async def test_connect_timeout_bounds_a_server_that_never_answers(
    client: str, bound: float, make: Any
) -> None:
    require_postgres()
    with fault_proxy(pg_port()) as proxy:
        proxy.hold()  # the TCP handshake completes; the startup message gets no answer
        db = make(client_url(client, PG_URL, proxy.port), connect_timeout=1)
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailableError) as raised:
            await backend_pid(client, db)
        elapsed = time.monotonic() - started
    assert bound - 0.1 <= elapsed < bound + 3.0
    assert str(raised.value).startswith("cannot reach the database at postgresql+")
    if client == "asyncpg":
        assert "(no answer within 1s)" in str(raised.value)
        assert isinstance(raised.value.__cause__, TimeoutError)
    assert pool_of(client, db).checkedout() == 0


def connect_arguments(url: str, *, sync: bool = False, **options: Any) -> dict[str, Any]:
    config = FactoryConfig.from_url(url, **options)
    kwargs = engine_kwargs(
        config, config.sync_url if sync else config.async_url, is_async=not sync
    )
    arguments: dict[str, Any] = kwargs.get("connect_args", {})
    return arguments


def test_connect_timeout_reaches_each_driver_unless_the_user_set_one() -> None:
    asyncpg = "postgresql+asyncpg://app@db/app"
    psycopg = "postgresql+psycopg://app@db/app"
    assert connect_arguments(asyncpg)["timeout"] == 5.0  # the default
    assert connect_arguments(asyncpg, connect_timeout=2.5)["timeout"] == 2.5
    assert "timeout" not in connect_arguments(asyncpg, connect_timeout=None)
    assert connect_arguments(asyncpg, connect_args={"timeout": 9})["timeout"] == 9
    assert "timeout" not in connect_arguments(f"{asyncpg}?timeout=9")  # the URL's wins
    # libpq: whole seconds, rounded up, at least 2 (as libpq itself treats it)
    assert connect_arguments(asyncpg, sync=True)["connect_timeout"] == 5
    assert connect_arguments(psycopg, connect_timeout=2.5)["connect_timeout"] == 3
    assert connect_arguments(psycopg, connect_timeout=0.5)["connect_timeout"] == 2
    assert (
        connect_arguments(psycopg, sync=True, sync_connect_args={"connect_timeout": 30})[
            "connect_timeout"
        ]
        == 30
    )
    assert "connect_timeout" not in connect_arguments(f"{psycopg}?connect_timeout=30")
    assert "connect_timeout" not in connect_arguments(psycopg, connect_timeout=None)


# --- 25006: a standby where a primary was expected ------------------------------------


@pytest.fixture(scope="module")
def standby() -> Iterator[PostgresServer]:
    with replicated_postgres(replicas=1) as cluster:
        yield cluster.replicas[0]


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_write_on_a_standby_drops_the_connection_unless_read_only_was_asked(
    client: str, make: Any, standby: PostgresServer
) -> None:
    db = make(client_url(client, standby.url), pool_size=1, max_overflow=0)
    write = text("CREATE TABLE sf_never (id int)")

    async def attempt(**begin: Any) -> tuple[int, BaseException]:
        if client == "sync":
            try:
                with db.sync.begin(**begin) as session:
                    pid = session.scalar(PID)
                    session.execute(write)
            except Exception as error:
                return pid, error
        else:
            try:
                async with db.begin(**begin) as session:
                    pid = await session.scalar(PID)
                    await session.execute(write)
            except Exception as error:
                return pid, error
        raise AssertionError("the standby accepted a write")

    first_pid, error = await attempt()
    assert type(error) is DatabaseUnavailableError
    assert "refused a write as read-only" in str(error)
    assert "target_session_attrs=read-write" in str(error)
    assert "read-only transaction" in str(error.__cause__)
    pid = await backend_pid(client, db)
    assert pid != first_pid  # the connection was invalidated: a new one

    # A reader (autocommit here; a READ ONLY transaction behind PgBouncer) keeps the
    # driver's error and its connection.
    with pytest.raises(DBAPIError) as raised:
        if client == "sync":
            with db.sync.reader() as session:
                session.execute(write)
        else:
            async with db.reader() as session:
                await session.execute(write)
    assert not isinstance(raised.value, DatabaseUnavailableError)
    assert await backend_pid(client, db) == pid
    # So does a transaction opened READ ONLY on purpose. (Last: on psycopg, the
    # connection's next plain BEGIN then says READ WRITE, which a standby refuses.)
    readonly_pid, error = await attempt(readonly=True)
    assert isinstance(error, DBAPIError)
    assert not isinstance(error, DatabaseUnavailableError)
    assert readonly_pid == pid
    assert await backend_pid(client, db, readonly=True) == pid
    assert pool_of(client, db).checkedout() == 0


# --- passwords ------------------------------------------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
async def test_no_message_shows_the_password(
    client: str, make: Any, password_server: PostgresServer
) -> None:
    hidden = spellings(LOGIN.password)
    seen: list[BaseException] = []

    async def fails(db: SessionFactory[Any], fault: Callable[[], Any]) -> None:
        fresh = text(f"SELECT {len(seen)}")  # not prepared yet: its text is sent
        try:
            if client == "sync":
                with db.sync.begin() as session:
                    session.scalar(PID)
                    fault()
                    session.scalar(fresh)
            else:
                async with db.begin() as session:
                    await session.scalar(PID)
                    fault()
                    await session.scalar(fresh)
        except DatabaseUnavailableError as error:
            seen.append(error)
        else:
            raise AssertionError("no error")

    with fault_proxy(password_server.port) as proxy:
        url = client_url(client, password_server.login_url, proxy.port)
        db = make(url)
        await fails(db, proxy.drop_all)  # lost mid-transaction
        await fails(db, lambda: proxy.cut_after(b"SELECT"))  # lost in a statement
        proxy.refuse()
        await fails(make(url), lambda: None)  # connect refused
        proxy.accept()
        proxy.hold()
        await fails(make(url, connect_timeout=1), lambda: None)  # connect timed out
    assert len(seen) == 4
    for error in seen:
        assert f"{LOGIN.user}:***@" in str(error)
        assert not any(spelling in str(error) for spelling in hidden), str(error)
