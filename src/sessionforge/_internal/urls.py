"""Database URLs: parsing and normalising them, and showing them without secrets.

``parse_url`` refuses, with a message that says what to write instead, everything a
driver would trip over later; ``mask_url`` and ``mask_mapping`` are what every message,
repr and log line goes through, so a password is never shown. A PostgreSQL URL may
list several hosts (libpq's ``db1:5432,db2:5432`` or ``?host=db1:5432&host=db2:5432``);
``parse_url`` brings both to one form (``dialects/postgresql.py``) and ``mask_url``
shows it as the comma list.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import unquote

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from sessionforge import dialects
from sessionforge.errors import ConfigurationError

__all__ = ["SECRET_KEY", "mask_mapping", "mask_url", "parse_url"]

#: A key (of a query string, a mapping, an option) that names a secret.
SECRET_KEY: Final = re.compile(r"pass|secret|token|key|credential|dsn", re.IGNORECASE)
# "key=" in a string that did not parse: a query string, or a libpq keyword DSN
# ("host=db password=..."); a secret's value ends at the next separator.
_KEY = re.compile(r"(?P<key>[\w.%-]+)\s*=\s*")
_VALUE = re.compile(r"'[^']*'|[^&;\s]*")


def mask_url(url: URL | str) -> str:
    """Render ``url`` with its password (and password-like query values) as ``***``.

    A string that did not parse as a URL gets its whole user-info part masked, up to
    the last ``@``, whatever characters the password holds, and the value of every
    ``key=value`` pair whose (percent-decoded) key names a secret: query strings and
    libpq keyword DSNs alike.
    """
    if isinstance(url, URL):
        secret = {key: "***" for key in url.query if SECRET_KEY.search(key)}
        if secret:
            url = url.update_query_dict(secret)
        hosts = dialects.listed_hosts(url)
        try:
            if hosts is None:
                return url.render_as_string(hide_password=True)
            # The host part is rendered as given; a user name's "%" is percent-encoded,
            # so the first _HOSTS is the host.
            shown = url.set(host=_HOSTS).difference_update_query(("host",))
            return shown.render_as_string(hide_password=True).replace(_HOSTS, hosts, 1)
        except UnicodeEncodeError:  # a lone surrogate cannot be percent-encoded
            return f"{url.drivername}://(a URL with text that is not valid Unicode)"
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        url = f"{scheme}://***@{rest.rpartition('@')[2]}"
    # Every "key=" is looked at, also one inside another key's value ("db=?password=").
    parts, shown_to = [], 0
    for match in _KEY.finditer(url):
        if match.start() < shown_to or not SECRET_KEY.search(unquote(match["key"])):
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
        if isinstance(key, str) and SECRET_KEY.search(key):
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
    asyncpg, ``sqlite://`` → sessionforge's own driver); ``postgres://`` is read as ``postgresql://``;
    an in-memory SQLite URL gets a shared name. Explicit drivers are kept as given.
    Everything a driver would trip over later is refused here: a scheme that is not
    ``dialect[+driver]``, a port outside 1-65535, a NUL character. A PostgreSQL URL
    with several hosts, in either spelling, comes back as ``?host=h1:p1&host=h2:p2``.
    """
    if isinstance(raw, URL):
        url, shown, listed = raw, mask_url(raw), None
    elif isinstance(raw, str):
        _check_unencoded_at(raw)
        shown = mask_url(raw)
        raw, listed = _take_host_list(raw.strip())
        _check_raw_port(raw)
        try:
            url = make_url(raw)
        except (ArgumentError, ValueError):
            raise ConfigurationError(
                f"could not parse the database URL {shown!r}: expected "
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
    url = _normalise_hosts(url, listed, shown)
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
# The host part, as SQLAlchemy's URL pattern delimits it (see _RAW_PORT).
_HOST_PART: Final = re.compile(
    r"(?P<head>[^:/?#]*://(?:[^:/]*(?::[^@]*)?@)?)(?P<hosts>[^/?#]*)(?P<tail>.*)", re.DOTALL
)
_HOSTS: Final = "%hosts%"


def _take_host_list(raw: str) -> tuple[str, str | None]:
    """``raw`` without libpq's comma list of hosts, and that list (None without one).

    SQLAlchemy reads ``db1:5432,db2:5432`` as host ``db1`` with the port
    ``5432,db2:5432`` and fails on it; ``_normalise_hosts`` puts the list back.
    """
    match = _HOST_PART.match(raw)
    if match is None or "," not in match["hosts"]:
        return raw, None
    return match["head"] + match["tail"], match["hosts"]


def _normalise_hosts(url: URL, listed: str | None, shown: str) -> URL:
    normalised = dialects.normalise_hosts(url, listed, shown)
    if normalised is not url:
        _check_url_parts(normalised)  # the listed hosts were not checked yet
    return normalised


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
