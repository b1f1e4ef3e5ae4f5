"""One task per session: a second task using a busy session gets a clear error."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import select, text

from sessionforge import ConcurrentSessionUseError, SessionFactory

from .models import Models


def slow_sql(db: SessionFactory[Any]) -> str:
    if db.url.get_backend_name() == "postgresql":
        return "SELECT pg_sleep(0.2), 1"
    if db.url.get_backend_name() == "mysql":
        return "SELECT SLEEP(0.2), 1"
    # (MariaDB stops a recursive CTE at max_recursive_iterations, 1000, without an error.)
    return (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000) "
        "SELECT count(*), 1 FROM n"
    )


async def test_second_task_gets_concurrent_session_use_error(
    db: SessionFactory[Any], models: Models
) -> None:
    async with db() as session:
        first = asyncio.create_task(session.execute(text(slow_sql(db))), name="first-task")
        await asyncio.sleep(0.02)  # first is inside its statement

        async def second() -> Any:
            return await session.execute(text("SELECT 2"))

        with pytest.raises(ConcurrentSessionUseError) as raised:
            await asyncio.create_task(second(), name="second-task")
        message = str(raised.value)
        assert message.startswith(
            "second-task (test_second_task_gets_concurrent_session_use_error.<locals>.second) "
            "called session.execute() while first-task ("
        )
        assert "one task at a time" in message
        assert "db.scope() per task" in message
        assert isinstance(raised.value, RuntimeError)

        row = (await first).one()  # the first task's work was not disturbed
        assert row[1] == 1
        # Sequential use from another task is fine.
        assert await asyncio.create_task(session.scalar(text("SELECT 3"))) == 3


async def test_gather_on_one_session_fails_fast_and_the_session_stays_usable(
    db: SessionFactory[Any], models: Models
) -> None:
    async with db.begin() as session:
        session.add(models.Item(name="kept"))
        await session.flush()
        results = await asyncio.gather(
            session.execute(text(slow_sql(db))),
            session.get(models.Item, 1),
            return_exceptions=True,
        )
        assert not isinstance(results[0], BaseException)
        assert isinstance(results[1], ConcurrentSessionUseError)
        names = (await session.scalars(select(models.Item.name))).all()
        assert names == ["kept"]
    assert db.status().checked_out == 0


async def test_sessions_per_task_run_concurrently(db: SessionFactory[Any], models: Models) -> None:
    async def one(index: int) -> None:
        async with db.begin() as session:
            session.add(models.Item(name=f"task {index}"))

    await asyncio.gather(*(one(index) for index in range(8)))
    async with db() as session:
        assert len((await session.scalars(select(models.Item.name))).all()) == 8
