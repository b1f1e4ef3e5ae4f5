"""Which database errors mean what: retryable conflicts, statement timeouts.

``is_retryable`` is public (``sessionforge.dialects.is_retryable``, the README points to
it): ``run_transaction`` re-runs the work for the errors it accepts, and a
``retry_if=`` predicate may call it. The retry *policy* (how often, how long to wait)
is ``_internal/transactions.py``; this module only reads error codes.
"""

from __future__ import annotations

from typing import Final

__all__ = ["is_retryable", "is_statement_timeout"]

# PostgreSQL: serialization_failure, deadlock_detected. MySQL/MariaDB: deadlock,
# lock wait timeout. SQLite: SQLITE_BUSY, SQLITE_LOCKED.
_RETRYABLE_SQLSTATES: Final = frozenset({"40001", "40P01"})
_RETRYABLE_MYSQL_CODES: Final = frozenset({1213, 1205})
_RETRYABLE_SQLITE_CODES: Final = frozenset({5, 6})
_STATEMENT_TIMEOUT_SQLSTATE: Final = "57014"  # query_canceled


def _driver_errors(exc: BaseException) -> list[BaseException]:
    """``exc`` and the driver exceptions it wraps (SQLAlchemy's ``.orig``, causes)."""
    found: list[BaseException] = []
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        found.append(current)
        stack.extend([getattr(current, "orig", None), current.__cause__])
    return found


def _sqlstate(error: BaseException) -> str | None:
    state = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    return state if isinstance(state, str) else None


def is_retryable(exc: BaseException) -> bool:
    """True when re-running the whole transaction may succeed (conflicts, deadlocks)."""
    for error in _driver_errors(exc):
        if _sqlstate(error) in _RETRYABLE_SQLSTATES:
            return True
        code = getattr(error, "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF in _RETRYABLE_SQLITE_CODES:
            return True  # extended codes (SQLITE_BUSY_SNAPSHOT...) keep the primary low
        if type(error).__module__.startswith(("sqlite3", "aiosqlite")) and (
            "database is locked" in str(error) or "database is busy" in str(error)
        ):
            return True
        args = getattr(error, "args", ())
        if (
            type(error).__module__.startswith(("pymysql", "aiomysql", "asyncmy", "MySQLdb"))
            and args
            and args[0] in _RETRYABLE_MYSQL_CODES
        ):
            return True
    return False


def is_statement_timeout(exc: BaseException) -> bool:
    """True when the server cancelled a statement for ``statement_timeout``.

    SQLSTATE 57014 also covers a cancel by ``pg_cancel_backend`` ("due to user
    request"): only the statement-timeout wording counts.
    """
    return any(
        _sqlstate(error) == _STATEMENT_TIMEOUT_SQLSTATE and "statement timeout" in str(error)
        for error in _driver_errors(exc)
    )
