"""One session transaction at a time on the isolated connection: the turn lock.

``isolated()`` puts every session of a factory on one connection, which can serve one
session transaction at a time. The lock hands out turns across threads and event
loops; a session begun by the holder (or by a task or thread its context was copied
into) stacks its SAVEPOINT on top instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
import weakref
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Final

from sessionforge.errors import IsolationLockTimeoutError, SessionClosedError

__all__ = ["WHAT_TO_DO", "ConnectionLock"]

#: The end of every message about a session the block ended under.
WHAT_TO_DO: Final = (
    "; close sessions, and await the tasks (join the threads) that use them, before the "
    "isolated() block ends"
)

# The lock tokens held by this context and the contexts it was copied from (a task
# started by a holder inherits them): a session whose context holds the newest token
# nests its SAVEPOINT on top instead of waiting.
_HELD: ContextVar[tuple[object, ...]] = ContextVar("sessionforge_isolation_held", default=())


@dataclass(slots=True, eq=False)
class _Waiter:
    key: object
    held: tuple[object, ...]
    event: threading.Event | None = None
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[None] | None = None
    token: object | None = None

    def wake(self) -> None:
        if self.event is not None:
            self.event.set()
        elif self.loop is not None and self.future is not None:
            future = self.future
            self.loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_POLL: Final = 0.005  # seconds between looks while a commit waits for a stacked grant
#: Seconds between a waiter's looks for a holder that was garbage-collected (the first
#: look runs the collector: a leaked session sits in a reference cycle).
_CHECK: Final = 1.0


class ConnectionLock:
    """Who may use the isolated connection: one session transaction at a time.

    Works across threads and event loops (a ``threading.Lock`` guards the state; async
    waiters are woken with ``call_soon_threadsafe``). Grants are stacked: the holder of
    the newest grant, and the tasks and threads its context was copied into, may stack
    another (a nested SAVEPOINT); anyone else waits, first come first served.

    Holders are held weakly: a session garbage-collected in its transaction can never
    release its grant, and a waiter that finds one fails at once instead of waiting out
    the timeout. A holder that is merely slow is alive, and is waited for.
    """

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._mutex = threading.Lock()
        # (key, token), oldest first
        self._holders: list[tuple[weakref.ref[object], object]] = []
        self._waiters: deque[_Waiter] = deque()
        self._closed = False  # the isolated block has ended

    def acquire(self, key: object) -> None:
        """Wait (blocking the thread) until ``key`` may use the connection."""
        waiter = self._grant_or_queue(key, threading.Event())
        if waiter.token is None:
            assert waiter.event is not None
            deadline = time.monotonic() + self._timeout
            collect = True
            while not waiter.event.wait(min(_CHECK, max(deadline - time.monotonic(), 0))):
                if time.monotonic() >= deadline or self._hopeless(waiter, collect):
                    break
                collect = False
            self._settle(waiter, None)
        self._hold(waiter.token)

    async def acquire_async(self, key: object) -> None:
        """Wait (suspending the task) until ``key`` may use the connection."""
        waiter = self._grant_or_queue(key, None)
        if waiter.token is None:
            assert waiter.future is not None
            deadline = time.monotonic() + self._timeout
            collect = True
            try:
                while (remaining := deadline - time.monotonic()) > 0:
                    await asyncio.wait((waiter.future,), timeout=min(_CHECK, remaining))
                    if waiter.future.done() or self._hopeless(waiter, collect):
                        break
                    collect = False
            except BaseException as error:
                self._settle(waiter, error)
            self._settle(waiter, None)
        self._hold(waiter.token)

    def acquire_now(self, key: object) -> bool:
        """Take the connection if it is free for this context; say whether it was."""
        held = _HELD.get()
        with self._mutex:
            self._check_open()
            if not self._grantable(held):
                return False
            token = self._grant(key)
        self._hold(token)
        return True

    def wait_on_top(self, key: object) -> None:
        """Wait (blocking) until no grant stacked on ``key``'s is left."""
        deadline = time.monotonic() + self._timeout
        while not self._on_top(key):
            if time.monotonic() > deadline:
                raise self._stacked_error()
            time.sleep(_POLL)

    async def wait_on_top_async(self, key: object) -> None:
        """Wait (suspending the task) until no grant stacked on ``key``'s is left."""
        deadline = time.monotonic() + self._timeout
        while not self._on_top(key):
            if time.monotonic() > deadline:
                raise self._stacked_error()
            await asyncio.sleep(_POLL)

    def _on_top(self, key: object) -> bool:
        with self._mutex:
            if self._closed:
                return True  # nothing to wait for: the commit is refused on its own
            keys = [holder() for holder, _token in self._holders]
        return key not in keys or keys[-1] is key

    def _stacked_error(self) -> IsolationLockTimeoutError:
        return IsolationLockTimeoutError(
            f"a transaction waited {self._timeout:g}s to commit for a session begun by a task "
            "or thread it started, whose SAVEPOINT sits on top of its own; await that task "
            "(or close its session) before committing"
        )

    def release(self, key: object) -> None:
        """``key``'s transaction ended: hand the connection to the next waiter."""
        with self._mutex:
            for index, (holder, _token) in enumerate(self._holders):
                if holder() is key:
                    del self._holders[index]
                    break
            else:
                return
            woken = self._next_waiter()
        if woken is not None:
            woken.wake()

    def close(self) -> None:
        """The isolated block ends: wake every waiter, refuse every later request."""
        with self._mutex:
            self._closed = True
            waiters = list(self._waiters)
            self._waiters.clear()
        for waiter in waiters:
            with contextlib.suppress(RuntimeError):  # its loop has closed: nobody waits
                waiter.wake()

    # internals (the _locked ones run under the mutex) ------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosedError(
                "the test's isolated() block ended while this session was waiting for its turn "
                f"on the connection{WHAT_TO_DO}"
            )

    def _hopeless(self, waiter: _Waiter, collect: bool) -> bool:
        """Whether a holder ahead of ``waiter`` was garbage-collected (so never releases)."""
        if collect:
            with self._mutex:
                alive = all(holder() is not None for holder, _token in self._holders)
            if alive:
                gc.collect()  # a leaked session and its transaction form a cycle
        with self._mutex:
            return self._dead_ahead_locked(waiter)

    def _dead_ahead_locked(self, waiter: _Waiter) -> bool:
        return any(
            holder() is None and token not in waiter.held for holder, token in self._holders
        )

    def _grant_or_queue(self, key: object, event: threading.Event | None) -> _Waiter:
        held = _HELD.get()
        waiter = _Waiter(key, held, event=event)
        with self._mutex:
            self._check_open()
            if self._grantable(held):
                waiter.token = self._grant(key)
                return waiter
            if event is None:
                waiter.loop = asyncio.get_running_loop()
                waiter.future = waiter.loop.create_future()
            self._waiters.append(waiter)
        return waiter

    def _settle(self, waiter: _Waiter, error: BaseException | None) -> None:
        """After a wait: keep a grant that arrived, or leave the queue and raise."""
        with self._mutex:
            if waiter.token is not None:
                if error is None and not self._closed:
                    return
                # Cancelled, or the block ended, just as it was granted: pass it on.
                granted = True
            else:
                granted = False
                if waiter in self._waiters:  # not if woken by close()
                    self._waiters.remove(waiter)
            hopeless = self._dead_ahead_locked(waiter)
        if granted:
            self.release(waiter.key)
        if isinstance(error, asyncio.CancelledError):
            raise error
        self._check_open()
        if hopeless:
            raise IsolationLockTimeoutError(
                "a session would wait forever for the test's isolated connection: the session "
                "holding it was garbage-collected without being closed, so its transaction "
                "can never end; close every session (`async with db() as session`, "
                "`async with db.begin()`, `await session.close()`), also in app code — "
                "track_session_origin=True makes the leak's ResourceWarning say where it "
                "was made"
            ) from error
        raise IsolationLockTimeoutError(
            f"a session waited {self._timeout:g}s for the test's isolated connection, which "
            "another session's transaction holds: a session the test left open, or a task "
            "that waits for this one while its own transaction is open; close sessions when "
            "done (or raise lock_timeout)"
        ) from error

    def _grantable(self, held: tuple[object, ...]) -> bool:
        return not self._holders or self._holders[-1][1] in held

    def _grant(self, key: object) -> object:
        token = object()
        self._holders.append((weakref.ref(key), token))
        return token

    def _next_waiter(self) -> _Waiter | None:
        for waiter in self._waiters:
            if self._grantable(waiter.held):
                self._waiters.remove(waiter)
                waiter.token = self._grant(waiter.key)
                return waiter
        return None

    def _hold(self, token: object | None) -> None:
        with self._mutex:
            live = {token for _key, token in self._holders}
        _HELD.set((*(t for t in _HELD.get() if t in live), token))
