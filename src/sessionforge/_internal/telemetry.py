"""OpenTelemetry for one factory pair: pool metrics, a span per transaction attempt, counters.

Made by ``sessionforge.telemetry.instrument`` (which checks that opentelemetry-api is
installed); nothing else imports this module, so a factory that is not instrumented
carries no listener and no span: its twins make the plain ``begin()`` contexts, and
the only cost is the check of ``FactoryStats.async_context`` (or ``sync_context``).

**Pools.** A pool is watched from the first transaction of one of the factory's
sessions that uses it (``after_transaction_create`` sees the session's engine before
the checkout; ``after_begin`` the replica's or bind's engine a session routed to), and
the engines already built when ``instrument`` runs are watched at once. A watched pool's
``connect()`` is wrapped on the instance (as ``sqla.wrap_connect`` wraps the dialect's):
the wait for a connection, the requests waiting now and the checkouts that timed out
(``sqlalchemy.exc.TimeoutError``) are counted there, because no pool event fires when a
checkout starts; a ``checkin`` listener times the use. Connections, idle and used, and
the pool's maximum are read from the pools when the metrics are collected.

**Instruments** exist once per ``MeterProvider`` (``_Instruments``): the SDK returns an
instrument registered twice without its new callbacks, so one callback per instrument
sums the figures of every instrumented factory, per pool name (both twins' pools and
every event loop's pool of one database are one figure).
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Final

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, Status, StatusCode
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.pool import Pool

from sessionforge import __version__, dialects

from . import sqla as _sqla
from .begin import AsyncBeginContext, SyncBeginContext

if TYPE_CHECKING:
    from .core import FactoryCore
    from .state import SessionState
    from .transactions import TransactionOptions

__all__ = ["Telemetry", "pool_name"]

logger = logging.getLogger("sessionforge.telemetry")

#: The semantic conventions the names follow (the database-client metrics of 1.26).
SCHEMA_URL: Final = "https://opentelemetry.io/schemas/1.26.0"
SPAN_NAME: Final = "sessionforge.transaction"
POOL_NAME: Final = "db.client.connection.pool.name"
STATE: Final = "db.client.connection.state"
OUTCOME: Final = "sessionforge.transaction.outcome"
ATTEMPT: Final = "sessionforge.transaction.attempt"
ISOLATION: Final = "sessionforge.transaction.isolation_level"
ROUTE: Final = "sessionforge.transaction.route"
ERROR_TYPE: Final = "error.type"
#: The semantic conventions' advice for connection times, in seconds.
_TIME_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
#: Where a connection's checkout time waits for its checkin (the pool entry's info).
_CHECKED_OUT: Final = "sessionforge_checked_out"

Attributes = dict[str, str]


def pool_name(url: URL) -> str:
    """``host:port/database`` (never the user or password); SQLite: its file or ``:memory:``."""
    if dialects.is_sqlite(url):
        return ":memory:" if dialects.is_memory_sqlite(url) else str(url.database)
    hosts = url.query.get("host") if url.host is None else None
    if isinstance(hosts, tuple):  # several PostgreSQL hosts, every port written out
        where = ",".join(hosts)
    else:
        port = url.port or dialects.default_port(url)
        where = f"{url.host or 'localhost'}" + ("" if port is None else f":{port}")
    return f"{where}/{url.database or ''}"


class _Instruments:
    """The instruments of one ``MeterProvider``, and the factories they report."""

    def __init__(self, provider: metrics.MeterProvider) -> None:
        meter = provider.get_meter("sessionforge", __version__, schema_url=SCHEMA_URL)
        self.factories: weakref.WeakSet[Telemetry] = weakref.WeakSet()
        pools = functools.partial(self._pool_figures, "count")
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            [pools],
            unit="{connection}",
            description="Connections in the pool now, by state (idle, used)",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.max",
            [functools.partial(self._pool_figures, "max")],
            unit="{connection}",
            description="The most connections the pool allows (size + max_overflow)",
        )
        self.pending = meter.create_up_down_counter(
            "db.client.connection.pending_requests",
            unit="{request}",
            description="Checkouts waiting for a connection now",
        )
        self.timeouts = meter.create_counter(
            "db.client.connection.timeouts",
            unit="{timeout}",
            description="Checkouts that waited pool_timeout and failed",
        )
        self.wait_time = meter.create_histogram(
            "db.client.connection.wait_time",
            unit="s",
            description="The time a checkout took to obtain a connection",
            explicit_bucket_boundaries_advisory=_TIME_BUCKETS,
        )
        self.use_time = meter.create_histogram(
            "db.client.connection.use_time",
            unit="s",
            description="The time from a checkout to its checkin",
            explicit_bucket_boundaries_advisory=_TIME_BUCKETS,
        )
        for name, unit, description in _COUNTERS:
            meter.create_observable_counter(
                name,
                [functools.partial(self._counter_figures, name)],
                unit=unit,
                description=description,
            )

    def _pool_figures(self, which: str, _options: CallbackOptions) -> Iterator[Observation]:
        totals: dict[tuple[str, str], int] = {}
        for telemetry in list(self.factories):
            for name, idle, used, most in telemetry.pool_figures():
                if which == "count":
                    for state, value in (("idle", idle), ("used", used)):
                        totals[name, state] = totals.get((name, state), 0) + value
                elif most is not None:
                    totals[name, ""] = totals.get((name, ""), 0) + most
        for (name, state), value in totals.items():
            attributes = {POOL_NAME: name, STATE: state} if state else {POOL_NAME: name}
            yield Observation(value, attributes)

    def _counter_figures(self, which: str, _options: CallbackOptions) -> Iterator[Observation]:
        totals: dict[str, int] = {}
        for telemetry in list(self.factories):
            for name, value in telemetry.counter_figures(which):
                totals[name] = totals.get(name, 0) + value
        for name, value in totals.items():
            yield Observation(value, {POOL_NAME: name} if name else {})


#: The counters read from ``FactoryStats`` and the replicas: (name, unit, description).
_COUNTERS: Final = (
    ("sessionforge.commits", "{transaction}", "Transactions committed"),
    ("sessionforge.rollbacks", "{transaction}", "Transactions rolled back"),
    ("sessionforge.retries", "{transaction}", "Transactions run_transaction re-ran"),
    ("sessionforge.replica_reads", "{session}", "Routed sessions a replica served"),
    ("sessionforge.primary_fallbacks", "{session}", "Routed sessions the primary served"),
)
_INSTRUMENTS: weakref.WeakKeyDictionary[metrics.MeterProvider, _Instruments] = (
    weakref.WeakKeyDictionary()
)
_LOCK = threading.Lock()


def _instruments(provider: metrics.MeterProvider) -> _Instruments:
    with _LOCK:
        made = _INSTRUMENTS.get(provider)
        if made is None:
            made = _INSTRUMENTS[provider] = _Instruments(provider)
        return made


class Telemetry:
    """One factory pair's telemetry (module docstring); ``FactoryStats.telemetry``."""

    def __init__(
        self,
        core: FactoryCore[Any],
        meter_provider: metrics.MeterProvider | None,
        tracer_provider: trace.TracerProvider | None,
    ) -> None:
        self.core = core
        self.instruments = _instruments(meter_provider or metrics.get_meter_provider())
        self.tracer = trace.get_tracer(
            "sessionforge", __version__, tracer_provider, schema_url=SCHEMA_URL
        )
        #: The watched pools and their attributes (a disposed engine's pool goes).
        self.pools: weakref.WeakKeyDictionary[Pool, Attributes] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        attributes = {"_telemetry": self, "__slots__": ()}
        self.async_context = type("TracedAsyncBeginContext", (_TracedAsync,), attributes)
        self.sync_context = type("TracedSyncBeginContext", (_TracedSync,), attributes)

    def install(self) -> None:
        """Start: watch the built engines and the sessions' transactions, trace begin()."""
        core = self.core
        for engine in _built_engines(core):
            self.watch(engine)
        event.listen(core.sync_class, "after_transaction_create", self._transaction_created)
        event.listen(core.sync_class, "after_begin", self._began)
        self.instruments.factories.add(self)
        stats = core.stats
        stats.async_context, stats.sync_context = self.async_context, self.sync_context
        stats.telemetry = self

    # pools -------------------------------------------------------------------------

    def watch(self, engine: Engine) -> Attributes:
        """Count ``engine``'s pool from now on (once); return its attributes."""
        pool = engine.pool
        attributes = self.pools.get(pool)
        if attributes is not None:
            return attributes
        with self._lock:
            attributes = self.pools.get(pool)
            if attributes is None:
                attributes = {POOL_NAME: pool_name(engine.url)}
                self._wrap_connect(pool, attributes)
                # A disposed engine's new pool inherits the listener (Pool.recreate).
                if not event.contains(pool, "checkin", self._checked_in):
                    event.listen(pool, "checkin", self._checked_in)
                self.pools[pool] = attributes
        return attributes

    def _wrap_connect(self, pool: Pool, attributes: Attributes) -> None:
        connect = pool.connect
        instruments = self.instruments

        def counted_connect() -> Any:
            started = time.perf_counter()
            instruments.pending.add(1, attributes)
            try:
                proxied = connect()
            except PoolTimeoutError:
                instruments.timeouts.add(1, attributes)
                raise
            finally:
                instruments.pending.add(-1, attributes)
            now = time.perf_counter()
            instruments.wait_time.record(now - started, attributes)
            proxied.info[_CHECKED_OUT] = (now, attributes)  # the checkin listener's
            return proxied

        pool.connect = counted_connect  # type: ignore[method-assign]

    def _checked_in(self, _dbapi_connection: Any, record: Any) -> None:
        stamp = record.info.pop(_CHECKED_OUT, None)
        if stamp is not None:
            self.instruments.use_time.record(time.perf_counter() - stamp[0], stamp[1])

    def _transaction_created(self, session: Session, transaction: SessionTransaction) -> None:
        engine = getattr(session.bind, "engine", None)  # an Engine's is itself
        if transaction.parent is None and isinstance(engine, Engine):
            self.watch(engine)

    def _began(self, _session: Session, transaction: SessionTransaction, connection: Any) -> None:
        if transaction.parent is None:
            self.watch(connection.engine)

    def pool_figures(self) -> Iterator[tuple[str, int, int, int | None]]:
        """(pool name, idle, used, most allowed or None) of each watched pool."""
        with self._lock:
            watched = list(self.pools.items())
        for pool, attributes in watched:
            used = _figure(pool, "checkedout")
            if used is None:
                continue  # a pool without figures (NullPool, StaticPool)
            size, overflow = _figure(pool, "size"), _sqla.pool_max_overflow(pool)
            most = None if size is None or overflow is None or overflow < 0 else size + overflow
            yield attributes[POOL_NAME], _figure(pool, "checkedin") or 0, used, most

    def counter_figures(self, which: str) -> Iterable[tuple[str, int]]:
        """(pool name, value) of the counter ``which`` (see ``_COUNTERS``)."""
        core = self.core
        url = core.config.url
        primary = "" if url is None else pool_name(url)
        replicas = core.replicas
        if which == "sessionforge.replica_reads":
            found = replicas.replicas if replicas is not None else ()
            return [(pool_name(r.url), next(copy.copy(r.reads))) for r in found]
        if which == "sessionforge.primary_fallbacks":
            return [] if replicas is None else [(primary, replicas.fallbacks)]
        counters = core.stats.snapshot()
        value = {
            "sessionforge.commits": counters.transactions_committed,
            "sessionforge.rollbacks": counters.transactions_rolled_back,
            "sessionforge.retries": counters.transactions_retried,
        }[which]
        return [(primary, value)]

    # spans -------------------------------------------------------------------------

    def start(self, attempt: int) -> tuple[Span, object]:
        """A transaction attempt's span, made the current one (the token restores)."""
        span = self.tracer.start_span(SPAN_NAME, attributes={ATTEMPT: attempt})
        return span, otel_context.attach(trace.set_span_in_context(span))

    def describe(self, span: Span, session: Session, options: TransactionOptions | None) -> None:
        """The route and isolation level of ``session``'s transaction, before it ends.

        Telemetry must never stand between a block and its COMMIT: a failure here is
        logged, and the transaction ends as it would have.
        """
        try:
            self._describe(span, session, options)
        except Exception:
            logger.warning("could not describe a transaction's span", exc_info=True)

    def _describe(self, span: Span, session: Session, options: TransactionOptions | None) -> None:
        state: SessionState = session._sessionforge_state  # type: ignore[attr-defined]
        route = state.route
        span.set_attribute(ROUTE, "replica" if route and route.replica else "primary")
        engine = state.engine if state.connected is not None else None
        if engine is not None:
            span.set_attributes(self.watch(engine))
        config = self.core.config
        dialect = getattr(engine or session.bind, "dialect", None)
        level = (
            (options.execution_options.get("isolation_level") if options is not None else None)
            or config.isolation_level
            or config.engine_options.get("isolation_level")
            or getattr(dialect, "default_isolation_level", None)  # the server's, once known
        )
        if level:
            span.set_attribute(ISOLATION, str(level))


def finish(span: Span, token: object, error: BaseException | None, committed: bool) -> None:
    """End an attempt's span with its outcome, and make the previous span current again."""
    if error is None:
        span.set_attribute(OUTCOME, "committed" if committed else "rolled_back")
    else:
        kind = type(error)
        name = kind.__qualname__
        if kind.__module__ != "builtins":
            name = f"{kind.__module__}.{name}"
        span.set_attributes({OUTCOME: "error", ERROR_TYPE: name})
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, kind.__name__))  # the message: the event
    span.end()
    otel_context.detach(token)  # type: ignore[arg-type]


class _TracedAsync(AsyncBeginContext[Any]):
    """``AsyncBeginContext`` in a ``sessionforge.transaction`` span (one per factory)."""

    __slots__ = ("_span", "_token")
    _telemetry: ClassVar[Telemetry]

    async def __aenter__(self) -> Any:
        self._span, self._token = self._telemetry.start(self._attempt)
        try:
            return await super().__aenter__()
        except BaseException as error:
            finish(self._span, self._token, error, False)
            raise

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        assert self._transaction is not None, "__aexit__ without __aenter__"
        self._telemetry.describe(self._span, self._session.sync_session, self._options)
        committing = exc is None and self._transaction.is_active
        try:
            await super().__aexit__(exc_type, exc, tb)
        except BaseException as error:
            finish(self._span, self._token, error, False)
            raise
        finish(self._span, self._token, exc, committing)


class _TracedSync(SyncBeginContext[Any]):
    """``SyncBeginContext`` in a ``sessionforge.transaction`` span (one per factory)."""

    __slots__ = ("_span", "_token")
    _telemetry: ClassVar[Telemetry]

    def __enter__(self) -> Any:
        self._span, self._token = self._telemetry.start(self._attempt)
        try:
            return super().__enter__()
        except BaseException as error:
            finish(self._span, self._token, error, False)
            raise

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        assert self._transaction is not None, "__exit__ without __enter__"
        self._telemetry.describe(self._span, self._session, self._options)
        committing = exc is None and self._transaction.is_active
        try:
            super().__exit__(exc_type, exc, tb)
        except BaseException as error:
            finish(self._span, self._token, error, False)
            raise
        finish(self._span, self._token, exc, committing)


def _figure(pool: Pool, name: str) -> int | None:
    method: Callable[[], int] | None = getattr(pool, name, None)
    return int(method()) if callable(method) else None


def _built_engines(core: FactoryCore[Any]) -> list[Engine]:
    """The running loop's engines (the primary's, the replicas') and the sync twin's, if
    built; the others are watched from their next transaction."""
    found = [] if core.async_engine_if_built is None else [core.async_engine_if_built.sync_engine]
    if core.sync_engine_if_built is not None:
        found.append(core.sync_engine_if_built)
    if core.replicas is not None:
        found += core.replicas.loop_engines()
    return found
