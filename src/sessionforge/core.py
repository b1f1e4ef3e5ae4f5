"""The shared core of a twin pair: configuration, session classes, engines, status.

``SessionFactory`` and ``SyncSessionFactory`` each hold one ``FactoryCore``; ``db.sync``
holds the same core as ``db``, so ``configure()`` on either twin is seen by both and
the twins differ only where they do I/O. Everything here is pure or synchronous.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Generic, Literal, TypeVar, cast

from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from . import dialects
from .config import (
    ENGINE_OPTIONS,
    PRESET_OPTIONS,
    SESSION_LEVEL_OPTIONS,
    FactoryConfig,
    check_option_names,
    check_session_argument,
    mask_url,
    session_argument_names,
)
from .context import CurrentSession
from .engines import EngineStatus, build_async_engine, build_sync_engine, engine_status
from .errors import ConfigurationError, DatabaseUnavailableError
from .loops import LoopEngines
from .session import make_session_classes, reader_classes
from .stats import FactoryStats
from .transactions import TransactionOptions, reader_options, transaction_options

__all__ = ["FactoryCore", "FactoryStatus", "IsolatedConnection", "resolve_target", "unavailable"]

_AS = TypeVar("_AS", bound=AsyncSession)

# configure() takes these as config fields; any other session argument goes to
# session_options.
_NAMED_SESSION_OPTIONS = frozenset({"autoflush", "expire_on_commit", "info"})


@dataclass(frozen=True, slots=True)
class FactoryStatus:
    """A snapshot of a factory's connections and counters.

    ``checked_out`` counts the connections checked out of the engine that a new
    session of this factory would use now; ``engines`` has the pool figures of every
    engine the factory has built so far (the running loop's async engine first). The
    counters cover both twins: sessions made and not yet closed, and transactions that
    reached the database and committed, rolled back (closing without a commit
    counts), or were re-run by ``run_transaction``.
    """

    checked_out: int
    engines: tuple[EngineStatus, ...]
    sessions_open: int = 0
    transactions_committed: int = 0
    transactions_rolled_back: int = 0
    transactions_retried: int = 0


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


class FactoryCore(Generic[_AS]):
    """Configuration and engines shared by an async factory and its sync twin."""

    def __init__(
        self,
        config: FactoryConfig,
        *,
        async_engine: AsyncEngine | None = None,
        sync_engine: Engine | None = None,
    ) -> None:
        self.config = config
        self.stats = FactoryStats()
        async_class, self.sync_class = make_session_classes(
            config.class_, config.sync_class_, self.stats
        )
        self.async_class = cast("type[_AS]", async_class)
        self.session_arguments = session_argument_names(self.async_class, self.sync_class)
        self.owns_async_engine = async_engine is None
        self.owns_sync_engine = sync_engine is None
        self._user_async_engine = async_engine
        self._loop_engines = LoopEngines(lambda: build_async_engine(self.config))
        self._sync_engine = sync_engine
        self._async_binds: dict[tuple[AsyncEngine, tuple[tuple[str, Any], ...]], AsyncEngine] = {}
        self._sync_binds: dict[tuple[Engine, tuple[tuple[str, Any], ...]], Engine] = {}
        self._lock = threading.Lock()
        self._session_defaults: tuple[FactoryConfig, dict[str, Any]] | None = None
        self.current_async: CurrentSession[_AS] = CurrentSession("sessionforge_current")
        self.current_sync: CurrentSession[Session] = CurrentSession("sessionforge_current_sync")
        self._reader: tuple[TransactionOptions, type[_AS], type[Session]] | None = None
        #: Set while ``sessionforge.testing.isolated`` routes this factory's sessions.
        self.isolation: IsolatedConnection | None = None

    # sessions ----------------------------------------------------------------------

    def session_kwargs(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Merge per-call ``overrides`` into the factory's defaults, as sessionmaker does.

        A call's value wins; ``info`` dicts are merged (the call's keys win) into a
        new dict, so neither the factory's nor the caller's dict is shared.
        """
        defaults = self._session_defaults
        if defaults is None or defaults[0] is not self.config:
            defaults = self._session_defaults = (self.config, self.config.session_kwargs())
        if self.isolation is not None:
            overrides = {**overrides, "join_transaction_mode": "create_savepoint"}
        if not overrides:
            return dict(defaults[1])  # Session copies `info`: sharing its dict is safe
        for name in overrides:
            check_session_argument(name, self.session_arguments)
        kwargs = dict(overrides)
        for name, value in defaults[1].items():
            if name == "info" and "info" in kwargs:
                merged = dict(value)
                merged.update(kwargs["info"] or {})
                kwargs["info"] = merged
            else:
                kwargs.setdefault(name, value)
        return kwargs

    def configure(self, options: Mapping[str, Any]) -> None:
        """Change session options for sessions made from now on, by both twins."""
        changes: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for name, value in options.items():
            if name in ENGINE_OPTIONS or name in PRESET_OPTIONS or name == "sync_connect_args":
                raise ConfigurationError(
                    f"configure() changes session options only; {name} shapes the engine, "
                    "so pass it when the factory is made"
                )
            check_session_argument(name, self.session_arguments)
            if name in _NAMED_SESSION_OPTIONS:
                changes[name] = value
            else:
                extra[name] = value
        if extra:
            changes["session_options"] = {**self.config.session_options, **extra}
        self.config = self.config.replace(**changes)

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
                    engine = self._sync_engine = build_sync_engine(self.config)
        return engine

    def reader(self) -> tuple[TransactionOptions, type[_AS], type[Session]]:
        """What both twins' ``reader()`` build on: the options and the reader classes."""
        made = self._reader
        if made is None:
            url = self.config.url
            async_class, sync_class = reader_classes(
                self.async_class, self.sync_class, dialects.reader_begin_listener(url)
            )
            made = self._reader = (reader_options(url), async_class, sync_class)
        return made

    def transaction_options(
        self,
        isolation_level: str | None,
        readonly: bool,
        timeout: float | None,
        settings: Mapping[str, Any] | None,
    ) -> TransactionOptions | None:
        """Validate per-transaction options against this factory's dialect.

        Under isolation the transaction is a SAVEPOINT of the test's transaction: the
        options are validated as usual, then the isolation level and read-only mode
        (which only a real BEGIN can set) and PostgreSQL's ``statement_timeout`` (a
        transaction-local setting that would outlive the SAVEPOINT) are left out, and a
        timeout rolls back rather than invalidates the shared connection.
        """
        options = transaction_options(
            self.config.url,
            isolation_level=isolation_level,
            readonly=readonly,
            timeout=timeout,
            settings=settings,
        )
        if options is None or self.isolation is None:
            return options
        kept = transaction_options(
            self.config.url, isolation_level=None, readonly=False, timeout=None, settings=settings
        )
        if kept is None and timeout is None:
            return None
        return replace(
            kept or options,
            execution_options={},
            settings=kept.settings if kept is not None else (),
            timeout=timeout,
            invalidate_on_timeout=False,
        )

    def async_bind(self, options: TransactionOptions | None) -> AsyncEngine | AsyncConnection:
        """The engine (or an option engine sharing its pool) a transaction runs on.

        Under isolation: the isolated connection.
        """
        isolation = self.isolation
        if isolation is not None:
            if not isinstance(isolation.connection, AsyncConnection):
                raise isolation.refuse("async")
            return isolation.connection
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

    def sync_bind(self, options: TransactionOptions | None) -> Engine | Connection:
        """The sync twin's counterpart of ``async_bind``."""
        isolation = self.isolation
        if isolation is not None:
            if not isinstance(isolation.connection, Connection):
                raise isolation.refuse("sync")
            return isolation.connection
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
        return FactoryStatus(
            checked_out=checked_out,
            engines=tuple(engines),
            sessions_open=counters.sessions_open,
            transactions_committed=counters.transactions_committed,
            transactions_rolled_back=counters.transactions_rolled_back,
            transactions_retried=counters.transactions_retried,
        )

    # shared formatting -------------------------------------------------------------

    def describe(self, name: str, class_: type[AsyncSession] | type[Session], url: URL) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.config.describe().items())
        return f"{name}(class_={class_.__name__!r}, url={mask_url(url)!r}{options})"


def unavailable(url: URL, exc: BaseException, timeout: float | None) -> DatabaseUnavailableError:
    """Turn a failed ping into a ``DatabaseUnavailableError`` without the password."""
    where = mask_url(url)
    if isinstance(exc, TimeoutError):
        reason = f"no answer within {timeout:g}s"
    else:
        original = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
        reason = str(original).strip().splitlines()[0] if str(original).strip() else ""
        reason = f"{type(original).__name__}: {reason}" if reason else type(original).__name__
        if url.password:
            reason = reason.replace(str(url.password), "***")
    return DatabaseUnavailableError(
        f"cannot reach the database at {where} ({reason}); check that the server is up, "
        "the host, port and credentials, and any firewall in between"
    )


def resolve_target(
    target: object, options: dict[str, Any], *, engine_type: type, factory: str
) -> tuple[FactoryConfig, Any]:
    """Turn a factory's first argument and options into (config, user's engine or None)."""
    if isinstance(target, FactoryConfig):
        return (target.replace(**options) if options else target), None
    if isinstance(target, engine_type):
        fixed = sorted(options.keys() & (ENGINE_OPTIONS | PRESET_OPTIONS))
        if fixed:
            raise ConfigurationError(
                f"{', '.join(fixed)} shape(s) engines sessionforge builds, but {factory} was "
                "given an engine: set them where you create the engine, or pass a URL instead"
            )
        check_option_names(options, allowed=SESSION_LEVEL_OPTIONS)
        # The user's engine is used as given: its URL (and so its in-memory database)
        # is taken as is, without our normalisation.
        engine: Any = target
        return FactoryConfig(url=engine.url, **options), engine
    if isinstance(target, str | URL):
        return FactoryConfig.from_url(target, **options), None
    if isinstance(target, AsyncEngine | Engine):
        wanted = "an AsyncEngine" if engine_type is AsyncEngine else "an Engine"
        other = "SyncSessionFactory" if engine_type is AsyncEngine else "SessionFactory"
        raise ConfigurationError(
            f"{factory} needs {wanted}, got {type(target).__name__}; pass a URL, or use "
            f"{other} for this engine"
        )
    raise ConfigurationError(
        f"{factory} takes a URL string, a sqlalchemy URL, a FactoryConfig or an engine; "
        f"got {type(target).__name__}"
    )
