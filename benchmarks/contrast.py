"""Correctness contrast: concurrent read-modify-write increments, with and without help.

Not a test (the bad outcomes are not deterministic) but the demonstration the README
points to. Ten tasks each increment one row 50 times (500 in all) by reading it,
adding one, and writing it back:

- PostgreSQL, bare ``async_sessionmaker`` at READ COMMITTED: updates are lost silently;
- PostgreSQL, ``db.begin(isolation_level="SERIALIZABLE")`` without retries: no update is
  lost, but many transactions fail with serialization errors;
- PostgreSQL, ``db.run_transaction(..., isolation_level="SERIALIZABLE")``: exactly 500;
- SQLite file, bare ``async_sessionmaker`` on aiosqlite: updates are lost silently;
- SQLite file, ``db.begin()`` (the preset's ``BEGIN IMMEDIATE``): exactly 500.

    python -m benchmarks.contrast [--skip-postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Integer
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sessionforge import SessionFactory

from .harness import DEFAULT_URL, URL_ENV

TASKS, PER_TASK = 10, 50


class Base(DeclarativeBase):
    pass


class Counter(Base):
    __tablename__ = "sf_contrast_counter"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(Integer)


@dataclass
class Outcome:
    name: str
    final: int
    errors: int


async def increment(session: AsyncSession) -> None:
    counter = await session.get(Counter, 1)
    assert counter is not None
    counter.value += 1


async def hammer(
    name: str, one: Callable[[], Awaitable[None]], read: Callable[[], Awaitable[int]]
) -> Outcome:
    errors = 0

    async def task() -> None:
        nonlocal errors
        for _ in range(PER_TASK):
            try:
                await one()
            except Exception:
                errors += 1

    await asyncio.gather(*(task() for _ in range(TASKS)))
    return Outcome(name, await read(), errors)


async def scenario(url: str, label: str) -> list[Outcome]:
    db = SessionFactory(url)
    bare_engine = create_async_engine(url)
    bare = async_sessionmaker(bare_engine, expire_on_commit=False)

    async def reset() -> None:
        async with db.engine.begin() as connection:
            await connection.run_sync(Base.metadata.drop_all)
            await connection.run_sync(Base.metadata.create_all)
        async with db.begin() as session:
            session.add(Counter(id=1, value=0))

    async def read() -> int:
        async with db() as session:
            counter = await session.get(Counter, 1)
            return counter.value if counter is not None else -1

    async def bare_one() -> None:
        async with bare.begin() as session:
            await increment(session)

    async def begin_one(**options: str) -> None:
        async with db.begin(**options) as session:  # type: ignore[arg-type]
            await increment(session)

    async def retried_one() -> None:
        await db.run_transaction(increment, isolation_level="SERIALIZABLE", retries=25)

    runs: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        (f"{label}: bare async_sessionmaker", bare_one)
    ]
    if label == "postgresql":
        runs += [
            (
                f"{label}: begin(SERIALIZABLE), no retry",
                lambda: begin_one(isolation_level="SERIALIZABLE"),
            ),
            (f"{label}: run_transaction(SERIALIZABLE)", retried_one),
        ]
    else:
        runs.append((f"{label}: sessionforge begin()", begin_one))
    outcomes = []
    try:
        for name, one in runs:
            await reset()
            outcomes.append(await hammer(name, one, read))
    finally:
        async with db.engine.begin() as connection:
            await connection.run_sync(Base.metadata.drop_all)
        await bare_engine.dispose()
        await db.dispose()
    return outcomes


async def run(skip_postgres: bool) -> list[Outcome]:
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory() as folder:
        outcomes += await scenario(f"sqlite+aiosqlite:///{Path(folder) / 'contrast.db'}", "sqlite")
    if not skip_postgres:
        outcomes += await scenario(os.environ.get(URL_ENV, DEFAULT_URL), "postgresql")
    return outcomes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="read-modify-write correctness contrast")
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args(argv)
    outcomes = asyncio.run(run(args.skip_postgres))
    expected = TASKS * PER_TASK
    print(f"{'path':50} {'final':>6} {'errors':>7}  (expected {expected}, 0 errors)")
    for outcome in outcomes:
        verdict = "ok" if outcome.final == expected and not outcome.errors else "LOST/FAILED"
        print(f"{outcome.name:50} {outcome.final:>6} {outcome.errors:>7}  {verdict}")


if __name__ == "__main__":
    main()
