"""What ``begin()`` returns, for each twin: a session in a transaction for a block.

``AsyncBeginContext`` (``async with db.begin()``) and ``SyncBeginContext`` (``with
db.sync.begin()``) commit on success, roll back on error and always close the session —
also when the COMMIT itself fails. Both make their session when the block is entered,
so a context that is never entered leaves nothing behind. The async one also keeps
``begin(timeout=)``'s deadline and ends the transaction in a task of its own, so a
cancellation cannot cut the COMMIT or the close short (``cancellation.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, AsyncSessionTransaction
from sqlalchemy.orm import Session, SessionTransaction

from sessionforge import dialects
from sessionforge.errors import TransactionTimeoutError

from .cancellation import end_and_close, run_to_completion
from .replicas import Replicas
from .routing import carry_consistency
from .transactions import TransactionOptions

__all__ = ["AsyncBeginContext", "SyncBeginContext"]

_AS = TypeVar("_AS", bound=AsyncSession)
_S = TypeVar("_S", bound=Session)


class AsyncBeginContext(Generic[_AS]):
    """What ``SessionFactory.begin()`` returns: ``async with`` yields the session.

    The session is made when the block is entered, so a context that is never
    entered leaves nothing behind (and is not counted as an open session).
    """

    __slots__ = (
        "_attempt",
        "_deadline",
        "_make_session",
        "_options",
        "_replicas",
        "_session",
        "_transaction",
    )

    def __init__(
        self,
        make_session: Callable[[], _AS],
        options: TransactionOptions | None = None,
        replicas: Replicas | None = None,
        attempt: int = 1,
    ) -> None:
        self._make_session = make_session
        self._options = options
        self._replicas = replicas
        self._transaction: AsyncSessionTransaction | None = None
        self._deadline: asyncio.Timeout | None = None
        #: Which ``run_transaction`` attempt this is (1 for ``begin()``), for telemetry.
        self._attempt = attempt

    async def __aenter__(self) -> _AS:
        self._session = self._make_session()
        try:
            if self._options is not None and self._options.timeout is not None:
                self._deadline = asyncio.timeout(self._options.timeout)
                await self._deadline.__aenter__()
            self._transaction = await self._session.begin()
        except BaseException as error:
            if self._deadline is not None:  # disarm it: it must not cancel later code
                with contextlib.suppress(BaseException):
                    await self._deadline.__aexit__(type(error), error, error.__traceback__)
            await run_to_completion(self._session.close())
            raise
        return self._session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._transaction is not None, "__aexit__ without __aenter__"
        timed_out = False
        if self._deadline is not None:
            # The deadline covers the block, not the COMMIT: a COMMIT cut short would
            # leave the caller not knowing whether it happened.
            try:
                await self._deadline.__aexit__(exc_type, exc, tb)
            except TimeoutError as expired:
                exc_type, exc, timed_out = TimeoutError, expired, True
        if (
            exc is not None
            and self._options is not None
            and self._options.timeout is not None
            and dialects.is_statement_timeout(exc)
        ):
            timed_out = True  # our transaction-local statement_timeout fired
        end: Callable[[], Awaitable[object]]
        if timed_out and self._options is not None and self._options.invalidate_on_timeout:
            # A statement may still be running on the server: drop the connection (the
            # server rolls back) rather than queue a ROLLBACK behind it.
            end = self._session.invalidate
        else:
            end = functools.partial(self._transaction.__aexit__, exc_type, exc, tb)
        try:
            await end_and_close(self._session, end)
        finally:
            if self._replicas is not None:
                # The COMMIT ran in a task of its own, and a cancellation may have cut
                # the wait short after it happened: its position reaches the caller.
                carry_consistency(self._session.sync_session, self._replicas)
        if timed_out:
            assert self._options is not None
            raise TransactionTimeoutError(
                f"the transaction outlived its timeout of {self._options.timeout:g}s and was "
                "rolled back; raise timeout= or make the work shorter"
            ) from exc


class SyncBeginContext(Generic[_S]):
    """What ``SyncSessionFactory.begin()`` returns: ``with`` yields the session.

    The session is made when the block is entered (see ``AsyncBeginContext``).
    """

    __slots__ = ("_attempt", "_make_session", "_options", "_session", "_started", "_transaction")

    def __init__(
        self,
        make_session: Callable[[], _S],
        options: TransactionOptions | None = None,
        attempt: int = 1,
    ) -> None:
        self._make_session = make_session
        self._options = options
        self._transaction: SessionTransaction | None = None
        self._started = 0.0
        self._attempt = attempt

    def __enter__(self) -> _S:
        self._session = self._make_session()
        try:
            self._started = time.monotonic()
            self._transaction = self._session.begin()
        except BaseException:
            self._session.close()
            raise
        return self._session

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._transaction is not None, "__exit__ without __enter__"
        timeout = self._options.timeout if self._options is not None else None
        timed_out = timeout is not None and (
            (exc is None and time.monotonic() - self._started > timeout)
            or (exc is not None and dialects.is_statement_timeout(exc))
        )
        try:
            if timed_out:
                self._transaction.rollback()
            else:
                self._transaction.__exit__(exc_type, exc, tb)
        finally:
            self._session.close()
        if timed_out:
            raise TransactionTimeoutError(
                f"the transaction outlived its timeout of {timeout:g}s and was rolled back; "
                "raise timeout= or make the work shorter"
            ) from exc
