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
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run_to_completion"]

_T = TypeVar("_T")


async def run_to_completion(coro: Coroutine[Any, Any, _T]) -> _T:
    """Await ``coro`` to its end even if the calling task is cancelled meanwhile."""
    task = asyncio.ensure_future(coro)
    cancelled: asyncio.CancelledError | None = None
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError as error:
            if task.done():
                raise  # the cleanup itself was cancelled or failed that way
            cancelled = error
        else:
            break
    if cancelled is not None:
        raise cancelled
    return result
