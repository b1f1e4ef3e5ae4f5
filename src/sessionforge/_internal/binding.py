"""What a factory's sessions bind to: its engines, its connection, its isolation.

A mixin of ``FactoryCore`` (``core.py`` holds sessions and configuration): the engine of
the running loop (``loops.py``) or the user's, the sync twin's engine, option engines
for per-transaction options, a connection the factory was made on, the connection
``isolated()`` routes every session to, and ``configure(bind=...)``. Methods of the
core, not a separate object, so a session's bind costs no extra call.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from sessionforge.config import FactoryConfig, mask_url
from sessionforge.errors import ConfigurationError

from .engines import EngineStatus, build_sync_engine, engine_status
from .loops import LoopEngines
from .replicas import Replicas
from .routing import install_write_tracking
from .stats import FactoryStats, FactoryStatus
from .targets import Resolved, Twin, resolve_rebind, wrong_twin_connection
from .transactions import TransactionOptions

__all__ = ["Binding", "IsolatedConnection"]

_E = TypeVar("_E", AsyncEngine, Engine)


@dataclass(frozen=True, slots=True)
class IsolatedConnection:
    """The one connection every session of a factory is bound to, for a while.

    Set on ``FactoryCore.isolation`` by ``sessionforge.testing.isolated``: sessions of
    the isolated twin bind to ``connection`` (inside its outer transaction) with
    ``join_transaction_mode="create_savepoint"``, so their COMMIT releases a SAVEPOINT.
    """

    connection: AsyncConnection | Connection

    def refuse(self, twin: Literal["async", "sync"]) -> ConfigurationError:
        other = "sync" if twin == "async" else "async"
        return ConfigurationError(
            f"the {other} twin of this factory is isolated for a test, so a session of its "
            f"{twin} twin would write to the database for real; isolate the twin the code "
            "under test uses (isolated(db) or isolated(db.sync))"
        )


class Binding:
    """The engines and binds half of ``FactoryCore`` (see the module docstring)."""

    config: FactoryConfig
    stats: FactoryStats
    owns_async_engine: bool
    owns_sync_engine: bool
    connection: AsyncConnection | Connection | None
    isolation: IsolatedConnection | None
    _user_async_engine: AsyncEngine | None
    _loop_engines: LoopEngines
    _sync_engine: Engine | None
    _async_binds: dict[tuple[AsyncEngine, tuple[tuple[str, Any], ...]], AsyncEngine]
    _sync_binds: dict[tuple[Engine, tuple[tuple[str, Any], ...]], Engine]
    _lock: threading.Lock
    _reader: Any
    replicas: Replicas | None

    def primary_engine(self, engine: _E) -> _E:
        """Prepare an engine of the primary: with replicas, its writes are noted."""
        if self.replicas is not None and self.replicas.read_your_writes:
            install_write_tracking(
                engine.sync_engine if isinstance(engine, AsyncEngine) else engine
            )
        return engine

    # targets -----------------------------------------------------------------------

    def _take_target(self, resolved: Resolved) -> None:
        engine, connection = resolved.engine, resolved.connection
        if connection is not None:
            self.connection = connection
            engine = connection.engine
        if isinstance(engine, AsyncEngine):
            self._user_async_engine, self.owns_async_engine = self.primary_engine(engine), False
        elif isinstance(engine, Engine):
            self._sync_engine, self.owns_sync_engine = self.primary_engine(engine), False

    def rebind(self, target: object, twin: Twin, config: FactoryConfig) -> None:
        """``configure(bind=target)``: a URL, an engine or a connection for later sessions.

        ``config`` is the configuration to bind (the current one with the same call's
        session options applied).
        """
        built = self._loop_engines.engines() or (self.owns_sync_engine and self._sync_engine)
        if built:
            raise ConfigurationError(
                "configure(bind=...) cannot rebind a factory that has built engines "
                f"already (for {mask_url(self.config.bound_url)}); make another factory, "
                "or bind it before its first session uses the database"
            )
        resolved = resolve_rebind(target, twin, config)
        self.config = resolved.config
        self.owns_async_engine = self.owns_sync_engine = True
        self._user_async_engine = self._sync_engine = self.connection = None
        self._take_target(resolved)
        self._async_binds.clear()
        self._sync_binds.clear()
        self._reader = None

    # engines -----------------------------------------------------------------------

    @property
    def async_engine_if_built(self) -> AsyncEngine | None:
        """The engine ``async_engine()`` would return here, if it exists already."""
        return self._user_async_engine or self._loop_engines.current()

    @property
    def sync_engine_if_built(self) -> Engine | None:
        return self._sync_engine

    def async_engine(self) -> AsyncEngine:
        """The running event loop's async engine, built on first use in that loop.

        An engine passed in by the user is used as given, in whatever loop.
        """
        return self._user_async_engine or self._loop_engines.get()

    def sync_engine(self) -> Engine:
        """The sync twin's engine, built on first use."""
        engine = self._sync_engine
        if engine is None:
            with self._lock:
                engine = self._sync_engine
                if engine is None:
                    engine = self._sync_engine = self.primary_engine(
                        build_sync_engine(self.config)
                    )
        return engine

    def async_bind(
        self, options: TransactionOptions | None
    ) -> AsyncEngine | AsyncConnection | None:
        """The engine (or an option engine sharing its pool) a transaction runs on.

        Under isolation: the isolated connection. A factory made on a connection:
        that connection; one made without a target: ``None`` (its ``binds`` route).
        """
        isolation = self.isolation
        if isolation is not None:
            if not isinstance(isolation.connection, AsyncConnection):
                raise isolation.refuse("async")
            return isolation.connection
        connection = self.connection
        if connection is not None:
            if not isinstance(connection, AsyncConnection):
                raise wrong_twin_connection("async")
            return connection
        if self.config.url is None:
            return None
        engine = self.async_engine()
        if options is None or not options.execution_options:
            return engine
        key = (engine, options.cache_key)
        bind = self._async_binds.get(key)
        if bind is None:
            if len(self._async_binds) > 64:  # engines of ended loops
                self._async_binds.clear()
            bind = self._async_binds[key] = engine.execution_options(**options.execution_options)
        return bind

    def sync_bind(self, options: TransactionOptions | None) -> Engine | Connection | None:
        """The sync twin's counterpart of ``async_bind``."""
        isolation = self.isolation
        if isolation is not None:
            if not isinstance(isolation.connection, Connection):
                raise isolation.refuse("sync")
            return isolation.connection
        connection = self.connection
        if connection is not None:
            if not isinstance(connection, Connection):
                raise wrong_twin_connection("sync")
            return connection
        if self.config.url is None:
            return None
        engine = self.sync_engine()
        if options is None or not options.execution_options:
            return engine
        key = (engine, options.cache_key)  # never an option engine over a disposed one
        bind = self._sync_binds.get(key)
        if bind is None:
            bind = self._sync_binds[key] = engine.execution_options(**options.execution_options)
        return bind

    def forget_engines(
        self, *, sync_only: bool = False
    ) -> tuple[AsyncEngine | None, Engine | None]:
        """Detach the engines this core owns and return them for the caller to dispose.

        Async: the running loop's engine (engines of other live loops stay theirs);
        engines of loops that closed are dropped on the way.
        """
        async_engine = None
        if not sync_only and self.owns_async_engine:
            async_engine = self._loop_engines.take_current()
            self._loop_engines.drop_dead()
            self._async_binds.clear()
        with self._lock:
            sync_engine = None
            if self.owns_sync_engine:
                sync_engine, self._sync_engine = self._sync_engine, None
                self._sync_binds.clear()
        return async_engine, sync_engine

    def forget_all_engines(
        self, *, sync_only: bool = False
    ) -> list[tuple[AsyncEngine | None, Engine | None]]:
        """``forget_engines``, and the replicas' engines (async ones unless ``sync_only``)."""
        found = [self.forget_engines(sync_only=sync_only)]
        if self.replicas is not None:
            found += self.replicas.forget_engines(sync_only=sync_only)
        return found

    def status(self, *, role: str) -> FactoryStatus:
        """Pool figures of every built engine; ``role`` ("async"/"sync") picks ``checked_out``."""
        engines: list[EngineStatus] = []
        current = self.async_engine_if_built
        async_engines = (
            [self._user_async_engine] if self._user_async_engine else self._loop_engines.engines()
        )
        # The running loop's engine first: the one a new session would use.
        for engine in sorted(async_engines, key=lambda e: e is not current):
            engines.append(engine_status("async", engine.sync_engine))
        if self._sync_engine is not None:
            engines.append(engine_status("sync", self._sync_engine))
        if role == "async":
            checked_out = engines[0].checked_out if current is not None else 0
        else:
            checked_out = engines[-1].checked_out if self._sync_engine is not None else 0
        counters = self.stats.snapshot()
        replicas = self.replicas
        return FactoryStatus(
            checked_out=checked_out,
            engines=tuple(engines),
            sessions_open=counters.sessions_open,
            transactions_committed=counters.transactions_committed,
            transactions_rolled_back=counters.transactions_rolled_back,
            transactions_retried=counters.transactions_retried,
            replicas=() if replicas is None else replicas.status(),
            primary_fallbacks=0 if replicas is None else replicas.fallbacks,
        )

    def check_sync_twin(self) -> None:
        """Raise ``ConfigurationError`` if this factory cannot have a sync twin."""
        if isinstance(self.connection, AsyncConnection):
            raise ConfigurationError(
                "this factory was made on an AsyncConnection, which sync code cannot "
                "use, so it has no sync twin; make a SyncSessionFactory on a "
                "Connection (or a URL) for sync code"
            )

    def _no_own_database(self) -> str:
        if self.connection is not None:
            return "a factory with its own pool, not one bound to a connection"
        return "a factory with a database (this one was made without one)"
