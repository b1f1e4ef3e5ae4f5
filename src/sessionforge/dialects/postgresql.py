"""What sessionforge does differently on PostgreSQL.

Multi-host URLs (libpq's ``host1:port1,host2:port2`` and SQLAlchemy's ``?host=...``
spellings, normalised to one form both drivers understand), connection arguments per
driver (``application_name``, the PgBouncer settings), the isolation level asyncpg
spells differently, transaction-local server settings
(``set_config``, the server-side ``statement_timeout`` of ``begin(timeout=)``), and the
reader's switch of the driver's own ``autocommit`` flag (a ``READ ONLY`` transaction
instead behind PgBouncer on asyncpg).
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine

from sessionforge.errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session
    from sqlalchemy.pool import ConnectionPoolEntry

__all__ = [
    "DEFAULT_PORT",
    "READONLY_OPTIONS",
    "TARGET_SESSION_ATTRS",
    "check_settings",
    "connect_args",
    "driver_isolation_level",
    "install_reader_autocommit_reset",
    "is_reader_connection",
    "listed_hosts",
    "normalise_hosts",
    "reader_begin_listener",
    "reader_flips_autocommit",
    "settings_statement",
    "timeout_settings",
]

#: Execution options of a ``begin(readonly=True)`` transaction.
READONLY_OPTIONS: Final[Mapping[str, Any]] = {"postgresql_readonly": True}

# Levels a driver's SQLAlchemy dialect refuses, and what to pass for the same
# behaviour. PostgreSQL runs READ UNCOMMITTED as READ COMMITTED (its docs, "Transaction
# Isolation"), and SQLAlchemy's asyncpg dialect, whose lookup table has no READ
# UNCOMMITTED, raises ArgumentError for it, at checkout, leaking the connection.
_DRIVER_LEVELS: Final[Mapping[str, Mapping[str, str]]] = {
    "asyncpg": {"READ UNCOMMITTED": "READ COMMITTED"},
}
_LIBPQ_LIKE: Final = ("psycopg", "psycopg_async", "psycopg2", "psycopg2cffi", "pg8000")
_READER_AUTOCOMMIT_DRIVERS: Final = ("asyncpg", "psycopg", "psycopg_async")
_READER_AUTOCOMMIT: Final = "sessionforge_reader_autocommit"
_READER_READ_ONLY: Final = "sessionforge_reader_read_only"
_BEHIND_POOLER: Final = "sessionforge_behind_pooler"
_SETTING_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")


def driver_isolation_level(driver: str, level: str) -> str:
    """The level to hand SQLAlchemy's ``driver`` dialect for ``level`` (normalised)."""
    return _DRIVER_LEVELS.get(driver, {}).get(level, level)


def connect_args(
    driver: str,
    given: dict[str, Any],
    *,
    application_name: str | None,
    pgbouncer: bool,
    connect_timeout: float | None = None,
) -> dict[str, Any]:
    """``given`` connect arguments with the presets added (what the user set wins).

    ``connect_timeout`` bounds each connection attempt: asyncpg's ``timeout=`` (its own
    default is 60 s; with several hosts it is the budget for all of them), libpq's
    ``connect_timeout`` for psycopg, in whole seconds per host, rounded up (libpq and
    psycopg treat anything under 2 as 2). ``None`` leaves the driver's own.
    """
    if connect_timeout is not None:
        if driver == "asyncpg":
            given.setdefault("timeout", connect_timeout)
        elif driver in _LIBPQ_LIKE and driver != "pg8000":
            given.setdefault("connect_timeout", max(2, math.ceil(connect_timeout)))
    if driver == "asyncpg":
        if application_name is not None:
            settings = dict(given.get("server_settings") or {})
            settings.setdefault("application_name", application_name)
            given["server_settings"] = settings
        if pgbouncer:
            # PgBouncer in transaction mode hands each transaction to any server
            # connection, so a named prepared statement may not exist there
            # (SQLAlchemy #6467, asyncpg #1058): no caches, unique statement names.
            # The names come from a _PooledStatementNames (the user's function, if
            # given, inside it): its type tells the reader's listener the connection
            # is behind a pooler (_note_pooled_connection).
            given.setdefault("statement_cache_size", 0)
            given.setdefault("prepared_statement_cache_size", 0)
            names = given.get("prepared_statement_name_func", _unique_statement_name)
            if not isinstance(names, _PooledStatementNames):
                given["prepared_statement_name_func"] = _PooledStatementNames(names)
    elif driver in _LIBPQ_LIKE:
        if application_name is not None:
            given.setdefault("application_name", application_name)
        if pgbouncer and driver in ("psycopg", "psycopg_async"):
            given.setdefault("prepare_threshold", None)
    return given


def _unique_statement_name() -> str:
    return f"__sessionforge_{uuid.uuid4().hex}__"


class _PooledStatementNames:
    """asyncpg's ``prepared_statement_name_func`` under ``pgbouncer=True``."""

    __slots__ = ("_names",)

    def __init__(self, names: Callable[[], str]) -> None:
        self._names = names

    def __call__(self) -> str:
        return self._names()


# --- multi-host URLs ------------------------------------------------------------------

#: The port a host without one gets.
DEFAULT_PORT: Final = 5432
#: ``target_session_attrs`` values both asyncpg (0.30+) and libpq (14+) accept.
TARGET_SESSION_ATTRS: Final = (
    "any",
    "read-write",
    "read-only",
    "primary",
    "standby",
    "prefer-standby",
)
_MAX_PORT: Final = 65535
_LIST_FORM: Final = "postgresql://user@host1:5432,host2:5432/database"


def normalise_hosts(url: URL, listed: str | None, shown: str) -> URL:
    """``url`` with its hosts in the one form both twins' drivers understand.

    ``listed`` is libpq's comma list (``db1:5432,db2``) taken out of the URL's host part,
    which SQLAlchemy cannot parse; ``?host=db1:5432&host=db2:5432`` and
    ``?host=db1,db2&port=5432,5432`` arrive in ``url.query``. Two or more hosts become
    ``?host=h1:p1&host=h2:p2`` with every port written out: SQLAlchemy's asyncpg dialect
    turns that into asyncpg's host and port lists (and refuses a host without a port),
    its psycopg dialect into libpq's ``host=h1,h2 port=p1,p2``. A URL with one host is
    returned as it is. ``shown`` is the masked URL for messages.
    """
    _check_target_session_attrs(url, shown)
    specs = _host_specs(url, listed, shown)
    if specs is None:
        return url
    hosts = tuple(_host_and_port(spec, index, shown) for index, spec in enumerate(specs, 1))
    return (
        url.set(host=None, port=None)
        .difference_update_query(("host", "port"))
        .update_query_dict({"host": tuple(f"{host}:{port}" for host, port in hosts)})
    )


def listed_hosts(url: URL) -> str | None:
    """``db1:5432,db2:5432`` for a URL ``normalise_hosts`` gave more than one host."""
    values = url.query.get("host")
    if url.host is None and isinstance(values, tuple) and len(values) > 1:
        return ",".join(values)
    return None


def _host_specs(url: URL, listed: str | None, shown: str) -> list[str] | None:
    hosts, ports = url.query.get("host"), url.query.get("port")
    if listed is None and url.host is not None and "," in url.host:
        # A URL object made from the comma form without ports ("db1,db2"); a port
        # after the list belongs to the last host, as in libpq.
        listed = url.host if url.port is None else f"{url.host}:{url.port}"
    if listed is not None:
        if hosts is not None or ports is not None:
            raise ConfigurationError(
                f"the database URL {shown!r} lists hosts both before the path and in "
                f"host=/port= query parameters; write them once, as {_LIST_FORM}"
            )
        return listed.split(",")
    tokens = _split(hosts)
    if len(tokens) < 2:
        return None  # one host: left to SQLAlchemy as before
    if url.host is not None:
        raise ConfigurationError(
            f"the database URL {shown!r} has a host before the path and more in host= "
            f"query parameters; list every host in one place, as {_LIST_FORM}"
        )
    if ports is None:
        return tokens
    port_tokens = _split(ports)
    if any(":" in token for token in tokens):
        raise ConfigurationError(
            f"the database URL {shown!r} gives ports both in host= and in port=; write "
            "host=host1:5432&host=host2:5432"
        )
    if len(port_tokens) != len(tokens):
        raise ConfigurationError(
            f"the database URL {shown!r} has {len(tokens)} hosts and {len(port_tokens)} "
            "ports in host= and port=; give one port per host, or write "
            "host=host1:5432&host=host2:5432"
        )
    return [
        f"{host}:{port}" if port else host for host, port in zip(tokens, port_tokens, strict=True)
    ]


def _split(values: str | tuple[str, ...] | None) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        return values.split(",")
    return [part for value in values for part in value.split(",")]


def _host_and_port(spec: str, index: int, shown: str) -> tuple[str, int]:
    where = f"host {index} ({spec!r}) of the database URL {shown!r}"
    if spec.startswith("[") or spec.count(":") > 1:
        # SQLAlchemy splits each host=host:port at every ":".
        raise ConfigurationError(
            f"{where} is an IPv6 address, which a multi-host URL cannot carry; use a host "
            "name for it"
        )
    host, colon, port = spec.partition(":")
    if not host:
        raise ConfigurationError(
            f"{where} has no host name; list hosts as {_LIST_FORM} (a port may be left out "
            f"for {DEFAULT_PORT})"
        )
    if not colon:
        return host, DEFAULT_PORT
    if not (port.isascii() and port.isdigit() and 0 < int(port) <= _MAX_PORT):
        raise ConfigurationError(
            f"{where} has the port {port!r}, which is not a number from 1 to {_MAX_PORT}; "
            f"write host:port with a numeric port, or leave ':port' out for {DEFAULT_PORT}"
        )
    return host, int(port)


def _check_target_session_attrs(url: URL, shown: str) -> None:
    value = url.query.get("target_session_attrs")
    if value is not None and value not in TARGET_SESSION_ATTRS:
        raise ConfigurationError(
            f"target_session_attrs={value!r} in the database URL {shown!r} is not one of "
            f"{', '.join(TARGET_SESSION_ATTRS)}; use read-write to reach the primary of a "
            "multi-host URL"
        )


# --- the reader's autocommit ----------------------------------------------------------


def reader_flips_autocommit(url: URL) -> bool:
    """Whether ``db.reader()`` switches the driver's ``autocommit`` flag on ``url``."""
    return (
        url.get_backend_name() == "postgresql"
        and url.get_driver_name() in _READER_AUTOCOMMIT_DRIVERS
    )


def reader_begin_listener(url: URL) -> Callable[[Session, Any, Connection], None] | None:
    """The ``after_begin`` listener that puts a reader's connection in autocommit, if any.

    An option engine with ``isolation_level="AUTOCOMMIT"`` does the same through
    SQLAlchemy's per-checkout isolation-level handling, which measured about 25 µs per
    session on asyncpg (set at checkout, restored at checkin, each through the
    dialect's validation) — most of what a reader saves. Both drivers start their
    transaction lazily, at the first statement, so at ``after_begin`` nothing has begun
    yet and the DBAPI ``autocommit`` attribute (asyncpg's adapter emulates it, psycopg
    has it) can be switched; the pool's checkin switches it back
    (``install_reader_autocommit_reset``).

    Behind PgBouncer (``pgbouncer=True``) an asyncpg reader runs in a short ``READ
    ONLY`` transaction instead (SQLAlchemy #12836). SQLAlchemy's asyncpg adapter
    prepares every statement in one round trip (Parse/Describe/Sync) and runs it in a
    second (Bind/Execute/Sync); in transaction mode PgBouncer may hand the second to
    another server connection when no transaction holds the first, which has no such
    statement ("prepared statement ... does not exist"). A transaction keeps both on
    one server connection, for the cost of its BEGIN and the ROLLBACK at return. psycopg
    with ``prepare_threshold=None`` sends each statement in one round trip, unnamed, so
    its readers stay in autocommit.
    """
    return _autocommit_reader_connection if reader_flips_autocommit(url) else None


def is_reader_connection(info: Mapping[str, Any]) -> bool:
    """Whether a pooled connection (its ``info``) is serving a reader in autocommit now."""
    return bool(info.get(_READER_AUTOCOMMIT))


def install_reader_autocommit_reset(engine: Engine) -> None:
    """Switch a reader's connection back out of autocommit when it returns to the pool.

    On asyncpg it also notes which connections were made with the ``pgbouncer=True``
    preset, whose readers run in a ``READ ONLY`` transaction (``reader_begin_listener``),
    and switches those back out of read-only at checkin.
    """

    def end_reader(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        if dbapi_connection is None:  # invalidated: nothing left to switch back
            record.info.pop(_READER_AUTOCOMMIT, None)
            record.info.pop(_READER_READ_ONLY, None)
            return
        if record.info.pop(_READER_AUTOCOMMIT, False):
            dbapi_connection.autocommit = False
        if record.info.pop(_READER_READ_ONLY, False):
            dbapi_connection.readonly = False

    event.listen(engine, "checkin", end_reader)
    if engine.dialect.driver == "asyncpg":
        event.listen(engine, "do_connect", _note_pooled_connection)


def _note_pooled_connection(
    _dialect: Any, record: ConnectionPoolEntry, _cargs: Any, cparams: dict[str, Any]
) -> None:
    # The record's info is cleared when its connection is closed or invalidated, and
    # do_connect runs for each new one.
    if isinstance(cparams.get("prepared_statement_name_func"), _PooledStatementNames):
        record.info[_BEHIND_POOLER] = True


def _autocommit_reader_connection(
    session: Session, _transaction: Any, connection: Connection
) -> None:
    if not isinstance(session.bind, Engine):
        return  # bound to a connection of its own (a test's isolated one): leave it be
    proxied = connection.connection
    if proxied.info.get(_BEHIND_POOLER):
        # A READ ONLY transaction, not autocommit (see reader_begin_listener): the
        # adapter's flag its lazy BEGIN reads, as the dialect's set_readonly() sets it.
        proxied.dbapi_connection.readonly = True  # type: ignore[union-attr]
        proxied.info[_READER_READ_ONLY] = True
        return
    try:
        proxied.dbapi_connection.autocommit = True  # type: ignore[union-attr]
    except Exception:  # the driver cannot switch now: the reader runs in a transaction
        return
    proxied.info[_READER_AUTOCOMMIT] = True


# --- transaction-local settings -------------------------------------------------------


def check_settings(url: URL, settings: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """Validate transaction-local server settings; return (name, value) text pairs."""
    if not isinstance(settings, Mapping):
        raise ConfigurationError(
            f"settings must be a dict of server setting names to values, "
            f"got {type(settings).__name__}"
        )
    if settings and url.get_backend_name() != "postgresql":
        raise ConfigurationError(
            f"settings= are PostgreSQL server settings (set_config); "
            f"{url.get_backend_name()} has no equivalent, so they cannot be applied"
        )
    pairs: list[tuple[str, str]] = []
    for name, value in settings.items():
        if not isinstance(name, str) or not _SETTING_NAME.fullmatch(name):
            shown = repr(name) if isinstance(name, str) else f"of type {type(name).__name__}"
            raise ConfigurationError(
                f"setting name {shown} is invalid: use a server setting name like "
                "'statement_timeout' or a custom one like 'app.tenant_id'"
            )
        pairs.append((name, _setting_text(name, value)))
    return tuple(pairs)


def _setting_text(name: str, value: object) -> str:
    """A setting's value as the text set_config() gets; values are never echoed."""

    def invalid(problem: str) -> ConfigurationError:
        return ConfigurationError(f"setting {name!r} has {problem}")

    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and not math.isfinite(value):
        raise invalid("a value that is not a finite number; use a number or a string")
    if isinstance(value, int | float):
        try:
            return str(value)
        except ValueError:  # an int past the 4300 digits int -> str allows
            raise invalid("an int too large to convert; pass it as a string") from None
    if not isinstance(value, str):
        raise invalid(f"a value of type {type(value).__name__}; use a string, a number or a bool")
    if "\x00" in value:
        raise invalid("a NUL character in its value, which PostgreSQL text cannot hold")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(
            "a value that is not valid Unicode (a lone surrogate); check how it was decoded"
        ) from None
    return value


def timeout_settings(url: URL, timeout: float | None) -> tuple[tuple[str, str], ...]:
    """Server settings that enforce ``timeout`` on the server too (PostgreSQL)."""
    if timeout is None or url.get_backend_name() != "postgresql":
        return ()
    return (("statement_timeout", str(max(1, round(timeout * 1000)))),)


def settings_statement(count: int) -> str:
    """One SELECT applying ``count`` transaction-local settings, all values bound."""
    calls = ", ".join(f"set_config(:name_{i}, :value_{i}, true)" for i in range(count))
    return f"SELECT {calls}"
