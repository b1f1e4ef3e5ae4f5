"""MariaDB/MySQL as a backend (issue 14), on the real MariaDB server only.

The read-modify-write race with and without the ``mysql_snapshot_isolation`` preset,
real deadlocks and lock wait timeouts retried by ``run_transaction``, read-only and
timed transactions (and that a timed transaction's limit does not reach the next user
of a pool of one), ``settings=``, the liveness ping and ``ping()``, ``check``, and
MySQL's refusals worded by the diagnosis. Both async drivers where it matters.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from sessionforge import SessionFactory
from sessionforge.cli import main
from sessionforge.cli.workload import build_models
from sessionforge.errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    TransactionTimeoutError,
)

from .conftest import MARIADB_URL, require_mariadb
from .models import Models

pytestmark = pytest.mark.mysql

DRIVERS = [pytest.param("asyncmy", id="asyncmy"), pytest.param("aiomysql", id="aiomysql")]
TASKS, INCREMENTS = 10, 50
# A loser of the race can lose again: generous retries (see test_transactions.HOT_ROW).
RETRIES = 50


def url_for(driver: str) -> str:
    return make_url(MARIADB_URL).set(drivername=f"mysql+{driver}").render_as_string(False)


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    require_mariadb()
    name: str = request.param
    return name


@pytest.fixture
async def make(driver: str, models: Models) -> AsyncIterator[Callable[..., SessionFactory[Any]]]:
    """Factories on MariaDB with ``driver``, this test's tables, counters 1 and 2 at 0."""
    made: list[SessionFactory[Any]] = []

    def make(**options: Any) -> SessionFactory[Any]:
        db: SessionFactory[Any] = SessionFactory(url_for(driver), **options)
        made.append(db)
        return db

    setup = create_engine(url_for("pymysql"), poolclass=NullPool)
    models.metadata.create_all(setup)
    with setup.begin() as connection:
        connection.execute(models.Counter.__table__.insert(), [{"id": 1}, {"id": 2}])
    yield make
    for db in made:
        await db.dispose()
    models.metadata.drop_all(setup)
    setup.dispose()


def counter(models: Models, row: int = 1) -> int:
    engine = create_engine(url_for("pymysql"), poolclass=NullPool)
    with engine.connect() as connection:
        value = connection.scalar(select(models.Counter.value).where(models.Counter.id == row))
    engine.dispose()
    assert value is not None
    return int(value)


def code_of(exc: BaseException) -> object:
    orig = getattr(exc, "orig", None)
    return orig.args[0] if orig is not None and orig.args else None


# --- the read-modify-write race ---------------------------------------------------------


async def race(db: SessionFactory[Any], models: Models) -> list[object]:
    """TASKS x INCREMENTS read-modify-write increments through run_transaction.

    Returns the error codes of the attempts that were retried.
    """
    codes: list[object] = []

    def seen(exc: BaseException) -> None:
        codes.append(code_of(exc))  # None: the default classification decides

    async def increment(session: AsyncSession) -> None:
        row = await session.get(models.Counter, 1)
        assert row is not None
        await asyncio.sleep(0)  # let the others read the same value
        row.value += 1

    async def worker() -> None:
        for _ in range(INCREMENTS):
            await db.run_transaction(increment, retries=RETRIES, retry_if=seen)

    await asyncio.gather(*(worker() for _ in range(TASKS)))
    return codes


async def test_the_race_with_the_preset_is_exact(
    make: Callable[..., SessionFactory[Any]], models: Models
) -> None:
    """Default REPEATABLE READ, no FOR UPDATE: the lost updates become retried 1020s."""
    db = make()
    codes = await race(db, models)
    assert counter(models) == TASKS * INCREMENTS
    assert 1020 in codes  # the preset turned overwrites into errors, and they were retried
    assert set(codes) <= {1020, 1213, 1205}
    assert db.status().checked_out == 0


async def test_the_race_without_the_preset_loses_updates(
    make: Callable[..., SessionFactory[Any]], models: Models
) -> None:
    """Why the preset exists: the same race, no error to anyone, increments lost."""
    db = make(mysql_snapshot_isolation=False)
    codes = await race(db, models)
    assert 1020 not in codes
    assert counter(models) < TASKS * INCREMENTS


def sync_race(db: SessionFactory[Any], models: Models) -> None:
    def increment(session: Session) -> None:
        row = session.get(models.Counter, 1)
        assert row is not None
        time.sleep(0.001)  # let the other threads read the same value
        row.value += 1

    def worker() -> None:
        for _ in range(INCREMENTS):
            db.sync.run_transaction(increment, retries=RETRIES)

    with ThreadPoolExecutor(max_workers=TASKS) as pool:
        for future in [pool.submit(worker) for _ in range(TASKS)]:
            future.result()


async def test_the_race_with_the_preset_is_exact_on_the_sync_twin(
    make: Callable[..., SessionFactory[Any]], models: Models
) -> None:
    db = make()
    await asyncio.to_thread(sync_race, db, models)
    assert counter(models) == TASKS * INCREMENTS


async def test_the_race_without_the_preset_loses_updates_on_the_sync_twin(
    make: Callable[..., SessionFactory[Any]], models: Models
) -> None:
    db = make(mysql_snapshot_isolation=False)
    await asyncio.to_thread(sync_race, db, models)
    assert counter(models) < TASKS * INCREMENTS


# --- deadlocks and lock waits -----------------------------------------------------------


async def test_a_real_deadlock_is_retried_to_success(
    make: Callable[..., SessionFactory[Any]], models: Models
) -> None:
    """Two transactions lock rows 1 and 2 in opposite orders: one gets 1213, re-runs."""
    db = make()
    locked = {1: asyncio.Event(), 2: asyncio.Event()}
    codes: list[object] = []
    attempts = 0

    async def both(session: AsyncSession, first: int, second: int) -> str:
        nonlocal attempts
        attempts += 1
        table = models.Counter.__table__
        await session.execute(
            update(table).where(table.c.id == first).values(value=table.c.value + 1)
        )
        locked[first].set()
        await locked[second].wait()  # the other holds `second` now (on the first run)
        await session.execute(
            update(table).where(table.c.id == second).values(value=table.c.value + 1)
        )
        return f"{first}-{second}"

    def seen(exc: BaseException) -> None:
        codes.append(code_of(exc))

    results = await asyncio.wait_for(
        asyncio.gather(
            db.run_transaction(both, 1, 2, retry_if=seen),
            db.run_transaction(both, 2, 1, retry_if=seen),
        ),
        timeout=30,
    )
    assert list(results) == ["1-2", "2-1"]
    assert codes == [1213]
    assert attempts == 3
    assert (counter(models, 1), counter(models, 2)) == (2, 2)


async def test_a_lock_wait_timeout_is_retried(
    make: Callable[..., SessionFactory[Any]], models: Models, driver: str
) -> None:
    """innodb_lock_wait_timeout=1: 1205 after a second, the re-run gets the row."""
    db = make(connect_args={"init_command": "SET SESSION innodb_lock_wait_timeout = 1"})
    holder = create_async_engine(url_for(driver), poolclass=NullPool)
    codes: list[object] = []

    async def bump(session: AsyncSession) -> None:
        table = models.Counter.__table__
        await session.execute(update(table).where(table.c.id == 1).values(value=table.c.value + 1))

    def seen(exc: BaseException) -> None:
        codes.append(code_of(exc))

    try:
        async with holder.connect() as other:
            await other.execute(text(f"UPDATE {models.counter} SET value = 10 WHERE id = 1"))
            waiting = asyncio.create_task(db.run_transaction(bump, retry_if=seen, backoff=0.5))
            await asyncio.sleep(1.6)  # past the first attempt's 1 s wait
            await other.commit()
        await asyncio.wait_for(waiting, timeout=30)
    finally:
        await holder.dispose()
    assert codes[:1] == [1205]
    assert counter(models) == 11


# --- per-transaction options ------------------------------------------------------------


async def test_readonly_transactions_refuse_writes(
    make: Callable[..., SessionFactory[Any]], models: Models
) -> None:
    db = make()
    async with db.begin(readonly=True) as session:
        assert (await session.get(models.Counter, 1)) is not None
    with pytest.raises(DBAPIError, match="READ ONLY transaction") as refused:
        async with db.begin(readonly=True) as session:
            await session.execute(text(f"UPDATE {models.counter} SET value = 5"))
    assert code_of(refused.value) == 1792
    with pytest.raises(DBAPIError, match="READ ONLY transaction"):
        with db.sync.begin(readonly=True) as sync_session:
            sync_session.execute(text(f"UPDATE {models.counter} SET value = 5"))
    # and the connection's next transaction may write again
    async with db.begin() as session:
        await session.execute(text(f"UPDATE {models.counter} SET value = 7 WHERE id = 1"))
    assert counter(models) == 7
    assert db.status().checked_out == 0


async def test_isolation_levels_are_validated_and_applied(
    make: Callable[..., SessionFactory[Any]],
) -> None:
    db = make()
    async with db.begin(isolation_level="read_committed") as session:
        assert await session.scalar(text("SELECT @@tx_isolation")) == "READ-COMMITTED"
    with pytest.raises(ConfigurationError, match="not supported by mysql"):
        db.begin(isolation_level="SNAPSHOT")


async def test_timeout_fires_by_its_deadline(make: Callable[..., SessionFactory[Any]]) -> None:
    db = make()
    started = time.monotonic()
    with pytest.raises(TransactionTimeoutError, match=r"timeout of 0\.5s"):
        async with db.begin(timeout=0.5) as session:
            await session.execute(text("SELECT SLEEP(5)"))
    assert time.monotonic() - started < 3
    # the sync twin cannot be interrupted: the server's limit (max_statement_time) cuts it
    started = time.monotonic()
    with pytest.raises(TransactionTimeoutError, match=r"timeout of 0\.5s"):
        await asyncio.to_thread(_sleep_in_sync_twin, db, 0.5)
    assert time.monotonic() - started < 3


def _sleep_in_sync_twin(db: SessionFactory[Any], timeout: float | None) -> Any:
    with db.sync.begin(timeout=timeout) as session:
        return session.execute(text("SELECT SLEEP(1.2), CONNECTION_ID()")).one()


async def test_the_timeout_does_not_reach_the_next_user_of_the_connection(
    make: Callable[..., SessionFactory[Any]],
) -> None:
    """A pool of one: after a timed transaction, an untimed long statement runs out."""
    db = make(pool_size=1, max_overflow=0)
    async with db.begin(timeout=0.5) as session:
        timed = await session.scalar(CONNECTION_ID)
        assert float(await session.scalar(text("SELECT @@session.max_statement_time"))) == 0.5
    async with db.begin() as session:
        slept, same = (await session.execute(text("SELECT SLEEP(1.2), CONNECTION_ID()"))).one()
    assert (slept, same) == (0, timed)  # not cut (1 would be an interrupted SLEEP)
    # a transaction that timed out too
    with pytest.raises(TransactionTimeoutError):
        async with db.begin(timeout=0.3) as session:
            await session.execute(text("SELECT SLEEP(5)"))
    async with db.begin() as session:
        assert (await session.execute(text("SELECT SLEEP(1.2)"))).scalar() == 0
    # the sync twin, its own pool of one
    sync_db = make(pool_size=1, max_overflow=0)
    with pytest.raises(TransactionTimeoutError):
        await asyncio.to_thread(_sleep_in_sync_twin, sync_db, 0.3)
    slept, _ = await asyncio.to_thread(_sleep_in_sync_twin, sync_db, None)
    assert slept == 0
    assert db.status().checked_out == 0


def test_settings_are_refused_with_what_to_do() -> None:
    db = SessionFactory(MARIADB_URL)
    with pytest.raises(ConfigurationError, match=r"next user.*SET STATEMENT.*init_command"):
        db.begin(settings={"sql_mode": "ANSI"})
    with pytest.raises(ConfigurationError, match="SET STATEMENT"):
        db.sync.begin(settings={"sql_mode": "ANSI"})


# --- liveness, ping, check, diagnosis ---------------------------------------------------


def kill(connection_id: object) -> None:
    killer = create_engine(url_for("pymysql"), poolclass=NullPool)
    with killer.connect() as connection:
        connection.exec_driver_sql(f"KILL {int(str(connection_id))}")
    killer.dispose()


CONNECTION_ID = text("SELECT CONNECTION_ID()")


async def test_ping_and_a_killed_pooled_connection_replaced_unseen(
    make: Callable[..., SessionFactory[Any]], driver: str
) -> None:
    db = make(ping_after=0.0, pool_size=1, max_overflow=0)
    assert 0 < await db.ping() < 5
    assert 0 < await asyncio.to_thread(db.sync.ping) < 5
    async with db.begin() as session:
        killed = await session.scalar(CONNECTION_ID)
    kill(killed)
    await asyncio.sleep(0.1)
    async with db.begin() as session:  # the checkout's ping found it dead: a fresh one
        assert await session.scalar(CONNECTION_ID) != killed


def test_check_names_mariadb_and_its_version(capsys: pytest.CaptureFixture[str]) -> None:
    require_mariadb()
    url = make_url(MARIADB_URL).set(drivername="mysql").render_as_string(False)
    assert main(["check", url]) == 0
    out = capsys.readouterr().out
    engine = create_engine(url_for("pymysql"), poolclass=NullPool)
    with engine.connect() as connection:
        version = str(connection.scalar(text("SELECT VERSION()"))).split("-")[0]
    engine.dispose()
    assert f"server:   MariaDB {version}\n" in out
    assert "driver:   aiomysql" in out
    assert "snapshot_isolation=True" in out


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(
            {"database": "sf_no_such_db"},
            r"answered, but database 'sf_no_such_db' does not exist: create it",
            id="unknown-database",
        ),
        pytest.param(
            {"username": "sf_nobody", "password": "secret"},
            r"answered, but access denied for user 'sf_nobody': check the user name",
            id="access-denied",
        ),
    ],
)
async def test_refusals_are_explained(driver: str, change: dict[str, Any], expected: str) -> None:
    db = SessionFactory(make_url(url_for(driver)).set(**change))
    try:
        with pytest.raises(DatabaseUnavailableError, match=expected) as refused:
            await db.ping()
        assert "secret" not in str(refused.value)
    finally:
        await db.dispose()


# --- round trips: ping() and the return to the pool --------------------------------------

#: What ``commands`` reads: the server's own per-connection counters.
COUNTERS = ("Questions", "Com_admin_commands", "Com_commit", "Com_rollback", "Com_update")
SHOW_COUNTERS = "SHOW SESSION STATUS WHERE Variable_name IN ({})".format(
    ", ".join(f"'{name}'" for name in COUNTERS)
)


def _counted(rows: Any) -> dict[str, int]:
    values = {str(name): int(value) for name, value in rows}
    return {name: values[name] for name in COUNTERS}


async def commands(db: SessionFactory[Any], action: Callable[[], Any]) -> dict[str, int]:
    """What ``action`` sent to the one pooled connection of ``db``, by the server's count.

    ``SHOW SESSION STATUS`` on that connection, before and after, less what reading
    the counters costs by itself (``Questions`` counts statements; a COM_PING counts
    in ``Com_admin_commands`` only). Zero counts are left out.
    """

    async def read() -> dict[str, int]:
        async with db() as session:
            return _counted((await session.execute(text(SHOW_COUNTERS))).all())

    await read()  # the connection exists
    first, second = await read(), await read()
    await action()
    third = await read()
    delta = {name: (third[name] - second[name]) - (second[name] - first[name]) for name in first}
    return {name: count for name, count in delta.items() if count}


def sync_commands(db: SessionFactory[Any], action: Callable[[], Any]) -> dict[str, int]:
    """``commands`` on the sync twin's one pooled connection (PyMySQL)."""

    def read() -> dict[str, int]:
        with db.sync() as session:
            return _counted(session.execute(text(SHOW_COUNTERS)).all())

    read()
    first, second = read(), read()
    action()
    third = read()
    delta = {name: (third[name] - second[name]) - (second[name] - first[name]) for name in first}
    return {name: count for name, count in delta.items() if count}


async def test_ping_is_one_command(make: Callable[..., SessionFactory[Any]]) -> None:
    """One COM_PING and no statement (it was six: SET AUTOCOMMIT, SELECT 1, ROLLBACK, ...)."""
    db = make(pool_size=1, max_overflow=0)
    assert await commands(db, db.ping) == {"Com_admin_commands": 1}
    assert await asyncio.to_thread(sync_commands, db, db.sync.ping) == {"Com_admin_commands": 1}
    assert db.status().checked_out == 0


async def test_a_committed_transaction_sends_no_rollback_at_return(
    make: Callable[..., SessionFactory[Any]], models: Models
) -> None:
    """UPDATE and COMMIT, and nothing more: no ROLLBACK when the connection goes back."""
    db = make(pool_size=1, max_overflow=0)
    table = models.Counter.__table__

    async def bump() -> None:
        async with db.begin() as session:
            await session.execute(
                update(table).where(table.c.id == 1).values(value=table.c.value + 1)
            )

    def sync_bump() -> None:
        with db.sync.begin() as session:
            session.execute(update(table).where(table.c.id == 1).values(value=table.c.value + 1))

    sent = {"Questions": 2, "Com_update": 1, "Com_commit": 1}
    assert await commands(db, bump) == sent
    assert await asyncio.to_thread(sync_commands, db, sync_bump) == sent
    assert counter(models) == 2


async def test_a_transaction_left_open_is_rolled_back_at_return(
    make: Callable[..., SessionFactory[Any]], models: Models
) -> None:
    """A pool of one: the next user of the connection sees none of the previous one's work.

    Closed mid-transaction by SQLAlchemy (a session) and behind its back (a statement on
    the driver's own connection, which only the server's status flag shows).
    """
    db = make(pool_size=1, max_overflow=0)
    statement = f"UPDATE {models.counter} SET value = 9 WHERE id = 1"

    async def next_user() -> tuple[int, int, int]:
        async with db.begin() as session:
            # first: the server's word on whether the connection came in a transaction
            state = (await session.execute(text("SELECT @@in_transaction, CONNECTION_ID()"))).one()
            value = await session.scalar(
                select(models.Counter.value).where(models.Counter.id == 1)
            )
            return int(state[0]), int(state[1]), int(value or 0)

    _, connection_id, _ = await next_user()
    session = db()
    await session.execute(text(statement))
    await session.close()
    assert await next_user() == (0, connection_id, 0)

    def behind_its_back() -> None:
        with db.sync.engine.connect() as connection:
            cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            cursor.execute(statement)
            cursor.close()
            connection.commit()  # SQLAlchemy began nothing, so this sends nothing

    def sync_next_user() -> tuple[int, int]:
        with db.sync.begin() as sync_session:
            in_transaction = sync_session.scalar(text("SELECT @@in_transaction"))
            value = sync_session.scalar(select(models.Counter.value).where(models.Counter.id == 1))
            return int(in_transaction), int(value or 0)

    await asyncio.to_thread(behind_its_back)
    assert await asyncio.to_thread(sync_next_user) == (0, 0)
    assert counter(models) == 0


async def test_ping_of_a_killed_pooled_connection_fails_and_drops_it(
    make: Callable[..., SessionFactory[Any]],
) -> None:
    """Without the liveness ping (ping_after=None) ping() says the connection was lost,
    and the pool does not hand that connection on: the next ping answers."""
    db = make(ping_after=None, pool_size=1, max_overflow=0)
    async with db.begin() as session:
        killed = await session.scalar(CONNECTION_ID)
    kill(killed)
    await asyncio.sleep(0.1)
    with pytest.raises(DatabaseUnavailableError):
        await db.ping()
    assert 0 < await db.ping() < 5
    async with db.begin() as session:
        assert await session.scalar(CONNECTION_ID) != killed
    assert db.status().checked_out == 0


@pytest.mark.parametrize("twin", ["async", "sync"])
async def test_a_connection_killed_mid_transaction_is_database_unavailable(
    make: Callable[..., SessionFactory[Any]], models: Models, twin: str
) -> None:
    """The server drops the connection (2013 "Lost connection" or 2006 "gone away"):
    DatabaseUnavailableError, nothing written, the pool hands out a fresh connection."""
    db = make(pool_size=1, max_overflow=0)
    bump = update(models.Counter).where(models.Counter.id == 1).values(value=7)

    def sync_work() -> None:
        with db.sync.begin() as session:
            session.execute(bump)
            kill(session.scalar(CONNECTION_ID))
            session.execute(text("SELECT 1"))

    with pytest.raises(DatabaseUnavailableError, match="lost the connection to the database"):
        if twin == "sync":
            await asyncio.to_thread(sync_work)
        else:
            async with db.begin() as session:
                await session.execute(bump)
                killed = await session.scalar(CONNECTION_ID)
                await asyncio.to_thread(kill, killed)
                await session.execute(text("SELECT 1"))
    assert counter(models) == 0
    pool = db.sync.engine.pool if twin == "sync" else db.engine.sync_engine.pool
    assert pool.checkedout() == 0  # type: ignore[attr-defined]
    async with db.begin() as session:
        assert await session.scalar(text("SELECT 1")) == 1


async def test_run_transaction_reruns_work_whose_connection_was_killed(
    make: Callable[..., SessionFactory[Any]], models: Models
) -> None:
    db = make()
    calls = 0

    async def work(session: AsyncSession) -> None:
        nonlocal calls
        calls += 1
        await session.execute(
            update(models.Counter)
            .where(models.Counter.id == 1)
            .values(value=models.Counter.value + 1)
        )
        if calls == 1:
            await asyncio.to_thread(kill, await session.scalar(CONNECTION_ID))
            await session.execute(text("SELECT 1"))

    await db.run_transaction(work, retries=2)
    assert (calls, counter(models)) == (2, 1)


async def test_a_refused_connect_is_database_unavailable_and_hides_the_password() -> None:
    require_mariadb()
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    db: SessionFactory[Any] = SessionFactory(f"mysql://root:s3cret-pw@127.0.0.1:{port}/test")
    try:
        with pytest.raises(DatabaseUnavailableError, match="cannot reach the database") as first:
            async with db.begin() as session:
                await session.execute(text("SELECT 1"))
        with pytest.raises(DatabaseUnavailableError, match="cannot reach the database") as second:
            await asyncio.to_thread(db.sync.ping)
    finally:
        await db.dispose()
    for raised in (first, second):
        assert "s3cret-pw" not in str(raised.value)
        assert "s3cret-pw" not in repr(raised.value)


# --- the demo -----------------------------------------------------------------------------


@pytest.fixture
def demo_prefix() -> Iterator[str]:
    """A table prefix no other run uses; its tables are dropped afterwards."""
    require_mariadb()
    prefix = f"sf_demo_test_{uuid.uuid4().hex[:8]}"
    yield prefix
    engine = create_engine(url_for("pymysql"), poolclass=NullPool)
    build_models(prefix).metadata.drop_all(engine)
    engine.dispose()


def test_the_demo_keeps_its_invariant_and_plain_loses_updates(
    demo_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``sessionforge demo --url mysql://...``: the preset's 1020s are re-run, nothing is
    lost; ``--plain`` (bare SQLAlchemy, the same reads without FOR UPDATE) loses updates
    at REPEATABLE READ with no error at all."""
    url = make_url(MARIADB_URL).set(drivername="mysql").render_as_string(False)
    # Three accounts make most transfers collide.
    args = ["--url", url, "--table-prefix", demo_prefix, "--workers", "8", "--transfers", "25"]
    args += ["--accounts", "3", "--seed", "1"]
    assert main(["demo", *args]) == 0
    out = capsys.readouterr().out
    assert "committed:   200 of 200 transfers (0 failed)" in out
    assert "total:       3000 (expected 3000 = 3 x 1000)" in out
    assert "INVARIANT HOLDS: total 3000 == 3000, 200 committed == 200 logged" in out
    assert re.search(r"retried: +[1-9]\d* conflicting transactions re-run", out)

    assert main(["demo", "--plain", *args]) == 0  # showing the loss is the point: exit 0
    out = capsys.readouterr().out
    assert "committed:   200 of 200 transfers (0 failed)" in out  # no error to anyone
    assert "INVARIANT BROKEN:" in out
    assert re.search(r"total balance is \d+, expected 3000 \(off by [+-]\d+\): updates", out)
    assert "errors:" not in out
