"""Scenario "sqlite": short SQLite transactions on aiosqlite, on ``sqlite+sessionforge``, and sync.

Two workloads, each run with 1 task and with 10 tasks (``--tasks 1,10``):

* ``write``: open a transaction, ``session.add()`` one row to ``sf_bench_entry`` (an
  ``INSERT ... RETURNING id`` at flush), commit;
* ``read``: open a transaction, ``session.get()`` one of 1,000 rows of ``sf_bench_item``
  by primary key, commit.

Every contender opens the same SQLite file with the same settings: ``journal_mode=WAL``,
``synchronous=NORMAL``, ``busy_timeout=5000``, ``foreign_keys=ON``, driver-level
autocommit (``isolation_level=None``) and a real ``BEGIN`` emitted at SQLAlchemy's
``begin`` event — ``BEGIN IMMEDIATE`` for writes, ``BEGIN`` (deferred) for reads — and a
pool of ``--pool-size`` connections, no overflow. The contenders:

* ``SQLAlchemy + aiosqlite`` (the baseline): ``async_sessionmaker(expire_on_commit=False)
  .begin()`` on ``create_async_engine("sqlite+aiosqlite:///…")``, the pragmas and BEGIN
  added by ``connect``/``begin`` listeners (SQLAlchemy's documented recipe);
* ``SQLAlchemy + sessionforge driver``: the same on ``sqlite+sessionforge:///…``;
* ``sessionforge + aiosqlite`` / ``sessionforge + sessionforge driver``:
  ``SessionFactory(url).begin()``, whose SQLite preset does the same (``sqlite_begin=
  "deferred"`` for the read workload);
* ``sessionforge, sqlite:/// (its default driver)``: the same on the URL as a user
  writes it, ``sqlite:///…``, whatever driver sessionforge picks for it;
* ``sync SQLAlchemy (pysqlite)``, for reference: ``sessionmaker.begin()`` on
  ``create_engine("sqlite+pysqlite:///…")`` with the same listeners, called directly in
  the event loop, so its tasks take turns (it blocks the loop: not a way to serve).

The file lives in a temporary directory (``--dir`` to choose one) and is deleted at the end.

Run: ``python -m benchmarks.bench_sqlite --rounds 5 --seconds 1.5``
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sessionforge import SessionFactory

from . import harness
from .bench_factory import Item, create_table, random_id
from .harness import Contender, Params

SCENARIO = "sqlite"
BASELINE = "SQLAlchemy + aiosqlite"
DEFAULT_URL_CONTENDER = "sessionforge, sqlite:/// (its default driver)"
WORKLOADS = ("write", "read")
PRAGMAS = (
    "PRAGMA busy_timeout = 5000",
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = NORMAL",
    "PRAGMA foreign_keys = ON",
)


class Base(DeclarativeBase):
    """This scenario's own table; the read workload uses the ``factory`` scenario's."""


class Entry(Base):
    """The table the write workload appends to."""

    __tablename__ = "sf_bench_entry"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    quantity: Mapped[int]


def add_recipe(engine: Engine, begin: str) -> None:
    """The pragmas and a real BEGIN, as sessionforge's preset does (SQLAlchemy's recipe)."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: Any) -> None:
        connection.exec_driver_sql(begin)


def work(workload: str) -> Any:
    """The statement of one transaction, for a session of either kind."""
    if workload == "write":
        return lambda session: session.add(Entry(name="entry", quantity=random.randint(1, 99)))
    return lambda session: session.get(Item, random_id())


def async_contender(name: str, maker: Any, workload: str) -> Contender:
    """``maker.begin()`` (an ``async_sessionmaker`` or a ``SessionFactory``) + one statement."""
    step = work(workload)

    async def op() -> None:
        async with maker.begin() as session:
            result = step(session)
            if result is not None:
                await result

    return Contender(name, op)


def sync_contender(name: str, maker: sessionmaker[Any], workload: str) -> Contender:
    step = work(workload)

    async def op() -> None:
        with maker.begin() as session:
            step(session)

    return Contender(name, op)


async def create_tables(engine: AsyncEngine) -> None:
    await create_table(engine)  # sf_bench_item, filled
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)


DRIVERS = (("aiosqlite", "aiosqlite"), ("sessionforge", "sessionforge driver"))


def source(path: Path, workload: str) -> harness.ContenderSource:
    """The contenders of one workload, on the database file at ``path``."""
    begin = "BEGIN IMMEDIATE" if workload == "write" else "BEGIN"
    sqlite_begin: Literal["immediate", "deferred"] = (
        "immediate" if workload == "write" else "deferred"
    )

    @asynccontextmanager
    async def contenders(params: Params) -> AsyncIterator[Sequence[Contender]]:
        size = params.pool_size
        chosen: list[Contender] = []
        async with AsyncExitStack() as stack:
            for driver, label in DRIVERS:
                engine = create_async_engine(
                    f"sqlite+{driver}:///{path}", pool_size=size, max_overflow=0
                )
                stack.push_async_callback(engine.dispose)
                add_recipe(engine.sync_engine, begin)
                if driver == "aiosqlite":
                    await create_tables(engine)
                maker = async_sessionmaker(engine, expire_on_commit=False)
                chosen.append(async_contender(f"SQLAlchemy + {label}", maker, workload))
            for driver, label in DRIVERS:
                db = SessionFactory(
                    f"sqlite+{driver}:///{path}",
                    sqlite_begin=sqlite_begin,
                    pool_size=size,
                    max_overflow=0,
                )
                stack.push_async_callback(db.dispose)
                chosen.append(async_contender(f"sessionforge + {label}", db, workload))
            # The URL as a user writes it: sessionforge chooses the driver.
            db = SessionFactory(
                f"sqlite:///{path}", sqlite_begin=sqlite_begin, pool_size=size, max_overflow=0
            )
            stack.push_async_callback(db.dispose)
            chosen.append(async_contender(DEFAULT_URL_CONTENDER, db, workload))
            sync_engine = create_engine(
                f"sqlite+pysqlite:///{path}", pool_size=size, max_overflow=0
            )
            stack.callback(sync_engine.dispose)
            add_recipe(sync_engine, begin)
            sync_maker = sessionmaker(sync_engine, expire_on_commit=False)
            chosen.append(sync_contender("sync SQLAlchemy (pysqlite)", sync_maker, workload))
            yield chosen

    return contenders


async def measure(
    name: str, contenders: harness.ContenderSource, params: Params
) -> harness.Report:
    async with contenders(params) as chosen:
        return await harness.run(name, chosen, BASELINE, params)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: every workload and task count, one table each."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_sqlite",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--rounds", type=int, default=7, help="rounds; each measures every contender once")
    add("--seconds", type=float, default=2.0, help="measured seconds per contender per round")
    add("--warmup", type=float, default=0.5, help="warm-up seconds before each measurement")
    add("--tasks", default="1,10", help="comma-separated concurrent task counts")
    add("--workloads", default=",".join(WORKLOADS), help="comma-separated: write, read")
    add("--pool-size", type=int, default=10, help="connection pool size of every contender")
    add("--dir", type=Path, default=None, help="where the database file goes (default: temp)")
    args = parser.parse_args(argv)
    workloads = args.workloads.split(",")
    if not set(workloads) <= set(WORKLOADS):
        parser.error(f"--workloads: choose from {', '.join(WORKLOADS)}")
    task_counts = [int(n) for n in args.tasks.split(",")]

    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        path = Path(directory) / "bench.db"
        for workload in workloads:
            for tasks in task_counts:
                params = Params(
                    url=f"sqlite:///{path}",
                    rounds=args.rounds,
                    seconds=args.seconds,
                    warmup=args.warmup,
                    tasks=tasks,
                    pool_size=args.pool_size,
                )
                name = f"{SCENARIO}-{workload}-{tasks}task{'s' if tasks > 1 else ''}"
                report = asyncio.run(measure(name, source(path, workload), params))
                print(harness.format_table(report))
                print(f"results: {harness.write_json(report, None)}\n")


if __name__ == "__main__":
    main()
