"""``FactoryConfig``: the immutable configuration both twins are built from.

A config holds the database URL and the closed list of options of DESIGN.md §2, each
validated when the config is made, so a typo or a wrong type fails at construction even
though engines are built lazily. ``replace()`` returns a validated copy; the factories'
``configure()`` swaps such a copy into their shared core.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import re
import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final, Literal, TypedDict, Unpack
from urllib.parse import unquote

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.orm.session import JoinTransactionMode

from . import dialects
from .errors import ConfigurationError

__all__ = ["DEFAULT_URL", "FactoryConfig", "FactoryOptions", "SyncFactoryOptions", "mask_url"]

#: The embedded default: a SQLite file in the working directory.
DEFAULT_URL: Final = "sqlite+aiosqlite:///sessionforge.db"
DEFAULT_PING_AFTER: Final = 1.0

_SECRET_KEY = re.compile(r"pass|secret|token|key|credential|dsn", re.IGNORECASE)
# "key=" in a string that did not parse: a query string, or a libpq keyword DSN
# ("host=db password=..."); a secret's value ends at the next separator.
_KEY = re.compile(r"(?P<key>[\w.%-]+)\s*=\s*")
_VALUE = re.compile(r"'[^']*'|[^&;\s]*")


class _CommonOptions(TypedDict, total=False):
    pool_size: int
    max_overflow: int
    pool_timeout: float
    pool_recycle: int
    pool_use_lifo: bool
    echo: bool | Literal["debug"]
    isolation_level: str | None
    connect_args: Mapping[str, Any]
    sync_connect_args: Mapping[str, Any]
    engine_options: Mapping[str, Any]
    autoflush: bool
    expire_on_commit: bool
    info: Mapping[Any, Any] | None
    session_options: Mapping[str, Any]
    ping_after: float | None
    pgbouncer: bool
    application_name: str | None
    sqlite_journal_mode: str | None
    sqlite_synchronous: str | None
    sqlite_busy_timeout: float
    sqlite_foreign_keys: bool | None
    sqlite_begin: Literal["immediate", "deferred"]
    track_session_origin: bool


class FactoryOptions(_CommonOptions, total=False):
    """The options ``SessionFactory(url, **options)`` accepts, besides ``class_``."""

    sync_class_: type[Session] | None


class SyncFactoryOptions(_CommonOptions, total=False):
    """The options ``SyncSessionFactory(url, **options)`` accepts, besides ``sync_class_``."""

    class_: type[AsyncSession]


class _TargetOptions(TypedDict, total=False):
    # Kept by the factory, not the config: engines and factories per mapped class/table.
    binds: Mapping[Any, Any] | None
    # A session argument, moved into session_options (common with a connection target).
    join_transaction_mode: JoinTransactionMode


class FactoryArguments(FactoryOptions, _TargetOptions, total=False):
    """``SessionFactory(target, **options)``: ``FactoryOptions`` plus ``binds``."""


class SyncFactoryArguments(SyncFactoryOptions, _TargetOptions, total=False):
    """``SyncSessionFactory(target, **options)``: ``SyncFactoryOptions`` plus ``binds``."""


ENGINE_OPTIONS: Final = frozenset(
    {
        "pool_size",
        "max_overflow",
        "pool_timeout",
        "pool_recycle",
        "pool_use_lifo",
        "echo",
        "isolation_level",
        "connect_args",
        "engine_options",
    }
)
PRESET_OPTIONS: Final = frozenset(
    {
        "ping_after",
        "pgbouncer",
        "application_name",
        "sqlite_journal_mode",
        "sqlite_synchronous",
        "sqlite_busy_timeout",
        "sqlite_foreign_keys",
        "sqlite_begin",
    }
)
SESSION_LEVEL_OPTIONS: Final = frozenset(
    {
        "autoflush",
        "expire_on_commit",
        "info",
        "class_",
        "sync_class_",
        "session_options",
        "sync_connect_args",
        "track_session_origin",
    }
)
# Session keyword arguments the factory sets itself and users may not pass.
_FACTORY_OWNED: Final = frozenset({"bind", "binds", "sync_session_class", "class_", "sync_class_"})


def mask_url(url: URL | str) -> str:
    """Render ``url`` with its password (and password-like query values) as ``***``.

    A string that did not parse as a URL gets its whole user-info part masked, up to
    the last ``@``, whatever characters the password holds, and the value of every
    ``key=value`` pair whose (percent-decoded) key names a secret: query strings and
    libpq keyword DSNs alike.
    """
    if isinstance(url, URL):
        secret = {key: "***" for key in url.query if _SECRET_KEY.search(key)}
        if secret:
            url = url.update_query_dict(secret)
        try:
            return url.render_as_string(hide_password=True)
        except UnicodeEncodeError:  # a lone surrogate cannot be percent-encoded
            return f"{url.drivername}://(a URL with text that is not valid Unicode)"
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        url = f"{scheme}://***@{rest.rpartition('@')[2]}"
    # Every "key=" is looked at, also one inside another key's value ("db=?password=").
    parts, shown_to = [], 0
    for match in _KEY.finditer(url):
        if match.start() < shown_to or not _SECRET_KEY.search(unquote(match["key"])):
            continue
        value = _VALUE.match(url, match.end())
        parts += [url[shown_to : match.end()], "***"]
        shown_to = value.end() if value else match.end()
    return "".join(parts) + url[shown_to:]


def mask_mapping(values: Mapping[str, Any]) -> dict[str, Any]:
    """Copy ``values`` with anything that looks like a secret replaced by ``***``.

    Keys that name a secret are masked; string values are masked like URLs (a DSN
    under an innocent key); nested mappings are masked the same way.
    """
    masked: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(key, str) and _SECRET_KEY.search(key):
            masked[key] = "***"
        elif isinstance(value, Mapping):
            masked[key] = mask_mapping(value)
        elif isinstance(value, str):
            masked[key] = mask_url(value)
        else:
            masked[key] = value
    return masked


def parse_url(raw: str | URL) -> URL:
    """Parse and normalise a database URL (DESIGN.md §2, async URL rules).

    A URL without a driver gets the dialect's async default (``postgresql://`` →
    asyncpg, ``sqlite://`` → aiosqlite); ``postgres://`` is read as ``postgresql://``;
    an in-memory SQLite URL gets a shared name. Explicit drivers are kept as given.
    Everything a driver would trip over later is refused here: a scheme that is not
    ``dialect[+driver]``, a port outside 1-65535, a NUL character.
    """
    if isinstance(raw, URL):
        url = raw
    elif isinstance(raw, str):
        _check_unencoded_at(raw)
        _check_raw_port(raw)
        try:
            url = make_url(raw.strip())
        except (ArgumentError, ValueError):
            raise ConfigurationError(
                f"could not parse the database URL {mask_url(raw)!r}: expected "
                f"{_URL_FORM}, for example 'postgresql://app@localhost/app' or "
                "'sqlite:///app.db'"
            ) from None  # SQLAlchemy's message adds nothing, and may quote the URL
    else:
        raise ConfigurationError(
            f"the database URL must be a string or a sqlalchemy URL, got {type(raw).__name__}"
        )
    _check_url_parts(url)
    dialect_name, _, driver = url.drivername.lower().partition("+")
    dialect_name = dialects.canonical_dialect(dialect_name)
    if not driver:
        driver = dialects.default_async_driver(dialect_name) or ""
    url = url.set(drivername=f"{dialect_name}+{driver}" if driver else dialect_name)
    try:
        url.get_dialect()
    except NoSuchModuleError as exc:
        raise ConfigurationError(_unknown_driver_message(url)) from exc
    except (ImportError, ValueError, AttributeError) as exc:  # a broken dialect entry point
        raise ConfigurationError(
            f"SQLAlchemy could not load the dialect of {mask_url(url)!r} "
            f"({type(exc).__name__}); check the dialect and driver names and that the "
            "driver's package is installed"
        ) from None
    dialects.check_url(url)
    if dialects.is_sqlite(url):
        url = dialects.normalise_memory_sqlite(url)
    return url


_URL_FORM: Final = "dialect[+driver]://user:password@host:port/database"
_SCHEME: Final = re.compile(r"[a-z][a-z0-9_]*(\+[a-z][a-z0-9_]*)?", re.IGNORECASE)
# The port as SQLAlchemy's URL pattern (sqlalchemy.engine.url._parse_url) finds it:
# after the user info (a password may hold "/" and ":") and the host.
_RAW_PORT: Final = re.compile(
    r"[^:/?#]*://(?:[^:/]*(?::[^@]*)?@)?(?:\[[^/?]+\]|[^/:?]+)?(?::(?P<port>[^/?]*))?"
)
_MAX_PORT: Final = 65535


def _port_error(port: object, shown_url: str) -> ConfigurationError:
    return ConfigurationError(
        f"the port {port!r} in the database URL {shown_url!r} is not a number from 1 to "
        f"{_MAX_PORT}; write {_URL_FORM} with a numeric port, or leave ':port' out for "
        "the database's default"
    )


def _check_raw_port(raw: str) -> None:
    # SQLAlchemy reads the port with int(): "-1", "+5", " 5" and non-ASCII digits
    # pass it, "99999" too, and fail only when a driver opens a socket.
    match = _RAW_PORT.match(raw.strip())
    port = match["port"] if match else None
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) <= _MAX_PORT):
        raise _port_error(port, mask_url(raw))


def _check_url_parts(url: URL) -> None:
    if not _SCHEME.fullmatch(url.drivername):
        raise ConfigurationError(
            f"the database URL scheme {url.drivername!r} is not dialect or dialect+driver "
            f"(letters, digits and '_', at most one '+'); expected {_URL_FORM}, for "
            "example 'postgresql+asyncpg://app@localhost/app'"
        )
    if url.port is not None and not 0 < url.port <= _MAX_PORT:
        raise _port_error(url.port, mask_url(url))
    if url.password is not None and not _sendable(str(url.password)):
        raise ConfigurationError(
            "the password of the database URL contains a NUL character or text that is "
            "not valid Unicode, which no driver can send; check how the URL is built"
        )
    parts = {"user name": url.username, "host": url.host, "database": url.database}
    for key, values in url.query.items():
        parts[f"query parameter {key!r}"] = "".join((key, *_as_tuple(values)))
    for part, value in parts.items():
        if value is not None and not _sendable(value):
            raise ConfigurationError(
                f"the {part} of the database URL {mask_url(url)!r} contains a NUL "
                "character or text that is not valid Unicode (a lone surrogate), which no "
                "driver can send; remove it"
            )


def _sendable(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_tuple(values: str | tuple[str, ...]) -> tuple[str, ...]:
    return (values,) if isinstance(values, str) else values


def _check_unencoded_at(raw: str) -> None:
    # "u:p@ss@host" would be split at the first "@", leaking part of the password
    # into the host name (and into every message that shows the URL).
    _, sep, rest = raw.partition("://")
    authority = rest.split("/", 1)[0] if sep else ""
    if authority.count("@") > 1:
        user = authority.split("@", 1)[0].split(":", 1)[0]
        raise ConfigurationError(
            f"the database URL for user {user!r} has more than one '@' before the host: "
            "percent-encode an '@' in the password as %40 "
            "(urllib.parse.quote_plus(password))"
        )
    # "u/x:pw@host": SQLAlchemy's user name stops at the "/", so it reads host "u" and
    # database "x:pw@host", and the password would be shown as part of the database.
    head, slash, tail = rest.partition("/")
    if sep and slash and head and not set(":@") & set(head) and ":" in tail.rpartition("@")[0]:
        raise ConfigurationError(
            f"the database URL {mask_url(raw)!r} has a '/' inside what looks like its "
            "user name and password: percent-encode them (urllib.parse.quote_plus), or "
            "part of the password would be read as the database name"
        )


def _unknown_driver_message(url: URL) -> str:
    dialect_name, _, driver = url.drivername.partition("+")
    known = sorted(
        info.driver for info in dialects.known_drivers() if info.dialect == dialect_name
    )
    if not known:
        return (
            f"unknown database dialect {dialect_name!r} in {mask_url(url)!r}; "
            "use postgresql, sqlite or mysql (with an optional +driver)"
        )
    return (
        f"unknown driver {driver!r} for {dialect_name} in {mask_url(url)!r}; "
        f"known drivers: {', '.join(known)}"
    )


def _check_bool(name: str, value: Any) -> None:
    if type(value) is not bool:
        raise _ill_typed(name, value, "True or False")


def _check_optional_bool(name: str, value: Any) -> None:
    if value is not None:
        _check_bool(name, value)


def _check_int(minimum: int, maximum: int = 2**31 - 1) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if value is None:
            return
        if type(value) is not int or not minimum <= value <= maximum:
            raise _ill_typed(name, value, f"an int from {minimum} to {maximum}")

    return check


def finite_seconds(value: object) -> float | None:
    """``value`` as a float if it is a finite int or float (a bool is not), else ``None``.

    ``nan`` compares false with everything, so ``nan < 0`` lets it through a range
    check, and ``asyncio.timeout(nan)`` stops the loop's timers; ``inf`` and huge ints
    overflow where drivers convert seconds to integer milliseconds.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond float's range
        return None
    return seconds if math.isfinite(seconds) else None


def _check_seconds(maximum: float, *, optional: bool) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if value is None and optional:
            return
        seconds = finite_seconds(value)
        if seconds is None or not 0 <= seconds <= maximum:
            none = " or None" if optional else ""
            raise _ill_typed(name, value, f"a number of seconds from 0 to {maximum:.10g}{none}")

    return check


def _check_mapping(name: str, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise _ill_typed(name, value, "a dict")


def _check_optional_mapping(name: str, value: Any) -> None:
    if value is not None:
        _check_mapping(name, value)


def _check_optional_str(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise _ill_typed(name, value, "a string or None")


def _check_echo(name: str, value: Any) -> None:
    if type(value) is not bool and value != "debug":
        raise _ill_typed(name, value, "True, False or 'debug'")


def _check_class(base: type) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if value is None and base is Session:
            return
        if not (isinstance(value, type) and issubclass(value, base)):
            if base is Session and isinstance(value, type) and issubclass(value, AsyncSession):
                raise ConfigurationError(
                    f"{name}={value.__name__} is an AsyncSession class, but {name} is the "
                    "sync Session class; AsyncSessions come from SessionFactory(target, "
                    f"class_={value.__name__})"
                )
            raise _ill_typed(name, value, f"a subclass of {base.__module__}.{base.__name__}")

    return check


def _check_choice(choices: frozenset[str], *, optional: bool) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str) or value.upper() not in {c.upper() for c in choices}:
            raise _ill_typed(name, value, "one of " + ", ".join(sorted(choices)))

    return check


def safe_repr(value: object) -> str:
    """``repr(value)``, shortened, and never an error (ints past 4300 digits raise one)."""
    try:
        shown = repr(value)
    except Exception:
        return f"<{type(value).__name__} that cannot be shown>"
    return shown if len(shown) <= 80 else f"{shown[:60]}...{shown[-10:]}"


def shown_value(value: object) -> str:
    """``value`` for an error message: secrets masked as reprs mask them, short."""
    if isinstance(value, Mapping):
        return safe_repr(mask_mapping(value))
    if isinstance(value, str):
        return safe_repr(mask_url(value))
    if value is None or isinstance(value, int | float | type):
        return safe_repr(value)
    return "..."  # a list or an object: it may hold anything


def _ill_typed(name: str, value: Any, expected: str) -> ConfigurationError:
    # Connection arguments may carry credentials: never echo them.
    shown = "..." if name in _MAY_HOLD_SECRETS or _SECRET_KEY.search(name) else shown_value(value)
    return ConfigurationError(
        f"option {name}={shown} ({type(value).__name__}) is invalid: expected {expected}"
    )


_MAY_HOLD_SECRETS: Final = frozenset({"connect_args", "sync_connect_args", "engine_options"})

_CHECKS: Final[Mapping[str, Callable[[str, Any], None]]] = {
    "pool_size": _check_int(0),
    "max_overflow": _check_int(-1),
    # threading's waits (the sync pool's) refuse longer ones with an OverflowError.
    "pool_timeout": _check_seconds(threading.TIMEOUT_MAX, optional=True),
    "pool_recycle": _check_int(-1),
    "pool_use_lifo": _check_bool,
    "echo": _check_echo,
    "isolation_level": _check_optional_str,
    "connect_args": _check_mapping,
    "sync_connect_args": _check_mapping,
    "engine_options": _check_mapping,
    "autoflush": _check_bool,
    "expire_on_commit": _check_bool,
    "info": _check_optional_mapping,
    "class_": _check_class(AsyncSession),
    "sync_class_": _check_class(Session),
    "session_options": _check_mapping,
    "ping_after": _check_seconds(dialects.MAX_SECONDS, optional=True),
    "pgbouncer": _check_bool,
    "application_name": _check_optional_str,
    "sqlite_journal_mode": _check_choice(dialects.SQLITE_JOURNAL_MODES, optional=True),
    "sqlite_synchronous": _check_choice(dialects.SQLITE_SYNCHRONOUS, optional=True),
    "sqlite_busy_timeout": _check_seconds(dialects.MAX_SECONDS, optional=False),
    "sqlite_foreign_keys": _check_optional_bool,
    "sqlite_begin": _check_choice(dialects.SQLITE_BEGIN_MODES, optional=False),
    "track_session_origin": _check_bool,
}


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
    # engine
    pool_size: int | None = None
    max_overflow: int | None = None
    pool_timeout: float | None = None
    pool_recycle: int | None = None
    pool_use_lifo: bool = False
    echo: bool | Literal["debug"] = False
    isolation_level: str | None = None
    connect_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    sync_connect_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    engine_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # session
    autoflush: bool = True
    expire_on_commit: bool = False
    info: Mapping[Any, Any] | None = None
    class_: type[AsyncSession] = AsyncSession
    sync_class_: type[Session] | None = None
    session_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # presets
    ping_after: float | None = DEFAULT_PING_AFTER
    pgbouncer: bool = False
    application_name: str | None = None
    sqlite_journal_mode: str | None = "WAL"
    sqlite_synchronous: str | None = "NORMAL"
    sqlite_busy_timeout: float = 5.0
    sqlite_foreign_keys: bool | None = True
    sqlite_begin: Literal["immediate", "deferred"] = "immediate"
    # diagnostics
    track_session_origin: bool = False

    def __post_init__(self) -> None:
        if self.url is not None and not isinstance(self.url, URL):
            raise ConfigurationError(
                "FactoryConfig.url must be a sqlalchemy URL; "
                "use FactoryConfig.from_url() to pass a string"
            )
        for field in dataclasses.fields(self):
            if field.name != "url":
                _CHECKS[field.name](field.name, getattr(self, field.name))
        set_ = object.__setattr__
        for name in ("connect_args", "sync_connect_args", "engine_options", "session_options"):
            set_(self, name, MappingProxyType(dict(getattr(self, name))))
        if self.info is not None:
            set_(self, "info", MappingProxyType(dict(self.info)))
        for name in ("sqlite_journal_mode", "sqlite_synchronous"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, value.upper())
        set_(self, "sqlite_begin", self.sqlite_begin.lower())
        if self.isolation_level is not None and self.url is not None:
            set_(
                self,
                "isolation_level",
                dialects.check_isolation_level(self.url, self.isolation_level),
            )
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
        config = cls(url=parse_url(url), class_=class_, **options)
        config._check_dialect_options(options)
        return config

    @classmethod
    def from_env(
        cls,
        var: str = "DATABASE_URL",
        *,
        default: str = DEFAULT_URL,
        class_: type[AsyncSession] = AsyncSession,
        **options: Unpack[FactoryOptions],
    ) -> FactoryConfig:
        """Build a config from the URL in environment variable ``var``.

        When ``var`` is unset or empty the embedded default is used: a SQLite file
        ``sessionforge.db`` in the working directory.
        """
        return cls.from_url(os.environ.get(var) or default, class_=class_, **options)

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
        kwargs["autoflush"] = self.autoflush
        kwargs["expire_on_commit"] = self.expire_on_commit
        if self.info is not None:
            kwargs["info"] = dict(self.info)
        return kwargs

    def describe(self) -> dict[str, Any]:
        """Options that differ from the defaults, secrets masked, for reprs and logs."""
        shown: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            if field.name in ("url", "class_"):
                continue
            value = getattr(self, field.name)
            default = (
                field.default_factory()
                if field.default_factory is not dataclasses.MISSING
                else field.default
            )
            if value == default and field.name not in ("autoflush", "expire_on_commit"):
                continue
            if isinstance(value, Mapping):
                value = mask_mapping(value)
            elif isinstance(value, type):
                value = value.__name__
            shown[field.name] = value
        return shown

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.describe().items())
        url = None if self.url is None else mask_url(self.url)
        return f"FactoryConfig(url={url!r}, class_={self.class_.__name__!r}{options})"

    # validation --------------------------------------------------------------------

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
            check_session_argument(key, allowed)

    def _check_dialect_options(self, given: Mapping[str, Any]) -> None:
        if self.url is None:  # unbound: checked when configure(bind=...) gives the URL
            return
        backend = self.url.get_backend_name()
        for name in given:
            owner = dialects.option_dialect(name)
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


_FIELD_NAMES: Final = frozenset(f.name for f in dataclasses.fields(FactoryConfig))
_DEFAULTS: Final[Mapping[str, Any]] = {
    f.name: f.default
    for f in dataclasses.fields(FactoryConfig)
    if f.default is not dataclasses.MISSING
}


def check_option_names(options: Mapping[str, Any], allowed: frozenset[str] | None = None) -> None:
    """Raise ``ConfigurationError`` for the first name that is not a known option."""
    known = allowed if allowed is not None else _FIELD_NAMES - {"url", "class_"}
    for name in options:
        if name in known:
            continue
        if name in ("bind", "binds"):
            raise ConfigurationError(
                f"{name} is set by the factory from its URL; "
                "create another SessionFactory for another database"
            )
        elsewhere = _elsewhere(name, known)
        if elsewhere is not None:
            raise ConfigurationError(f"unknown option {name!r}: {elsewhere}")
        hint = difflib.get_close_matches(name, sorted(known), n=1)
        did_you_mean = f"; did you mean {hint[0]!r}?" if hint else "."
        raise ConfigurationError(
            f"unknown option {name!r}{did_you_mean} Options are listed in "
            "FactoryOptions; anything else for the engine goes in engine_options={...}, "
            "for sessions in session_options={...}"
        )


_TO_ENGINE_OPTIONS: Final = "a create_engine() argument: pass engine_options={{{name!r}: ...}}"
# What users of SQLAlchemy (or of a factory's other methods) try first, and where it
# goes instead; names SQLAlchemy's create_engine() takes that are not options here.
_ELSEWHERE: Final[Mapping[str, str]] = {
    "pool_pre_ping": (
        "sessionforge replaces it with ping_after=: a pooled connection is pinged at "
        "checkout only after it sat idle in the pool for ping_after seconds (default "
        f"{DEFAULT_PING_AFTER:g}), so a busy pool pays no round trip; ping_after=0 pings "
        "at every checkout, ping_after=None never"
    ),
    "future": "SQLAlchemy 2 engines and sessions are always 'future'; leave it out",
    "url": (
        "the URL is the factory's first argument, given once: SessionFactory(url, "
        "**options); config.replace(url=...) makes a copy for another URL"
    ),
    "engine": "pass an engine as the factory's first argument: SessionFactory(engine)",
    "creator": (
        "sessionforge builds the engine from the URL; to connect your own way, create "
        "the engine yourself and pass it: SessionFactory(engine)"
    ),
    "autocommit": (
        "sessions have no autocommit mode since SQLAlchemy 2.0; use db.reader() for "
        "reads without a transaction, or isolation_level='AUTOCOMMIT'"
    ),
    "readonly": (
        "read-only is per transaction: db.begin(readonly=True), or db.reader() for "
        "reads without a transaction"
    ),
    "timeout": (
        "a transaction's deadline is db.begin(timeout=...); the wait for a pooled "
        "connection is pool_timeout="
    ),
    "statement_timeout": (
        "db.begin(timeout=...) sets it for one transaction; for every connection pass "
        "it as a server setting in connect_args"
    ),
    "retries": "retries are per call: db.run_transaction(fn, retries=...)",
    "settings": (
        "server settings are per transaction: db.begin(settings={...}); for every "
        "connection pass them in connect_args"
    ),
    **{
        name: _TO_ENGINE_OPTIONS.format(name=name)
        for name in (
            "poolclass",
            "pool",
            "pool_reset_on_return",
            "pool_logging_name",
            "pool_events",
            "echo_pool",
            "json_serializer",
            "json_deserializer",
            "execution_options",
            "hide_parameters",
            "logging_name",
            "query_cache_size",
            "insertmanyvalues_page_size",
            "use_insertmanyvalues",
            "max_identifier_length",
            "label_length",
            "paramstyle",
            "plugins",
            "enable_from_linting",
            "skip_autocommit_rollback",
            "module",
            "implicit_returning",
        )
    },
}


def _elsewhere(name: str, known: frozenset[str]) -> str | None:
    """Where an option the factory does not take by this name goes, if we know."""
    if "engine_options" not in known:  # a factory given an engine takes session options
        return None
    if name in _ELSEWHERE:
        return _ELSEWHERE[name] + "."
    if name in session_argument_names(AsyncSession, Session):
        return f"a session argument: pass session_options={{{name!r}: ...}}."
    return None


def session_argument_names(*classes: type) -> frozenset[str]:
    """Keyword arguments the session classes' constructors accept, factory-owned aside."""
    names: set[str] = set()
    for cls in classes:
        for parameter in inspect.signature(cls).parameters.values():
            if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD):
                names.add(parameter.name)
    return frozenset(names - _FACTORY_OWNED - {"self"})


def check_session_argument(name: str, allowed: frozenset[str]) -> None:
    """Raise ``ConfigurationError`` unless ``name`` is a session keyword argument."""
    if name in allowed:
        return
    if name in _FACTORY_OWNED:
        raise ConfigurationError(
            f"{name} is set by the factory and cannot be passed to a session; "
            "create another SessionFactory for another database or session class"
        )
    hint = difflib.get_close_matches(name, sorted(allowed), n=1)
    did_you_mean = f"; did you mean {hint[0]!r}?" if hint else "."
    raise ConfigurationError(
        f"unknown session argument {name!r}{did_you_mean} "
        f"Sessions accept: {', '.join(sorted(allowed))}"
    )
