"""``begin(timeout=)`` against a hung PostgreSQL server (issue 11, defect 8).

A private server (tests/pgcluster.py) is frozen with SIGSTOP: TCP still connects and
accepts what is sent, nothing answers. Whatever phase the deadline finds the
transaction in — connecting, the liveness ping, BEGIN, a statement, a wait for a pooled
connection — the caller gets ``TransactionTimeoutError`` close to the deadline, nothing
stays checked out, the connections to the hung server are dropped, and the factory
works again once the server answers. COMMIT is outside the deadline (a COMMIT cut
short leaves its outcome unknown): a server that hangs in COMMIT keeps the caller
waiting, and the test says so.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from sessionforge import SessionFactory, TransactionTimeoutError

from .pgcluster import PostgresServer, private_postgres

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]

TIMEOUT = 1.0
#: How late after its deadline a caller may hear of it (the target is ~0.5 s; the
#: margin absorbs a loaded 2-core CI machine).
MARGIN = 1.0


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    with private_postgres() as server:
        yield server


Maker = Callable[..., SessionFactory[Any]]


@pytest.fixture
async def make_db(server: PostgresServer) -> AsyncIterator[Maker]:
    """Factories on the private server, each with a table ``item``; disposed after."""
    made: list[SessionFactory[Any]] = []

    def make(**options: Any) -> SessionFactory[Any]:
        options.setdefault("application_name", f"deadline-{len(made)}")
        made.append(SessionFactory(server.url, **options))
        return made[-1]

    connection = await connect(server)
    try:
        await connection.execute("DROP TABLE IF EXISTS item; CREATE TABLE item (name text)")
    finally:
        await connection.close()
    try:
        yield make
    finally:
        server.resume()  # a frozen server would hang the pool's graceful close
        for db in made:
            await db.dispose()
        gc.collect()  # a connection left unclosed warns here, in the test that left it


async def connect(server: PostgresServer) -> asyncpg.Connection:
    """A connection of its own to ``server``, to look at it from outside."""
    return await asyncpg.connect(
        host="127.0.0.1", port=server.port, user="postgres", database="postgres"
    )


async def backends(server: PostgresServer, application_name: str) -> list[str]:
    """The states of the server's connections from ``application_name``."""
    connection = await connect(server)
    try:
        rows = await connection.fetch(
            "SELECT state FROM pg_stat_activity WHERE application_name = $1", application_name
        )
        return [row["state"] for row in rows]
    finally:
        await connection.close()


async def assert_dropped_and_working(
    server: PostgresServer, db: SessionFactory[Any], name: str
) -> None:
    """After ``resume()``: no connection left on the server, and a new commit works."""
    assert db.status().checked_out == 0
    server.resume()
    for _ in range(250):  # a dropped backend exits once it reads the EOF
        states = await backends(server, db.config.application_name or "")
        if not states:
            break
        await asyncio.sleep(0.02)
    assert states == []
    async with db.begin(timeout=TIMEOUT) as session:
        await session.execute(text("INSERT INTO item VALUES (:name)"), {"name": name})
    async with db() as session:
        names = (await session.scalars(text("SELECT name FROM item"))).all()
    assert name in names
    assert db.status().checked_out == 0


async def timed(work: Callable[[], Awaitable[object]]) -> float:
    """Seconds until ``work()`` raised ``TransactionTimeoutError`` (it must)."""
    started = time.monotonic()
    with pytest.raises(TransactionTimeoutError):
        await work()
    return time.monotonic() - started


def within_deadline(elapsed: list[float]) -> str:
    figures = ", ".join(f"{seconds:.3f}" for seconds in sorted(elapsed))
    return f"seconds until TransactionTimeoutError (timeout={TIMEOUT:g}): {figures}"


async def test_deadline_holds_for_callers_frozen_mid_transaction(
    server: PostgresServer, make_db: Maker
) -> None:
    callers = 20
    db = make_db(pool_size=callers, max_overflow=0)
    ready = asyncio.Barrier(callers + 1)
    frozen = asyncio.Event()

    async def caller() -> None:
        async with db.begin(timeout=TIMEOUT) as session:
            await session.execute(text("INSERT INTO item VALUES ('never committed')"))
            await ready.wait()
            await frozen.wait()
            await session.execute(text("SELECT 1"))  # the server never answers

    tasks = [asyncio.create_task(timed(caller)) for _ in range(callers)]
    await ready.wait()
    server.pause()
    frozen.set()
    elapsed = await asyncio.gather(*tasks)
    assert max(elapsed) < TIMEOUT + MARGIN, within_deadline(elapsed)
    await assert_dropped_and_working(server, db, "after the freeze")
    async with db() as session:
        assert await session.scalar(text("SELECT count(*) FROM item")) == 1


async def _first_statement(session: AsyncSession) -> None:
    await session.execute(text("SELECT 1"))


@pytest.mark.parametrize(
    "phase",
    [
        pytest.param("connect", id="connect"),
        pytest.param("ping", id="liveness-ping"),
        pytest.param("begin", id="begin"),
        pytest.param("statement", id="statement"),
    ],
)
async def test_deadline_holds_in_every_phase(
    phase: str, server: PostgresServer, make_db: Maker
) -> None:
    # ping_after=0 pings every pooled connection at checkout; None never does.
    db = make_db(ping_after=0 if phase == "ping" else None)
    if phase != "connect":  # one idle connection in the pool
        async with db.begin() as session:
            await _first_statement(session)

    async def work() -> None:
        async with db.begin(timeout=TIMEOUT) as session:
            if phase == "statement":
                await _first_statement(session)  # BEGIN and our settings are through
            server.pause()
            await session.execute(text("INSERT INTO item VALUES ('never committed')"))

    elapsed = await timed(work)
    assert elapsed < TIMEOUT + MARGIN, within_deadline([elapsed])
    await assert_dropped_and_working(server, db, phase)


async def test_deadline_holds_while_waiting_for_a_pooled_connection(
    server: PostgresServer, make_db: Maker
) -> None:
    db = make_db(pool_size=5, max_overflow=0, ping_after=None)

    async def caller() -> None:
        async with db.begin(timeout=TIMEOUT) as session:
            await _first_statement(session)

    async with db.begin() as session:  # one pooled connection; four more are made frozen
        await _first_statement(session)
    server.pause()
    elapsed = await asyncio.gather(*(timed(caller) for _ in range(10)))
    assert max(elapsed) < TIMEOUT + MARGIN, within_deadline(elapsed)
    await assert_dropped_and_working(server, db, "after the pool wait")


async def test_deadline_holds_in_run_transaction(server: PostgresServer, make_db: Maker) -> None:
    db = make_db()
    attempts = 0

    async def work(session: AsyncSession) -> None:
        nonlocal attempts
        attempts += 1
        await _first_statement(session)
        server.pause()
        await _first_statement(session)

    elapsed = await timed(lambda: db.run_transaction(work, timeout=TIMEOUT))
    assert elapsed < TIMEOUT + MARGIN, within_deadline([elapsed])
    assert attempts == 1  # a timeout is not retried
    await assert_dropped_and_working(server, db, "run_transaction")


async def test_a_live_server_still_gets_the_cancel_request(
    server: PostgresServer, make_db: Maker
) -> None:
    # The grace keeps SQLAlchemy's reason for a graceful close (#10717): a statement
    # whose task is cancelled is cancelled on a server that answers, not left running.
    db = make_db()

    async def sleep() -> None:
        async with db() as session:
            await session.execute(text("SELECT pg_sleep(30)"))

    task = asyncio.create_task(sleep())
    for _ in range(250):
        if "active" in await backends(server, db.config.application_name or ""):
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await backends(server, db.config.application_name or "") == []
    assert db.status().checked_out == 0


async def test_a_server_hung_in_commit_keeps_the_caller_waiting(
    server: PostgresServer, make_db: Maker
) -> None:
    # The deadline covers the block, not the COMMIT: cutting a COMMIT short would leave
    # the caller not knowing whether it happened. The caller waits for the server.
    db = make_db()

    async def commit() -> None:
        async with db.begin(timeout=TIMEOUT) as session:
            await session.execute(text("INSERT INTO item VALUES ('committed late')"))
            server.pause()

    task = asyncio.create_task(commit())
    await asyncio.sleep(TIMEOUT + 0.5)
    assert not task.done()
    server.resume()
    await asyncio.wait_for(task, 5)  # no error: the COMMIT went through
    async with db() as session:
        names = (await session.scalars(text("SELECT name FROM item"))).all()
    assert names == ["committed late"]
    assert db.status().checked_out == 0


def test_sync_twin_waits_for_a_hung_server(server: PostgresServer) -> None:
    # The sync twin cannot interrupt a statement: a frozen server keeps it waiting, and
    # its timeout is checked when the block ends (here, once the server answers).
    db = SessionFactory(server.url, application_name="deadline-sync")
    outcome: list[BaseException | None] = []

    def work() -> None:
        try:
            with db.sync.begin(timeout=TIMEOUT) as session:
                session.execute(text("SELECT 1"))
                server.pause()
                session.execute(text("SELECT 1"))
        except BaseException as error:
            outcome.append(error)
        else:
            outcome.append(None)

    thread = threading.Thread(target=work)
    try:
        thread.start()
        thread.join(TIMEOUT + 0.5)
        assert thread.is_alive()  # still waiting, past the deadline
        server.resume()
        thread.join(5)
        assert isinstance(outcome[0], TransactionTimeoutError)
        assert db.sync.status().checked_out == 0
    finally:
        server.resume()
        thread.join(5)
        db.sync.dispose()
