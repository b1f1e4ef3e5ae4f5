"""Per-transaction options and the retry policy, shared by both twins.

``TransactionOptions`` is validated once, before anything reaches the server; the twins
turn it into a bind with the right execution options, the transaction-local settings
applied when the transaction begins, and a deadline. The retry policy decides which
errors re-run a whole transaction and how long to wait between attempts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, SessionTransaction

from sessionforge import dialects
from sessionforge.errors import (
    AmbiguousCommitError,
    ConfigurationError,
    DatabaseUnavailableError,
    NestedTransactionError,
    RetryExhaustedError,
)

from .options import finite_seconds, shown_value

if TYPE_CHECKING:
    from .state import SessionState

__all__ = [
    "RetryPolicy",
    "TransactionOptions",
    "atomic_block",
    "check_durable",
    "check_joinable",
    "for_isolation",
    "install",
    "joins",
    "reader_options",
    "transaction_options",
]

#: Upper bound of one backoff sleep, whatever the attempt number.
MAX_BACKOFF: Final = 2.0

RetryPredicate = Callable[[BaseException], bool | None]


@dataclass(frozen=True, slots=True)
class TransactionOptions:
    """What ``begin(isolation_level=..., readonly=..., timeout=..., settings=...)`` asked for."""

    execution_options: Mapping[str, Any]
    settings: tuple[tuple[str, str], ...]
    timeout: float | None
    invalidate_on_timeout: bool
    #: Sent before the settings when the transaction gets its connection (MySQL's
    #: ``START TRANSACTION READ ONLY``: its dialects have no read-only option).
    statements: tuple[str, ...] = ()

    @property
    def cache_key(self) -> tuple[tuple[str, Any], ...]:
        return tuple(sorted(self.execution_options.items()))


def transaction_options(
    url: URL,
    *,
    isolation_level: str | None,
    readonly: bool,
    timeout: float | None,
    settings: Mapping[str, Any] | None,
    engine_isolation_level: str | None = None,
) -> TransactionOptions | None:
    """Validate per-transaction options for ``url``; ``None`` when none were given.

    Everything is checked here, before a session or a connection exists: whatever
    reaches the driver or the server is known to be acceptable to it.
    ``engine_isolation_level`` is the engine's own level (``isolation_level=`` of the
    factory), under which options that only a transaction honours would be lost.
    """
    if (
        engine_isolation_level == "AUTOCOMMIT"
        and isolation_level is None
        and (readonly or settings)
    ):
        raise ConfigurationError(
            "this factory's engine runs in AUTOCOMMIT (isolation_level='AUTOCOMMIT'), "
            "so readonly=True and settings= (which last one transaction) would silently "
            "do nothing; pass isolation_level= for this transaction, or use db.reader()"
        )
    if type(readonly) is not bool:
        raise ConfigurationError(
            f"readonly={shown_value(readonly)} ({type(readonly).__name__}) is invalid: "
            "expected True or False"
        )
    if settings is not None and not isinstance(settings, Mapping):
        raise ConfigurationError(
            "settings must be a dict of server setting names to values, or None; "
            f"got {type(settings).__name__}"
        )
    if isolation_level is None and not readonly and timeout is None and not settings:
        return None
    seconds = None if timeout is None else finite_seconds(timeout)
    if timeout is not None and (seconds is None or not 0 < seconds <= dialects.MAX_SECONDS):
        raise ConfigurationError(
            f"timeout={shown_value(timeout)} ({type(timeout).__name__}) is invalid: expected "
            f"seconds > 0 and at most {dialects.MAX_SECONDS:.10g} (about 24.8 days), or None"
        )
    level = (
        None if isolation_level is None else dialects.check_isolation_level(url, isolation_level)
    )
    pairs = dialects.check_settings(url, settings or {})
    if level == "AUTOCOMMIT" and (readonly or pairs):
        raise ConfigurationError(
            "isolation_level='AUTOCOMMIT' runs every statement on its own, outside a "
            "transaction, so readonly=True and settings= (which last one transaction) "
            "would silently do nothing; drop AUTOCOMMIT, or use db.reader() for reads"
        )
    if seconds is not None and any(name.lower() == "statement_timeout" for name, _ in pairs):
        raise ConfigurationError(
            "timeout= sets statement_timeout for the transaction, and settings= sets it "
            "too; pass one of them"
        )
    if level != "AUTOCOMMIT":  # a transaction-local setting would not outlive its statement
        pairs = dialects.timeout_settings(url, seconds) + pairs
    return TransactionOptions(
        execution_options=dialects.transaction_execution_options(url, level, readonly),
        settings=pairs,
        timeout=seconds,
        invalidate_on_timeout=dialects.invalidate_on_timeout(url),
        statements=dialects.begin_statements(url, readonly),
    )


def for_isolation(
    options: TransactionOptions,
    url: URL,
    timeout: float | None,
    settings: Mapping[str, Any] | None,
) -> TransactionOptions | None:
    """``options`` for a transaction that is a SAVEPOINT of a test's (``isolated()``).

    The isolation level and read-only mode (which only a real BEGIN can set) and the
    server's statement-time limit (PostgreSQL's transaction-local ``statement_timeout``,
    MySQL's session variable, either of which would outlive the SAVEPOINT) are left
    out, and a timeout rolls back rather than invalidates the shared connection.
    """
    kept = transaction_options(
        url, isolation_level=None, readonly=False, timeout=None, settings=settings
    )
    if kept is None and timeout is None:
        return None
    return replace(
        kept or options,
        execution_options={},
        settings=kept.settings if kept is not None else (),
        timeout=timeout,
        invalidate_on_timeout=False,
        statements=(),
    )


def reader_options(url: URL) -> TransactionOptions:
    """The options of ``db.reader()`` sessions (see ``dialects.reader_execution_options``)."""
    return TransactionOptions(
        execution_options=dialects.reader_execution_options(url),
        settings=(),
        timeout=None,
        invalidate_on_timeout=False,
    )


def install(session_class: type[Session]) -> None:
    """Apply a transaction's settings when it first gets its connection."""
    event.listen(session_class, "after_begin", _apply_settings)


def _apply_settings(session: Session, transaction: SessionTransaction, connection: Any) -> None:
    if transaction.parent is not None:
        return  # SAVEPOINTs share the outer transaction's settings
    options = session._sessionforge_state.options  # type: ignore[attr-defined]
    if options is None:
        return
    for statement in options.statements:
        connection.exec_driver_sql(statement)
    if options.settings:
        dialects.apply_settings(connection, options.settings)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How ``run_transaction`` retries: which errors, how often, how long between."""

    retries: int
    backoff: float
    retry_if: RetryPredicate | None

    @classmethod
    def build(cls, retries: int, backoff: float, retry_if: RetryPredicate | None) -> RetryPolicy:
        if type(retries) is not int or retries < 0:
            raise ConfigurationError(
                f"retries={shown_value(retries)} is invalid: expected an int >= 0"
            )
        seconds = finite_seconds(backoff)
        if seconds is None or seconds < 0:
            raise ConfigurationError(
                f"backoff={shown_value(backoff)} is invalid: expected seconds >= 0"
            )
        if retry_if is not None and not callable(retry_if):
            raise ConfigurationError("retry_if must be a callable taking the exception")
        return cls(retries, seconds, retry_if)

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """Whether the failure of attempt number ``attempt`` (1-based) gets another run.

        Raises ``RetryExhaustedError`` when the error is retryable but the attempts
        are used up.
        """
        if not self.is_retryable(exc):
            return False
        if attempt > self.retries:
            raise RetryExhaustedError(
                f"the transaction failed {attempt} times on retryable errors (the last: "
                f"{type(exc).__name__}); "
                + (
                    "the database stayed unreachable: check it, or raise retries="
                    if isinstance(exc, DatabaseUnavailableError)
                    else "raise retries= or reduce contention"
                ),
                last_error=exc,
                attempts=attempt,
            ) from exc
        return True

    def is_retryable(self, exc: BaseException) -> bool:
        """``retry_if``'s verdict, else conflicts and connections lost before COMMIT.

        A ``DatabaseUnavailableError`` means the server rolled the transaction back
        (the connection was lost before its COMMIT was sent), so it is re-run; an
        ``AmbiguousCommitError`` (lost while the COMMIT was in flight) never is.
        """
        if self.retry_if is not None:
            verdict = self.retry_if(exc)
            if verdict is not None:
                return bool(verdict)
        return dialects.is_retryable(exc) or _lost_before_commit(exc)

    def delay(self, attempt: int) -> float:
        """Full-jitter exponential backoff before re-run number ``attempt`` (1-based)."""
        # The exponent is capped: 2 ** 1024 no longer converts to a float.
        return random.uniform(0, min(MAX_BACKOFF, self.backoff * 2 ** min(attempt - 1, 64)))


def _lost_before_commit(exc: BaseException) -> bool:
    """``exc`` is, or was raised from, a ``DatabaseUnavailableError`` and no COMMIT was lost."""
    unavailable = False
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, AmbiguousCommitError):
            return False
        unavailable = unavailable or isinstance(current, DatabaseUnavailableError)
        current = current.__cause__
    return unavailable


@contextmanager
def atomic_block(session: Session) -> Iterator[int]:
    """Count one more atomic() block on ``session``; yield how many enclosed it."""
    state: SessionState = session._sessionforge_state  # type: ignore[attr-defined]
    depth = state.atomic_depth
    state.atomic_depth = depth + 1
    try:
        yield depth
    finally:
        state.atomic_depth = depth


def joins(session: Session | None) -> bool:
    """Whether an atomic() block joins ``session`` (as a SAVEPOINT) rather than begin anew.

    It does when the session is in a transaction, and when it is marked as an open
    atomic block without having begun one yet: a request's session (the ASGI
    integration), whose transaction the request commits.
    """
    if session is None:
        return False
    state: SessionState = session._sessionforge_state  # type: ignore[attr-defined]
    return session.in_transaction() or state.atomic_depth > 0


def check_durable(durable: object) -> None:
    """``atomic(durable=)`` is True or False, checked on every path."""
    if type(durable) is not bool:
        raise ConfigurationError(
            f"durable={shown_value(durable)} ({type(durable).__name__}) is invalid: "
            "expected True or False"
        )


def check_joinable(
    depth: int,
    durable: bool,
    isolation_level: str | None,
    readonly: bool,
    timeout: float | None,
    settings: Mapping[str, Any] | None,
) -> None:
    """Refuse what an atomic() running inside an open transaction cannot honour."""
    if durable and depth:
        raise NestedTransactionError(
            "atomic(durable=True) was entered inside another atomic block; a durable block "
            "must be outermost, so that leaving it means the work is committed"
        )
    if isolation_level is not None or readonly or timeout is not None or settings:
        where = (
            "a SAVEPOINT of the outer atomic block"
            if depth
            else ("a SAVEPOINT of the current session's open transaction")
        )
        raise NestedTransactionError(
            f"this atomic() is {where} and cannot change its isolation level, read-only "
            "mode, timeout or settings; pass them to the outermost atomic() or begin()"
        )
