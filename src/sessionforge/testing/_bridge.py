"""The isolated async connection's own event loop, and the bridge to its driver.

Drivers such as asyncpg tie a connection to the loop that opened it, while the
sessions of an ``isolated()`` block run in any loop: the test's, or the one
Starlette's ``TestClient`` runs the app in. The connection is opened in a loop of its
own (``HomeLoop``), and every call to its driver is handed to that loop (``bridge_driver``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

from sessionforge import dialects
from sessionforge._internal import sqla

__all__ = ["HomeLoop", "bridge_driver", "unbridge_driver"]

_T = TypeVar("_T")


class HomeLoop:
    """A thread running the event loop that owns the isolated async connection.

    Drivers such as asyncpg tie a connection to the loop that opened it; the test's
    loop may not be running while the app's (``TestClient``'s) runs, and may not even
    exist (a sync test). This loop runs for the whole isolated block.
    """

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        #: Held by each bridged await of a driver that drops its connection when a call
        #: is cancelled (``dialects.cancel_closes_connection``): the next call waits.
        self.turn: asyncio.Lock | None = None
        self.thread_id: int | None = None
        self._thread = threading.Thread(
            target=self._serve, name="sessionforge-isolated", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def submit(self, coroutine: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coroutine`` in the home loop, blocking this (other) thread meanwhile."""
        return self.submit(coroutine).result()

    def stop(self) -> None:
        if self._loop is not None and self._done is not None:
            self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join()

    def _serve(self) -> None:
        # asyncio.Runner: closing it ends the loop's async generators, which disposes
        # the factory's engine for this loop (loops.py).
        with asyncio.Runner() as runner:
            runner.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self.turn = asyncio.Lock()
        self.thread_id = threading.get_ident()
        self._ready.set()
        await self._done.wait()


def bridge_driver(adapted: Any, home: HomeLoop) -> None:
    """Have every call to the driver connection of ``adapted`` run in ``home``'s loop."""
    driver = sqla.driver_of(adapted)
    package = type(driver).__module__.partition(".")[0]
    sqla.replace_driver(adapted, _Bridge(driver, home, package))


def unbridge_driver(adapted: Any) -> None:
    """Undo ``bridge_driver`` (before the connection is closed)."""
    bridge = sqla.driver_of(adapted)
    if isinstance(bridge, _Bridge):
        sqla.replace_driver(adapted, bridge._target)


class _Bridge:
    """A driver object whose calls run in the home loop, whatever loop awaits them.

    Coroutines are awaited there (``run_coroutine_threadsafe``) and their results
    bridged in turn when they are driver objects (prepared statements, cursors,
    transactions); plain calls run there too, blocking the caller for the call.
    """

    __slots__ = ("_home", "_package", "_target")

    def __init__(self, target: Any, home: HomeLoop, package: str) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_home", home)
        object.__setattr__(self, "_package", package)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not callable(value):
            return self._wrap(value)
        home = self._home

        def call(*args: Any, **kwargs: Any) -> Any:
            if inspect.iscoroutinefunction(value) or threading.get_ident() == home.thread_id:
                result = value(*args, **kwargs)  # a coroutine does nothing until awaited
            else:

                async def in_home() -> Any:
                    return value(*args, **kwargs)

                result = home.run(in_home())
            wrapped = self._wrap(result)
            if wrapped is result and inspect.isawaitable(result):
                return self._await(result)
            return wrapped

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, value)

    def __await__(self) -> Generator[Any, None, Any]:
        return self._await(self._target).__await__()

    async def _await(self, awaitable: Any) -> Any:
        home = self._home
        if threading.get_ident() == home.thread_id:
            return self._wrap(await awaitable)

        if not dialects.cancel_closes_connection(self._package):

            async def in_home() -> Any:
                return await awaitable

            return self._wrap(await asyncio.wrap_future(home.submit(in_home())))

        async def in_turn() -> Any:
            assert home.turn is not None
            async with home.turn:
                return await awaitable

        # A driver that closes its connection when a call is cancelled mid-statement
        # would end the isolated block's one connection: cancelled here (a timeout, a
        # task cancelled), the call runs on to its end there (the statement's own limit,
        # such as begin(timeout=)'s max_statement_time, ends a long one), and each call
        # waits for the one before.
        return self._wrap(await asyncio.shield(asyncio.wrap_future(home.submit(in_turn()))))

    def _wrap(self, value: Any) -> Any:
        if _bridgeable(type(value), self._package):
            return _Bridge(value, self._home, self._package)
        return value


_BRIDGEABLE: dict[tuple[type, str], bool] = {}


def _bridgeable(kind: type, package: str) -> bool:
    """Whether ``kind`` is a connection-bound object of the driver ``package``: defined
    there (it or a base: SQLAlchemy 2.1's aiomysql dialect hands aiomysql a ``Cursor``
    subclass of its own, from ``sqlalchemy.dialects``) and with coroutine methods."""
    key = (kind, package)
    found = _BRIDGEABLE.get(key)
    if found is None:
        found = _BRIDGEABLE[key] = any(
            (base.__module__ or "").partition(".")[0] == package for base in kind.__mro__
        ) and any(inspect.iscoroutinefunction(getattr(kind, name, None)) for name in dir(kind))
    return found
