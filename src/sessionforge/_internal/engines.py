"""Building engines from a ``FactoryConfig``, the liveness policy, and pool figures.

``engine_kwargs`` turns the config's engine options (declared in ``config.py``) into
``create_engine`` arguments; ``apply_presets`` installs the dialect presets
(``dialects/sqlite.py``, ``dialects/postgresql.py``, ``dialects/mysql.py``) with the
config's values.

The liveness policy replaces ``pool_pre_ping``: a pooled connection is pinged at
checkout only when it sat idle in the pool for longer than ``ping_after`` seconds, so a
busy pool pays nothing, and a connection that failed its ping is replaced before the
caller sees it (SQLAlchemy retries the checkout with a fresh connection).

Connection-class failures (refused, reset, terminated, a standby where the primary was)
reach callers as ``DatabaseUnavailableError``, a COMMIT lost in flight as
``AmbiguousCommitError`` (``disconnects.install``, on every engine built here).

An invalidated connection gets ``INVALIDATION_GRACE`` seconds to close gracefully
(asyncpg: deliver a pending cancel request, say goodbye), then is dropped: a hung
server must not hold up the caller, nor ``begin(timeout=)`` miss its deadline (issue 11).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy
import sqlalchemy.ext.asyncio
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import ArgumentError, DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from sessionforge import dialects
from sessionforge.config import OPTIONS, FactoryConfig
from sessionforge.dialects import mysql, postgresql, sqlite
from sessionforge.errors import ConfigurationError

from . import disconnects
from . import sqla as _sqla
from .credentials import check_sync_password, install_password
from .diagnosis import scrub
from .urls import mask_url

__all__ = [
    "EngineStatus",
    "apply_presets",
    "build_async_engine",
    "build_sync_engine",
    "check_driver",
    "describe_presets",
    "engine_kwargs",
    "engine_status",
]

_LAST_CHECKIN: Final = "sessionforge_last_checkin"

#: Seconds an invalidated asyncpg connection may take to close gracefully (SQLAlchemy
#: 2.1.9 waits up to 2 s). On loopback or a LAN the cancel request and the goodbye take
#: milliseconds; a server that has not answered by then is treated as hung.
INVALIDATION_GRACE: Final = 0.25


# The extra that installs a dialect's drivers.
_EXTRAS: Final = {"postgresql": "postgres", "mysql": "mysql"}


def check_driver(url: URL, *, is_async: bool) -> None:
    """Raise ``ConfigurationError`` unless ``url``'s driver is installed and fits."""
    dialect_cls = _sqla.load_dialect(url, is_async=is_async)
    backend, driver = url.get_backend_name(), url.get_driver_name()
    if is_async and not getattr(dialect_cls, "is_async", False):
        raise ConfigurationError(
            f"{backend}+{driver} is a sync driver; use an async driver with "
            "SessionFactory, or SyncSessionFactory for sync code"
        )
    try:
        dialect_cls.import_dbapi()
    except ImportError as exc:
        info = dialects.find_driver(backend, driver)
        package = info.package if info is not None else driver
        extra = (
            f" (or pip install 'sessionforge[{_EXTRAS[backend]}]')" if backend in _EXTRAS else ""
        )
        role = "async" if is_async else "sync twin's"
        raise ConfigurationError(
            f"the {role} driver {driver} for {backend} is not installed: "
            f"pip install '{package}'{extra}"
        ) from exc


def build_async_engine(config: FactoryConfig) -> AsyncEngine:
    """Create the async engine for ``config``, with presets and liveness policy."""
    url = config.async_url
    kwargs = engine_kwargs(config, url, is_async=True)
    try:
        # Looked up at each call, not imported: an instrumentation that wraps SQLAlchemy's
        # functions (OpenTelemetry's) reaches our engines whenever it was installed.
        engine = sqlalchemy.ext.asyncio.create_async_engine(url, **kwargs)
    except (ArgumentError, TypeError) as exc:
        raise _engine_error(url, exc) from None  # its text may hold the password
    _prepare(engine.sync_engine, config)
    return engine


def build_sync_engine(config: FactoryConfig) -> Engine:
    """Create the sync twin's engine for ``config``, with the same presets."""
    url = config.sync_url
    check_driver(url, is_async=False)
    check_sync_password(config.password)
    kwargs = engine_kwargs(config, url, is_async=False)
    try:
        engine = sqlalchemy.create_engine(url, **kwargs)  # (at the call: see above)
    except (ArgumentError, TypeError) as exc:
        raise _engine_error(url, exc) from None  # its text may hold the password
    _prepare(engine, config)
    return engine


def _engine_error(url: URL, exc: Exception) -> ConfigurationError:
    # SQLAlchemy's message may quote the URL: every spelling of the password goes.
    return ConfigurationError(
        f"could not build an engine for {mask_url(url)}: {scrub(str(exc), url)}; check "
        "engine_options, connect_args and the pool options"
    )


# Connect-timeout spellings of asyncpg and libpq, as a URL's query may carry them.
_URL_TIMEOUTS: Final = frozenset({"timeout", "connect_timeout"})

# The engine options passed to create_engine() under their own names.
_ENGINE_ARGUMENTS: Final = tuple(
    (name, spec.engine_argument)
    for name, spec in OPTIONS.items()
    if spec.engine_argument is not None
)


def engine_kwargs(config: FactoryConfig, url: URL, *, is_async: bool) -> dict[str, Any]:
    """Return the keyword arguments for ``create_engine``/``create_async_engine``."""
    kwargs: dict[str, Any] = {}
    for name, argument in _ENGINE_ARGUMENTS:
        value = argument(getattr(config, name))
        if value is not None:
            kwargs[name] = value
    if config.isolation_level is not None:
        # By the config's (async) driver, so both twins run the same level.
        level = config.isolation_level
        kwargs["isolation_level"] = dialects.driver_isolation_level(config.url or url, level)
    connect_args = dict(config.connect_args if is_async else config.sync_connect_args)
    if url.get_backend_name() == "postgresql":
        connect_args = postgresql.connect_args(
            url.get_driver_name(),
            connect_args,
            application_name=config.application_name,
            pgbouncer=config.pgbouncer,
            # A timeout written in the URL's query wins too (connect_args would not).
            connect_timeout=(
                None if _URL_TIMEOUTS.intersection(url.query) else config.connect_timeout
            ),
        )
    if sqlite.is_sqlite(url):
        sqlite.engine_arguments(url, kwargs, connect_args, is_async=is_async)
    if mysql.is_mysql(url):
        mysql.engine_arguments(kwargs)
    if connect_args:
        kwargs["connect_args"] = connect_args
    kwargs.update(config.engine_options)
    return kwargs


def apply_presets(engine: Engine, config: FactoryConfig) -> None:
    """Attach the dialect's presets to ``engine`` (the sync core of an async engine)."""
    url = engine.url
    if postgresql.reader_flips_autocommit(url):
        postgresql.install_reader_autocommit_reset(engine)
    if sqlite.is_sqlite(url):
        sqlite.install_pragmas(
            engine,
            busy_timeout=config.sqlite_busy_timeout,
            journal_mode=config.sqlite_journal_mode,
            synchronous=config.sqlite_synchronous,
            foreign_keys=config.sqlite_foreign_keys,
        )
        sqlite.install_begin(engine, config.sqlite_begin, config.isolation_level)
        sqlite.install_return_policy(
            engine, reset_on_return="pool_reset_on_return" not in config.engine_options
        )
        if url.get_driver_name() == "aiosqlite":
            sqlite.refuse_unopenable_files(engine)
    if mysql.is_mysql(url):
        if config.mysql_snapshot_isolation:
            mysql.install_snapshot_isolation(engine)
        mysql.install_return_policy(
            engine, reset_on_return="pool_reset_on_return" not in config.engine_options
        )


def _prepare(engine: Engine, config: FactoryConfig) -> None:
    install_password(engine, config.password)
    apply_presets(engine, config)
    if config.ping_after is not None and dialects.needs_liveness_check(engine.url):
        install_liveness_policy(engine, config.ping_after)
    install_invalidation_grace(engine)
    if not sqlite.is_sqlite(engine.url):  # a file has no connection to lose
        disconnects.install(engine)  # last: its handle_error sees what the presets left


def install_invalidation_grace(engine: Engine, grace: float = INVALIDATION_GRACE) -> None:
    """Give an invalidated connection ``grace`` seconds to close, then drop it.

    SQLAlchemy invalidates a connection whose statement was cancelled (a deadline, a
    cancelled task) and closes it with a graceful wait of its own, inside the
    cancelled caller. Only asyncpg's wait is bounded here (see ``_sqla.close_within``).
    """
    if engine.dialect.driver != "asyncpg":
        return

    def on_invalidate(
        dbapi_connection: Any, _record: ConnectionPoolEntry, _exception: BaseException | None
    ) -> None:
        _sqla.close_within(engine.dialect, dbapi_connection, grace)

    event.listen(engine, "invalidate", on_invalidate)


def install_liveness_policy(engine: Engine, ping_after: float) -> None:
    """Ping a pooled connection at checkout only after ``ping_after`` idle seconds."""

    def on_checkin(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info[_LAST_CHECKIN] = time.monotonic()

    def on_checkout(
        dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: PoolProxiedConnection
    ) -> None:
        last = record.info.get(_LAST_CHECKIN)
        if last is None or time.monotonic() - last < ping_after:
            return  # a brand-new connection, or one in use moments ago
        try:
            _sqla.ping(engine.dialect, dbapi_connection)
        except Exception as exc:
            # The pool invalidates this connection and checks out a fresh one.
            raise DisconnectionError("pooled connection failed its liveness ping") from exc

    event.listen(engine, "checkin", on_checkin)
    event.listen(engine, "checkout", on_checkout)


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """Pool figures of one engine at one moment."""

    role: str
    url: str
    pool: str
    size: int | None
    max_overflow: int | None
    timeout: float | None
    checked_in: int | None
    checked_out: int
    overflow: int | None


def engine_status(role: str, engine: Engine) -> EngineStatus:
    """Read ``engine``'s pool figures (``None`` where its pool class has no such figure)."""
    pool: Any = engine.pool

    def figure(name: str) -> int | None:
        method = getattr(pool, name, None)
        return int(method()) if callable(method) else None

    timeout = getattr(pool, "timeout", None)
    return EngineStatus(
        role=role,
        url=mask_url(engine.url),
        pool=type(pool).__name__,
        size=figure("size"),
        max_overflow=_sqla.pool_max_overflow(pool),
        timeout=float(timeout()) if callable(timeout) else None,
        checked_in=figure("checkedin"),
        checked_out=figure("checkedout") or 0,
        overflow=figure("overflow"),
    )


def describe_presets(config: FactoryConfig, url: URL) -> dict[str, Any]:
    """Return the presets in effect for ``url``, for ``sessionforge check`` and logs."""
    if dialects.is_sqlite(url):
        presets: dict[str, Any] = {
            "begin": config.sqlite_begin,
            "busy_timeout": config.sqlite_busy_timeout,
            "synchronous": config.sqlite_synchronous,
            "foreign_keys": config.sqlite_foreign_keys,
        }
        if dialects.is_memory_sqlite(url):
            presets["memory"] = "one shared connection; transactions serialised"
        else:
            presets["journal_mode"] = config.sqlite_journal_mode
        return presets
    if url.get_backend_name() == "postgresql":
        return {
            "application_name": config.application_name,
            "pgbouncer": config.pgbouncer,
            "ping_after": config.ping_after,
        }
    if mysql.is_mysql(url):
        return {
            "snapshot_isolation": config.mysql_snapshot_isolation,
            "ping_after": config.ping_after,
        }
    return {"ping_after": config.ping_after}
