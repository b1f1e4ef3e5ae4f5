"""``FactoryConfig``: the immutable configuration both twins are built from.

A config holds the database URL and the closed list of options of DESIGN.md §2, each
validated when the config is made, so a typo or a wrong type fails at construction even
though engines are built lazily. ``replace()`` returns a validated copy; the factories'
``configure()`` swaps such a copy into their shared core.

Each option is declared once, as a field below: type, default, group, check, where it
goes, its dialect (``_internal/options.py`` explains the record). The option sets,
validation, dialect checks, engine and session arguments and ``describe()`` are derived
from these fields.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Mapping
from typing import Any, Final, Literal, Unpack

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from . import dialects
from ._internal import environment
from ._internal.arguments import FactoryArguments as FactoryArguments
from ._internal.arguments import FactoryOptions as FactoryOptions
from ._internal.arguments import SyncFactoryArguments as SyncFactoryArguments
from ._internal.arguments import SyncFactoryOptions as SyncFactoryOptions
from ._internal.credentials import Password, check_password, check_password_use, shown_password
from ._internal.options import (
    DEFAULT_PING_AFTER,
    Option,
    check_names,
    check_session_argument,
    declared_options,
    mapping_option,
    option,
    session_argument_names,
    when_on,
    when_set,
    when_true,
)
from ._internal.options import check_bool as _bool
from ._internal.options import check_choice as _choice
from ._internal.options import check_class as _class
from ._internal.options import check_echo as _echo
from ._internal.options import check_int as _int
from ._internal.options import check_optional_bool as _optional_bool
from ._internal.options import check_optional_mapping as _optional_mapping
from ._internal.options import check_optional_str as _optional_str
from ._internal.options import check_seconds as _seconds
from ._internal.options import check_urls as _urls
from ._internal.urls import mask_mapping, parse_url
from ._internal.urls import mask_url as mask_url
from .dialects import sqlite
from .errors import ConfigurationError

__all__ = ["DEFAULT_URL", "FactoryConfig", "FactoryOptions", "SyncFactoryOptions", "mask_url"]

#: The embedded default: a SQLite file in the working directory.
DEFAULT_URL: Final = "sqlite+sessionforge:///sessionforge.db"


# Checks shared by several options, or too long for one line.
_POOL_SECONDS: Final = _seconds(threading.TIMEOUT_MAX, optional=True)
_PING_SECONDS: Final = _seconds(dialects.MAX_SECONDS, optional=True)
_BUSY_SECONDS: Final = _seconds(dialects.MAX_SECONDS, optional=False)
_JOURNAL_MODE: Final = _choice(sqlite.JOURNAL_MODES, optional=True, upper=True)
_SYNCHRONOUS: Final = _choice(sqlite.SYNCHRONOUS_LEVELS, optional=True, upper=True)
_WAIT_SECONDS: Final = _seconds(60.0, optional=False)
_RECHECK_SECONDS: Final = _seconds(3600.0, optional=False)
_CONNECT_SECONDS: Final = _seconds(dialects.MAX_SECONDS, optional=True)
_BEGIN: Final = _choice(sqlite.BEGIN_MODES, optional=False, upper=False)
_AS_GIVEN: Final = {"engine_argument": when_set}  # create_engine(name=value) unless None
_IF_TRUE: Final = {"engine_argument": when_true}  # create_engine(name=True) when true
_IF_ON: Final = {"engine_argument": when_on}  # create_engine(name=value) unless false
_PER_SESSION: Final = {"session_argument": True, "with_user_engine": True}


@dataclasses.dataclass(frozen=True, kw_only=True, eq=True)
class FactoryConfig:
    """Immutable configuration shared by ``SessionFactory`` and ``SyncSessionFactory``.

    Example::

        config = FactoryConfig.from_url("postgresql://app@db/app", pool_size=10)
        db = SessionFactory(config)
        tuned = config.replace(expire_on_commit=True)
    """

    #: ``None`` for a factory made without a target, until ``configure(bind=...)``.
    url: URL | None
    # engine: create_engine() arguments
    pool_size: int | None = option("engine", None, _int(0), "", **_AS_GIVEN)
    max_overflow: int | None = option("engine", None, _int(-1), "", **_AS_GIVEN)
    # threading's waits (the sync pool's) refuse longer ones with an OverflowError.
    pool_timeout: float | None = option("engine", None, _POOL_SECONDS, "", **_AS_GIVEN)
    pool_recycle: int | None = option("engine", None, _int(-1), "", **_AS_GIVEN)
    pool_use_lifo: bool = option("engine", False, _bool, "", **_IF_TRUE)
    echo: bool | Literal["debug"] = option("engine", False, _echo, "", **_IF_ON)
    isolation_level: str | None = option(
        "engine", None, _optional_str, "create_engine(isolation_level=), as the driver spells it"
    )
    password: Password | None = option(  # noqa: RUF009 (a callable is not immutable)
        "engine",
        None,
        check_password,
        "each new connection's password: a str, or a callable asked each time (not SQLite)",
    )
    connect_args: Mapping[str, Any] = mapping_option("engine", "the async engine's connect_args")
    # Accepted with a user's engine: the sync twin's engine is still built by sessionforge.
    sync_connect_args: Mapping[str, Any] = mapping_option(
        "engine", "the sync twin's connect_args", with_user_engine=True
    )
    engine_options: Mapping[str, Any] = mapping_option(
        "engine", "any other create_engine() argument"
    )
    # session: Session() arguments and classes
    autoflush: bool = option("session", True, _bool, "", always_shown=True, **_PER_SESSION)
    expire_on_commit: bool = option("session", False, _bool, "", always_shown=True, **_PER_SESSION)
    info: Mapping[Any, Any] | None = option(
        "session", None, _optional_mapping, "a copy per session", **_PER_SESSION
    )
    # RUF009 takes any call for a mutable default unless the annotation is immutable.
    class_: type[AsyncSession] = option(  # noqa: RUF009
        "session",
        AsyncSession,
        _class(AsyncSession),
        "the async sessions' class",
        with_user_engine=True,
    )
    sync_class_: type[Session] | None = option(  # noqa: RUF009
        "session", None, _class(Session), "the sync twin's sessions' class", with_user_engine=True
    )
    session_options: Mapping[str, Any] = mapping_option(
        "session", "any other Session() argument", with_user_engine=True
    )
    # presets: listeners and connect arguments
    ping_after: float | None = option(
        "preset", DEFAULT_PING_AFTER, _PING_SECONDS, "checkout ping after idle seconds"
    )
    pgbouncer: bool = option(
        "preset", False, _bool, "connect args: no statement caches", dialect="postgresql"
    )
    application_name: str | None = option(
        "preset", None, _optional_str, "connect args: application_name", dialect="postgresql"
    )
    sqlite_journal_mode: str | None = option(
        "preset", "WAL", _JOURNAL_MODE, "PRAGMA journal_mode (files)", dialect="sqlite"
    )
    sqlite_synchronous: str | None = option(
        "preset", "NORMAL", _SYNCHRONOUS, "PRAGMA synchronous", dialect="sqlite"
    )
    sqlite_busy_timeout: float = option(
        "preset", 5.0, _BUSY_SECONDS, "PRAGMA busy_timeout", dialect="sqlite"
    )
    sqlite_foreign_keys: bool | None = option(
        "preset", True, _optional_bool, "PRAGMA foreign_keys", dialect="sqlite"
    )
    sqlite_begin: Literal["immediate", "deferred"] = option(
        "preset", "immediate", _BEGIN, "BEGIN IMMEDIATE or BEGIN", dialect="sqlite"
    )
    connect_timeout: float | None = option(
        "preset", 5.0, _CONNECT_SECONDS, "connect args: seconds per attempt", dialect="postgresql"
    )
    mysql_snapshot_isolation: bool = option(
        "preset", True, _bool, "SET SESSION innodb_snapshot_isolation = ON", dialect="mysql"
    )
    # routing: read replicas (DESIGN.md §9)
    replicas: tuple[URL, ...] = option(
        "routing", (), _urls, "engines for reads", dialect="postgresql", with_user_engine=True
    )
    read_your_writes: bool = option(
        "routing", True, _bool, "replica reads see the context's commits", dialect="postgresql"
    )
    replica_wait: float = option(
        "routing", 0.05, _WAIT_SECONDS, "wait for a replica to catch up", dialect="postgresql"
    )
    replica_recheck: float = option(
        "routing", 5.0, _RECHECK_SECONDS, "retry an unhealthy replica after", dialect="postgresql"
    )
    # diagnostics
    track_session_origin: bool = option(
        "diagnostics", False, _bool, "where a leaked session was made", with_user_engine=True
    )

    def __post_init__(self) -> None:
        if self.url is not None and not isinstance(self.url, URL):
            raise ConfigurationError(
                "FactoryConfig.url must be a sqlalchemy URL; "
                "use FactoryConfig.from_url() to pass a string"
            )
        set_ = object.__setattr__
        for name, declared in _OPTIONS.items():
            set_(self, name, declared.check(name, getattr(self, name)))
        if self.isolation_level is not None and self.url is not None:
            set_(
                self,
                "isolation_level",
                dialects.check_isolation_level(self.url, self.isolation_level),
            )
        self._check_replicas()
        if self.password is not None:
            check_password_use(self.url, self.replicas, self.connect_args, self.sync_connect_args)
        self._check_engine_options()
        self._check_session_options()
        self._check_memory_pool()

    # construction ------------------------------------------------------------------

    @classmethod
    def from_url(
        cls,
        url: str | URL,
        /,
        *,
        class_: type[AsyncSession] = AsyncSession,
        **options: Unpack[FactoryOptions],
    ) -> FactoryConfig:
        """Build a config from a URL string (or ``sqlalchemy.URL``) and options.

        An option that belongs to another dialect than the URL's (``pgbouncer=True``
        for SQLite, say) is refused, unless it is left at its default.
        """
        check_option_names(options)
        # replicas= may be any sequence of URLs: its check makes it the tuple the field holds
        config = cls(url=parse_url(url), class_=class_, **options)  # type: ignore[arg-type]
        config._check_dialect_options(options)
        return config

    @classmethod
    def from_env(
        cls,
        var: str = "DATABASE_URL",
        *,
        default: str = DEFAULT_URL,
        class_: type[AsyncSession] | None = None,
        **options: Unpack[FactoryOptions],
    ) -> FactoryConfig:
        """Build a config from the URL in variable ``var`` (unset or empty: ``default``,
        a SQLite file ``sessionforge.db`` in the working directory) and the options in
        ``SESSIONFORGE_<OPTION>`` variables (``_internal/environment.py``), which keyword
        arguments override."""
        given = {*options, *(["class_"] if class_ is not None else [])}
        read = environment.read_options(os.environ, _OPTIONS, cls, url_variable=var, given=given)
        read_class = read.pop("class_", AsyncSession)
        with environment.naming_variables(read):
            url = os.environ.get(var) or default
            return cls.from_url(url, class_=class_ or read_class, **read, **options)

    def replace(self, **changes: Any) -> FactoryConfig:
        """Return a validated copy with ``changes`` applied.

        Only the options in ``changes`` are checked against the dialect: with a new
        ``url`` of another dialect, options set for the old one stay in the copy and
        are not applied.
        """
        check_option_names(changes, allowed=_FIELD_NAMES)
        if "url" in changes:
            changes["url"] = parse_url(changes["url"])
        config = dataclasses.replace(self, **changes)
        config._check_dialect_options(changes)
        return config

    # derived values ----------------------------------------------------------------

    @property
    def bound_url(self) -> URL:
        """``url``, or ``ConfigurationError`` for a factory made without a target."""
        if self.url is None:
            raise ConfigurationError(
                "this factory was made without a database (SessionFactory() with no URL or "
                "engine); bind it first with db.configure(bind=url_or_engine), or route "
                "classes and tables with binds={...}"
            )
        return self.url

    @property
    def async_url(self) -> URL:
        """The URL the async factory connects with; an error for a sync-only driver."""
        url = self.bound_url
        dialect_name, driver = url.get_backend_name(), url.get_driver_name()
        info = dialects.find_driver(dialect_name, driver)
        if info is not None and not info.is_async:
            suggestion = dialects.async_driver_for(dialect_name)
            use = (
                f"use {dialect_name}+{suggestion.driver}" if suggestion else "use an async driver"
            )
            raise ConfigurationError(
                f"{dialect_name}+{driver} is a sync driver; {use} with SessionFactory, "
                "or SyncSessionFactory for sync code"
            )
        return url

    @property
    def sync_url(self) -> URL:
        """The URL the sync twin connects with, by the driver mapping of DESIGN.md §5."""
        url = self.bound_url
        dialect_name, driver = url.get_backend_name(), url.get_driver_name()
        info = dialects.sync_driver_for(dialect_name, driver)
        if info is None:
            raise ConfigurationError(
                f"sessionforge knows no sync driver to pair with {dialect_name}+{driver}; "
                "build the sync factory from a sync URL: "
                "SyncSessionFactory(FactoryConfig.from_url('dialect+syncdriver://...'))"
            )
        return url.set(drivername=f"{dialect_name}+{info.driver}")

    def session_kwargs(self) -> dict[str, Any]:
        """The keyword arguments every new session gets (before per-call overrides)."""
        kwargs = dict(self.session_options)
        for name in _SESSION_ARGUMENTS:
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = dict(value) if isinstance(value, Mapping) else value
        return kwargs

    def describe(self) -> dict[str, Any]:
        """Options that differ from the defaults, secrets masked, for reprs and logs."""
        shown: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            name = field.name
            if name in ("url", "class_"):
                continue
            value = getattr(self, name)
            default = (
                field.default_factory()
                if field.default_factory is not dataclasses.MISSING
                else field.default
            )
            if value == default and not _OPTIONS[field.name].always_shown:
                continue
            if isinstance(value, Mapping):
                value = mask_mapping(value)
            elif name == "password":
                value = shown_password(value)
            elif name == "replicas":
                value = [mask_url(url) for url in value]
            elif isinstance(value, type):
                value = value.__name__
            shown[field.name] = value
        return shown

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.describe().items())
        url = None if self.url is None else mask_url(self.url)
        return f"FactoryConfig(url={url!r}, class_={self.class_.__name__!r}{options})"

    # validation --------------------------------------------------------------------

    def _check_replicas(self) -> None:
        """Replicas are servers of the primary's cluster, reached with its driver."""
        if not self.replicas or self.url is None:
            return
        backend = self.url.get_backend_name()
        if backend != "postgresql":
            return  # replicas= is for PostgreSQL only: _check_dialect_options says so
        for replica in self.replicas:
            if replica.get_backend_name() != backend:
                raise ConfigurationError(
                    f"replica {mask_url(replica)!r} is not a {dialects.display_name(backend)} "
                    f"URL like the primary's ({mask_url(self.url)!r}); replicas are "
                    "streaming standbys of the primary's cluster"
                )
            if replica.host is None and "host" not in replica.query:
                raise ConfigurationError(
                    f"replica {mask_url(replica)!r} names no host; give each replica's "
                    "host (and port): 'postgresql://app@replica1:5432/app'"
                )
        same_driver = tuple(r.set(drivername=self.url.drivername) for r in self.replicas)
        object.__setattr__(self, "replicas", same_driver)

    def _check_engine_options(self) -> None:
        for key in self.engine_options:
            if key in _FIELD_NAMES:
                raise ConfigurationError(
                    f"engine_options[{key!r}] duplicates the option {key}=; pass it as "
                    f"SessionFactory(url, {key}=...)"
                )
            if key in ("url", "creator") or key.startswith("__"):
                raise ConfigurationError(
                    f"engine_options[{key!r}] cannot be set: sessionforge builds the "
                    "engine from the URL; pass an engine instead if you need to"
                )

    def _check_session_options(self) -> None:
        allowed = session_argument_names(self.class_, self.sync_class_ or Session)
        for key in self.session_options:
            if key in _FIELD_NAMES:
                raise ConfigurationError(
                    f"session_options[{key!r}] duplicates the option {key}=; pass it as "
                    f"SessionFactory(url, {key}=...)"
                )
            check_session_argument(key, allowed, self.session_options[key])

    def _check_dialect_options(self, given: Mapping[str, Any]) -> None:
        if self.url is None:  # unbound: checked when configure(bind=...) gives the URL
            return
        backend = self.url.get_backend_name()
        for name in given:
            declared = _OPTIONS.get(name)
            owner = None if declared is None else declared.dialect
            if owner is None or owner == backend or getattr(self, name) == _DEFAULTS[name]:
                continue
            raise ConfigurationError(
                f"option {name}= is for {dialects.display_name(owner)} only, and the URL "
                f"{mask_url(self.url)!r} is {dialects.display_name(backend)}; leave it out "
                f"for this database (pass it only when the URL is {owner}://...)"
            )

    def _check_memory_pool(self) -> None:
        if self.url is None or not dialects.is_memory_sqlite(self.url):
            return
        if (self.pool_size or 1) > 1 or (self.max_overflow or 0) != 0:
            raise ConfigurationError(
                "an in-memory SQLite database lives in one connection, so pool_size and "
                "max_overflow cannot be set for it; use a SQLite file for a pool"
            )


#: Every option, from the field declarations above.
OPTIONS: Final[Mapping[str, Option]] = declared_options(FactoryConfig)
_OPTIONS: Final = OPTIONS  # read in FactoryConfig's methods
_FIELD_NAMES: Final = frozenset(f.name for f in dataclasses.fields(FactoryConfig))
_DEFAULTS: Final[Mapping[str, Any]] = {
    f.name: f.default
    for f in dataclasses.fields(FactoryConfig)
    if f.default is not dataclasses.MISSING
}
#: Options that shape the engines sessionforge builds (refused with a user's engine).
ENGINE_OPTIONS: Final = frozenset(
    name for name, spec in OPTIONS.items() if spec.group == "engine" and not spec.with_user_engine
)
#: Options applied to engines as presets: listeners and connect arguments.
PRESET_OPTIONS: Final = frozenset(name for name, spec in OPTIONS.items() if spec.group == "preset")
#: Options a factory given an engine or a connection accepts.
SESSION_LEVEL_OPTIONS: Final = frozenset(
    name for name, spec in OPTIONS.items() if spec.with_user_engine
)
_SESSION_ARGUMENTS: Final = tuple(name for name, spec in OPTIONS.items() if spec.session_argument)


def check_option_names(options: Mapping[str, Any], allowed: frozenset[str] | None = None) -> None:
    """Raise ``ConfigurationError`` for the first name that is not a known option."""
    check_names(options, allowed if allowed is not None else _FIELD_NAMES - {"url", "class_"})
