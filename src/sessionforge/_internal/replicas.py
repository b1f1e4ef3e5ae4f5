"""Read replicas: their engines and health, and the consistency tokens that route reads.

One ``Replicas`` per factory core (both twins share it) when the factory has
``replicas=``. Each ``Replica`` has its own engines (one per event loop, one for the
sync twin, each with its own pool, built with the factory's options) and what the
factory last learnt of it: healthy or not (and when to try again), and its replay
position at its last check.

**Read your writes.** After a transaction that wrote commits on the primary, the
context that ran it holds a ``Consistency``: the cluster's system identifier and the
primary's WAL position after that COMMIT (``routing.py`` takes it; ``dialects/
replication.py`` has the SQL). A replica serves a context only once its replay position
has reached the context's; the check is its own statement on the replica, before the
session's first one, and its answer is cached: while a replica is known to be past the
position, reads cost no check. Otherwise ``choose`` checks the replicas again for up to
``replica_wait`` seconds, then gives up and the read goes to the primary.

Where a context keeps its position, and the token format: ``consistency.py``.

**Health.** A replica that fails its check, or whose connection cannot be made, is
marked unhealthy and skipped for ``replica_recheck`` seconds; then it is checked (one
round trip) before it serves again.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, ExceptionContext
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import await_

from sessionforge.config import FactoryConfig
from sessionforge.dialects.replication import format_lsn, replica_position

from . import sqla as _sqla
from .consistency import ContextConsistency
from .disconnects import known_closed
from .engines import build_async_engine, build_sync_engine
from .loops import LoopEngines
from .urls import mask_url

__all__ = ["Replica", "ReplicaStatus", "Replicas"]

logger = logging.getLogger("sessionforge.replicas")

Twin = Literal["async", "sync"]
_E = TypeVar("_E", AsyncEngine, Engine)

#: How long ``choose`` sleeps between checks while waiting for a replica: it doubles
#: from the first value up to the second.
_FIRST_POLL: Final = 0.001
_LONGEST_POLL: Final = 0.01
#: A replica known to be behind a context's position is asked again after this long.
_REFRESH: Final = 0.5


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """One replica, as ``status().replicas`` shows it.

    ``position`` is its replay position at its last check (``None`` before the first),
    ``lag_bytes`` how far that is behind the newest commit this process saw on the
    primary (``None`` when it knows of none). ``reads`` counts the sessions it served,
    ``checked_out`` the connections checked out of its pools now.
    """

    url: str
    healthy: bool
    reads: int
    position: str | None
    lag_bytes: int | None
    checked_out: int
    last_error: str | None


class Replica:
    """One replica's engines and what the factory knows of it."""

    def __init__(
        self, config: FactoryConfig, lost: Callable[[Replica, BaseException], None]
    ) -> None:
        self.config = config
        self.url: URL = config.bound_url
        self.shown = mask_url(self.url)
        self._lost = lost
        self._loop_engines = LoopEngines(lambda: self._prepared(build_async_engine(config)))
        self._sync_engine: Engine | None = None
        self._option_engines: dict[tuple[Engine, tuple[tuple[str, Any], ...]], Engine] = {}
        self._lock = threading.Lock()
        self.healthy = True
        self.retry_at = 0.0
        self.last_error: str | None = None
        self.position = -1
        self.checked_at = 0.0
        self.reads = itertools.count()
        self._reads_seen = 0

    def engine(self, twin: Twin, execution_options: dict[str, Any] | None = None) -> Engine:
        """The (sync-level) engine a session of ``twin`` uses here, with the options."""
        engine = self._loop_engines.get().sync_engine if twin == "async" else self._sync()
        if not execution_options:
            return engine
        key = (engine, tuple(sorted(execution_options.items())))
        bound = self._option_engines.get(key)
        if bound is None:
            if len(self._option_engines) > 64:  # engines of ended loops
                self._option_engines.clear()
            bound = self._option_engines[key] = engine.execution_options(**execution_options)
        return bound

    def _prepared(self, engine: _E) -> _E:
        """A replica's engine, with two listeners more.

        - A pooled connection the server closed is replaced at checkout (asyncpg
          knows as soon as the event loop read the socket; psycopg's socket is peeked
          without blocking: ``disconnects.known_closed``), so a replica that stopped
          fails at checkout, before the session's first statement, where its read can
          go to another server.
        - A connection lost during a statement (a disconnect, as SQLAlchemy and
          ``disconnects.py`` classify it) marks the replica unhealthy.
        """
        sync = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        dialect = sync.dialect

        def on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
            if known_closed(dialect.get_driver_connection(dbapi_connection)):
                raise DisconnectionError("the server closed this pooled connection")

        def on_error(context: ExceptionContext) -> None:
            if context.is_disconnect and not context.is_pre_ping:
                self._lost(self, context.original_exception)

        event.listen(sync, "checkout", on_checkout)
        event.listen(sync, "handle_error", on_error)
        return engine

    def _sync(self) -> Engine:
        engine = self._sync_engine
        if engine is None:
            with self._lock:
                engine = self._sync_engine
                if engine is None:
                    engine = self._sync_engine = self._prepared(build_sync_engine(self.config))
        return engine

    def forget_engines(self, *, sync_only: bool) -> tuple[AsyncEngine | None, Engine | None]:
        """Detach this loop's async engine (unless ``sync_only``) and the sync engine,
        for the caller to dispose."""
        async_engine = None
        if not sync_only:
            async_engine = self._loop_engines.take_current()
            self._loop_engines.drop_dead()
        with self._lock:
            sync_engine, self._sync_engine = self._sync_engine, None
            self._option_engines.clear()
        return async_engine, sync_engine

    @property
    def loop_engine(self) -> Engine | None:
        engine = self._loop_engines.current()
        return None if engine is None else engine.sync_engine

    def checked_out(self) -> int:
        engines = [e.sync_engine for e in self._loop_engines.engines()]
        if self._sync_engine is not None:
            engines.append(self._sync_engine)
        total = 0
        for engine in engines:
            count = getattr(engine.pool, "checkedout", None)
            total += int(count()) if callable(count) else 0
        return total

    def __repr__(self) -> str:
        return f"<replica {self.shown} {'healthy' if self.healthy else 'unhealthy'}>"


class Replicas(ContextConsistency):
    """The replicas of one factory (module docstring), and the contexts' consistency
    (``ContextConsistency``)."""

    def __init__(self, config: FactoryConfig) -> None:
        self.replicas = tuple(
            Replica(_replica_config(config, url), self.failed) for url in config.replicas
        )
        super().__init__(read_your_writes=config.read_your_writes)
        self.wait = float(config.replica_wait)
        self.recheck = float(config.replica_recheck)
        #: asyncpg behind PgBouncer: checks run in a transaction (``dialects.replication``).
        self.in_transaction = config.pgbouncer and config.bound_url.get_driver_name() == "asyncpg"
        self._fallbacks = itertools.count()
        self._turn = itertools.count()

    # routing ---------------------------------------------------------------------------

    def choose(self, twin: Twin, *, io: bool) -> Replica | None:
        """A replica that may serve the running context's read now, or ``None`` (primary).

        With ``io`` (in the sync twin, or in SQLAlchemy's greenlet for the async one)
        it may check replicas and wait up to ``replica_wait``, and the choice counts
        (round-robin turn, primary fallbacks); without, it answers from what it knows.
        """
        need = self.needed()
        order = self._rotation(advance=io)
        if not io:
            return next(
                (r for r in order if r.healthy and (need is None or r.position >= need)), None
            )
        now = time.monotonic()
        for replica in order:
            if not replica.healthy and replica.retry_at <= now:
                self.check(replica, twin)  # due: one round trip decides
        for replica in order:
            if not replica.healthy:
                continue
            if need is None or replica.position >= need:
                return replica
            # Known to be behind, but that was a while ago: look again (so a replica
            # that caught up gets its share of the reads back).
            stale = now - replica.checked_at > _REFRESH
            if stale and self.check(replica, twin) and replica.position >= need:
                return replica
        if need is None:
            return self._fallback()
        deadline = time.monotonic() + self.wait
        pause = _FIRST_POLL
        while True:
            for replica in order:
                if replica.healthy and self.check(replica, twin):
                    need = self.needed()  # the first check may have told the cluster
                    if need is None or replica.position >= need:
                        return replica
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not any(replica.healthy for replica in order):
                return self._fallback()
            _sleep(min(pause, remaining))
            pause = min(pause * 2, _LONGEST_POLL)

    def _rotation(self, *, advance: bool) -> tuple[Replica, ...]:
        replicas = self.replicas
        start = (next(self._turn) if advance else _peek(self._turn)) % len(replicas)
        return replicas[start:] + replicas[:start]

    def _fallback(self) -> Replica | None:
        """The primary serves: counted, and ``None`` returned for ``choose``."""
        next(self._fallbacks)
        return None

    def check(self, replica: Replica, twin: Twin) -> bool:
        """Ask ``replica`` for its replay position; ``False`` if it could not say.

        A failure marks it unhealthy. A pool with no connection to spare is not asked
        (and not marked): waiting for one could take ``pool_timeout``, far past
        ``replica_wait``; a checkout that times out anyway is not the replica's fault.
        """
        engine = replica.engine(twin)
        if _pool_is_full(engine):
            return False
        try:
            with engine.connect() as connection:
                answer = replica_position(
                    connection.connection.dbapi_connection, in_transaction=self.in_transaction
                )
        except PoolTimeoutError:
            return False
        except Exception as exc:
            self.failed(replica, exc)
            return False
        if self.system is None:
            self.system = answer.system
        elif answer.system != self.system:
            self.failed(replica, None, f"belongs to another cluster (system {answer.system})")
            return False
        replica.position = max(replica.position, answer.position)
        replica.checked_at = time.monotonic()
        if not replica.healthy:
            logger.info("replica %s is healthy again", replica.shown)
        replica.healthy, replica.last_error = True, None
        return True

    def failed(self, replica: Replica, exc: BaseException | None, why: str = "") -> None:
        """Mark ``replica`` unhealthy until ``replica_recheck`` seconds from now."""
        reason = why or f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        if replica.healthy:
            logger.warning(
                "replica %s is unhealthy (%s); reads go elsewhere, it is checked again in %gs",
                replica.shown,
                reason,
                self.recheck,
            )
        replica.healthy = False
        replica.retry_at = time.monotonic() + self.recheck
        replica.last_error = reason
        # What it replayed is forgotten: a server restarted after a crash may accept
        # reads at an older position than it showed before.
        replica.position = -1

    # status ----------------------------------------------------------------------------

    @property
    def fallbacks(self) -> int:
        return _peek(self._fallbacks)

    def status(self) -> tuple[ReplicaStatus, ...]:
        found = []
        for replica in self.replicas:
            known = replica.position >= 0
            found.append(
                ReplicaStatus(
                    url=replica.shown,
                    healthy=replica.healthy,
                    reads=_peek(replica.reads),
                    position=format_lsn(replica.position) if known else None,
                    lag_bytes=max(0, self.newest - replica.position)
                    if known and self.newest
                    else None,
                    checked_out=replica.checked_out(),
                    last_error=replica.last_error,
                )
            )
        return tuple(found)

    def forget_engines(self, *, sync_only: bool) -> list[tuple[AsyncEngine | None, Engine | None]]:
        return [replica.forget_engines(sync_only=sync_only) for replica in self.replicas]

    def loop_engines(self) -> list[Engine]:
        """The (sync cores of the) running loop's replica engines built so far."""
        return [r.loop_engine for r in self.replicas if r.loop_engine is not None]


def _replica_config(config: FactoryConfig, url: URL) -> FactoryConfig:
    """The primary's configuration for one replica's engines.

    A hot standby refuses SERIALIZABLE transactions: a factory whose engines run
    SERIALIZABLE gets REPEATABLE READ replicas (the strongest level a standby has; its
    read-only ``begin()``s that do not name a level go to the primary, see
    ``core._reads_only``).
    """
    changes: dict[str, Any] = {"url": url, "replicas": ()}
    if str(config.isolation_level).upper() == "SERIALIZABLE":
        changes["isolation_level"] = "REPEATABLE READ"
    level = config.engine_options.get("isolation_level")
    if isinstance(level, str) and level.upper() == "SERIALIZABLE":
        changes["engine_options"] = {**config.engine_options, "isolation_level": "REPEATABLE READ"}
    return config.replace(**changes)


def _pool_is_full(engine: Engine) -> bool:
    """Whether ``engine``'s pool (a QueuePool) has every connection checked out."""
    pool: Any = engine.pool
    checked_out, size = getattr(pool, "checkedout", None), getattr(pool, "size", None)
    if not callable(checked_out) or not callable(size):
        return False
    overflow = _sqla.pool_max_overflow(pool)
    if overflow is None or overflow < 0:
        return False  # no limit
    return bool(checked_out() >= size() + overflow)


def _peek(counter: itertools.count[int]) -> int:
    return next(copy.copy(counter))  # the copy advances, not the counter


def _sleep(seconds: float) -> None:
    """Sleep in the sync twin's thread, or in SQLAlchemy's greenlet of the async twin."""
    if _sqla.in_greenlet():
        await_(asyncio.sleep(seconds))
    else:
        time.sleep(seconds)
