"""Engines that follow the event loop: one factory, many loops, nothing left behind.

Each scenario runs as its own Python process with warnings as errors, because what is
tested is exactly what happens around event loops starting and ending — which a test
running inside pytest-asyncio's loop cannot do to itself.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from sessionforge import SessionFactory

from .conftest import MARIADB_URL, PG_URL, require_mariadb, require_postgres

PRELUDE = """
import asyncio, gc, logging, sys
from sqlalchemy import text
from sessionforge import SessionFactory

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
URL = sys.argv[1]
NAME = {"application_name": sys.argv[2]} if URL.startswith("postgres") else {}
db = SessionFactory(URL, **NAME)   # made at import time, no loop

async def job(n):
    async with db.begin() as session:
        value = (await session.execute(text(f"SELECT {n}"))).scalar()
    return value, db.engine  # the engine itself: an id() may be reused once it is collected
"""


def run_script(body: str, url: str, application_name: str = "sf-loops") -> str:
    script = textwrap.dedent(PRELUDE) + textwrap.dedent(body)
    result = subprocess.run(
        [sys.executable, "-W", "error", "-X", "dev", "-c", script, url, application_name],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == "", result.stderr  # no warning, no "Event loop is closed"
    return result.stdout


@pytest.fixture
def loop_url(db_url: str, tmp_path: Path) -> str:
    # An in-memory database would not outlive a loop's engine; use a file for SQLite.
    if db_url.startswith("sqlite") and db_url.endswith("://"):  # either driver
        return f"{db_url}/{tmp_path / 'loops.db'}"
    return db_url


def test_one_factory_across_successive_asyncio_run_calls(loop_url: str) -> None:
    out = run_script(
        """
        first = asyncio.run(job(1))
        second = asyncio.run(job(2))
        assert first[0] == 1 and second[0] == 2, (first, second)
        assert first[1] is not second[1], "each loop gets its own engine"
        assert db.status().engines == (), db.status()   # asyncio.run closed them
        print("ok")
        """,
        loop_url,
    )
    assert out.strip().endswith("ok")


def test_celery_style_worker_runs_one_loop_per_job(loop_url: str) -> None:
    out = run_script(
        """
        results = [asyncio.run(job(n))[0] for n in range(5)]
        assert results == [0, 1, 2, 3, 4], results
        print("ok")
        """,
        loop_url,
    )
    assert out.strip().endswith("ok")


def test_loop_closed_without_shutdown_is_dropped_quietly(loop_url: str) -> None:
    out = run_script(
        """
        loop = asyncio.new_event_loop()
        assert loop.run_until_complete(job(1))[0] == 1
        loop.close()                        # no shutdown_asyncgens: engine left behind
        assert asyncio.run(job(2))[0] == 2  # a new loop: the dead loop's engine is dropped
        print("ok")
        """,
        loop_url,
    )
    assert "dropped the engine of a closed event loop" in out
    assert out.strip().endswith("ok")


@pytest.mark.postgres
def test_asyncio_run_closes_the_server_connections(pg_url: str, prefix: str) -> None:
    name = f"{prefix}-loops"
    out = run_script(
        """
        asyncio.run(job(1))
        asyncio.run(job(2))

        async def count():
            fresh = SessionFactory(URL)
            async with fresh() as session:
                n = (await session.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n"),
                    {"n": sys.argv[2]},
                )).scalar()
            await fresh.dispose()
            return n

        print("connections", asyncio.run(count()))
        """,
        pg_url,
        name,
    )
    assert "connections 0" in out


# Within pytest-asyncio: every test has its own loop; a factory shared between tests
# (as an app's module-level factory is) must work in each.
SHARED: dict[str, Any] = {}


@pytest.fixture(
    params=[
        "sqlite-file",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ]
)
def shared_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[SessionFactory[Any], list[Any]]:
    backend: str = request.param
    if backend not in SHARED:
        if backend == "postgres":
            require_postgres()
            url = PG_URL
        elif backend == "mysql":
            require_mariadb()
            url = MARIADB_URL
        else:
            url = f"sqlite:///{tmp_path_factory.getbasetemp() / 'shared-across-loops.db'}"
        SHARED[backend] = (SessionFactory(url), [])
    factory, engines = SHARED[backend]
    return factory, engines


@pytest.mark.parametrize("turn", [1, 2, 3])
async def test_module_level_factory_works_in_each_tests_loop(
    turn: int, shared_factory: tuple[SessionFactory[Any], list[Any]]
) -> None:
    db, engines = shared_factory
    async with db.begin() as session:
        assert (await session.execute(text(f"SELECT {turn}"))).scalar() == turn
    engines.append(db.engine)  # held, so no two engines can share an id
    assert len({id(engine) for engine in engines}) == len(engines)  # one per loop
    assert db.status().engines[0].checked_out == 0
