"""Read replicas on a real topology: routing, read-your-writes, replica faults (issue 13).

One primary and two streaming replicas (``tests/pgcluster.py``) are built for the module
and torn down after it. Each test makes its own table and waits until both replicas
have it. Where a read was served is asked of the server itself: ``pg_is_in_recovery()``
and ``inet_server_port()`` inside the block.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionforge import SessionFactory
from sessionforge.errors import ConfigurationError
from sessionforge.testing import isolated

from .pgcluster import Replicated, replicated_postgres

pytestmark = pytest.mark.postgres

WHERE = "SELECT pg_is_in_recovery(), inet_server_port()"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Replicated]:
    with replicated_postgres(replicas=2) as built:
        yield built


@pytest.fixture
def table(cluster: Replicated) -> Iterator[str]:
    """A fresh table on the primary (and, once replayed, on both replicas)."""
    name = f"t_{uuid.uuid4().hex[:8]}"
    for replica in cluster.replicas:
        if not replica.running:
            cluster.start(replica)
        cluster.resume_replay(replica)
    cluster.primary.sql(f"CREATE TABLE {name} (id int PRIMARY KEY, note text)")
    cluster.wait_caught_up()
    yield name
    for replica in cluster.replicas:
        if not replica.running:
            cluster.start(replica)
        cluster.resume_replay(replica)
    cluster.primary.sql(f"DROP TABLE {name}")


@pytest.fixture
async def db(cluster: Replicated) -> AsyncIterator[SessionFactory[AsyncSession]]:
    factory = SessionFactory(cluster.primary.url, replicas=[r.url for r in cluster.replicas])
    yield factory
    await factory.dispose()
    factory.sync.dispose()


def replica_ports(cluster: Replicated) -> set[int]:
    return {replica.port for replica in cluster.replicas}


async def where(session: AsyncSession) -> tuple[bool, int]:
    in_recovery, port = (await session.execute(text(WHERE))).one()
    return bool(in_recovery), int(port)


def sync_where(session: Session) -> tuple[bool, int]:
    in_recovery, port = session.execute(text(WHERE)).one()
    return bool(in_recovery), int(port)


# routing ------------------------------------------------------------------------------


async def test_reads_go_to_replicas_and_everything_else_to_the_primary(
    db: SessionFactory[AsyncSession], cluster: Replicated
) -> None:
    replicas, primary = replica_ports(cluster), cluster.primary.port

    async with db.reader() as session:
        assert (await where(session))[1] in replicas
    async with db.begin(readonly=True) as session:
        assert (await where(session))[1] in replicas
    async with db.begin(readonly=True, isolation_level="REPEATABLE READ") as session:
        assert (await where(session))[1] in replicas
    assert (await db.run_transaction(where, readonly=True))[1] in replicas
    assert (await db.transactional(readonly=True)(where)())[1] in replicas
    async with db.atomic(readonly=True) as session:
        assert (await where(session))[1] in replicas

    # a hot standby refuses SERIALIZABLE: such a read-only transaction runs on the primary
    async with db.begin(readonly=True, isolation_level="SERIALIZABLE") as session:
        assert await where(session) == (False, primary)
    async with db.begin() as session:
        assert await where(session) == (False, primary)
    async with db() as session:
        assert await where(session) == (False, primary)
    async with db.scope() as session:
        assert await where(session) == (False, primary)
    assert await db.run_transaction(where) == (False, primary)
    async with db.atomic() as session:
        assert await where(session) == (False, primary)
    assert db.status().primary_fallbacks == 0


async def test_reads_are_spread_over_the_replicas(
    db: SessionFactory[AsyncSession], cluster: Replicated
) -> None:
    served = []
    for _ in range(10):
        async with db.reader() as session:
            served.append((await where(session))[1])
    assert set(served) == replica_ports(cluster)
    assert sorted(r.reads for r in db.status().replicas) == [5, 5]


def test_the_sync_twin_routes_the_same_way(
    db: SessionFactory[AsyncSession], cluster: Replicated
) -> None:
    sync, replicas = db.sync, replica_ports(cluster)
    with sync.reader() as session:
        assert sync_where(session)[1] in replicas
    with sync.begin(readonly=True) as session:
        assert sync_where(session)[1] in replicas
    assert sync.run_transaction(sync_where, readonly=True)[1] in replicas
    with sync.begin() as session:
        assert sync_where(session) == (False, cluster.primary.port)
    with sync.begin(readonly=True, isolation_level="SERIALIZABLE") as session:
        assert sync_where(session) == (False, cluster.primary.port)


async def test_under_isolation_every_session_uses_the_tests_connection(
    db: SessionFactory[AsyncSession], cluster: Replicated, table: str
) -> None:
    async with isolated(db):
        async with db.begin() as session:
            await session.execute(text(f"INSERT INTO {table} VALUES (1, 'mine')"))
        async with db.reader() as session:
            assert await where(session) == (False, cluster.primary.port)
            assert (await session.execute(text(f"SELECT count(*) FROM {table}"))).scalar() == 1
    assert cluster.primary.scalar(f"SELECT count(*) FROM {table}") == "0"


# read your writes ---------------------------------------------------------------------


async def insert(db: SessionFactory[AsyncSession], table: str, row: int) -> None:
    async with db.begin() as session:
        await session.execute(text(f"INSERT INTO {table} VALUES ({row}, 'x')"))


async def count(session: AsyncSession, table: str) -> int:
    return int((await session.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())


async def test_a_write_is_seen_by_the_next_read_while_every_replica_is_paused(
    db: SessionFactory[AsyncSession], cluster: Replicated, table: str
) -> None:
    naive = SessionFactory(
        cluster.primary.url, replicas=[r.url for r in cluster.replicas], read_your_writes=False
    )
    try:
        for replica in cluster.replicas:
            cluster.pause_replay(replica)
        assert db.consistency_token() is None
        await insert(db, table, 1)
        token = db.consistency_token()
        assert token is not None
        assert token.startswith("sf1-")

        started = time.monotonic()
        async with db.reader() as session:
            assert await count(session, table) == 1
            assert await where(session) == (False, cluster.primary.port)
        # it waited replica_wait (0.05 s) for a replica, then used the primary
        assert time.monotonic() - started < 2.0
        async with db.begin(readonly=True) as session:
            assert await count(session, table) == 1
        assert db.status().primary_fallbacks == 2

        # what a router without read-your-writes returns: the replica's stale answer
        async with naive.reader() as session:
            assert await count(session, table) == 0
            assert (await where(session))[0] is True
    finally:
        await naive.dispose()
    for replica in cluster.replicas:
        cluster.resume_replay(replica)
    cluster.wait_caught_up()
    async with db.reader() as session:  # caught up: the replicas serve again
        assert await count(session, table) == 1
        assert (await where(session))[0] is True


async def test_one_lagging_replica_is_skipped_until_it_has_the_write(
    db: SessionFactory[AsyncSession], cluster: Replicated, table: str
) -> None:
    lagging, current = cluster.replicas
    cluster.pause_replay(lagging)
    for row in range(1, 6):
        await insert(db, table, row)
        for _ in range(3):
            async with db.reader() as session:
                assert await count(session, table) == row
                assert (await where(session))[1] == current.port
    cluster.resume_replay(lagging)
    cluster.wait_caught_up()
    await asyncio.sleep(0.6)  # a replica known to be behind is asked again after 0.5 s
    served = set()
    for _ in range(6):
        async with db.reader() as session:
            assert await count(session, table) == 5
            served.add((await where(session))[1])
    assert served == replica_ports(cluster)
    assert db.status().primary_fallbacks == 0


async def test_a_context_that_wrote_nothing_reads_any_replica(
    db: SessionFactory[AsyncSession], cluster: Replicated, table: str
) -> None:
    async def reader() -> tuple[int, bool]:
        async with db.reader() as session:
            return await count(session, table), (await where(session))[0]

    for replica in cluster.replicas:
        cluster.pause_replay(replica)
    await asyncio.create_task(insert(db, table, 1))  # a task of its own: its own context
    assert db.consistency_token() is None
    assert await reader() == (0, True)  # stale, as promised for a context without writes
    # a task started after this context's own write inherits the token
    await insert(db, table, 2)
    assert await asyncio.create_task(reader()) == (2, False)


async def test_a_transaction_that_only_read_gives_no_token(
    db: SessionFactory[AsyncSession], table: str
) -> None:
    async with db.begin() as session:
        await count(session, table)
        await session.execute(text("SELECT set_config('application_name', 'x', true)"))
    assert db.consistency_token() is None
    async with db() as session:
        await session.execute(text(f"UPDATE {table} SET note = 'y'"))  # a write, text()
        await session.commit()  # committed in this task
    assert db.consistency_token() is not None


def test_the_sync_twin_shares_the_token_and_reads_its_writes(
    db: SessionFactory[AsyncSession], cluster: Replicated, table: str
) -> None:
    sync = db.sync
    for replica in cluster.replicas:
        cluster.pause_replay(replica)
    with sync.begin() as session:
        session.execute(text(f"INSERT INTO {table} VALUES (1, 'x')"))
    token = sync.consistency_token()
    assert token is not None
    assert db.consistency_token() == token
    with sync.reader() as session:
        assert session.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 1
    # another thread has its own context: no token, so a (stale) replica serves it
    seen: list[Any] = []

    def other_thread() -> None:
        with sync.reader() as session:
            seen.append(session.execute(text(f"SELECT count(*) FROM {table}")).scalar())
            seen.append(sync_where(session)[0])

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert seen == [0, True]


async def test_a_token_carried_to_another_process(
    db: SessionFactory[AsyncSession], cluster: Replicated, table: str
) -> None:
    for replica in cluster.replicas:
        cluster.pause_replay(replica)
    await insert(db, table, 1)
    token = db.consistency_token()
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from sqlalchemy import text
        from sessionforge import SessionFactory

        async def main(token):
            db = SessionFactory({cluster.primary.url!r},
                                replicas={[r.url for r in cluster.replicas]!r})
            async def read():
                async with db.reader() as session:
                    return (await session.execute(text("SELECT count(*) FROM {table}"))).scalar()
            without = await read()
            with db.consistent_with(token):
                within = await read()
            await db.dispose()
            print(without, within)

        asyncio.run(main(sys.argv[1]))
        """
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        token or "",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    assert out.decode().split() == ["0", "1"]


async def test_tokens_that_cannot_be_used_are_ignored(
    db: SessionFactory[AsyncSession], cluster: Replicated, table: str, caplog: Any
) -> None:
    await insert(db, table, 1)
    cluster.wait_caught_up()
    token = db.consistency_token()
    assert token is not None
    system = token.split("-")[1]
    other_cluster = token.replace(system, f"{int(system, 16) ^ 1:x}")
    caplog.set_level(logging.WARNING, logger="sessionforge.replicas")
    for replica in cluster.replicas:
        cluster.pause_replay(replica)

    async def fresh_read() -> bool:  # a task with no token of its own
        async with db.reader() as session:
            return (await where(session))[0]

    async def read_with(given: str | None) -> bool:
        with db.consistent_with(given):
            return await fresh_read()

    assert await asyncio.create_task(read_with(None)) is True
    assert await asyncio.create_task(read_with("not-a-token")) is True
    assert "not one of sessionforge's" in caplog.text
    assert await asyncio.create_task(read_with(other_cluster)) is True
    assert "another cluster" in caplog.text
    far_ahead = "sf1-" + system + "-" + "f" * 12
    assert await asyncio.create_task(read_with(far_ahead)) is False  # primary
    with pytest.raises(ConfigurationError, match="consistency_token"):
        db.consistent_with(42)  # type: ignore[arg-type]


async def test_a_commit_inside_consistent_with_outlives_the_block(
    db: SessionFactory[AsyncSession], table: str
) -> None:
    await insert(db, table, 1)
    first = db.consistency_token()
    with db.consistent_with(first):
        await insert(db, table, 2)
        inside = db.consistency_token()
    assert inside != first
    assert db.consistency_token() == inside


# replica faults -----------------------------------------------------------------------


async def test_a_stopped_replica_is_skipped_and_used_again_once_back(
    cluster: Replicated, table: str
) -> None:
    down, up = cluster.replicas
    db = SessionFactory(
        cluster.primary.url, replicas=[r.url for r in cluster.replicas], replica_recheck=0.5
    )
    try:
        for _ in range(4):  # both replicas have pooled connections
            async with db.reader() as session:
                await count(session, table)
        cluster.stop(down)
        await asyncio.sleep(0.2)  # the pooled connections see the server go
        for _ in range(10):  # no caller sees the stopped replica's errors
            async with db.reader() as session:
                assert await count(session, table) == 0
                assert (await where(session))[1] == up.port
        status = {r.url.rsplit(":", 1)[1].split("/")[0]: r for r in db.status().replicas}
        assert status[str(down.port)].healthy is False
        assert status[str(down.port)].last_error
        assert status[str(up.port)].healthy is True

        cluster.start(down)
        cluster.wait_streaming()
        await asyncio.sleep(0.6)  # past replica_recheck
        served = set()
        for _ in range(6):
            async with db.reader() as session:
                served.add((await where(session))[1])
        assert served == replica_ports(cluster)
        assert all(r.healthy for r in db.status().replicas)
    finally:
        await db.dispose()


async def test_with_every_replica_down_reads_go_to_the_primary(
    cluster: Replicated, table: str
) -> None:
    db = SessionFactory(cluster.primary.url, replicas=[r.url for r in cluster.replicas])
    try:
        for replica in cluster.replicas:
            cluster.stop(replica)
        for _ in range(3):
            async with db.reader() as session:
                assert await where(session) == (False, cluster.primary.port)
            async with db.begin(readonly=True) as session:
                assert await count(session, table) == 0
        assert not any(r.healthy for r in db.status().replicas)
        assert db.status().primary_fallbacks == 6
        assert db.status().checked_out == 0
    finally:
        await db.dispose()


async def test_a_replica_lost_during_a_statement_is_the_callers_error_and_is_marked(
    cluster: Replicated, table: str
) -> None:
    from sessionforge.errors import DatabaseUnavailableError

    db = SessionFactory(cluster.primary.url, replicas=[r.url for r in cluster.replicas])
    try:
        async with db.reader() as session:
            port = (await where(session))[1]
            lost = next(r for r in cluster.replicas if r.port == port)
            cluster.stop(lost)
            with pytest.raises(DatabaseUnavailableError) as raised:
                await count(session, table)
        assert raised.value.__cause__ is not None
        (marked,) = [r for r in db.status().replicas if r.url.endswith(f":{port}/postgres")]
        assert marked.healthy is False
        for _ in range(4):  # the next reads go to the other replica, without errors
            async with db.reader() as session:
                assert (await where(session))[1] != port
        assert db.status().checked_out == 0
    finally:
        await db.dispose()


async def test_close_all_closes_sessions_on_replicas(
    db: SessionFactory[AsyncSession], cluster: Replicated
) -> None:
    sessions = [db.reader(), db.reader(), db()]
    for session in sessions:
        await where(session)  # each holds a connection: two replicas' and the primary's
    assert sum(r.checked_out for r in db.status().replicas) == 2
    assert await db.close_all() == 3
    assert sum(r.checked_out for r in db.status().replicas) == 0
    assert db.status().checked_out == 0


# configuration ------------------------------------------------------------------------


def test_replicas_are_validated(cluster: Replicated, tmp_path: Any) -> None:
    with pytest.raises(ConfigurationError, match="replicas= is for PostgreSQL only"):
        SessionFactory(f"sqlite:///{tmp_path}/x.db", replicas=["postgresql://h/app"])
    with pytest.raises(ConfigurationError, match=r"replicas=.*invalid: expected a list"):
        SessionFactory(cluster.primary.url, replicas="postgresql://h/app")
    with pytest.raises(ConfigurationError, match="not a PostgreSQL URL"):
        SessionFactory(cluster.primary.url, replicas=["sqlite:///x.db"])
    with pytest.raises(ConfigurationError, match="names no host"):
        SessionFactory(cluster.primary.url, replicas=["postgresql:///app"])
    with pytest.raises(ConfigurationError, match="replica_wait"):
        SessionFactory(cluster.primary.url, replicas=["postgresql://h/app"], replica_wait=-1)
    with pytest.raises(ConfigurationError, match=r"configure\(\) changes session options only"):
        SessionFactory(cluster.primary.url).configure(replicas=["postgresql://h/app"])


def test_replica_urls_are_masked_and_take_the_primarys_driver(cluster: Replicated) -> None:
    primary = cluster.primary.url.replace("postgres@", "postgres:s3cret@")
    replica = (
        cluster.replicas[0].url.replace("+asyncpg", "").replace("postgres@", "postgres:s3cret@")
    )
    db = SessionFactory(primary, replicas=[replica])
    assert "s3cret" not in repr(db)
    assert "s3cret" not in repr(db.config)
    assert db.config.replicas[0].drivername == "postgresql+asyncpg"
    (status,) = db.status().replicas
    assert "s3cret" not in status.url
    assert "***" in status.url


# across requests: the ASGI integration --------------------------------------------------


def make_app(
    db: SessionFactory[AsyncSession], table: str, *, middleware: bool = True, **options: Any
) -> Any:
    from fastapi import Depends, FastAPI

    from sessionforge.asgi import SessionMiddleware

    app = FastAPI()
    if middleware:
        app.add_middleware(SessionMiddleware, factory=db, **options)
    reader = db.dependency(readonly=True)

    @app.post("/rows/{row}")
    async def add(row: int) -> dict[str, int]:
        await db.current().execute(text(f"INSERT INTO {table} VALUES ({row}, 'x')"))
        return {"added": row}

    @app.get("/rows")
    # (a default, not Annotated: this module's annotations are strings, and FastAPI
    # resolves them in the module's namespace, where `reader` is not)
    async def rows(session: AsyncSession = Depends(reader)) -> dict[str, Any]:  # noqa: B008
        found = await count(session, table)
        return {"rows": found, "replica": (await where(session))[0]}

    return app


async def test_a_client_that_posts_then_gets_sees_its_write_on_another_process(
    cluster: Replicated, table: str
) -> None:
    import httpx

    replicas = [r.url for r in cluster.replicas]
    # two "processes": factories that share nothing but the cluster
    first = SessionFactory(cluster.primary.url, replicas=replicas)
    second = SessionFactory(cluster.primary.url, replicas=replicas)
    writer, other = make_app(first, table), make_app(second, table)
    no_cookie = make_app(second, table, consistency_cookie=None)
    try:
        for replica in cluster.replicas:
            cluster.pause_replay(replica)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=writer), base_url="http://test"
        ) as client:
            posted = await client.post("/rows/1")
            assert posted.status_code == 200
            cookie = posted.headers["set-cookie"]
            assert cookie.startswith("sessionforge_consistency=sf1-")
            assert "HttpOnly" in cookie
            assert "Max-Age=300" in cookie
            token = client.cookies["sessionforge_consistency"]
            read = await client.get("/rows")  # reads carry no new cookie
            assert read.json() == {"rows": 1, "replica": False}
            assert "set-cookie" not in read.headers
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=other),
            base_url="http://test",
            cookies={"sessionforge_consistency": token},
        ) as client:
            assert (await client.get("/rows")).json() == {"rows": 1, "replica": False}
        dependency_only = make_app(second, table, middleware=False)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=dependency_only),
            base_url="http://test",
            cookies={"sessionforge_consistency": token},
        ) as client:  # db.dependency() alone reads the cookie too
            assert (await client.get("/rows")).json() == {"rows": 1, "replica": False}
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=other), base_url="http://test"
        ) as client:  # another client, that wrote nothing: any replica, stale
            assert (await client.get("/rows")).json() == {"rows": 0, "replica": True}
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=no_cookie), base_url="http://test"
        ) as client:
            posted = await client.post("/rows/2")
            assert "set-cookie" not in posted.headers
    finally:
        await first.dispose()
        await second.dispose()


async def test_the_example_shows_a_naive_router_read_stale_data(cluster: Replicated) -> None:
    example = Path(__file__).parent.parent / "examples" / "read_your_writes.py"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-W",
        "error",
        str(example),
        cluster.primary.url,
        *(r.url for r in cluster.replicas),
        "--writes",
        "10",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[1].startswith("naive router:   0 of 10 writes visible (10 reads by a replica)")
    assert lines[2] == "sessionforge:  10 of 10 writes visible (0 by a replica, 10 by the primary)"
    *_, last = lines
    seen, served = re.match(
        r"sessionforge:  (\d+) of 10 writes visible \((\d+) by a replica", last
    ).groups()  # type: ignore[union-attr]
    assert seen == "10"
    assert int(served) > 0
    for replica in cluster.replicas:  # the example resumed replay
        assert replica.scalar("SELECT pg_is_wal_replay_paused()") == "f"
