"""A primary failover under load loses no acknowledged write and applies none twice.

DESIGN §9, "Primary failover": a primary and a synchronous standby (so that every
commit the primary acknowledged is on the standby), a factory on the multi-host URL
with ``target_session_attrs=read-write``, and writer tasks (asyncpg) or threads (the
sync twin, psycopg) running ``run_transaction`` inserts with unique ids. The primary
is stopped (a crash: ``pg_ctl stop -m immediate``) and the standby promoted. Then:
every acknowledged id is in the new primary once, no id is there twice, every error a
caller saw is a ``SessionForgeError`` (``AmbiguousCommitError`` for a COMMIT cut off —
its id may or may not be there, never twice), and writes resume within a generous
bound after the promotion. Speed is ``benchmarks/bench_failover.py``'s business.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionforge import AmbiguousCommitError, SessionFactory, SessionForgeError

from .pgcluster import Replicated, multi_host_url, replicated_postgres

pytestmark = pytest.mark.postgres

WRITERS = 4
#: Seconds of writing before the primary is stopped, and after writes resumed.
STEADY = 0.5
#: Writes must resume within this many seconds of the promotion (measured: ~0.2-2 s).
RESUME_BOUND = 15.0
RETRIES = 1000  # backoff caps each wait at 2 s: the budget outlasts any outage here
INSERT = text("INSERT INTO failover (id) VALUES (:id)")


@dataclass
class Outcome:
    """What the writers saw, shared by tasks or threads (list.append is atomic)."""

    acknowledged: list[int] = field(default_factory=list)
    ambiguous: list[int] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    acked_at: list[float] = field(default_factory=list)


@pytest.fixture
def cluster() -> Iterator[Replicated]:
    # One standby, synchronous: a commit is acknowledged once the standby has flushed it.
    with replicated_postgres(replicas=1, synchronous=True) as built:
        # No unique constraint on id: an insert applied twice would show as two rows.
        built.primary.sql("CREATE TABLE failover (n bigserial PRIMARY KEY, id bigint)")
        built.wait_caught_up()
        yield built


def fail_over(cluster: Replicated) -> tuple[float, float]:
    """Crash the primary, promote the standby; the monotonic times of both."""
    stopped = time.monotonic()
    cluster.stop(cluster.primary)
    cluster.promote(cluster.replicas[0])
    return stopped, time.monotonic()


def check(cluster: Replicated, outcome: Outcome, promoted: float) -> None:
    new_primary = cluster.replicas[0]
    applied = [
        int(value)
        for value in new_primary.scalar("SELECT string_agg(id::text, ' ') FROM failover").split()
    ]
    assert outcome.acknowledged, "no write was acknowledged"
    assert len(applied) == len(set(applied)), "an insert was applied twice"
    lost = set(outcome.acknowledged) - set(applied)
    assert not lost, f"{len(lost)} acknowledged writes lost"
    assert set(applied) <= set(outcome.acknowledged) | set(outcome.ambiguous)
    foreign = [error for error in outcome.errors if not isinstance(error, SessionForgeError)]
    assert not foreign, f"callers saw errors other than SessionForgeError: {foreign[:3]}"
    resumed = [at for at in outcome.acked_at if at > promoted]
    assert resumed, "no write succeeded after the promotion"
    assert min(resumed) - promoted < RESUME_BOUND


async def test_asyncpg_writers_survive_a_failover(cluster: Replicated) -> None:
    db: SessionFactory[Any] = SessionFactory(
        multi_host_url(cluster.primary, *cluster.replicas), connect_timeout=2
    )
    outcome = Outcome()
    ids = itertools.count(1)
    stop, resumed = asyncio.Event(), asyncio.Event()
    promoted_at: list[float] = []

    async def insert(session: AsyncSession, value: int) -> None:
        await session.execute(INSERT, {"id": value})

    async def writer() -> None:
        while not stop.is_set():
            value = next(ids)
            try:
                await db.run_transaction(insert, value, retries=RETRIES, backoff=0.02)
            except AmbiguousCommitError as error:
                outcome.ambiguous.append(value)
                outcome.errors.append(error)
            except Exception as error:
                outcome.errors.append(error)
            else:
                outcome.acknowledged.append(value)
                outcome.acked_at.append(now := time.monotonic())
                if promoted_at and now > promoted_at[0]:
                    resumed.set()

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(WRITERS):
                group.create_task(writer())
            await asyncio.sleep(STEADY)
            _, promoted = await asyncio.to_thread(fail_over, cluster)
            promoted_at.append(promoted)
            with contextlib.suppress(TimeoutError):  # check() says what went wrong
                async with asyncio.timeout(RESUME_BOUND):
                    await resumed.wait()
            await asyncio.sleep(STEADY)
            stop.set()
    finally:
        await db.dispose()
    check(cluster, outcome, promoted)


def test_sync_twin_writers_survive_a_failover(cluster: Replicated) -> None:
    db: SessionFactory[Any] = SessionFactory(
        multi_host_url(cluster.primary, *cluster.replicas), connect_timeout=2
    )
    outcome = Outcome()
    ids = itertools.count(1)
    lock = threading.Lock()
    stop = threading.Event()

    def insert(session: Session, value: int) -> None:
        session.execute(INSERT, {"id": value})

    def writer() -> None:
        while not stop.is_set():
            with lock:
                value = next(ids)
            try:
                db.sync.run_transaction(insert, value, retries=RETRIES, backoff=0.02)
            except AmbiguousCommitError as error:
                outcome.ambiguous.append(value)
                outcome.errors.append(error)
            except Exception as error:
                outcome.errors.append(error)
            else:
                outcome.acknowledged.append(value)
                outcome.acked_at.append(time.monotonic())

    try:
        with ThreadPoolExecutor(WRITERS) as pool:
            running = [pool.submit(writer) for _ in range(WRITERS)]
            try:
                time.sleep(STEADY)
                _, promoted = fail_over(cluster)
                deadline = time.monotonic() + RESUME_BOUND
                while time.monotonic() < deadline and not any(
                    at > promoted for at in outcome.acked_at
                ):
                    time.sleep(0.05)
                time.sleep(STEADY)
            finally:
                stop.set()
            for future in running:
                future.result()
    finally:
        db.sync.engine.dispose()
    check(cluster, outcome, promoted)
