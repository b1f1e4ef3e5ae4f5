"""Failover: how long writers see the database as gone when the primary dies.

Not part of the suite (it builds PostgreSQL servers). Each run builds a primary and a
synchronous standby with ``tests/pgcluster.py`` (``initdb``, ``pg_basebackup``; needs
the PostgreSQL binaries and root or the ``postgres`` user), starts ``--writers``
asyncio tasks inserting unique ids on the multi-host URL with
``target_session_attrs=read-write``, crashes the primary (``pg_ctl stop -m
immediate``), promotes the standby and waits for writes to come back. Reported per
contender, median over ``--repeats`` runs:

* ``from stop``: seconds from calling ``pg_ctl stop`` on the primary to the first
  successful write once it is down (``pg_ctl stop`` returned);
* ``from promote``: seconds from calling ``pg_ctl promote`` (right after the stop
  returned) to that write: the promotion itself plus what the client adds;
* ``lost``/``twice``: acknowledged writes missing on the new primary, and ids applied
  twice; ``errors``: the exception types callers saw (sessionforge: every one a
  ``SessionForgeError``).

The contenders, in the same run, with the same backoff (full jitter, base 0.02 s, cap
2 s):

* ``sessionforge``: ``SessionFactory(url)`` (libpq's comma form), ``run_transaction``;
* ``async_sessionmaker``: ``create_async_engine(url, pool_pre_ping=True)`` with the
  ``?host=`` form, and a loop that re-runs ``async with maker.begin()`` on any
  exception — what an application without sessionforge writes.

Run: ``python -m benchmarks.bench_failover --repeats 3``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from tests.pgcluster import Replicated, missing_binaries, multi_host_url, replicated_postgres

from sessionforge import AmbiguousCommitError, SessionFactory

INSERT = text("INSERT INTO failover (id) VALUES (:id)")
BACKOFF, CAP = 0.02, 2.0
SESSIONFORGE, BARE = "sessionforge", "async_sessionmaker"


@dataclass
class Run:
    """One failover as the writers of one contender saw it."""

    acknowledged: list[int] = field(default_factory=list)
    ambiguous: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    acked_at: list[float] = field(default_factory=list)
    stopped: float = 0.0
    promoting: float = 0.0
    lost: int = 0
    twice: int = 0

    @property
    def first_write(self) -> float:
        """When the first write after the primary went down succeeded."""
        return min(at for at in self.acked_at if at > self.promoting)

    @property
    def from_stop(self) -> float:
        return self.first_write - self.stopped

    @property
    def from_promote(self) -> float:
        return self.first_write - self.promoting


Writer = Callable[[int], Awaitable[None]]


def sessionforge_writer(cluster: Replicated, run: Run) -> tuple[Writer, Callable[[], Any]]:
    db: SessionFactory[Any] = SessionFactory(multi_host_url(cluster.primary, *cluster.replicas))

    async def insert(session: AsyncSession, value: int) -> None:
        await session.execute(INSERT, {"id": value})

    async def write(value: int) -> None:
        try:
            await db.run_transaction(insert, value, retries=10_000, backoff=BACKOFF)
        except AmbiguousCommitError:
            run.ambiguous.append(value)
            raise

    return write, db.dispose


def bare_writer(cluster: Replicated, run: Run) -> tuple[Writer, Callable[[], Any]]:
    url = multi_host_url(cluster.primary, *cluster.replicas, comma_form=False)
    engine = create_async_engine(url, pool_pre_ping=True)
    maker = async_sessionmaker(engine)

    async def write(value: int) -> None:
        for attempt in itertools.count():
            try:
                async with maker.begin() as session:
                    await session.execute(INSERT, {"id": value})
                return
            except Exception as error:
                run.errors[type(error).__name__] += 1
                await asyncio.sleep(random.uniform(0, min(CAP, BACKOFF * 2 ** min(attempt, 20))))

    return write, engine.dispose


async def one_run(name: str, writers: int, steady: float) -> Run:
    run = Run()
    with replicated_postgres(replicas=1, synchronous=True) as cluster:
        cluster.primary.sql("CREATE TABLE failover (n bigserial PRIMARY KEY, id bigint)")
        cluster.wait_caught_up()
        make = sessionforge_writer if name == SESSIONFORGE else bare_writer
        write, dispose = make(cluster, run)
        ids = itertools.count(1)
        stop, resumed = asyncio.Event(), asyncio.Event()

        async def writer() -> None:
            while not stop.is_set():
                value = next(ids)
                try:
                    await write(value)
                except Exception as error:
                    run.errors[type(error).__name__] += 1
                else:
                    run.acknowledged.append(value)
                    run.acked_at.append(now := time.monotonic())
                    if run.promoting and now > run.promoting:
                        resumed.set()

        def fail_over() -> None:
            run.stopped = time.monotonic()
            cluster.stop(cluster.primary)
            run.promoting = time.monotonic()
            cluster.promote(cluster.replicas[0])

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(writers):
                    group.create_task(writer())
                await asyncio.sleep(steady)
                await asyncio.to_thread(fail_over)
                with contextlib.suppress(TimeoutError):  # reported as no write after
                    async with asyncio.timeout(60):
                        await resumed.wait()
                await asyncio.sleep(steady)
                stop.set()
        finally:
            await dispose()
        applied = [
            int(value)
            for value in cluster.replicas[0]
            .scalar("SELECT coalesce(string_agg(id::text, ' '), '') FROM failover")
            .split()
        ]
    run.lost = len(set(run.acknowledged) - set(applied))
    run.twice = len(applied) - len(set(applied))
    return run


def report(runs: dict[str, list[Run]]) -> None:
    print(
        f"{'contender':<20} {'from stop s':>12} {'from promote s':>15} {'lost':>5} "
        f"{'twice':>6}  errors callers saw (all runs)"
    )
    for name, done in runs.items():
        from_stop = statistics.median(r.from_stop for r in done)
        from_promote = statistics.median(r.from_promote for r in done)
        errors: Counter[str] = Counter()
        for r in done:
            errors.update(r.errors)
        shown = ", ".join(f"{kind} x{count}" for kind, count in errors.most_common()) or "none"
        print(
            f"{name:<20} {from_stop:>12.3f} {from_promote:>15.3f} "
            f"{sum(r.lost for r in done):>5} {sum(r.twice for r in done):>6}  {shown}"
        )
        print(
            f"{'':<20} each run: "
            + ", ".join(f"{r.from_stop:.3f}/{r.from_promote:.3f}" for r in done)
        )


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--steady", type=float, default=1.0, help="seconds before/after")
    args = parser.parse_args(argv)
    problem = missing_binaries(replication=True)
    if problem is not None:
        print(f"bench_failover: {problem}", file=sys.stderr)
        return 1
    runs: dict[str, list[Run]] = {SESSIONFORGE: [], BARE: []}
    for repeat in range(args.repeats):
        for name in runs:  # alternate, so drift on the machine hits both alike
            runs[name].append(await one_run(name, args.writers, args.steady))
            print(f"run {repeat + 1}/{args.repeats} {name}: done", file=sys.stderr)
    report(runs)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
