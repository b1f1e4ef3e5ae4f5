"""SQLModel through the session classes, and apps with more than one database (issue 15):
the README's examples run, two factories isolated at once, one session over two
databases with ``binds=``. On real databases: a SQLite file, PostgreSQL and MariaDB.
"""

from __future__ import annotations

import asyncio
import runpy
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import String, create_engine, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import NullPool

from sessionforge import FactoryConfig, SessionFactory
from sessionforge.testing import isolated

from .conftest import MARIADB_URL, PG_URL, require_mariadb, require_postgres
from .test_readme import block_tested_by, run_block

HERE = "tests/test_multiple_databases.py"


def test_the_readme_sqlmodel_example_runs(tmp_path: Path) -> None:
    result = run_block(f"{HERE}::test_the_readme_sqlmodel_example_runs", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["['Deadpond']", "Deadpond"]
    with sqlite3.connect(tmp_path / "heroes.db") as connection:
        assert connection.execute("SELECT name FROM hero").fetchall() == [("Deadpond",)]


# --- two databases -----------------------------------------------------------------------

PAIRS = [
    pytest.param(("sqlite", "sqlite"), id="sqlite+sqlite"),
    pytest.param(("postgres", "sqlite"), id="postgres+sqlite", marks=pytest.mark.postgres),
    pytest.param(
        ("postgres", "mysql"),
        id="postgres+mysql",
        marks=[pytest.mark.postgres, pytest.mark.mysql],
    ),
]
TABLES = ("orders", "audit_entries")


def _url(kind: str, path: Path) -> str:
    if kind == "postgres":
        require_postgres()
        return PG_URL
    if kind == "mysql":
        require_mariadb()
        return MARIADB_URL
    return f"sqlite:///{path}"


def _outside(url: str) -> Engine:
    return create_engine(FactoryConfig.from_url(url).sync_url, poolclass=NullPool)


def _count(engine: Engine, table: str) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(text(f"SELECT count(*) FROM {table}")) or 0)


@pytest.fixture(params=PAIRS)
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The shop's and the audit's database URLs; the README's table names cleared on the
    servers before and after (they are fixed names, unlike the suite's own tables)."""
    shop_kind, audit_kind = request.param
    pair = (_url(shop_kind, tmp_path / "shop.db"), _url(audit_kind, tmp_path / "audit.db"))

    def clear() -> None:
        for url in pair:
            if not url.startswith("sqlite"):
                engine = _outside(url)
                with engine.begin() as connection:
                    for table in TABLES:
                        connection.execute(text(f"DROP TABLE IF EXISTS {table}"))
                engine.dispose()

    clear()
    yield pair
    clear()


async def test_the_readme_two_databases_example_runs(
    urls: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop_url, audit_url = urls
    monkeypatch.setenv("SHOP_DATABASE_URL", shop_url)
    monkeypatch.setenv("AUDIT_DATABASE_URL", audit_url)
    script = tmp_path / "two_databases.py"
    script.write_text(block_tested_by(f"{HERE}::test_the_readme_two_databases_example_runs"))
    app: dict[str, Any] = runpy.run_path(str(script))
    shop: SessionFactory[Any] = app["shop"]
    audit: SessionFactory[Any] = app["audit"]
    shop_outside, audit_outside = _outside(shop_url), _outside(audit_url)
    try:
        app["ShopBase"].metadata.create_all(shop_outside)
        app["AuditBase"].metadata.create_all(audit_outside)
        transport = httpx.ASGITransport(app=app["app"])
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            async with isolated(shop), isolated(audit):
                response = await client.post("/orders", params={"item": "tea"})
                assert response.status_code == 201, response.text
                async with shop() as session:  # committed (to a SAVEPOINT): seen here
                    assert (
                        await session.scalar(select(func.count()).select_from(app["Order"])) == 1
                    )
                async with audit() as session:
                    entry = await session.scalar(select(app["AuditEntry"].what))
                assert entry == f"order {response.json()['id']}: tea"
                assert _count(shop_outside, "orders") == 0  # not outside the test
            # both rolled back; both factories themselves again
            assert (_count(shop_outside, "orders"), _count(audit_outside, "audit_entries")) == (
                0,
                0,
            )
            assert shop.status().checked_out == audit.status().checked_out == 0
            response = await client.post("/orders", params={"item": "real"})
            assert response.status_code == 201, response.text
        assert (_count(shop_outside, "orders"), _count(audit_outside, "audit_entries")) == (1, 1)
    finally:
        await shop.dispose()
        await audit.dispose()
        shop_outside.dispose()
        audit_outside.dispose()


# --- one session, two databases: binds= ---------------------------------------------------


def _models(prefix: str) -> tuple[type[Any], type[Any]]:
    # Bases of their own per test: a class name registered twice in a base warns.
    class ShopBase(DeclarativeBase):
        pass

    class AuditBase(DeclarativeBase):
        pass

    class Order(ShopBase):
        __tablename__ = f"{prefix}_orders"
        id: Mapped[int] = mapped_column(primary_key=True)
        item: Mapped[str] = mapped_column(String(100))

    class Audit(AuditBase):
        __tablename__ = f"{prefix}_audit"
        id: Mapped[int] = mapped_column(primary_key=True)
        what: Mapped[str] = mapped_column(String(200))

    return Order, Audit


@pytest.mark.parametrize("twin", ["async", "sync"])
async def test_one_session_over_two_databases_with_binds(
    urls: tuple[str, str], prefix: str, twin: str
) -> None:
    shop_url, audit_url = urls
    Order, Audit = _models(prefix)
    audit: SessionFactory[Any] = SessionFactory(audit_url)
    db: SessionFactory[Any] = SessionFactory(shop_url, binds={Audit: audit})
    shop_outside, audit_outside = _outside(shop_url), _outside(audit_url)
    orders, entries = Order.__tablename__, Audit.__tablename__
    Order.__table__.create(shop_outside)
    Audit.__table__.create(audit_outside)

    def sync_write(what: str) -> None:
        with db.sync.begin() as session:
            session.add_all([Order(item=what), Audit(what=what)])

    def sync_test() -> str | None:
        with isolated(db.sync):  # isolates the factory in binds too
            sync_write("test")
            assert _count(shop_outside, orders) == _count(audit_outside, entries) == 0
            with db.sync() as session:
                return session.scalar(select(Audit.what))

    try:
        if twin == "sync":
            assert await asyncio.to_thread(sync_test) == "test"
            await asyncio.to_thread(sync_write, "real")
        else:
            async with isolated(db):  # isolates the factory in binds too
                async with db.begin() as session:
                    session.add_all([Order(item="test"), Audit(what="test")])
                assert _count(shop_outside, orders) == _count(audit_outside, entries) == 0
                async with db() as session:
                    assert await session.scalar(select(Audit.what)) == "test"
            async with db.begin() as session:
                session.add_all([Order(item="real"), Audit(what="real")])
        with audit_outside.connect() as connection:  # the Audit rows are in the audit database
            assert list(connection.scalars(text(f"SELECT what FROM {entries}"))) == ["real"]
        assert _count(shop_outside, orders) == 1
    finally:
        await db.dispose()
        await audit.dispose()
        Order.__table__.drop(shop_outside)
        Audit.__table__.drop(audit_outside)
        shop_outside.dispose()
        audit_outside.dispose()
