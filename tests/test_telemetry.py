"""``sessionforge.telemetry.instrument``: pool metrics, transaction spans, counters.

Against the real OpenTelemetry SDK (``InMemoryMetricReader``, ``InMemorySpanExporter``)
on every backend, through both twins; statement spans come from OpenTelemetry's
SQLAlchemy instrumentation, as a user would install it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionforge import AsyncBeginContext, SessionFactory, SyncBeginContext
from sessionforge.errors import ConfigurationError
from sessionforge.telemetry import instrument

from .conftest import DbMaker, count_rows
from .models import Models
from .test_readme import block_tested_by

TWINS = [pytest.param("async", id="async"), pytest.param("sync", id="sync")]
TRANSACTION = "sessionforge.transaction"
#: The isolation level a transaction runs at when nobody chose one: the server's.
DEFAULT_LEVELS = {
    "sqlite-file": "SERIALIZABLE",
    "sqlite-memory": "SERIALIZABLE",
    "postgres": "READ COMMITTED",
    "mysql": "REPEATABLE READ",
}


class Conflict(Exception):
    """A failure the tests' ``retry_if`` calls retryable."""


@dataclass
class Otel:
    """An SDK tracer provider and meter provider with in-memory exporters."""

    tracer_provider: TracerProvider
    exporter: InMemorySpanExporter
    meter_provider: MeterProvider
    reader: InMemoryMetricReader

    def instrument(self, db: Any) -> None:
        instrument(db, meter_provider=self.meter_provider, tracer_provider=self.tracer_provider)

    def spans(self, name: str | None = TRANSACTION) -> list[ReadableSpan]:
        found = self.exporter.get_finished_spans()
        return [span for span in found if name is None or span.name == name]

    def points(self, metric: str) -> list[tuple[dict[str, Any], Any]]:
        """(attributes, value or histogram count) of each point of ``metric`` now."""
        data = self.reader.get_metrics_data()
        found = []
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for each in scope.metrics:
                    if each.name == metric:
                        for point in each.data.data_points:
                            value = point.value if hasattr(point, "value") else point.count
                            found.append((dict(point.attributes or {}), value))
        return found

    def value(self, metric: str, **attributes: str) -> Any:
        """The one point of ``metric`` with these attributes (0 if none)."""
        wanted = {key.replace("_", "."): value for key, value in attributes.items()}
        matches = [v for a, v in self.points(metric) if wanted.items() <= a.items()]
        assert len(matches) <= 1, (metric, self.points(metric))
        return matches[0] if matches else 0


@pytest.fixture
def otel() -> Iterator[Otel]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider(shutdown_on_exit=False)
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    yield Otel(tracer_provider, exporter, meter_provider, reader)
    meter_provider.shutdown()
    tracer_provider.shutdown()


@pytest.fixture
def trace_statements(otel: Otel) -> Iterator[Callable[..., None]]:
    """OpenTelemetry's SQLAlchemy instrumentation on the given engines, removed after."""
    instrumentor = SQLAlchemyInstrumentor()

    def install(*engines: Engine) -> None:
        instrumentor.instrument(
            engines=list(engines), tracer_provider=otel.tracer_provider, skip_dep_check=True
        )

    yield install
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()


def factory_of(db: SessionFactory[Any], twin: str) -> Any:
    return db if twin == "async" else db.sync


def engine_of(db: SessionFactory[Any], twin: str) -> Engine:
    return db.engine.sync_engine if twin == "async" else db.sync.engine


async def in_transaction(
    db: SessionFactory[Any], twin: str, work: Callable[[Session], Any]
) -> Any:
    """Run ``work(session)`` in ``begin()`` of ``twin`` (async: in SQLAlchemy's greenlet)."""
    if twin == "async":
        async with db.begin() as session:
            return await session.run_sync(work)
    with db.sync.begin() as session:
        return work(session)


def expected_pool_name(db: SessionFactory[Any], backend: str) -> str:
    url = make_url(str(db.config.url))
    if backend == "sqlite-memory":
        return ":memory:"
    if backend == "sqlite-file":
        return str(url.database)
    default = {"postgres": 5432, "mysql": 3306}[backend]
    return f"{url.host}:{url.port or default}/{url.database}"


def child_of(span: ReadableSpan, parent: ReadableSpan) -> bool:
    return span.parent is not None and span.parent.span_id == parent.context.span_id


# --- without instrument() --------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_importing_sessionforge_imports_no_opentelemetry() -> None:
    done = run_python(
        "import sys, sessionforge, sessionforge.factory, sessionforge.sync\n"
        "db = sessionforge.SessionFactory('sqlite://')\n"
        "with db.sync.begin() as s: pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_without_opentelemetry_the_error_names_the_extra() -> None:
    done = run_python(
        "import sys\n"
        "sys.modules['opentelemetry'] = None\n"
        "import sessionforge\n"
        "import sessionforge.telemetry"
    )
    assert done.returncode == 1
    assert "ImportError: sessionforge.telemetry needs the OpenTelemetry API: " in done.stderr
    assert "pip install 'sessionforge[otel]'" in done.stderr


async def test_a_factory_not_instrumented_records_nothing_and_listens_to_nothing(
    db: SessionFactory[Any], make_db: DbMaker, otel: Otel, models: Models
) -> None:
    other = await make_db()  # on the same database, never instrumented
    otel.instrument(db)
    assert type(other.begin()) is AsyncBeginContext
    assert type(other.sync.begin()) is SyncBeginContext
    async with other.begin() as session:
        session.add(models.Item(name="quiet"))
    with other.sync.begin() as sync_session:
        sync_session.execute(text("SELECT 1"))

    assert otel.spans(None) == []
    assert otel.points("db.client.connection.wait_time") == []
    assert otel.value("sessionforge.commits") == 0  # `db`'s counter: other's commits not in it
    with db.sync.begin() as watched:  # builds `db`'s sync engine: its pool is watched
        watched.execute(text("SELECT 1"))
    for twin in ("async", "sync"):
        quiet, counted = engine_of(other, twin).pool, engine_of(db, twin).pool
        assert "connect" not in vars(quiet)
        assert "connect" in vars(counted)
        assert len(quiet.dispatch.checkin) == len(counted.dispatch.checkin) - 1  # our listener


def test_instrument_takes_a_factory() -> None:
    with pytest.raises(ConfigurationError, match=r"takes a SessionFactory .*got str"):
        instrument("sqlite://")  # type: ignore[arg-type]


# --- spans ---------------------------------------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
async def test_statement_spans_nest_under_the_transaction_span(
    backend: str,
    twin: str,
    db: SessionFactory[Any],
    models: Models,
    otel: Otel,
    trace_statements: Callable[..., None],
) -> None:
    otel.instrument(db)
    trace_statements(engine_of(db, twin))
    item = models.Item

    def work(session: Session) -> int:
        session.add(item(name="traced"))
        session.flush()
        return len(session.scalars(select(item)).all())

    assert await in_transaction(db, twin, work) == 1

    [transaction] = otel.spans()
    assert transaction.attributes == {
        "sessionforge.transaction.attempt": 1,
        "sessionforge.transaction.outcome": "committed",
        "sessionforge.transaction.route": "primary",
        "sessionforge.transaction.isolation_level": DEFAULT_LEVELS[backend],
        "db.client.connection.pool.name": expected_pool_name(db, backend),
    }
    statements = [
        span
        for span in otel.spans(None)
        if models.item in str((span.attributes or {}).get("db.statement", ""))
    ]
    assert len(statements) == 2  # the INSERT and the SELECT
    assert all(child_of(span, transaction) for span in statements)
    assert transaction.parent is None


async def test_statements_in_sqlalchemys_greenlet_see_the_transaction_span(
    db: SessionFactory[Any], otel: Otel
) -> None:
    """The async twin's statements run in a greenlet: the span (a contextvar) reaches it."""
    otel.instrument(db)
    async with db.begin() as session:
        outside = trace.get_current_span()
        inside = await session.run_sync(lambda _: trace.get_current_span())
    [transaction] = otel.spans()
    assert inside is outside
    assert inside.get_span_context().span_id == transaction.context.span_id
    assert trace.get_current_span() is trace.INVALID_SPAN  # detached at exit


@pytest.mark.parametrize("twin", TWINS)
async def test_a_retried_run_transaction_has_a_span_per_attempt(
    twin: str, db: SessionFactory[Any], models: Models, otel: Otel, outside: Engine
) -> None:
    otel.instrument(db)
    attempts: list[int] = []

    def work(session: Session) -> None:
        attempts.append(1)
        session.add(models.Item(name=f"try{len(attempts)}"))
        session.flush()
        if len(attempts) == 1:
            raise Conflict("make me retry")

    options: dict[str, Any] = {"retry_if": lambda exc: isinstance(exc, Conflict), "backoff": 0}
    if twin == "async":

        async def run(session: AsyncSession) -> None:
            await session.run_sync(work)

        await db.run_transaction(run, **options)
    else:
        db.sync.run_transaction(work, **options)

    first, second = otel.spans()
    assert first.attributes is not None
    assert second.attributes is not None
    assert first.attributes["sessionforge.transaction.attempt"] == 1
    assert first.attributes["sessionforge.transaction.outcome"] == "error"
    assert first.attributes["error.type"] == f"{__name__}.Conflict"
    assert first.status.status_code is trace.StatusCode.ERROR
    assert second.attributes["sessionforge.transaction.attempt"] == 2
    assert second.attributes["sessionforge.transaction.outcome"] == "committed"
    assert count_rows(outside, models.item) == 1
    assert otel.value("sessionforge.retries") == 1
    assert otel.value("sessionforge.commits") == 1
    assert otel.value("sessionforge.rollbacks") == 1


@pytest.mark.parametrize("twin", TWINS)
async def test_outcomes_and_levels_of_transactions(
    backend: str, twin: str, db: SessionFactory[Any], models: Models, otel: Otel
) -> None:
    otel.instrument(db)
    factory = factory_of(db, twin)

    async def block(work: Callable[[Session], object], **options: Any) -> None:
        if twin == "async":
            async with factory.begin(**options) as session:
                await session.run_sync(work)
        else:
            with factory.begin(**options) as session:
                work(session)

    def fail(session: Session) -> None:
        session.execute(text("SELECT 1"))
        raise ValueError("the application failed")

    with pytest.raises(ValueError, match="the application failed"):
        await block(fail)
    await block(lambda session: session.rollback())
    level = "SERIALIZABLE" if backend.startswith("sqlite") else "REPEATABLE READ"
    await block(lambda session: session.execute(text("SELECT 1")), isolation_level=level)

    failed, rolled_back, chosen = (span.attributes or {} for span in otel.spans())
    assert failed["sessionforge.transaction.outcome"] == "error"
    assert failed["error.type"] == "ValueError"
    assert rolled_back["sessionforge.transaction.outcome"] == "rolled_back"
    assert "error.type" not in rolled_back
    assert chosen["sessionforge.transaction.outcome"] == "committed"
    assert chosen["sessionforge.transaction.isolation_level"] == level
    assert otel.value("sessionforge.rollbacks") == 1  # the failed one (the other ran nothing)


@pytest.mark.parametrize("twin", TWINS)
async def test_atomic_and_transactional_make_one_span_per_transaction(
    twin: str, db: SessionFactory[Any], models: Models, otel: Otel
) -> None:
    otel.instrument(db)
    item = models.Item
    if twin == "async":
        async with db.atomic() as session:
            async with db.atomic():  # a SAVEPOINT: no transaction of its own
                session.add(item(name="nested"))

        @db.transactional()
        async def add(session: AsyncSession, name: str) -> None:
            session.add(item(name=name))

        await add("decorated")
    else:
        with db.sync.atomic() as sync_session:
            with db.sync.atomic():
                sync_session.add(item(name="nested"))

        @db.sync.transactional()
        def add_sync(session: Session, name: str) -> None:
            session.add(item(name=name))

        add_sync("decorated")
    spans = otel.spans()
    assert [(s.attributes or {})["sessionforge.transaction.outcome"] for s in spans] == [
        "committed",
        "committed",
    ]
    assert otel.value("sessionforge.commits") == 2


# --- pool metrics ------------------------------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
async def test_pool_metrics_follow_the_connections(
    backend: str, twin: str, db: SessionFactory[Any], otel: Otel
) -> None:
    otel.instrument(db)
    name = expected_pool_name(db, backend)
    pool = {"db_client_connection_pool_name": name}

    def during(session: Session) -> tuple[int, int]:
        session.execute(text("SELECT 1"))
        return (
            otel.value("db.client.connection.count", **pool, db_client_connection_state="used"),
            otel.value("db.client.connection.pending_requests", **pool),
        )

    used, pending = await in_transaction(db, twin, during)
    assert (used, pending) == (1, 0)
    await in_transaction(db, twin, lambda session: session.execute(text("SELECT 1")))

    assert otel.value("db.client.connection.count", **pool, db_client_connection_state="used") == 0
    assert otel.value("db.client.connection.count", **pool, db_client_connection_state="idle") >= 1
    assert otel.value("db.client.connection.wait_time", **pool) == 2  # one per checkout
    assert otel.value("db.client.connection.use_time", **pool) == 2
    most = sum((e.size or 0) + (e.max_overflow or 0) for e in db.status().engines)
    assert otel.value("db.client.connection.max", **pool) == most
    assert otel.value("db.client.connection.timeouts", **pool) == 0
    shown = repr(otel.reader.get_metrics_data())
    assert "postgres@" not in shown
    assert "root@" not in shown


@pytest.mark.parametrize("twin", TWINS)
async def test_a_pool_timeout_is_counted(
    backend: str, twin: str, make_db: DbMaker, otel: Otel
) -> None:
    db = await make_db(pool_size=1, max_overflow=0, pool_timeout=0.05)
    otel.instrument(db)
    pool = {"db_client_connection_pool_name": expected_pool_name(db, backend)}

    def hold(session: Session) -> None:
        session.execute(text("SELECT 1"))
        with pytest.raises(PoolTimeoutError), db.sync.begin() as other:
            other.execute(text("SELECT 1"))

    if twin == "async":
        async with db.begin() as holder:
            await holder.execute(text("SELECT 1"))
            with pytest.raises(PoolTimeoutError):
                async with db.begin() as other:
                    await other.execute(text("SELECT 1"))
    else:
        with db.sync.begin() as sync_holder:
            hold(sync_holder)

    assert otel.value("db.client.connection.timeouts", **pool) == 1
    assert otel.value("db.client.connection.pending_requests", **pool) == 0
    timed_out = (otel.spans()[0].attributes or {})["error.type"]
    assert timed_out == "sqlalchemy.exc.TimeoutError"


async def test_instrument_twice_changes_nothing(db: SessionFactory[Any], otel: Otel) -> None:
    otel.instrument(db)
    pool = db.engine.sync_engine.pool
    wrapped, listeners = pool.connect, len(pool.dispatch.checkin)
    second = Otel(
        TracerProvider(shutdown_on_exit=False),
        InMemorySpanExporter(),
        otel.meter_provider,
        otel.reader,
    )
    instrument(db)
    second.instrument(db.sync)
    otel.instrument(db)
    async with db.begin() as session:
        await session.execute(text("SELECT 1"))
    with db.sync.begin() as sync_session:
        sync_session.execute(text("SELECT 1"))

    assert len(otel.spans()) == 2
    assert pool.connect is wrapped
    assert len(pool.dispatch.checkin) == listeners
    assert otel.value("db.client.connection.wait_time") == 2  # not once per instrument()


def test_the_sqlalchemy_instrumentation_needs_skip_dep_check(
    otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    """The trap docs/telemetry.md warns of: 0.66b2 declares sqlalchemy<2.1."""
    instrumentor = SQLAlchemyInstrumentor()
    db = SessionFactory("sqlite://")
    assert (
        instrumentor.instrument(engine=db.sync.engine, tracer_provider=otel.tracer_provider)
        is None
    )
    assert not instrumentor.is_instrumented_by_opentelemetry
    assert "falls outside of that range, so nothing can be instrumented" in caplog.text
    db.sync.dispose()


@pytest.mark.parametrize(
    ("url", "name"),
    [
        pytest.param("postgresql://app:secret@db.internal/shop", "db.internal:5432/shop", id="pg"),
        pytest.param("postgresql+asyncpg://app:pw@db:6432/shop", "db:6432/shop", id="port"),
        pytest.param("mysql://root:pw@maria/test", "maria:3306/test", id="mysql"),
        pytest.param(
            "postgresql://app:pw@/shop?host=db1:5432&host=db2:5433",
            "db1:5432,db2:5433/shop",
            id="hosts",
        ),
        pytest.param("sqlite:///var/app.db", "var/app.db", id="sqlite-file"),
        pytest.param("sqlite://", ":memory:", id="sqlite-memory"),
    ],
)
def test_pool_names_are_host_port_database(url: str, name: str) -> None:
    from sessionforge._internal.telemetry import pool_name

    assert pool_name(make_url(url)) == name


def test_each_event_loops_engine_is_counted_from_its_first_checkout(
    tmp_path: Path, otel: Otel
) -> None:
    db = SessionFactory(f"sqlite:///{tmp_path / 'loops.db'}")
    otel.instrument(db)

    async def work() -> None:
        async with db.begin() as session:
            await session.execute(text("SELECT 1"))

    asyncio.run(work())  # each run is a new loop, with an engine of its own
    asyncio.run(work())
    pool = {"db_client_connection_pool_name": str(tmp_path / "loops.db")}
    assert otel.value("db.client.connection.wait_time", **pool) == 2
    assert otel.value("db.client.connection.use_time", **pool) == 2
    assert len(otel.spans()) == 2


@pytest.mark.postgres
async def test_replica_reads_and_primary_fallbacks(otel: Otel) -> None:
    from .pgcluster import replicated_postgres

    with replicated_postgres(replicas=1) as cluster:
        [replica] = cluster.replicas
        db = SessionFactory(cluster.primary.url, replicas=[replica.url], replica_wait=0.05)
        primary_name = f"127.0.0.1:{cluster.primary.port}/postgres"
        replica_name = f"127.0.0.1:{replica.port}/postgres"
        otel.instrument(db)
        try:
            async with db.begin(readonly=True) as session:
                assert (await session.execute(text("SELECT pg_is_in_recovery()"))).scalar()
            cluster.pause_replay(replica)
            async with db.begin() as session:
                await session.execute(text("CREATE TABLE t_written (id int)"))
            async with db.begin(readonly=True) as session:  # the replica lacks the write
                assert not (await session.execute(text("SELECT pg_is_in_recovery()"))).scalar()
            cluster.resume_replay(replica)
        finally:
            await db.dispose()

    on_replica, write, fallback = (span.attributes or {} for span in otel.spans())
    assert on_replica["sessionforge.transaction.route"] == "replica"
    assert on_replica["db.client.connection.pool.name"] == replica_name
    assert write["sessionforge.transaction.route"] == "primary"
    assert fallback["sessionforge.transaction.route"] == "primary"
    assert fallback["db.client.connection.pool.name"] == primary_name
    assert (
        otel.value("sessionforge.replica_reads", db_client_connection_pool_name=replica_name) == 1
    )
    assert (
        otel.value("sessionforge.primary_fallbacks", db_client_connection_pool_name=primary_name)
        == 1
    )


async def test_the_readme_telemetry_block_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    block = block_tested_by("tests/test_telemetry.py::test_the_readme_telemetry_block_runs")
    namespace: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), namespace)
    try:
        await namespace["main"]()
    finally:
        await namespace["db"].dispose()
    assert capsys.readouterr().out == (
        "['db.client.connection.count', 'db.client.connection.max', "
        "'db.client.connection.pending_requests', 'db.client.connection.use_time', "
        "'db.client.connection.wait_time']\n"
    )


@pytest.mark.parametrize("when", ["before", "after"])
def test_the_instrumentor_traces_every_engine_whenever_sessionforge_was_imported(
    tmp_path: Path, when: str
) -> None:
    """docs/telemetry.md's recipe: engines of later event loops and the sync twin too,
    with the instrumentor installed before sessionforge is imported or after."""
    early = "import sessionforge" if when == "after" else ""
    done = run_python(
        textwrap.dedent(
            f"""
            import asyncio
            {early}
            from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
                InMemorySpanExporter,
            )

            exporter, tracers = InMemorySpanExporter(), TracerProvider()
            tracers.add_span_processor(SimpleSpanProcessor(exporter))
            SQLAlchemyInstrumentor().instrument(tracer_provider=tracers, skip_dep_check=True)

            from sqlalchemy import text
            from sessionforge import SessionFactory
            from sessionforge.telemetry import instrument

            db = SessionFactory({f"sqlite:///{tmp_path / 'early.db'}"!r})
            instrument(db, tracer_provider=tracers)

            async def work():
                async with db.begin() as session:
                    await session.execute(text("SELECT 42"))

            asyncio.run(work())
            asyncio.run(work())  # another loop, another engine
            with db.sync.begin() as session:
                session.execute(text("SELECT 43"))
            spans = exporter.get_finished_spans()
            blocks = {{s.context.span_id for s in spans if s.name == "sessionforge.transaction"}}
            print(len(blocks), sorted(
                (s.attributes["db.statement"], s.parent.span_id in blocks)
                for s in spans if s.attributes.get("db.statement", "").startswith("SELECT")
            ))
            """
        )
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "3 [('SELECT 42', True), ('SELECT 42', True), ('SELECT 43', True)]\n"
