"""Every exception sessionforge raises on its own account.

Each class subclasses the standard exception whose meaning it shares (or SQLAlchemy's,
for ``LazyLoadError``), so code that already catches ``ValueError``, ``TimeoutError`` or
``MissingGreenlet`` keeps working::

    SessionForgeError
    ├── ConfigurationError          (ValueError)
    ├── DatabaseUnavailableError    (ConnectionError)
    │   └── AmbiguousCommitError
    ├── ConcurrentSessionUseError   (RuntimeError)
    ├── IsolationLockTimeoutError   (TimeoutError)   sessionforge.testing only
    ├── IsolationNotEnteredError    (RuntimeError)   sessionforge.testing only
    ├── LazyLoadError               (sqlalchemy.exc.MissingGreenlet)
    ├── MigrationError              (RuntimeError)   sessionforge.alembic
    ├── NoCurrentSessionError       (LookupError)
    ├── NestedTransactionError      (RuntimeError)
    ├── ReadOnlySessionError        (RuntimeError)
    ├── RetryExhaustedError
    ├── SessionClosedError          (RuntimeError)
    └── TransactionTimeoutError     (TimeoutError)

Messages say what went wrong and what to do about it, and never contain a password.
The two ``Isolation*`` errors come from the test toolkit (``sessionforge.testing``), so
they are importable from here but not re-exported by ``sessionforge``.

``sessionforge.HookError`` is not one of these: it is never raised, but is the record
of a hook that raised (``hook_errors(session)``), and lives with the hooks.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.exc import MissingGreenlet

__all__ = [
    "AmbiguousCommitError",
    "ConcurrentSessionUseError",
    "ConfigurationError",
    "DatabaseUnavailableError",
    "IsolationLockTimeoutError",
    "IsolationNotEnteredError",
    "LazyLoadError",
    "MigrationError",
    "NestedTransactionError",
    "NoCurrentSessionError",
    "ReadOnlySessionError",
    "RetryExhaustedError",
    "SessionClosedError",
    "SessionForgeError",
    "TransactionTimeoutError",
]


class SessionForgeError(Exception):
    """Raised for nothing directly: the base of every sessionforge exception."""


class ConfigurationError(SessionForgeError, ValueError):
    """Raised when a URL, driver, option or setting cannot be used as given."""


class DatabaseUnavailableError(SessionForgeError, ConnectionError):
    """Raised when the database cannot be reached or does not answer in time.

    Also when an open connection is lost (refused, reset, the server shutting down or
    terminating the backend, a primary that became a standby): the connection is
    dropped, the server rolled back its open transaction, and ``run_transaction``
    re-runs it. The driver's error is its ``__cause__``.
    """


class AmbiguousCommitError(DatabaseUnavailableError):
    """Raised when the connection was lost while a COMMIT was in flight.

    The COMMIT was sent and no answer came back, so the transaction may or may not have
    committed: ``run_transaction`` never re-runs it. Check whether the work is there
    before doing it again (or make it idempotent).
    """


class ConcurrentSessionUseError(SessionForgeError, RuntimeError):
    """Raised when a second task uses a session while another task is using it."""


class LazyLoadError(SessionForgeError, MissingGreenlet):
    """Raised when an async session's object would load an attribute on the event loop.

    A lazy relationship, or an expired or deferred column, touched outside SQLAlchemy's
    greenlet (plain ``async`` code) would need IO that asyncio cannot run implicitly;
    SQLAlchemy would fail with ``MissingGreenlet`` halfway into the statement. This is
    raised instead, before any IO, naming the attribute and the ways to load it
    (``selectinload``, ``awaitable_attrs``, ``session.refresh``). Nothing was sent and
    the session is as it was: the next awaited call works.
    """


class NoCurrentSessionError(SessionForgeError, LookupError):
    """Raised when ``current()`` is called outside any ``scope()`` or request."""


class NestedTransactionError(SessionForgeError, RuntimeError):
    """Raised when ``atomic(durable=True)`` is entered inside another transaction."""


class RetryExhaustedError(SessionForgeError):
    """Raised when a retried transaction failed on every attempt.

    ``last_error`` is the exception of the final attempt; ``attempts`` counts every
    call of the function, the first one included.
    """

    def __init__(self, message: str, *, last_error: BaseException, attempts: int) -> None:
        super().__init__(message)
        self.last_error = last_error
        self.attempts = attempts


class TransactionTimeoutError(SessionForgeError, TimeoutError):
    """Raised when a transaction outlives its ``timeout`` and has been rolled back."""


class SessionClosedError(SessionForgeError, RuntimeError):
    """Raised when a session closed for good (a request's, once its response began) is used."""


class ReadOnlySessionError(SessionForgeError, RuntimeError):
    """Raised when a reader session (``db.reader()``) is asked to write."""


class IsolationLockTimeoutError(SessionForgeError, TimeoutError):
    """Raised when a session in an ``isolated()`` block cannot have its turn in time.

    Its turn on the test's one connection did not come within ``lock_timeout`` seconds,
    or never can (the session holding the connection was garbage-collected unclosed).
    """


class IsolationNotEnteredError(SessionForgeError, RuntimeError):
    """Raised when an ``isolated()`` handle's ``connection`` is asked for outside its block."""


class MigrationError(SessionForgeError, RuntimeError):
    """Raised when a migration left rows whose foreign keys point to no row (SQLite).

    ``violations`` holds ``PRAGMA foreign_key_check``'s rows: ``(table, rowid, parent,
    foreign key index)``. Raised by ``sessionforge.alembic.run_migrations``, which rolls
    the migration back.
    """

    def __init__(self, message: str, *, violations: list[tuple[Any, ...]]) -> None:
        super().__init__(message)
        self.violations = violations
