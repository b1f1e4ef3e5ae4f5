"""examples/fastapi_app.py under a real uvicorn process, driven over loopback HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from sessionforge import FactoryConfig

from .conftest import (
    MARIADB_URL,
    PG_URL,
    apply_backend_marks,
    require_mariadb,
    require_postgres,
)

ROOT = Path(__file__).parent.parent
TABLES = ("example_item", "example_account")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def drop_tables(url: str) -> None:
    engine = create_engine(FactoryConfig.from_url(url).sync_url, poolclass=NullPool)
    with engine.begin() as connection:
        for table in TABLES:
            connection.execute(text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite-file"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", id="mysql", marks=pytest.mark.mysql),
    ]
)
def example_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    apply_backend_marks(request, request.param)
    if request.param == "postgres":
        require_postgres()
        url = PG_URL
    elif request.param == "mysql":
        require_mariadb()
        url = MARIADB_URL
    else:
        url = f"sqlite:///{tmp_path / 'example.db'}"
    drop_tables(url)
    yield url
    drop_tables(url)


@pytest.fixture
def server(example_url: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-W", "error", "-m", "uvicorn", "examples.fastapi_app:app"]
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
        env={**os.environ, "DATABASE_URL": example_url},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                out, err = process.communicate(timeout=10)
                pytest.fail(f"uvicorn did not come up:\n{out}\n{err}")
            time.sleep(0.1)
        yield base
    finally:
        process.send_signal(signal.SIGINT)  # graceful: runs the lifespan's shutdown
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, out + err
    assert "Traceback" not in err, err
    assert "Application shutdown complete" in err


async def test_example_under_uvicorn_with_concurrent_requests(
    server: str, example_url: str
) -> None:
    limits = httpx.Limits(max_connections=20)
    async with httpx.AsyncClient(base_url=server, limits=limits, timeout=30) as client:
        # items: 40 distinct names plus 10 repeats, all at once
        names = [f"item-{n}" for n in range(40)] + [f"item-{n}" for n in range(10)]
        created = await asyncio.gather(
            *(client.post("/items", json={"name": name, "price_cents": 100}) for name in names)
        )
        assert Counter(r.status_code for r in created) == {201: 40, 409: 10}

        seen: list[str] = []
        after = 0
        while True:
            page = (await client.get("/items", params={"after": after, "limit": 15})).json()
            seen += [item["name"] for item in page["items"]]
            if page["next_after"] is None:
                break
            after = page["next_after"]
        assert sorted(seen) == sorted(set(names))

        first_id = (await client.get("/items", params={"limit": 1})).json()["items"][0]["id"]
        updated = await client.put(
            f"/items/{first_id}", json={"name": "renamed", "price_cents": 5}
        )
        assert updated.json()["name"] == "renamed"
        assert (await client.delete(f"/items/{first_id}")).status_code == 204
        assert (await client.get(f"/items/{first_id}")).status_code == 404

        # transfers: 60 concurrent, between 4 accounts of 100 each
        accounts = [
            (await client.post("/accounts", json={"owner": f"o{n}", "balance": 100})).json()["id"]
            for n in range(4)
        ]
        moves = [
            {"source": accounts[n % 4], "target": accounts[(n + 1) % 4], "amount": 1 + n % 7}
            for n in range(60)
        ]
        done = await asyncio.gather(*(client.post("/transfers", json=move) for move in moves))
        codes = Counter(r.status_code for r in done)
        assert set(codes) <= {200, 409}, [r.text for r in done if r.status_code not in (200, 409)]
        assert codes[200] > 0
        balances = [
            (await client.get(f"/accounts/{account}")).json()["balance"] for account in accounts
        ]
        assert sum(balances) == 400
        assert min(balances) >= 0
        # one notification per committed transfer, none for refused ones
        assert len((await client.get("/notifications")).json()) == codes[200]

        health = (await client.get("/health")).json()
        assert health["checked_out"] == 0

    engine = create_engine(FactoryConfig.from_url(example_url).sync_url, poolclass=NullPool)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM example_item")).scalar() == 39
        total = connection.execute(text("SELECT sum(balance) FROM example_account")).scalar()
        assert total == 400
    engine.dispose()


async def test_example_in_process_under_isolation(
    example_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # How a user would test their own app: the app's real code on the real database,
    # everything it commits rolled back afterwards (sessionforge.testing.isolated).
    import importlib

    from sessionforge.testing import isolated

    monkeypatch.setenv("DATABASE_URL", example_url)
    example = importlib.reload(importlib.import_module("examples.fastapi_app"))
    app, db = example.app, example.db
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):  # creates the tables
        for _ in range(2):  # the second run starts from empty tables again
            async with (
                isolated(db) as iso,
                httpx.AsyncClient(transport=transport, base_url="http://test") as client,
            ):
                assert (await client.get("/items")).json()["items"] == []
                created = await client.post("/items", json={"name": "ada", "price_cents": 1})
                assert created.status_code == 201
                again = await client.post("/items", json={"name": "ada", "price_cents": 2})
                assert again.status_code == 409
                ids = [
                    (await client.post("/accounts", json={"owner": o, "balance": 10})).json()["id"]
                    for o in ("a", "b")
                ]
                moved = {"source": ids[0], "target": ids[1], "amount": 4}
                assert (await client.post("/transfers", json=moved)).status_code == 200
                assert (await client.get(f"/accounts/{ids[1]}")).json()["balance"] == 14
                assert len(iso.hooks) == 1  # the notification, captured at its commit
                assert await iso.run_hooks() == 1
                assert (await client.get("/notifications")).json() == [
                    f"4 moved from {ids[0]} to {ids[1]}"
                ]
                example.sent.clear()
            assert db.status().checked_out == 0
    engine = create_engine(FactoryConfig.from_url(example_url).sync_url, poolclass=NullPool)
    with engine.connect() as connection:  # an independent connection sees nothing
        for table in TABLES:
            assert connection.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 0
    engine.dispose()
