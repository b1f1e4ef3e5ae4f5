"""The public surface is curated: nothing becomes public by accident."""

from __future__ import annotations

import subprocess
import sys

from sqlalchemy.exc import MissingGreenlet

import sessionforge
from sessionforge import errors

EXPECTED = [
    "DEFAULT_URL",
    "AmbiguousCommitError",
    "AsyncBeginContext",
    "ConcurrentSessionUseError",
    "ConfigurationError",
    "DatabaseUnavailableError",
    "EngineStatus",
    "FactoryConfig",
    "FactoryOptions",
    "FactoryStatus",
    "HookError",
    "LazyLoadError",
    "NestedTransactionError",
    "NoCurrentSessionError",
    "ReadOnlySessionError",
    "ReplicaStatus",
    "RetryExhaustedError",
    "SessionClosedError",
    "SessionFactory",
    "SessionForgeError",
    "SyncBeginContext",
    "SyncSessionFactory",
    "TransactionTimeoutError",
    "after_rollback",
    "errors",
    "hook_errors",
    "on_commit",
]


def test_exported_names() -> None:
    assert sessionforge.__all__ == EXPECTED
    for name in EXPECTED:
        assert getattr(sessionforge, name) is not None


def test_every_error_is_a_sessionforge_error_and_its_stdlib_kin() -> None:
    kin = {
        errors.ConfigurationError: ValueError,
        errors.DatabaseUnavailableError: ConnectionError,
        errors.AmbiguousCommitError: errors.DatabaseUnavailableError,
        errors.ConcurrentSessionUseError: RuntimeError,
        errors.NoCurrentSessionError: LookupError,
        errors.NestedTransactionError: RuntimeError,
        errors.TransactionTimeoutError: TimeoutError,
        errors.RetryExhaustedError: Exception,
        errors.SessionClosedError: RuntimeError,
        errors.ReadOnlySessionError: RuntimeError,
        errors.IsolationLockTimeoutError: TimeoutError,
        errors.IsolationNotEnteredError: RuntimeError,
        errors.MigrationError: RuntimeError,
        errors.LazyLoadError: MissingGreenlet,
    }
    assert sorted(errors.__all__) == sorted([*(c.__name__ for c in kin), "SessionForgeError"])
    for error, base in kin.items():
        assert issubclass(error, errors.SessionForgeError)
        assert issubclass(error, base)
        assert error.__doc__
        assert error.__doc__.startswith("Raised when")


def test_retry_exhausted_carries_the_last_error() -> None:
    last = TimeoutError("serialization failure")
    error = errors.RetryExhaustedError("gave up", last_error=last, attempts=6)
    assert (error.last_error, error.attempts) == (last, 6)


def test_import_does_not_pull_in_web_frameworks_or_pytest() -> None:
    code = (
        "import sys, sessionforge, sessionforge.asgi; "
        "bad = [m for m in ('fastapi', 'starlette', 'pytest', 'asyncpg', 'psycopg') "
        "if m in sys.modules]; print(bad)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
