"""``password=``: a password given apart from the URL, or a callable asked per connection.

Rotating credentials (AWS RDS IAM tokens, Vault leases) expire, so a password written
into the URL once goes stale. ``password=`` takes a string, or a callable that is called
for each new connection the pools open (never for a pooled one): with no arguments, or,
when it has one required positional parameter, with the URL being connected to (the
engine's URL, which holds no password) — with replicas, each server has its own engine
and URL, so a per-host token can be made for each.

It goes in through SQLAlchemy's public extension point, the ``do_connect`` event, which
runs before each DBAPI connect with the arguments the dialect made from the URL
(``cparams``); every driver sessionforge knows (asyncpg, psycopg, psycopg2, aiomysql,
asyncmy, PyMySQL) takes the password as ``password``. The async dialects connect inside
SQLAlchemy's greenlet (``connectors/asyncio.py``: the driver's coroutine is awaited with
``await_``), so an async callable is awaited there the same way. The sync twin has no
event loop to await one: an async callable is refused when its engine is built.

The value is never shown: ``describe()`` and the repr show ``***`` (or that it is a
callable), errors name the option only.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.engine import URL, Engine
from sqlalchemy.util import await_

from sessionforge import dialects
from sessionforge.errors import ConfigurationError

from .urls import mask_url

__all__ = [
    "Password",
    "check_password",
    "check_password_use",
    "check_sync_password",
    "install_password",
    "shown_password",
]

#: What ``password=`` holds: the password, or a callable returning it (or an awaitable
#: of it, for the async factory), given no arguments or the URL.
Password = str | Callable[..., str | Awaitable[str]]

# The connect argument every driver sessionforge knows takes the password as.
_PASSWORD_ARGUMENT: Final = "password"

_ASYNC_FOR_SYNC: Final = (
    "password= is an async callable, which the sync twin (db.sync, SyncSessionFactory) "
    "cannot await: it has no event loop; give a sync callable instead "
    "(def token() -> str: ...), which serves both twins"
)
_EXPECTED: Final = (
    "a string, or a callable taking no arguments (or one: the URL) that returns the "
    "password, e.g. password=lambda: token()"
)


def check_password(name: str, value: Any) -> Password | None:
    """The check of option ``password``: ``None``, a string, or a callable of 0 or 1 args."""
    if value is None or isinstance(value, str):
        if value is not None and "\x00" in value:
            raise ConfigurationError(
                f"option {name}= contains a NUL character, which no driver can send"
            )
        return value
    if not callable(value):
        raise ConfigurationError(
            f"option {name}=... ({type(value).__name__}) is invalid: expected {_EXPECTED}"
        )
    _takes_url(value, name)  # raises for a callable that cannot be called either way
    return value  # type: ignore[no-any-return]


def _takes_url(password: Callable[..., Any], name: str = "password") -> bool:
    """Whether ``password`` is given the URL: it has one required positional parameter."""
    try:
        signature = inspect.signature(password)
    except (TypeError, ValueError):  # a builtin without a signature: called as is
        return False
    required = [
        parameter
        for parameter in signature.parameters.values()
        if parameter.default is inspect.Parameter.empty
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ]
    if len(required) > 1 or any(p.kind is p.KEYWORD_ONLY for p in required):
        raise ConfigurationError(
            f"option {name}= is a callable with required parameters "
            f"({', '.join(p.name for p in required)}); it is called with no arguments, or "
            "with the URL being connected to when it has one positional parameter "
            "(def token(url): ...); bind the others first (functools.partial)"
        )
    return len(required) == 1


def _is_async(password: object) -> bool:
    call = getattr(password, "__call__", None)  # noqa: B004 (an object with async __call__)
    return inspect.iscoroutinefunction(password) or inspect.iscoroutinefunction(call)


def check_password_use(
    url: URL | None,
    replicas: tuple[URL, ...],
    connect_args: Mapping[str, Any],
    sync_connect_args: Mapping[str, Any],
) -> None:
    """Refuse ``password=`` where another password is given too, or cannot be used."""
    if url is None:  # unbound: checked when configure(bind=...) gives the URL
        return
    if dialects.is_sqlite(url):
        raise ConfigurationError(
            f"option password= cannot be used with SQLite ({mask_url(url)!r}): a SQLite "
            "database has no password; leave password= out"
        )
    for server in (url, *replicas):
        if server.password is not None:
            raise ConfigurationError(
                f"the URL {mask_url(server)!r} holds a password, and password= gives one "
                "too; remove the password from the URL (keep the user name) or leave "
                "password= out"
            )
    for name, arguments in (
        ("connect_args", connect_args),
        ("sync_connect_args", sync_connect_args),
    ):
        if _PASSWORD_ARGUMENT in arguments:
            raise ConfigurationError(
                f"{name} holds a password, and password= gives one too; leave one of them out"
            )


def check_sync_password(password: Password | None) -> None:
    """Refuse an async callable for the sync twin's engine, saying what to give instead."""
    if password is not None and not isinstance(password, str) and _is_async(password):
        raise ConfigurationError(_ASYNC_FOR_SYNC)


def install_password(engine: Engine, password: Password | None) -> None:
    """Give each new DBAPI connection of ``engine`` the password, asking a callable each time.

    ``engine`` is a sync engine, or the sync core of an async one.
    """
    if password is None:
        return
    if isinstance(password, str):
        fixed = password

        def give(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
            cparams[_PASSWORD_ARGUMENT] = fixed

        event.listen(engine, "do_connect", give)
        return
    source = password
    url = engine.url._replace(password=None)  # (set() ignores None)
    arguments = (url,) if _takes_url(source) else ()
    in_greenlet = bool(getattr(engine.dialect, "is_async", False))

    def ask(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
        value = source(*arguments)
        if inspect.isawaitable(value):
            if not in_greenlet:
                _discard(value)
                raise ConfigurationError(_ASYNC_FOR_SYNC)
            value = await_(value)
        if not isinstance(value, str):
            raise ConfigurationError(
                f"the password= callable returned {type(value).__name__}, not the password "
                f"as a str, for a connection to {mask_url(url)!r}"
            )
        cparams[_PASSWORD_ARGUMENT] = value

    event.listen(engine, "do_connect", ask)


def _discard(awaitable: Awaitable[Any]) -> None:
    """Close a coroutine that will not be awaited (no "never awaited" warning)."""
    close = getattr(awaitable, "close", None)
    if callable(close):
        close()


def shown_password(value: Password | None) -> str | None:
    """``password=`` as ``describe()`` and the repr show it: never its value."""
    if value is None:
        return None
    return "***" if isinstance(value, str) else "<callable>"
