"""Per-transaction options on begin(), and run_transaction/transactional with retries."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from sessionforge import (
    ConfigurationError,
    RetryExhaustedError,
    SessionFactory,
    TransactionTimeoutError,
)
from sessionforge.dialects import is_retryable

from .conftest import FactoryMaker, count_rows
from .models import Models, make_models

TWINS = [pytest.param("async", id="async"), pytest.param("sync", id="sync")]


class Flaky(Exception):
    """A failure the tests declare retryable through retry_if."""


async def scalar(db: SessionFactory[Any], twin: str, sql: str, **begin: Any) -> Any:
    """Run one statement in ``begin(**begin)`` through the chosen twin."""
    if twin == "async":
        async with db.begin(**begin) as session:
            result: Any = await session.execute(text(sql))
            return result.scalar() if result.returns_rows else None
    with db.sync.begin(**begin) as sync_session:
        sync_result: Any = sync_session.execute(text(sql))
        return sync_result.scalar() if sync_result.returns_rows else None


def isolation_query(db: SessionFactory[Any]) -> str:
    if db.url.get_backend_name() == "postgresql":
        return "SHOW transaction_isolation"
    if db.url.get_backend_name() == "mysql":
        return "SELECT @@tx_isolation"
    return "PRAGMA read_uncommitted"


async def noop(session: AsyncSession) -> None:
    return None


# --- isolation_level ------------------------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
async def test_isolation_level_applies_to_one_transaction_only(
    twin: str, make_factory: FactoryMaker
) -> None:
    db = make_factory(pool_size=1, max_overflow=0)
    query = isolation_query(db)
    level, expected, default = {
        "postgresql": ("SERIALIZABLE", "serializable", "read committed"),
        "mysql": ("SERIALIZABLE", "SERIALIZABLE", "REPEATABLE-READ"),
    }.get(db.url.get_backend_name(), ("READ UNCOMMITTED", 1, 0))

    assert await scalar(db, twin, query, isolation_level=level) == expected
    # The same pooled connection (pool of one) comes back at the engine default.
    assert await scalar(db, twin, query) == default
    assert await scalar(db, twin, query, isolation_level=level.lower()) == expected
    assert await scalar(db, twin, query) == default


@pytest.mark.parametrize("twin", TWINS)
async def test_bad_isolation_level_fails_before_reaching_the_server(
    twin: str, make_factory: FactoryMaker
) -> None:
    db = make_factory()
    factory: Any = db if twin == "async" else db.sync
    with pytest.raises(ConfigurationError, match=r"isolation_level='SNAPSHOT' is not supported"):
        factory.begin(isolation_level="SNAPSHOT")
    with pytest.raises(ConfigurationError, match="not supported"):
        if twin == "async":
            await db.run_transaction(noop, isolation_level="CHAOS")
        else:
            db.sync.run_transaction(lambda session: None, isolation_level="CHAOS")
    assert db.status().engines == ()  # nothing was even built


# --- readonly -------------------------------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
async def test_readonly_refuses_writes_and_the_next_transaction_can_write(
    twin: str, db: SessionFactory[Any], models: Models, outside: Any
) -> None:
    # Pooled connections are shared; run enough transactions to reuse them.
    insert = f"INSERT INTO {models.item} (name) VALUES ('x')"
    for attempt in range(3):
        with pytest.raises(DBAPIError) as raised:
            await scalar(db, twin, insert, readonly=True)
        message = str(raised.value.orig).lower()
        # PostgreSQL: "read-only transaction"; SQLite: "readonly database"; MariaDB:
        # "cannot execute statement in a read only transaction" (1792).
        assert any(word in message for word in ("read-only", "readonly", "read only")), message
        assert await scalar(db, twin, f"SELECT count(*) FROM {models.item}", readonly=True) == (
            attempt
        )
        await scalar(db, twin, insert.replace("'x'", f"'ok{attempt}'"))
    assert count_rows(outside, models.item) == 3


async def test_sqlite_readonly_does_not_take_the_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    db = SessionFactory(f"sqlite:///{path}")
    try:
        async with db.begin(readonly=True) as session:
            await session.execute(text("SELECT 1"))
            other = sqlite3.connect(path, timeout=0, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # would fail if we held the lock
            other.execute("ROLLBACK")
            other.close()
    finally:
        await db.dispose()


# --- timeout --------------------------------------------------------------------------


async def test_timeout_cancels_rolls_back_and_raises(
    db: SessionFactory[Any], models: Models, outside: Any
) -> None:
    started = time.monotonic()
    with pytest.raises(TransactionTimeoutError, match=r"timeout of 0.2s and was rolled back"):
        async with db.begin(timeout=0.2) as session:
            session.add(models.Item(name="never committed"))
            await session.flush()
            await asyncio.sleep(5)
    assert time.monotonic() - started < 2
    assert count_rows(outside, models.item) == 0
    assert db.status().checked_out == 0
    async with db.begin() as session:  # the factory is fine afterwards
        session.add(models.Item(name="later"))
    assert count_rows(outside, models.item) == 1


@pytest.mark.postgres
@pytest.mark.parametrize("twin", TWINS)
async def test_postgres_timeout_stops_a_running_statement(
    twin: str, pg_url: str, prefix: str
) -> None:
    db = SessionFactory(pg_url, application_name=f"{prefix}-timeout")
    try:
        started = time.monotonic()
        with pytest.raises(TransactionTimeoutError) as raised:
            await scalar(db, twin, "SELECT pg_sleep(10)", timeout=0.3)
        assert time.monotonic() - started < 3
        assert raised.value.__cause__ is not None
        assert db.status().checked_out == 0
        assert db.sync.status().checked_out == 0
        engine = create_engine(db.config.sync_url, poolclass=NullPool)
        with engine.connect() as connection:
            states = connection.execute(
                text("SELECT state FROM pg_stat_activity WHERE application_name = :name"),
                {"name": f"{prefix}-timeout"},
            ).scalars()
            assert "idle in transaction" not in list(states)
            assert "active" not in list(states)
        engine.dispose()
    finally:
        await db.dispose()


async def test_sync_timeout_is_checked_when_the_block_ends(
    db: SessionFactory[Any], models: Models, outside: Any
) -> None:
    def slow_work() -> None:
        with db.sync.begin(timeout=0.05) as session:
            session.add(models.Item(name="too slow"))
            session.flush()
            time.sleep(0.1)

    with pytest.raises(TransactionTimeoutError):
        await asyncio.to_thread(slow_work)
    assert count_rows(outside, models.item) == 0
    assert db.sync.status().checked_out == 0


@pytest.mark.parametrize("timeout", [0, -1, "1", True])
def test_bad_timeout_is_a_configuration_error(timeout: Any) -> None:
    db = SessionFactory("sqlite://")
    with pytest.raises(ConfigurationError, match="expected seconds > 0"):
        db.begin(timeout=timeout)


# --- settings -------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("twin", TWINS)
async def test_settings_are_transaction_local_on_a_shared_connection(
    twin: str, pg_url: str
) -> None:
    db = SessionFactory(pg_url, pool_size=1, max_overflow=0)
    read = "SELECT coalesce(current_setting('app.tenant_id', true), '')"
    try:
        for index in range(20):
            tenant = f"tenant-{index}"
            got = await scalar(db, twin, read, settings={"app.tenant_id": tenant})
            assert got == tenant
            assert await scalar(db, twin, read) == ""  # never seen by the next user
        hostile = "x'); DROP TABLE pg_class; --"
        assert await scalar(db, twin, read, settings={"app.tenant_id": hostile}) == hostile
        both = "SELECT current_setting('app.a') || current_setting('app.b')"
        assert await scalar(db, twin, both, settings={"app.a": 1, "app.b": True}) == "1on"
    finally:
        await db.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("twin", TWINS)
async def test_a_statement_timeout_we_did_not_set_is_the_same_error_not_ours(
    twin: str, pg_url: str
) -> None:
    # A server-, role- or SET LOCAL statement_timeout (SQLSTATE 57014) without timeout=
    # is the database's error: re-raised as it is, never a TransactionTimeoutError.
    db = SessionFactory(pg_url)
    sql = "SELECT pg_sleep(1)"
    try:
        for options in ({}, {"settings": {"statement_timeout": "50"}}, {"readonly": True}):
            with pytest.raises(DBAPIError, match="statement timeout"):
                if twin == "async":
                    async with db.begin(**options) as session:
                        await session.execute(text("SET LOCAL statement_timeout = 50"))
                        await session.execute(text(sql))
                else:
                    with db.sync.begin(**options) as sync_session:
                        sync_session.execute(text("SET LOCAL statement_timeout = 50"))
                        sync_session.execute(text(sql))
        assert db.status().checked_out == 0
    finally:
        await db.dispose()


@pytest.mark.postgres
async def test_an_admin_cancel_is_not_reported_as_our_timeout(pg_url: str, prefix: str) -> None:
    name = f"{prefix}-cancelled"
    db = SessionFactory(pg_url, application_name=name)
    admin = create_engine(db.config.sync_url, poolclass=NullPool)

    def cancel_when_running() -> None:
        # The sleep must be *running*: asyncpg prepares the statement first, and between
        # the prepare and the execute pg_stat_activity already shows its text while the
        # backend is idle; a cancel that lands then is ignored and the sleep runs to the end.
        query = text(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = :name AND state = 'active' AND wait_event = 'PgSleep'"
        )
        for _ in range(100):
            with admin.connect() as connection:
                if connection.execute(query, {"name": name}).scalar():
                    return
            time.sleep(0.05)

    try:
        canceller = asyncio.create_task(asyncio.to_thread(cancel_when_running))
        with pytest.raises(DBAPIError, match="user request"):
            async with db.begin(timeout=30) as session:
                await session.execute(text("SELECT pg_sleep(10)"))
        await canceller
    finally:
        admin.dispose()
        await db.dispose()


async def test_a_failed_begin_disarms_its_deadline(make_factory: FactoryMaker) -> None:
    from sqlalchemy import event

    db = make_factory()
    failures = [ValueError("listener failed once")]

    def fail_once(*_args: Any) -> None:
        if failures:
            raise failures.pop()

    event.listen(db, "after_transaction_create", fail_once)
    with pytest.raises(ValueError, match="listener failed once"):
        async with db.begin(timeout=0.05):
            pass
    await asyncio.sleep(0.2)  # the stale deadline would cancel this task here
    assert db.status().checked_out == 0


@pytest.mark.postgres
async def test_settings_apply_to_savepoints_of_the_transaction(pg_url: str) -> None:
    db = SessionFactory(pg_url)
    try:
        async with db.begin(settings={"app.user": "ada"}) as session:
            async with session.begin_nested():
                assert await session.scalar(text("SELECT current_setting('app.user')")) == "ada"
    finally:
        await db.dispose()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        pytest.param({"app.tenant; DROP": "x"}, r"setting name .* is invalid", id="name"),
        pytest.param({"app.tenant": object()}, r"value of type object", id="value"),
        pytest.param(["app.tenant"], r"must be a dict", id="not-a-dict"),
    ],
)
def test_bad_settings_are_configuration_errors(settings: Any, message: str) -> None:
    db = SessionFactory("postgresql://app@db.invalid/shop")
    with pytest.raises(ConfigurationError, match=message):
        db.begin(settings=settings)


def test_settings_on_sqlite_are_refused_with_a_reason() -> None:
    db = SessionFactory("sqlite://")
    with pytest.raises(ConfigurationError, match=r"PostgreSQL server settings.*sqlite has no"):
        db.begin(settings={"app.tenant_id": "acme"})


# Ten tasks hammering one row: measured, 1-2% of transactions need 6-8 attempts (a
# loser can lose again), so the default retries=5 is not enough here (see README).
HOT_ROW = 25

# --- run_transaction ------------------------------------------------------------------


@pytest.mark.postgres
async def test_serializable_increments_with_retries_are_exact(pg_url: str, prefix: str) -> None:
    """10 tasks x 50 SERIALIZABLE read-modify-write increments of one row: exactly 500."""
    models = make_models(prefix)
    db = SessionFactory(pg_url)
    calls = 0

    async def increment(session: AsyncSession) -> None:
        nonlocal calls
        calls += 1
        counter = await session.get(models.Counter, 1)
        assert counter is not None
        counter.value += 1

    try:
        async with db.engine.begin() as connection:
            await connection.run_sync(models.metadata.create_all)
        async with db.begin() as session:
            session.add(models.Counter(id=1, value=0))

        async def worker() -> None:
            for _ in range(50):
                await db.run_transaction(
                    increment, isolation_level="SERIALIZABLE", retries=HOT_ROW
                )

        await asyncio.gather(*(worker() for _ in range(10)))
        async with db() as session:
            assert await session.scalar(select(models.Counter.value)) == 500
        assert calls >= 500
        assert db.status().checked_out == 0
    finally:
        async with db.engine.begin() as connection:
            await connection.run_sync(models.metadata.drop_all)
        await db.dispose()


@pytest.mark.postgres
async def test_serializable_increments_with_sync_twin_threads(pg_url: str, prefix: str) -> None:
    models = make_models(prefix)
    db = SessionFactory(pg_url)
    sdb = db.sync

    def increment(session: Session) -> None:
        counter = session.get(models.Counter, 1)
        assert counter is not None
        counter.value += 1

    try:
        models.metadata.create_all(sdb.engine)
        with sdb.begin() as session:
            session.add(models.Counter(id=1, value=0))

        def worker() -> None:
            for _ in range(50):
                sdb.run_transaction(increment, isolation_level="SERIALIZABLE", retries=HOT_ROW)

        with ThreadPoolExecutor(max_workers=10) as pool:
            for future in [pool.submit(worker) for _ in range(10)]:
                future.result()
        with sdb() as session:
            assert session.scalar(select(models.Counter.value)) == 500
    finally:
        models.metadata.drop_all(sdb.engine)
        await db.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("twin", TWINS)
async def test_a_real_serialization_failure_is_retried(
    twin: str, pg_url: str, prefix: str
) -> None:
    """A concurrent update between our read and our write gives SQLSTATE 40001."""
    models = make_models(prefix)
    db = SessionFactory(pg_url)
    other = create_engine(db.config.sync_url, poolclass=NullPool)
    failures: list[BaseException] = []
    attempts: list[int] = []

    def interfere() -> None:
        with other.begin() as connection:
            connection.execute(text(f"UPDATE {models.counter} SET value = value + 100"))

    def note(exc: BaseException) -> None:
        failures.append(exc)

    try:
        models.metadata.create_all(other)
        with other.begin() as connection:
            connection.execute(text(f"INSERT INTO {models.counter} (id, value) VALUES (1, 0)"))
        if twin == "async":

            async def work(session: AsyncSession) -> int:
                attempts.append(len(attempts) + 1)
                counter = await session.get(models.Counter, 1)
                assert counter is not None
                if len(attempts) == 1:
                    await asyncio.to_thread(interfere)
                counter.value += 1
                await session.flush()
                return int(counter.value)

            result = await db.run_transaction(
                work, isolation_level="REPEATABLE READ", retry_if=lambda e: note(e)
            )
        else:

            def sync_work(session: Session) -> int:
                attempts.append(len(attempts) + 1)
                counter = session.get(models.Counter, 1)
                assert counter is not None
                if len(attempts) == 1:
                    interfere()
                counter.value += 1
                session.flush()
                return int(counter.value)

            result = db.sync.run_transaction(
                sync_work, isolation_level="REPEATABLE READ", retry_if=lambda e: note(e)
            )
        assert attempts == [1, 2]
        assert result == 101
        assert len(failures) == 1
        assert is_retryable(failures[0])
        assert isinstance(failures[0], DBAPIError)
        assert getattr(failures[0].orig, "sqlstate", None) == "40001"
    finally:
        models.metadata.drop_all(other)
        other.dispose()
        await db.dispose()


@pytest.mark.parametrize("twin", TWINS)
async def test_sqlite_busy_is_retried(twin: str, tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    db = SessionFactory(f"sqlite:///{path}", sqlite_busy_timeout=0)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock
    seen: list[bool] = []

    def release(exc: BaseException) -> None:
        seen.append(is_retryable(exc))
        blocker.execute("ROLLBACK")

    try:
        if twin == "async":

            async def work(session: AsyncSession) -> int:
                return int(await session.scalar(text("SELECT 41 + 1")))

            result = await db.run_transaction(work, retry_if=lambda e: release(e), backoff=0)
        else:
            result = db.sync.run_transaction(
                lambda session: int(session.scalar(text("SELECT 41 + 1"))),
                retry_if=lambda e: release(e),
                backoff=0,
            )
        assert result == 42
        assert seen == [True]
    finally:
        blocker.close()
        await db.dispose()


@pytest.mark.parametrize("twin", TWINS)
async def test_non_retryable_error_propagates_after_one_attempt(
    twin: str, db: SessionFactory[Any], models: Models, outside: Any
) -> None:
    calls = 0
    error = ValueError("bad input")

    def fail(session: Any) -> None:
        nonlocal calls
        calls += 1
        session.add(models.Item(name=f"attempt {calls}"))
        raise error

    async def afail(session: AsyncSession) -> None:
        fail(session)

    with pytest.raises(ValueError, match="bad input") as raised:
        if twin == "async":
            await db.run_transaction(afail)
        else:
            db.sync.run_transaction(fail)
    assert raised.value is error
    assert calls == 1
    assert count_rows(outside, models.item) == 0


@pytest.mark.parametrize("twin", TWINS)
async def test_retries_run_out_into_retry_exhausted_error(
    twin: str, db: SessionFactory[Any], models: Models, outside: Any
) -> None:
    errors: list[Flaky] = []

    def flaky(session: Any) -> None:
        session.add(models.Item(name=f"attempt {len(errors)}"))
        errors.append(Flaky(len(errors)))
        raise errors[-1]

    async def aflaky(session: AsyncSession) -> None:
        flaky(session)

    def retry_if(exc: BaseException) -> bool | None:
        return True if isinstance(exc, Flaky) else None

    with pytest.raises(RetryExhaustedError, match="failed 3 times") as raised:
        if twin == "async":
            await db.run_transaction(aflaky, retries=2, backoff=0, retry_if=retry_if)
        else:
            db.sync.run_transaction(flaky, retries=2, backoff=0, retry_if=retry_if)
    assert raised.value.attempts == 3
    assert raised.value.last_error is errors[-1]
    assert len(errors) == 3
    assert count_rows(outside, models.item) == 0
    assert db.status().checked_out == 0


@pytest.mark.parametrize("twin", TWINS)
async def test_run_transaction_commits_and_returns_with_partial_kwargs(
    twin: str, db: SessionFactory[Any], models: Models, outside: Any
) -> None:
    def add(session: Any, name: str, *, suffix: str) -> str:
        session.add(models.Item(name=name + suffix))
        return name + suffix

    async def aadd(session: AsyncSession, name: str, *, suffix: str) -> str:
        return add(session, name, suffix=suffix)

    if twin == "async":
        result = await db.run_transaction(functools.partial(aadd, suffix="!"), "hello")
    else:
        result = db.sync.run_transaction(functools.partial(add, suffix="!"), "hello")
    assert result == "hello!"
    with outside.connect() as connection:
        assert connection.scalar(text(f"SELECT name FROM {models.item}")) == "hello!"


@pytest.mark.parametrize("twin", TWINS)
async def test_transactional_decorator(
    twin: str, db: SessionFactory[Any], models: Models, outside: Any
) -> None:
    if twin == "async":

        @db.transactional(retries=1)
        async def add(session: AsyncSession, name: str) -> int:
            session.add(models.Item(name=name))
            await session.flush()
            return (await session.scalar(select(func.count()).select_from(models.Item))) or 0

        assert add.__name__ == "add"
        assert await add("a") == 1
        assert await add("b") == 2
    else:

        @db.sync.transactional(retries=1)
        def sync_add(session: Session, name: str) -> int:
            session.add(models.Item(name=name))
            session.flush()
            return session.scalar(select(func.count()).select_from(models.Item)) or 0

        assert sync_add("a") == 1
        assert sync_add("b") == 2
    assert count_rows(outside, models.item) == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"retries": -1}, "retries=-1", id="retries"),
        pytest.param({"retries": 1.5}, "retries=1.5", id="retries-float"),
        pytest.param({"backoff": -0.1}, "backoff=-0.1", id="backoff"),
        pytest.param({"retry_if": "yes"}, "retry_if must be a callable", id="retry_if"),
    ],
)
def test_bad_retry_options_are_configuration_errors(options: dict[str, Any], message: str) -> None:
    db = SessionFactory("sqlite://")
    with pytest.raises(ConfigurationError, match=message):
        db.transactional(**options)
    with pytest.raises(ConfigurationError, match=message):
        db.sync.run_transaction(lambda session: None, **options)


def test_retryable_classification() -> None:
    assert is_retryable(sqlite3.OperationalError("database is locked"))
    assert not is_retryable(sqlite3.OperationalError("no such table: x"))
    assert not is_retryable(ValueError("database is locked"))


# --- issue 11: per-transaction options validated before any I/O ------------------------

PG_NOWHERE = "postgresql://app@db.invalid/shop"  # never connected to


def begin_on(twin: str, url: str, **options: Any) -> None:
    db = SessionFactory(url)
    if twin == "async":
        db.begin(**options)
    else:
        db.sync.begin(**options)


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("url", [PG_NOWHERE, "sqlite://"], ids=["postgres", "sqlite"])
@pytest.mark.parametrize(
    "timeout",
    [
        pytest.param(float("inf"), id="inf"),  # was a bare OverflowError on PostgreSQL
        pytest.param(float("nan"), id="nan"),  # bare ValueError on PostgreSQL, armed on SQLite
        pytest.param(float("-inf"), id="-inf"),
        pytest.param(2_200_000, id="past-statement_timeout-max"),  # the server refused it
        pytest.param(10**400, id="huge-int"),
    ],
)
def test_non_finite_and_too_long_timeouts_are_refused(twin: str, url: str, timeout: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"timeout=.* is invalid: expected seconds > 0"):
        begin_on(twin, url, timeout=timeout)


def test_the_longest_timeout_fits_postgres_statement_timeout() -> None:
    from sqlalchemy.engine import make_url

    from sessionforge._internal.transactions import transaction_options

    options = transaction_options(
        make_url("postgresql+asyncpg://h/d"),
        isolation_level=None,
        readonly=False,
        timeout=2147483.647,
        settings=None,
    )
    assert options is not None
    assert options.settings == (("statement_timeout", "2147483647"),)


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        pytest.param({"app.x": "a\x00b"}, r"'app.x' has a NUL character", id="nul-value"),
        pytest.param({"app.x\x00": "a"}, r"setting name 'app.x\\x00' is invalid", id="nul-name"),
        pytest.param({"app.x\n": "a"}, r"setting name 'app.x\\n' is invalid", id="newline"),
        pytest.param({"app.x": "\ud800"}, r"not valid Unicode", id="surrogate"),
        pytest.param({"app.x": float("nan")}, r"not a finite number", id="nan"),
        pytest.param({"app.x": 10**5000}, r"too large to convert", id="huge-int"),
        pytest.param({1: "a"}, r"setting name of type int is invalid", id="int-name"),
        pytest.param({"statement_timeout": "5"}, r"pass one of them", id="timeout-twice"),
    ],
)
def test_settings_the_server_would_refuse_are_refused_first(
    twin: str, settings: Any, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        begin_on(twin, PG_NOWHERE, settings=settings, timeout=1)


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"readonly": None}, r"readonly=None \(NoneType\)", id="readonly-none"),
        pytest.param({"readonly": 1}, r"readonly=1 \(int\)", id="readonly-int"),
        pytest.param({"settings": []}, r"settings must be a dict .* got list", id="empty-list"),
        pytest.param({"settings": ""}, r"settings must be a dict .* got str", id="empty-str"),
        pytest.param(
            {"isolation_level": "AUTOCOMMIT", "readonly": True}, r"AUTOCOMMIT", id="ac-ro"
        ),
        pytest.param(
            {"isolation_level": "autocommit", "settings": {"app.x": 1}}, r"AUTOCOMMIT", id="ac-s"
        ),
    ],
)
def test_options_that_would_be_silently_ignored_are_refused(
    twin: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        begin_on(twin, PG_NOWHERE, **options)


def test_backoff_must_be_finite_and_long_retry_runs_do_not_overflow() -> None:
    from sessionforge._internal.transactions import RetryPolicy

    for backoff in (float("nan"), float("inf"), 10**400):
        with pytest.raises(ConfigurationError, match=r"backoff=.* is invalid"):
            RetryPolicy.build(5, backoff, None)
    assert 0 <= RetryPolicy.build(5000, 0.05, None).delay(2000) <= 2.0


@pytest.mark.postgres
@pytest.mark.parametrize("twin", TWINS)
async def test_read_uncommitted_on_postgres_runs_as_read_committed_and_leaks_nothing(
    twin: str, pg_url: str
) -> None:
    # SQLAlchemy's asyncpg dialect refused READ UNCOMMITTED with an ArgumentError at
    # checkout and leaked the connection; PostgreSQL runs it as READ COMMITTED anyway.
    db = SessionFactory(pg_url, pool_size=1, max_overflow=0)
    try:
        level = await scalar(
            db, twin, "SHOW transaction_isolation", isolation_level="READ UNCOMMITTED"
        )
        assert level == "read committed"
        assert db.status().checked_out == 0
        assert db.sync.status().checked_out == 0
        assert await scalar(db, twin, "SELECT 1") == 1  # the one pooled connection is back
    finally:
        await db.dispose()
    engine_level = SessionFactory(pg_url, isolation_level="READ UNCOMMITTED")
    try:
        assert await scalar(engine_level, twin, "SHOW transaction_isolation") == "read committed"
        assert engine_level.status().checked_out == 0
    finally:
        await engine_level.dispose()


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"readonly": {"password": "s3cret"}}, id="readonly"),
        pytest.param({"isolation_level": {"password": "s3cret"}}, id="isolation_level"),
        pytest.param({"timeout": "postgresql://u:s3cret@h/db"}, id="timeout"),
    ],
)
def test_ill_typed_transaction_options_are_not_echoed(options: dict[str, Any]) -> None:
    # Found by tests/test_properties.py: the values were shown with repr().
    with pytest.raises(ConfigurationError, match="is invalid") as raised:
        SessionFactory("sqlite://").begin(**options)
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize("twin", ["async", "sync"])
async def test_atomic_durable_must_be_a_bool_on_every_path(twin: str) -> None:
    db = SessionFactory("sqlite://")
    with pytest.raises(ConfigurationError, match=r"durable='yes' \(str\) is invalid"):
        if twin == "async":
            async with db.atomic(durable="yes"):  # type: ignore[arg-type]
                pass
        else:
            with db.sync.atomic(durable="yes"):  # type: ignore[arg-type]
                pass
    assert db.status().sessions_open == 0


@pytest.mark.parametrize("option", [{"readonly": True}, {"settings": {"work_mem": "64MB"}}])
def test_options_an_autocommit_engine_would_ignore_are_refused(option: dict[str, Any]) -> None:
    db = SessionFactory("postgresql://app@127.0.0.1/app", isolation_level="AUTOCOMMIT")
    for factory in (db, db.sync):
        with pytest.raises(ConfigurationError, match="engine runs in AUTOCOMMIT"):
            factory.begin(**option)
    # naming a level for the transaction is fine
    db.begin(isolation_level="SERIALIZABLE", **option)
