"""The shared core of a twin pair: configuration, session classes, engines, status.

``SessionFactory`` and ``SyncSessionFactory`` each hold one ``FactoryCore``; ``db.sync``
holds the same core as ``db``, so ``configure()`` on either twin is seen by both and
the twins differ only where they do I/O. Everything here is pure or synchronous.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Generic, Literal, TypeAlias, TypeVar, cast

from sqlalchemy import inspect
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.sql.expression import TableClause

from sessionforge import dialects
from sessionforge.config import (
    ENGINE_OPTIONS,
    PRESET_OPTIONS,
    SESSION_LEVEL_OPTIONS,
    FactoryConfig,
    check_option_names,
    check_session_argument,
    mask_url,
    session_argument_names,
)
from sessionforge.errors import ConfigurationError, DatabaseUnavailableError

from .context import CurrentSession
from .diagnosis import explain
from .engines import (
    EngineStatus,
    build_async_engine,
    build_sync_engine,
    check_driver,
    engine_status,
)
from .loops import LoopEngines
from .session import make_session_classes, reader_classes
from .stats import FactoryStats, connected_engine, opened_session
from .transactions import (
    OPTIONS_ATTRIBUTE,
    TransactionOptions,
    reader_options,
    transaction_options,
)

__all__ = [
    "FactoryBind",
    "FactoryCore",
    "FactoryStatus",
    "IsolatedConnection",
    "Resolved",
    "Twin",
    "check_ping_timeout",
    "core_of",
    "resolve_target",
    "unavailable",
]

_AS = TypeVar("_AS", bound=AsyncSession)
_S = TypeVar("_S", bound=Session)

Twin: TypeAlias = Literal["async", "sync"]
#: What a ``binds={key: target}`` entry resolves to once validated: a database target,
#: or another sessionforge factory (its engine is looked up per session).
BindTarget: TypeAlias = "AsyncEngine | Engine | AsyncConnection | Connection | FactoryBind"


@dataclass(frozen=True, slots=True)
class FactoryBind:
    """A ``binds`` target that is a sessionforge factory (either twin) and its core."""

    factory: Any  # SessionFactory | SyncSessionFactory (they import this module)
    core: FactoryCore[Any]


# configure() takes these as config fields; any other session argument goes to
# session_options.
_NAMED_SESSION_OPTIONS = frozenset({"autoflush", "expire_on_commit", "info"})
_UNSET: Any = object()


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

    def __init__(self, resolved: Resolved, *, twin: Twin) -> None:
        config = resolved.config
        self.config = config
        self.stats = FactoryStats()
        async_class, self.sync_class = make_session_classes(
            config.class_, config.sync_class_, self.stats
        )
        self.async_class = cast("type[_AS]", async_class)
        self.session_arguments = session_argument_names(self.async_class, self.sync_class)
        self.owns_async_engine = True
        self.owns_sync_engine = True
        self._user_async_engine: AsyncEngine | None = None
        self._loop_engines = LoopEngines(lambda: build_async_engine(self.config))
        self._sync_engine: Engine | None = None
        #: The connection this factory's sessions join, when it was made on one.
        self.connection: AsyncConnection | Connection | None = None
        self._take_target(resolved)
        self.binds: dict[Any, BindTarget] = check_binds(resolved.binds, twin=twin)
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

    def new_async_session(
        self,
        cls: type[_AS],
        options: TransactionOptions | None,
        overrides: Mapping[str, Any],
        *,
        reader: bool = False,
        require_bind: bool = True,
    ) -> _AS:
        """Make a session of ``cls`` (this factory's class, or its reader) for the async twin.

        ``options`` pick the bind (an option engine) and, unless ``reader``, are what the
        session's transactions begin with. A factory made without a database makes
        sessions without a bind only where ``sessionmaker`` would (``db()``):
        ``require_bind`` refuses it for ``begin()`` and the like.
        """
        kwargs = self.session_kwargs(overrides, "async")
        bind = self.async_bind(options)
        if bind is None and require_bind and not kwargs.get("binds"):
            self.config.bound_url  # noqa: B018 (raises the ConfigurationError)
        session = cls(bind=bind, **kwargs)
        if options is not None and not reader:
            setattr(session.sync_session, OPTIONS_ATTRIBUTE, options)
        opened_session(session.sync_session, self.config.track_session_origin)
        return session

    def new_sync_session(
        self,
        cls: type[_S],
        options: TransactionOptions | None,
        overrides: Mapping[str, Any],
        *,
        reader: bool = False,
        require_bind: bool = True,
    ) -> _S:
        """The sync twin's ``new_async_session``."""
        kwargs = self.session_kwargs(overrides, "sync")
        bind = self.sync_bind(options)
        if bind is None and require_bind and not kwargs.get("binds"):
            self.config.bound_url  # noqa: B018 (raises the ConfigurationError)
        session = cls(bind=bind, **kwargs)
        if options is not None and not reader:
            setattr(session, OPTIONS_ATTRIBUTE, options)
        opened_session(session, self.config.track_session_origin)
        return session

    def in_this_loop(self, session: Session) -> bool:
        """Whether ``session`` can be closed here: it holds no connection of another loop."""
        engine = connected_engine(session)
        if engine is None:
            return True
        current = self.async_engine_if_built
        others = {e.sync_engine for e in self._loop_engines.engines() if e is not current}
        return engine not in others

    def session_kwargs(self, overrides: Mapping[str, Any], twin: Twin) -> dict[str, Any]:
        """Merge per-call ``overrides`` into the factory's defaults, as sessionmaker does.

        A call's value wins; ``info`` dicts are merged (the call's keys win) into a
        new dict, so neither the factory's nor the caller's dict is shared. ``binds``
        (the factory's, or the call's instead) are resolved for ``twin``.
        """
        defaults = self._session_defaults
        if defaults is None or defaults[0] is not self.config:
            defaults = self._session_defaults = (self.config, self.config.session_kwargs())
        if self.isolation is not None:
            overrides = {**overrides, "join_transaction_mode": "create_savepoint"}
        binds = self.binds
        if "binds" in overrides:
            overrides = dict(overrides)
            binds = check_binds(overrides.pop("binds"), twin=twin)
        if not overrides:
            kwargs = dict(defaults[1])  # Session copies `info`: sharing its dict is safe
            if binds:
                kwargs["binds"] = resolve_binds(binds, twin)
            return kwargs
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
        if binds:
            kwargs["binds"] = resolve_binds(binds, twin)
        return kwargs

    def configure(self, options: Mapping[str, Any], twin: Twin) -> None:
        """Change session options for sessions made from now on, by both twins.

        ``bind=`` binds a factory made without a target (or one that has not built an
        engine yet); ``binds=`` replaces the factory's binds.
        """
        options = dict(options)
        binds = check_binds(options.pop("binds"), twin=twin) if "binds" in options else None
        target = options.pop("bind", _UNSET)
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
        config = self.config.replace(**changes) if changes else self.config
        if target is not _UNSET:
            self.rebind(target, twin, config)
        else:
            self.config = config
        if binds is not None:
            self.binds = binds

    # targets -----------------------------------------------------------------------

    def _take_target(self, resolved: Resolved) -> None:
        engine, connection = resolved.engine, resolved.connection
        if connection is not None:
            self.connection = connection
            engine = connection.engine
        if isinstance(engine, AsyncEngine):
            self._user_async_engine, self.owns_async_engine = engine, False
        elif isinstance(engine, Engine):
            self._sync_engine, self.owns_sync_engine = engine, False

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
        if isinstance(target, str | URL):
            config = config.replace(url=target)
            if twin == "async":
                check_driver(config.async_url, is_async=True)
            else:
                check_driver(config.sync_url, is_async=False)
            resolved = Resolved(config)
        elif isinstance(target, AsyncEngine | Engine | AsyncConnection | Connection):
            _check_target_twin(target, twin, "configure(bind=...)")
            _refuse_engine_options(set(config.describe()), "configure(bind=...)")
            resolved = _database_target(target, config)
        else:
            raise ConfigurationError(
                "configure(bind=...) takes a URL, an engine or a connection; got "
                f"{type(target).__name__}"
            )
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
                    engine = self._sync_engine = build_sync_engine(self.config)
        return engine

    def reader(self) -> tuple[TransactionOptions, type[_AS], type[Session]]:
        """What both twins' ``reader()`` build on: the options and the reader classes."""
        made = self._reader
        if made is None:
            url = self.config.url
            if url is None or self.connection is not None:
                raise ConfigurationError(
                    f"reader() needs {self._no_own_database()}: use db() for reads, or make "
                    "the factory from a URL or an engine"
                )
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
        url = self.config.url
        if url is None or self.connection is not None:
            if isolation_level is None and not readonly and timeout is None and not settings:
                return None
            raise ConfigurationError(
                "per-transaction options (isolation_level, readonly, timeout, settings) "
                f"need {self._no_own_database()}; set them on the engine or connection "
                "instead, or make the factory from a URL"
            )
        options = transaction_options(
            url,
            isolation_level=isolation_level,
            readonly=readonly,
            timeout=timeout,
            settings=settings,
        )
        if (
            self.config.isolation_level == "AUTOCOMMIT"
            and isolation_level is None
            and (readonly or settings)
        ):
            raise ConfigurationError(
                "this factory's engine runs in AUTOCOMMIT (isolation_level='AUTOCOMMIT'), "
                "so readonly=True and settings= (which last one transaction) would silently "
                "do nothing; pass isolation_level= for this transaction, or use db.reader()"
            )
        if options is None or self.isolation is None:
            return options
        kept = transaction_options(
            url, isolation_level=None, readonly=False, timeout=None, settings=settings
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
                raise _wrong_twin_connection("async")
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
                raise _wrong_twin_connection("sync")
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

    def _no_own_database(self) -> str:
        if self.connection is not None:
            return "a factory with its own pool, not one bound to a connection"
        return "a factory with a database (this one was made without one)"

    # shared formatting -------------------------------------------------------------

    def describe(
        self, name: str, class_: type[AsyncSession] | type[Session], url: URL | None
    ) -> str:
        shown = self.config.describe()
        if self.connection is not None:
            shown["bind"] = type(self.connection).__name__
        if self.binds:
            shown["binds"] = [_bind_name(key) for key in self.binds]
        options = "".join(f", {k}={v!r}" for k, v in shown.items())
        where = None if url is None else mask_url(url)
        return f"{name}(class_={class_.__name__!r}, url={where!r}{options})"


def core_of(factory: Any) -> FactoryCore[Any]:
    """The core of a ``SessionFactory`` or ``SyncSessionFactory``, for sessionforge's own
    integrations (``asgi``, ``testing``); users never need it."""
    core: FactoryCore[Any] = factory._core
    return core


def check_ping_timeout(timeout: object) -> None:
    """``ping(timeout=)``: a finite number of seconds > 0, or ``ConfigurationError``."""
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ConfigurationError(
            f"ping(timeout={timeout!r}) is invalid: expected a finite number of seconds > 0"
        )


def unavailable(url: URL, exc: BaseException, timeout: float | None) -> DatabaseUnavailableError:
    """Turn a failed connect into a ``DatabaseUnavailableError`` that says why.

    Worded by ``diagnosis.explain``, as ``sessionforge check`` words it; no password.
    """
    return DatabaseUnavailableError(explain(url, exc, timeout))


@dataclass(frozen=True, slots=True)
class Resolved:
    """A factory's first argument and options, sorted out by ``resolve_target``."""

    config: FactoryConfig
    engine: AsyncEngine | Engine | None = None
    connection: AsyncConnection | Connection | None = None
    binds: Mapping[Any, Any] | None = None


def resolve_target(target: object, options: dict[str, Any], *, twin: Twin) -> Resolved:
    """Turn a factory's first argument and options into a ``Resolved`` target.

    ``target`` is a URL (string or ``sqlalchemy.URL``), a ``FactoryConfig``, an engine
    or a connection of the factory's kind (async for ``SessionFactory``), or ``None``
    for a factory bound later (``configure(bind=...)``) or routed by ``binds``.
    """
    factory = "SessionFactory" if twin == "async" else "SyncSessionFactory"
    binds = options.pop("binds", None)
    if "join_transaction_mode" in options:  # a session argument, common with connections
        mode = options.pop("join_transaction_mode")
        options["session_options"] = {
            **options.get("session_options", {}),
            "join_transaction_mode": mode,
        }
    if target is None:
        check_option_names(options)
        return Resolved(FactoryConfig(url=None, **options), binds=binds)
    if isinstance(target, FactoryConfig):
        return Resolved(target.replace(**options) if options else target, binds=binds)
    if isinstance(target, str | URL):
        return Resolved(FactoryConfig.from_url(target, **options), binds=binds)
    if isinstance(target, AsyncEngine | Engine | AsyncConnection | Connection):
        _check_target_twin(target, twin, factory)
        _refuse_engine_options(set(options), factory)
        check_option_names(options, allowed=SESSION_LEVEL_OPTIONS)
        engine: Any = target.engine if isinstance(target, AsyncConnection | Connection) else target
        # The user's engine is used as given: its URL (and so its in-memory database)
        # is taken as is, without our normalisation.
        config = FactoryConfig(url=engine.url, **options)
        return replace(_database_target(target, config), binds=binds)
    raise ConfigurationError(
        f"{factory} takes a URL string, a sqlalchemy URL, a FactoryConfig, an engine or a "
        f"connection; got {type(target).__name__}"
    )


def _database_target(
    target: AsyncEngine | Engine | AsyncConnection | Connection, config: FactoryConfig
) -> Resolved:
    if isinstance(target, AsyncConnection | Connection):
        url = target.engine.url
        return Resolved(dataclasses_replace(config, url), connection=target)
    return Resolved(dataclasses_replace(config, target.url), engine=target)


def dataclasses_replace(config: FactoryConfig, url: URL) -> FactoryConfig:
    """``config`` with ``url`` taken as given (a user's engine's URL is not normalised)."""
    return config if config.url is url else replace(config, url=url)


def _check_target_twin(target: object, twin: Twin, where: str) -> None:
    is_async = isinstance(target, AsyncEngine | AsyncConnection)
    if is_async == (twin == "async"):
        return
    kind = type(target).__name__
    if twin == "async":
        raise ConfigurationError(
            f"{where} needs an AsyncEngine or AsyncConnection, got {kind}; pass a URL, "
            "or use SyncSessionFactory for sync code"
        )
    raise ConfigurationError(
        f"{where} needs an Engine or Connection, got {kind}; pass a URL, or use "
        "SessionFactory for async code"
    )


def _refuse_engine_options(names: set[str], where: str) -> None:
    fixed = sorted(names & (ENGINE_OPTIONS | PRESET_OPTIONS))
    if fixed:
        raise ConfigurationError(
            f"{', '.join(fixed)} shape(s) engines sessionforge builds, but {where} was "
            "given an engine or a connection: set them where you create the engine, or "
            "pass a URL instead"
        )


def _wrong_twin_connection(twin: Twin) -> ConfigurationError:
    other = "an AsyncConnection" if twin == "sync" else "a Connection"
    return ConfigurationError(
        f"this factory is bound to {other}, which its {twin} twin cannot use; make the "
        f"{twin} factory on a connection of its own kind"
    )


# binds --------------------------------------------------------------------------------


def check_binds(binds: object, *, twin: Twin) -> dict[Any, BindTarget]:
    """Validate ``binds={Mapper|class|Table: target}`` as sessionmaker takes it.

    A target is an engine or connection, or another sessionforge factory (either
    twin), kept as its core so each session uses that factory's current engine. An
    engine of the other kind (a sync ``Engine`` for ``SessionFactory``) is refused here
    for a factory's own twin; for the other twin, when a session of it is made.
    """
    if binds is None:
        return {}
    if not isinstance(binds, Mapping):
        raise ConfigurationError(
            f"binds must be a dict of {{mapped class, Mapper or Table: engine or factory}}, "
            f"got {type(binds).__name__}"
        )
    from sessionforge.factory import SessionFactory
    from sessionforge.sync import SyncSessionFactory

    checked: dict[Any, BindTarget] = {}
    for key, target in binds.items():
        if not isinstance(key, type):
            inspected = inspect(key, raiseerr=False)
            if not isinstance(inspected, Mapper | TableClause):
                raise ConfigurationError(
                    f"binds key {key!r} is not a mapped class, Mapper or Table; route "
                    "classes or tables to their databases: binds={User: engine}"
                )
        name = _bind_name(key)
        if isinstance(target, SessionFactory | SyncSessionFactory):
            checked[key] = FactoryBind(target, target._core)
        elif isinstance(target, AsyncEngine | Engine | AsyncConnection | Connection):
            _check_target_twin(target, twin, f"binds[{name}]")
            checked[key] = target
        else:
            raise ConfigurationError(
                f"binds[{name}] must be an engine, a connection or a sessionforge factory, "
                f"got {type(target).__name__}"
            )
    return checked


def resolve_binds(binds: Mapping[Any, BindTarget], twin: Twin) -> dict[Any, Any]:
    """The ``binds`` argument for one session of ``twin``: factories' engines looked up now."""
    resolved: dict[Any, Any] = {}
    for key, target in binds.items():
        if isinstance(target, FactoryBind):
            core = target.core
            bind = core.async_bind(None) if twin == "async" else core.sync_bind(None)
            if bind is None:
                raise ConfigurationError(
                    f"binds[{_bind_name(key)}] is a factory made without a database; bind "
                    "it with configure(bind=...) first"
                )
            resolved[key] = bind
        else:
            _check_target_twin(target, twin, f"binds[{_bind_name(key)}] (the {twin} twin)")
            resolved[key] = target
    return resolved


def _bind_name(key: object) -> str:
    if isinstance(key, type):
        return key.__name__
    name = getattr(key, "name", None)
    if isinstance(name, str):
        return repr(name)
    return repr(key)
