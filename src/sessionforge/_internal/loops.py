"""One async engine per event loop, closed when its loop ends.

An ``AsyncEngine``'s pooled connections belong to the event loop they were opened in;
used from another loop they fail with "attached to a different loop" (SQLAlchemy
#5626), and left behind when their loop closes they warn "Event loop is closed" (#9234).
A factory made at import time must still work when a program runs loop after loop
(``asyncio.run`` twice, pytest-asyncio's per-test loops, a worker calling
``asyncio.run`` per job). So each loop gets its own engine, built on first use there.

Closing: when an engine is built in a loop, an async generator parked at its ``yield``
is registered with that loop. ``asyncio.run()`` and ``asyncio.Runner`` end a loop with
``loop.shutdown_asyncgens()``, which closes the generator, whose ``finally`` disposes
the engine inside its own loop, properly. A loop closed without that step (a bare
``loop.close()``) leaves its engine to be dropped later: its pool is discarded without
closing the connections (they cannot be closed without their loop), drivers'
``ResourceWarning``s about them are silenced for that moment, and a line is logged.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import warnings
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from sessionforge import dialects

from . import sqla

__all__ = ["LoopEngines", "run_on_own_loop", "running_loop"]

_T = TypeVar("_T")

logger = logging.getLogger("sessionforge.engines")


def running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def run_on_own_loop(make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run the coroutine ``make()`` to completion on a new event loop, and wait for it.

    For sync code that must run async work to its end: Alembic's ``env.py`` (called
    from its CLI, or from a program inside a running loop), the pytest plugin's sync
    fixtures (pytest-asyncio's loop may be set, or running).

    No loop running here: the loop runs in this thread (``asyncio.Runner`` with a loop
    factory, so a loop set but idle here — pytest-asyncio's — stays set). A loop running
    here: a worker thread runs it, and this thread (and its loop) waits.
    """
    if running_loop() is None:
        with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
            return runner.run(make())
    results: list[_T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
                results.append(runner.run(make()))
        except BaseException as error:  # handed to the waiting thread
            errors.append(error)

    worker = threading.Thread(target=run, name="sessionforge-migrations")
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
    return results[0]


@dataclass(slots=True)
class _Entry:
    engine: AsyncEngine
    closer: AsyncGenerator[None, None] | None
    starter: asyncio.Future[None] | None = None


class LoopEngines:
    """The async engines of one factory, keyed by event loop (``None``: no loop)."""

    def __init__(self, build: Callable[[], AsyncEngine]) -> None:
        self._build = build
        self._entries: dict[asyncio.AbstractEventLoop | None, _Entry] = {}
        self._lock = threading.Lock()

    def get(self) -> AsyncEngine:
        """The running loop's engine, built (and its closing arranged) on first use."""
        loop = running_loop()
        entry = self._entries.get(loop)
        if entry is None:
            entry = self._add(loop)
        return entry.engine

    def current(self) -> AsyncEngine | None:
        """The running loop's engine if it was built, else ``None``."""
        entry = self._entries.get(running_loop())
        return entry.engine if entry is not None else None

    def engines(self) -> list[AsyncEngine]:
        return [entry.engine for entry in list(self._entries.values())]

    def take_current(self) -> AsyncEngine | None:
        """Forget the running loop's engine and return it, for the caller to dispose."""
        with self._lock:
            entry = self._entries.pop(running_loop(), None)
        if entry is not None and entry.closer is not None:
            _discard_closer(entry.closer)
        return entry.engine if entry is not None else None

    def drop_dead(self) -> None:
        """Drop the engines of loops that closed without disposing them."""
        with self._lock:
            dead = [loop for loop in self._entries if loop is not None and loop.is_closed()]
            entries = [self._entries.pop(loop) for loop in dead]
        for entry in entries:
            _abandon(entry)

    def _add(self, loop: asyncio.AbstractEventLoop | None) -> _Entry:
        with self._lock:
            entry = self._entries.get(loop)
            if entry is not None:
                return entry
            entry = _Entry(self._build(), None)
            self._entries[loop] = entry
        self.drop_dead()
        if loop is not None:
            closer = self._close_at_loop_end(loop, entry)
            # Calling __anext__ registers the generator with the running loop's asyncgen
            # hooks (the loop keeps it in a WeakSet: the entry holds the strong
            # reference); the task runs it up to its yield.
            entry.closer = closer
            entry.starter = asyncio.ensure_future(closer.__anext__())
        return entry

    async def _close_at_loop_end(
        self, loop: asyncio.AbstractEventLoop, entry: _Entry
    ) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            with self._lock:
                mine = self._entries.get(loop) is entry
                if mine:
                    del self._entries[loop]
            if mine:
                try:
                    await entry.engine.dispose()
                except Exception:
                    logger.warning(
                        "disposing the engine of an ending event loop failed", exc_info=True
                    )


def _discard_closer(closer: AsyncGenerator[None, None]) -> None:
    # The engine is being disposed by the caller; the parked generator has nothing
    # left to do. Closing it here would need the loop, so we just let go of it: a
    # generator parked at its yield and then collected is closed by the loop's
    # finalizer, and its finally finds the entry gone.
    del closer


def _let_go_of_idle(engine: AsyncEngine, pool: Any) -> None:
    # (A function of its own: no reference to a driver connection outlives it, so the
    # garbage collection in _abandon, under its warning filter, finds them all.)
    for driver in sqla.idle_driver_connections(pool):
        dialects.abandon_driver_connection(engine.url, driver)


def _abandon(entry: _Entry) -> None:
    pool: Any = entry.engine.sync_engine.pool
    count = pool.checkedin() if callable(getattr(pool, "checkedin", None)) else 0
    with warnings.catch_warnings():
        # The drivers' "unclosed connection/transport" warnings for connections of a
        # closed loop: nothing can close those connections any more.
        warnings.simplefilter("ignore", ResourceWarning)
        _let_go_of_idle(entry.engine, pool)
        entry.engine.sync_engine.dispose(close=False)
        del pool
        entry.closer = entry.starter = None
        gc.collect()
    logger.info(
        "dropped the engine of a closed event loop, abandoning %d pooled connection(s); "
        "end loops with asyncio.run()/asyncio.Runner, or call `await db.dispose()` before "
        "the loop closes, to close them properly",
        count,
    )
