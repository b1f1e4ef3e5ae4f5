"""Cleanup that a cancellation cannot cut short.

A task cancelled while its transaction ends must still end it: roll back (or finish the
COMMIT) and give the connection back, or the pool leaks a connection and the server keeps
a session "idle in transaction". ``run_to_completion`` runs the cleanup in a task of its
own, waits for it through any number of cancellations, and re-raises the cancellation
once the cleanup is done — so cancellation is never swallowed, and the caller never
returns while cleanup is still running in the background.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["end_and_close", "ending_the_transaction", "run_to_completion"]

_T = TypeVar("_T")


async def run_to_completion(coro: Coroutine[Any, Any, _T]) -> _T:
    """Await ``coro`` to its end even if the calling task is cancelled meanwhile.

    A cancellation received while waiting wins over the outcome: it is re-raised after
    ``coro`` has ended, chained to ``coro``'s error if it failed (a COMMIT that a
    deferred constraint refuses, say). Raising that error instead would swallow the
    cancellation — ``task.cancelled()`` False, and ``run_transaction`` could even
    retry — which is what SQLAlchemy 2.1's own ``_run_to_completion`` does.
    """
    task = asyncio.create_task(coro)
    cancelled: asyncio.CancelledError | None = None
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError as error:
            if task.done():
                raise  # the cleanup itself was cancelled or failed that way
            cancelled = error
        except BaseException as error:
            if cancelled is not None:
                raise cancelled from error
            raise
        else:
            break
    if cancelled is not None:
        raise cancelled
    return result


async def end_and_close(
    session: AsyncSession, end: Callable[[], Awaitable[object]] | None
) -> None:
    """Await ``end()`` (COMMIT, ROLLBACK...), then ``session.close()``, both to completion.

    They run in a task of their own, as ``async_sessionmaker``'s ``begin()`` exit does:
    a cancellation arriving meanwhile waits for them and is re-raised afterwards, so a
    COMMIT is never cut off half-way (the caller would not know whether it happened) and
    the pool never gets a connection back in the middle of its reset. Scheduling the
    task is also one pass of the event loop before the COMMIT, which lets other tasks'
    ready I/O run first: measured +3-4 % throughput with 10 tasks on PostgreSQL.

    If another task is still in an operation on the session (an ``asyncio.gather``
    abandoned by an error), the task first waits for that operation to end, then
    holds the session while it ends it: ``end()`` (``AsyncSessionTransaction``'s exit
    rolls back without passing through the guarded ``session.rollback``) never runs
    alongside another task's statement. See ``AsyncHookMethods._sessionforge_take_turn``.
    """
    caller = asyncio.current_task()  # awaits the ending: it must not be waited for
    await run_to_completion(ending_the_transaction(session, end, caller))


async def ending_the_transaction(
    session: AsyncSession,
    end: Callable[[], Awaitable[object]] | None,
    caller: asyncio.Task[Any] | None = None,
) -> None:
    """The task ``end_and_close`` runs (its name shows in ``ConcurrentSessionUseError``)."""
    # Sessions of a sessionforge factory carry the guard; others end as they are. (One
    # frame for the whole ending: every resume of a coroutine frame costs a call.)
    take_turn = getattr(session, "_sessionforge_take_turn", None)
    task = asyncio.current_task()
    restore: object = None
    if take_turn is not None:
        proceed, restore = await take_turn(task, caller)
        if not proceed:
            return  # retired: its operation outlived pool_timeout, the connection is gone
    try:
        try:
            if end is not None:
                await end()
        finally:
            await session.close()
    finally:
        if take_turn is not None:
            session._sessionforge_end_turn(task, restore)  # type: ignore[attr-defined]
