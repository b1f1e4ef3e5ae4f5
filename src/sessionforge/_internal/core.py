"""The shared core of a twin pair: configuration, session classes, engines, status.

``SessionFactory`` and ``SyncSessionFactory`` each hold one ``FactoryCore``; ``db.sync``
holds the same core as ``db``, so ``configure()`` on either twin is seen by both and
the twins differ only where they do I/O. Everything here is pure or synchronous.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Generic, TypeVar, cast

from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from sessionforge import dialects
from sessionforge.config import OPTIONS, FactoryConfig, mask_url
from sessionforge.errors import ConfigurationError

from .binding import Binding, IsolatedConnection
from .context import CurrentSession
from .diagnosis import check_ping_timeout, unavailable
from .engines import (
    build_async_engine,
)
from .loops import LoopEngines
from .options import check_session_argument, session_argument_names
from .readers import reader_classes
from .replicas import Replicas
from .routing import Route
from .session import make_session_classes
from .sqla import async_proxy
from .state import SessionState
from .stats import FactoryStats, FactoryStatus, connected_engine, open_sessions, opened_session
from .targets import (
    BindTarget,
    FactoryBind,
    Resolved,
    Twin,
    bind_name,
    check_binds,
    check_twin_driver,
    resolve_binds,
    resolve_target,
)
from .transactions import (
    TransactionOptions,
    for_isolation,
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
    "resolve_target",
    "unavailable",
]

_AS = TypeVar("_AS", bound=AsyncSession)
_S = TypeVar("_S", bound=Session)

# configure() takes these as config fields; any other session argument goes to
# session_options.
_NAMED_SESSION_OPTIONS = frozenset(n for n, o in OPTIONS.items() if o.session_argument)
_UNSET: Any = object()


class FactoryCore(Binding, Generic[_AS]):
    """Configuration and engines shared by an async factory and its sync twin."""

    def __init__(self, resolved: Resolved, *, twin: Twin) -> None:
        config = resolved.config
        if config.url is not None and resolved.engine is None and resolved.connection is None:
            check_twin_driver(config, twin)  # a driver missing or of the wrong kind fails now
        self.config = config
        self.stats = FactoryStats()
        #: The read replicas (``replicas=``), or ``None``.
        self.replicas = Replicas(config) if config.replicas and config.url is not None else None
        async_class, self.sync_class = make_session_classes(
            config.class_, config.sync_class_, self.stats, self.replicas
        )
        self.async_class = cast("type[_AS]", async_class)
        self.session_arguments = session_argument_names(self.async_class, self.sync_class)
        self.owns_async_engine = True
        self.owns_sync_engine = True
        self._user_async_engine: AsyncEngine | None = None
        self._loop_engines = LoopEngines(
            lambda: self.primary_engine(build_async_engine(self.config))
        )
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
        state: SessionState = session.sync_session._sessionforge_state  # type: ignore[attr-defined]
        if options is not None and not reader:
            state.options = options
        if self.replicas is not None:
            self.replicas.hold()  # (the task's own holder: its threads share it)
            if reader or self._reads_only(options):
                self._route(state, "async", options, kwargs, reader=reader)
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
        state: SessionState = session._sessionforge_state  # type: ignore[attr-defined]
        if options is not None and not reader:
            state.options = options
        if self.replicas is not None:
            self.replicas.hold()  # (the task's own holder: its threads share it)
            if reader or self._reads_only(options):
                self._route(state, "sync", options, kwargs, reader=reader)
        opened_session(session, self.config.track_session_origin)
        return session

    def _reads_only(self, options: TransactionOptions | None) -> bool:
        """Whether a ``begin()`` with ``options`` may run on a replica: read-only, and
        not SERIALIZABLE — its own level, else the engine's (a hot standby refuses
        SERIALIZABLE transactions)."""
        if options is None or not options.execution_options.get("postgresql_readonly"):
            return False
        level = (
            options.execution_options.get("isolation_level")
            or self.config.isolation_level
            or self.config.engine_options.get("isolation_level")
        )
        return str(level).upper() != "SERIALIZABLE"

    def _route(
        self,
        state: SessionState,
        twin: Twin,
        options: TransactionOptions | None,
        kwargs: Mapping[str, Any],
        *,
        reader: bool,
    ) -> None:
        """Route a session that only reads to the replicas (DESIGN.md §9).

        Not under ``isolated()`` (tests see their own writes on the test's connection),
        nor on a factory made on a connection, nor when ``binds`` route classes.
        """
        if self.isolation is not None or self.connection is not None or kwargs.get("binds"):
            return
        assert self.replicas is not None
        execution_options = None if options is None else dict(options.execution_options)
        state.route = Route(self.replicas, twin, execution_options, reader=reader)

    def open_sessions(self, twin: Twin) -> list[Any]:
        """The open sessions of ``twin`` that ``close_all()`` closes here.

        Async: those holding no connection, or one of the running loop's engine (a
        session left open in a loop that has ended cannot be closed from this one);
        sync: those of the sync twin (not the sync side of an async session).
        """
        found: list[Any] = []
        current = self.async_engine_if_built
        # By pool: an option engine (a read-only begin()'s) shares its engine's pool.
        here = [] if current is None else [current.sync_engine.pool]
        if self.replicas is not None:
            here += [engine.pool for engine in self.replicas.loop_engines()]
        for session in open_sessions(self.sync_class):
            proxy = async_proxy(session)
            if twin == "sync":
                if proxy is None:
                    found.append(session)
            elif proxy is not None:
                engine = connected_engine(session)
                if engine is None or any(engine.pool is pool for pool in here):
                    found.append(proxy)
        return found

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
        for name, value in overrides.items():
            check_session_argument(name, self.session_arguments, value)
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
            declared = OPTIONS.get(name)
            if declared is not None and declared.group in ("engine", "preset", "routing"):
                raise ConfigurationError(
                    f"configure() changes session options only; {name} shapes the engine, "
                    "so pass it when the factory is made"
                )
            check_session_argument(name, self.session_arguments, value)
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
            engine_isolation_level=self.config.isolation_level,
        )
        if options is None or self.isolation is None:
            return options
        return for_isolation(options, url, timeout, settings)

    # shared formatting -------------------------------------------------------------

    def describe(
        self, name: str, class_: type[AsyncSession] | type[Session], url: URL | None
    ) -> str:
        shown = self.config.describe()
        if self.connection is not None:
            shown["bind"] = type(self.connection).__name__
        if self.binds:
            shown["binds"] = [bind_name(key) for key in self.binds]
        options = "".join(f", {k}={v!r}" for k, v in shown.items())
        where = None if url is None else mask_url(url)
        return f"{name}(class_={class_.__name__!r}, url={where!r}{options})"
