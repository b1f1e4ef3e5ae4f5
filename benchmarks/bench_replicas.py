"""Scenario "replicas": reads on a replica vs the primary, and what read-your-writes costs.

Builds a primary and two streaming replicas on loopback from nothing
(``tests/pgcluster.py``: ``initdb`` + ``pg_basebackup``; needs PostgreSQL's binaries and
the ``postgres`` OS user), fills ``sf_bench_item`` (1,000 rows) on the primary, waits
until both replicas have it, and measures, in interleaved rounds (``harness.py``):

``--part read`` — one primary-key read in a reader session:

* ``reader() on a replica``: ``SessionFactory(primary, replicas=[r1, r2]).reader()``;
  the measuring tasks wrote nothing, so no position check is needed;
* ``reader() on the primary``: the same factory without ``replicas``;
* ``async_sessionmaker, AUTOCOMMIT, replica`` (the baseline) and ``..., primary``: plain
  SQLAlchemy on an ``isolation_level="AUTOCOMMIT"`` engine of one server.

``--part write`` — one transaction that updates a row (``begin()``), then a read of the
same row in a reader session:

* ``read-your-writes on``: the update's COMMIT is followed by one round trip for the
  primary's WAL position; the read goes to a replica that has replayed it (checked
  first, one round trip, then cached) or, after ``replica_wait``, the primary;
* ``read-your-writes off``: no position, no check: the read may be stale (counted:
  ``stale`` reads per round in the notes; each task writes rows of its own, so a
  different value is a stale one);
* ``no replicas``: the update and the read on the primary;
* ``async_sessionmaker, primary`` (the baseline): the same two steps in plain SQLAlchemy.

Run: ``python -m benchmarks.bench_replicas --part read --rounds 5 --seconds 2``
(``--part write`` for the second table). Results go to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import sys
import weakref
from collections.abc import Sequence
from contextlib import AsyncExitStack, ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from sessionforge import SessionFactory

from . import harness
from .bench_factory import ROWS, Item, create_table, drop_table
from .harness import Contender, Params

SCENARIO = "replicas"
READ_BASELINE = "async_sessionmaker, AUTOCOMMIT, replica"
WRITE_BASELINE = "async_sessionmaker, primary"


def read_contenders(primary: str, replicas: list[str], stack: AsyncExitStack, pool: int) -> Any:
    routed = SessionFactory(primary, replicas=replicas, pool_size=pool, max_overflow=0)
    alone = SessionFactory(primary, pool_size=pool, max_overflow=0)
    for db in (routed, alone):
        stack.push_async_callback(db.dispose)

    def sessionforge(name: str, db: SessionFactory[AsyncSession]) -> Contender:
        async def op() -> None:
            async with db.reader() as session:
                await session.get(Item, random.randint(1, ROWS))

        return Contender(name, op)

    def bare(name: str, url: str) -> Contender:
        engine = create_async_engine(
            url, pool_size=pool, max_overflow=0, isolation_level="AUTOCOMMIT"
        )
        stack.push_async_callback(engine.dispose)
        maker = async_sessionmaker(engine, expire_on_commit=False)

        async def op() -> None:
            async with maker() as session:
                await session.get(Item, random.randint(1, ROWS))

        return Contender(name, op)

    return [
        sessionforge("reader() on a replica", routed),
        bare(READ_BASELINE, replicas[0]),
        sessionforge("reader() on the primary", alone),
        bare("async_sessionmaker, AUTOCOMMIT, primary", primary),
    ]


_TASK_BLOCKS: weakref.WeakKeyDictionary[asyncio.Task[Any], int] = weakref.WeakKeyDictionary()
_BLOCKS = itertools.count()


def own_row() -> int:
    """A row only the running task writes (so a read of another value is stale, not a
    concurrent task's newer write): each task gets a block of 100 rows."""
    task = asyncio.current_task()
    assert task is not None
    block = _TASK_BLOCKS.get(task)
    if block is None:
        block = _TASK_BLOCKS[task] = next(_BLOCKS) % (ROWS // 100)
    return block * 100 + random.randint(1, 100)


def write_contenders(primary: str, replicas: list[str], stack: AsyncExitStack, pool: int) -> Any:
    def factory(**options: Any) -> SessionFactory[AsyncSession]:
        db = SessionFactory(primary, pool_size=pool, max_overflow=0, **options)
        stack.push_async_callback(db.dispose)
        return db

    def sessionforge(name: str, db: SessionFactory[AsyncSession]) -> Contender:
        stale = 0

        async def op() -> None:
            nonlocal stale
            row, value = own_row(), random.randint(0, 10**9)
            async with db.begin() as session:
                await session.execute(update(Item).where(Item.id == row).values(quantity=value))
            async with db.reader() as session:
                seen = await session.scalar(select(Item.quantity).where(Item.id == row))
            stale += seen != value

        async def after() -> dict[str, float]:
            nonlocal stale
            figures, stale = {"stale": float(stale)}, 0
            return figures

        return Contender(name, op, after)

    engine = create_async_engine(primary, pool_size=pool, max_overflow=0)
    stack.push_async_callback(engine.dispose)
    maker = async_sessionmaker(engine, expire_on_commit=False)

    async def bare() -> None:
        row, value = own_row(), random.randint(0, 10**9)
        async with maker.begin() as session:
            await session.execute(update(Item).where(Item.id == row).values(quantity=value))
        async with maker() as session:
            await session.scalar(select(Item.quantity).where(Item.id == row))

    return [
        sessionforge("read-your-writes on", factory(replicas=replicas)),
        Contender(WRITE_BASELINE, bare),
        sessionforge("read-your-writes off", factory(replicas=replicas, read_your_writes=False)),
        sessionforge("no replicas", factory()),
    ]


#: The issue 16 targets: (part, contender, versus, minimum, label).
TARGETS: tuple[tuple[str, str, str, float, str], ...] = (
    (
        "read",
        "reader() on a replica",
        "reader() on the primary",
        0.95,
        "Replicas: reader() on a caught-up replica >= 0.95x reader() on the primary",
    ),
    (
        "write",
        "read-your-writes on",
        "read-your-writes off",
        0.9,
        "Replicas: a write with read-your-writes on >= 0.9x off",
    ),
)


async def measure_part(cluster: Any, part: str, params: Params) -> harness.Report:
    """One part (``read`` or ``write``) on a running cluster, table made and dropped."""
    primary, replicas = cluster.primary.url, [r.url for r in cluster.replicas]
    baseline = READ_BASELINE if part == "read" else WRITE_BASELINE
    make = read_contenders if part == "read" else write_contenders
    async with AsyncExitStack() as stack:
        engine = create_async_engine(primary)
        stack.push_async_callback(engine.dispose)
        await create_table(engine)
        stack.push_async_callback(drop_table, engine)
        cluster.wait_caught_up()
        chosen = make(primary, replicas, stack, params.pool_size)
        return await harness.run(f"{SCENARIO}-{part}", chosen, baseline, params)


def cluster_builder() -> Any:
    """``tests/pgcluster.replicated_postgres``: the project's topology builder."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests.pgcluster import replicated_postgres

    return replicated_postgres


class ClusterUnavailable(RuntimeError):
    """Raised when the replicated cluster cannot be built here (no PostgreSQL binaries,
    no ``postgres`` OS user, ...): the suite then skips this scenario, with the reason."""


def measure(params: Params, parts: Sequence[str] = ("read", "write")) -> list[harness.Report]:
    """Build a primary and two replicas, measure each part, stop the cluster."""
    with ExitStack() as stack:
        try:
            cluster = stack.enter_context(cluster_builder()(replicas=2))
        except Exception as exc:
            raise ClusterUnavailable(f"{type(exc).__name__}: {exc}") from exc
        point = replace(params, url=cluster.primary.url)
        return [asyncio.run(measure_part(cluster, part, point)) for part in parts]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=("read", "write"), default="read")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--pool-size", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = parser.parse_args(argv)
    params = Params(
        url="postgresql+asyncpg://",  # replaced by the cluster's primary
        rounds=args.rounds,
        seconds=args.seconds,
        tasks=args.tasks,
        pool_size=args.pool_size,
    )
    [report] = measure(params, [args.part])
    print(harness.format_table(report))
    print(f"results: {harness.write_json(report, args.json)}")


if __name__ == "__main__":
    main()
