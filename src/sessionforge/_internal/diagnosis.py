"""Why a connection attempt failed, and what to do about it.

``explain(url, exc, timeout)`` words the exception a connect (or its first round trip)
raised as the message of a ``DatabaseUnavailableError``. ``db.ping()``,
``db.sync.ping()``, the lifespan's startup ping and the ``sessionforge check`` and
``demo`` commands all go through it, so one failure reads the same everywhere. A
failure is one of:

- **refused**: the server answered, and said what is wrong (a missing database or
  role, a wrong password: ``_REFUSALS``), or SQLite could not open the file (the path
  usually shows why). The message says what to create or fix.
- **unreachable**: no answer in time, or the connection itself failed (refused,
  unresolvable host, no route). Only these point at the server, host, port and
  firewalls.
- **anything else**: the driver's message, and where to look.

Every message shows the URL with its password masked, and the driver's text with any
spelling of the password replaced by ``***``. A ``DatabaseUnavailableError`` the engine
raised already (a connect that failed there, ``_internal/disconnects.py``, worded by
this module) keeps its message.

The functions are pure (no connections, no side effects), except that explaining why
SQLite cannot open a file looks at whether its directory exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, quote_plus

from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from sessionforge import dialects
from sessionforge.config import mask_url
from sessionforge.dialects.sqlite import sqlite_unopenable
from sessionforge.errors import ConfigurationError, DatabaseUnavailableError

from .options import finite_seconds

__all__ = [
    "check_ping_timeout",
    "diagnose",
    "driver_reason",
    "explain",
    "scrub",
    "sqlite_cannot_open",
    "unavailable",
]


@dataclass(frozen=True, slots=True)
class _Refusal:
    """One way a server turns a connection down, and the advice for it."""

    sqlstate: str | None  # matched when the driver gives one (asyncpg; not psycopg at connect)
    pattern: re.Pattern[str]  # the server's English message, for drivers without SQLSTATE
    url_part: str  # the URL attribute naming the missing thing when the message is not matched
    advice: str


_REFUSALS: Final = (
    _Refusal(
        "3D000",
        re.compile(r'database "(?P<name>[^"]*)" does not exist'),
        "database",
        'database "{name}" does not exist: create it (CREATE DATABASE "{name}"), '
        "or fix the database name in the URL",
    ),
    _Refusal(
        None,  # 28000 also means "no pg_hba.conf entry": only the message is specific
        re.compile(r'role "(?P<name>[^"]*)" does not exist'),
        "username",
        'role "{name}" does not exist: create it (CREATE ROLE "{name}" LOGIN), '
        "or fix the user name in the URL",
    ),
    _Refusal(
        "28P01",
        re.compile(r'password authentication failed for user "(?P<name>[^"]*)"'),
        "username",
        'password authentication failed for user "{name}": check the password (in the URL, '
        "or what password= returns)",
    ),
    # MySQL/MariaDB (the drivers carry the error number, not the SQLSTATE): 1049, 1045.
    _Refusal(
        None,
        re.compile(r"\(1049, \"Unknown database '(?P<name>[^']*)'"),
        "database",
        "database '{name}' does not exist: create it (CREATE DATABASE `{name}`), "
        "or fix the database name in the URL",
    ),
    _Refusal(
        None,
        re.compile(r"\(1045, \"Access denied for user '(?P<name>[^']*)'@'[^']*'"),
        "username",
        "access denied for user '{name}': check the user name and the password (in the "
        "URL, or what password= returns), and that the user may connect from this host "
        "(CREATE USER / GRANT ... TO '{name}'@'host')",
    ),
)

# How drivers word a connection that never got an answer from the server, when they
# raise their own error rather than an OSError (psycopg's OperationalError holds
# libpq's text; aiomysql's error 2003 "Can't connect to MySQL server").
_NETWORK_FAILURE: Final = re.compile(
    r"Connection refused|Connection timed out|timeout expired|No route to host"
    r"|Network is unreachable|failed to resolve host|could not translate host name"
    r"|Name or service not known|server closed the connection unexpectedly"
    r"|Can't connect to MySQL server",
    re.IGNORECASE,
)


_NETWORK_ADVICE: Final = (
    "check that the server is up, the host and port, and any firewall in between"
)


def explain(url: URL, exc: BaseException, timeout: float | None) -> str:
    """The message for a connection to ``url`` that failed with ``exc``.

    ``timeout`` is the seconds the caller waited, named when ``exc`` is a
    ``TimeoutError``.
    """
    if isinstance(exc, DatabaseUnavailableError):
        return str(exc)  # worded already (a connect that failed inside the engine)
    diagnosis = diagnose(url, exc)
    if diagnosis is not None:
        return diagnosis
    where = mask_url(url)
    if isinstance(exc, TimeoutError):
        within = "in time" if timeout is None else f"within {timeout:g}s"
        return f"cannot reach the database at {where} (no answer {within}); " + _NETWORK_ADVICE
    original = _original(exc)
    reason = driver_reason(url, exc)
    if isinstance(original, OSError) or _NETWORK_FAILURE.search(scrub(str(original), url)):
        return f"cannot reach the database at {where} ({reason}); " + _NETWORK_ADVICE
    look = "the path and the file" if dialects.is_sqlite(url) else "the URL and the server's log"
    return f"connecting to the database at {where} failed ({reason}); check {look}"


def diagnose(url: URL, exc: BaseException) -> str | None:
    """What is wrong when ``exc`` shows the database answered; ``None`` if it did not."""
    original = _original(exc)
    text = scrub(str(original), url)
    if dialects.is_sqlite(url):
        if "unable to open database file" in text:
            return sqlite_cannot_open(url)
        return None
    sqlstate = getattr(original, "sqlstate", None)
    for refusal in _REFUSALS:
        found = refusal.pattern.search(text)
        if found is None and (refusal.sqlstate is None or sqlstate != refusal.sqlstate):
            continue
        name = found["name"] if found else getattr(url, refusal.url_part) or ""
        return f"the server at {mask_url(url)} answered, but " + refusal.advice.format(name=name)
    return None


def driver_reason(url: URL, exc: BaseException) -> str:
    """``Name: first line`` of the driver's error inside ``exc``, without the password.

    SQLAlchemy's asyncio adapters re-raise the driver's exception as a DBAPI class of
    their own (``AsyncAdapt_asyncpg_dbapi.Error``): the driver's, its cause, is named.
    """
    original = _original(exc)
    cause = original.__cause__
    if type(original).__module__.startswith("sqlalchemy.") and cause is not None:
        original = cause
    text = scrub(str(original).strip(), url)
    first_line = text.splitlines()[0] if text else ""
    name = type(original).__name__
    return f"{name}: {first_line}" if first_line else name


def sqlite_cannot_open(url: URL) -> str:
    """The message for SQLite's "unable to open database file" on ``url``."""
    why = sqlite_unopenable(url) or "check the path, and that its directory is writable"
    return f"cannot open the SQLite database {mask_url(url)}: {why}"


def _original(exc: BaseException) -> BaseException:
    """The driver's own exception inside a SQLAlchemy wrapper."""
    return exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc


def scrub(text: str, url: URL) -> str:
    """``text`` with every spelling of the URL's password as ``***``."""
    password = url.password
    if not password:
        return text
    spellings = {str(password), quote(str(password), safe=""), quote_plus(str(password))}
    for spelling in sorted(spellings, key=len, reverse=True):
        text = text.replace(spelling, "***")
    return text


def check_ping_timeout(timeout: object) -> None:
    """``ping(timeout=)``: a finite number of seconds > 0, or ``ConfigurationError``."""
    seconds = finite_seconds(timeout)
    if seconds is None or seconds <= 0:
        raise ConfigurationError(
            f"ping(timeout={timeout!r}) is invalid: expected a finite number of seconds > 0"
        )


def unavailable(url: URL, exc: BaseException, timeout: float | None) -> DatabaseUnavailableError:
    """Turn a failed connect into a ``DatabaseUnavailableError`` that says why.

    Worded by ``diagnosis.explain``, as ``sessionforge check`` words it; no password.
    """
    return DatabaseUnavailableError(explain(url, exc, timeout))
