"""sessionforge's async SQLite driver, the default of ``sqlite://``: at most one thread hop
per statement, none for a quick one.

SQLAlchemy 2.1's aiosqlite adaptation awaits a thread hop for each step of a statement
(make the cursor, execute, fetch, close): eight hops for ``BEGIN``/``INSERT``/``COMMIT``
and the pool's reset. Here each connection owns one thread that alone uses its
``sqlite3`` connection, and

* a statement is executed, its rows fetched and its cursor closed in **one** hop;
  cursors on our side are plain objects, made and closed without a hop;
* a statement that has been quick so far (a moving average under ``INLINE_BUDGET``,
  0.5 ms), and COMMIT/ROLLBACK, run **inline**, on the event loop's thread, when the
  connection is idle: no hop at all. Its first run is on the connection's thread, timed
  there; one that turns slow goes back there after blocking the loop once. Waiting for
  a lock is never done on the loop's thread: SQLite's busy timeout is 0, and the
  driver waits out ``SQLITE_BUSY`` itself with ``asyncio.sleep`` backoff up to the
  connection's busy timeout (``PRAGMA busy_timeout`` reads and sets that wait);
* ``COMMIT`` and ``ROLLBACK`` are one hop each, and none when no transaction is open
  (the pool's reset-on-return after a COMMIT is free);
* ``stream()`` / ``stream_results`` get a real server-side cursor: one hop per
  ``fetchmany`` batch;
* a task cancelled while its statement runs does not disturb the connection: the
  statement finishes on the thread, the next call (the pool's ROLLBACK) queues behind
  it, and the connection stays usable;
* ``close()`` ends the thread; so does ``terminate()`` (the pool's invalidation, and
  garbage collection of a connection that was never closed), once the statement in
  flight ends — closing the ``sqlite3`` connection rolls its transaction back, so no
  lock outlives it.

Everything else (SQL compilation, types, reflection, isolation levels, the REGEXP and
FLOOR functions) is SQLAlchemy's pysqlite dialect, as for aiosqlite.

What SQLAlchemy's asyncio layer asks of a dialect (written against SQLAlchemy 2.1.9):
``SQLiteDialect_sessionforge`` subclasses ``SQLiteDialect_pysqlite`` and sets the
attributes that layer looks for (``is_async``, ``has_terminate``,
``supports_server_side_cursors``, ``get_driver_connection``, ``do_terminate``), as its
own ``SQLiteDialect_aiosqlite`` does; sync DBAPI calls made in SQLAlchemy's greenlet
wait for the thread with ``sqlalchemy.util.await_``; the connection subclasses
``AdaptedConnection``. The driver's touches of SQLAlchemy internals (the pool choice,
the server-side cursor, the cursors' ``_async_soft_close``) are functions of
``sessionforge._internal.sqla``, sections 11-13.

``tests/test_sqlite_driver.py`` exercises each, and every SQLite case of the suite runs
on this driver (``SESSIONFORGE_TEST_SQLITE_DRIVER=aiosqlite`` runs them on aiosqlite).
``benchmarks/bench_loop_latency.py`` measures what inline statements cost the loop's
other tasks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterator
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from sqlalchemy import pool, util
from sqlalchemy.dialects.sqlite.base import SQLiteExecutionContext
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import AdaptedConnection
from sqlalchemy.exc import MissingGreenlet

from sessionforge._internal.sqla import (
    SoftClosingCursor,
    in_greenlet,
    server_side_cursor,
    sqlite_pool_class,
)

if TYPE_CHECKING:
    from sqlalchemy.engine.interfaces import DBAPIConnection, DBAPICursor, DBAPIModule
    from sqlalchemy.engine.url import URL

__all__ = ["ConnectionThread", "SQLiteDialect_sessionforge"]

_T = TypeVar("_T")

#: The driver name: ``sqlite+sessionforge:///app.db``.
DRIVER: Final = "sessionforge"

#: A statement whose moving-average time stays under this runs on the event loop's
#: thread (seconds). ``benchmarks/bench_loop_latency.py`` measures what it costs others.
INLINE_BUDGET: Final = 0.0005
_SMOOTHING: Final = 0.2
_MOST_TIMINGS: Final = 4096
#: sqlite3's default busy timeout, and the backoff of an inline call's wait for a lock.
_DEFAULT_BUSY_TIMEOUT: Final = 5.0
_FIRST_PAUSE: Final = 0.0005
_LONGEST_PAUSE: Final = 0.01
#: SQLITE_BUSY and SQLITE_BUSY_RECOVERY: run again on the thread, where SQLite waits.
#: Not BUSY_SNAPSHOT (517), which no wait can cure.
_BUSY: Final = frozenset({5, 261})
#: Forwarded methods that register a callback run during statements: a callback for
#: every statement turns inline calls off; a named one keeps its statements off it.
_CALLBACK_HOOKS: Final = frozenset(
    {"set_authorizer", "set_progress_handler", "set_trace_callback"}
)
_NAMED_HOOKS: Final = frozenset(
    {"create_function", "create_aggregate", "create_window_function", "create_collation"}
)
#: The functions SQLAlchemy's pysqlite dialect registers on every connection (pure).
_DIALECT_FUNCTIONS: Final = frozenset({"regexp", "floor"})

# (function, arguments, loop, future); a job without a future is not waited for.
_Job = tuple[
    Callable[..., Any],
    tuple[Any, ...],
    asyncio.AbstractEventLoop | None,
    "asyncio.Future[Any] | None",
]

# sqlite3.Connection methods a DBAPI connection forwards to the connection's thread
# (SQLAlchemy's pysqlite dialect calls create_function; event listeners call others).
_FORWARDED: Final = frozenset(
    {
        "backup",
        "create_aggregate",
        "create_collation",
        "create_function",
        "create_window_function",
        "enable_load_extension",
        "load_extension",
        "set_authorizer",
        "set_progress_handler",
        "set_trace_callback",
    }
)


class ConnectionThread:
    """One ``sqlite3`` connection and the thread that alone uses it, one call at a time.

    It is the *driver connection* of ``sqlite+sessionforge`` (what
    ``AsyncConnection.get_raw_connection()`` leads to): run code against the
    ``sqlite3`` connection with ``await thread.run(fn, *args)``.

    Example::

        raw = await connection.get_raw_connection()
        names = await raw.driver_connection.run(
            lambda c: [row[0] for row in c.execute("SELECT name FROM sqlite_master")]
        )
    """

    __slots__ = (
        "__weakref__",
        "_finished",
        "_jobs",
        "_submitted",
        "_thread",
        "busy_timeout",
        "connection",
        "inline",
        "pending_begin",
        "timings",
        "user_names",
    )

    def __init__(self, timings: dict[str, float] | None = None) -> None:
        self.connection: sqlite3.Connection | None = None
        # A BEGIN not sent yet: it runs first in the next submitted call, same hop.
        self.pending_begin: str | None = None
        #: Seconds a statement waits for a lock another connection holds: SQLite's busy
        #: timeout, set only for calls on the connection's thread (``_with_busy_timeout``).
        self.busy_timeout = _DEFAULT_BUSY_TIMEOUT
        #: Whether calls may run on the event loop's thread (check_same_thread=False, a
        #: serialized SQLite build, no authorizer/progress/trace callback).
        self.inline = False
        #: The functions and collations registered through the DBAPI connection, whose
        #: statements stay on the connection's thread (one may wait on the event loop).
        self.user_names: re.Pattern[str] | None = None
        #: How long each statement took, by its SQL (shared by an engine's connections).
        self.timings: dict[str, float] = {} if timings is None else timings
        self._jobs: SimpleQueue[_Job | None] = SimpleQueue()
        # Jobs submitted (by the loop) and finished (by the thread): equal when idle.
        self._submitted = 0
        self._finished = 0
        # A daemon thread, as aiosqlite's: a connection leaked until interpreter exit
        # must not hold the process open.
        self._thread = threading.Thread(
            target=self._serve, name="sessionforge-sqlite", daemon=True
        )
        self._thread.start()

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(sqlite3_connection, *args)`` on the connection's thread (with SQLite's
        busy timeout in force, as for every call made there)."""
        return await self.submit(_with_busy_timeout, self, fn, (self.connection, *args))

    @property
    def idle(self) -> bool:
        """True when no call is queued or running (even one whose waiter gave up)."""
        return self._submitted == self._finished

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Queue ``fn(*args)``; the future (of the running loop) gets its outcome."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        fn, args = self.with_pending_begin(fn, args)
        self._submitted += 1
        self._jobs.put((fn, args, loop, future))
        return future

    def with_pending_begin(
        self, fn: Callable[..., _T], args: tuple[Any, ...]
    ) -> tuple[Callable[..., _T], tuple[Any, ...]]:
        """``fn(*args)``, preceded by the pending BEGIN if there is one (then sent)."""
        begin = self.pending_begin
        if begin is None:
            return fn, args
        self.pending_begin = None
        return _after_begin, (self.connection, begin, fn, args)

    def post(self, fn: Callable[..., object], *args: Any) -> None:
        """Queue ``fn(*args)`` and do not wait for it; its errors are dropped.

        A pending BEGIN stays pending: its error would have nobody to go to.
        """
        self._submitted += 1
        self._jobs.put((fn, args, None, None))

    def stop(self) -> None:
        """End the thread once the calls already queued have run."""
        self._jobs.put(None)

    def join(self) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _serve(self) -> None:
        jobs = self._jobs
        while (job := jobs.get()) is not None:
            fn, args, loop, future = job
            failed = False
            try:
                outcome = fn(*args)
            except Exception as exc:
                outcome, failed = exc, True
            self._finished += 1  # only this thread writes it
            if loop is not None and future is not None:
                # RuntimeError: the loop closed while the call ran; nobody waits for it.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_deliver, future, outcome, failed)
            del job, fn, args, loop, future, outcome

    def open(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Connect, on the thread.

        SQLite's own busy wait would block the event loop for a statement run inline:
        the connection's busy timeout is 0, and set to ``busy_timeout`` only around the
        calls made on the connection's thread (``_with_busy_timeout``). Calls may run
        inline only when the connection may be used from another thread and SQLite is
        built serialized (``sqlite3.threadsafety == 3``).
        """
        kwargs = dict(kwargs)
        self.busy_timeout = float(kwargs.pop("timeout", _DEFAULT_BUSY_TIMEOUT))
        # The adapter uses the connection for one call at a time, from either thread.
        kwargs.setdefault("check_same_thread", False)
        self.inline = kwargs["check_same_thread"] is False and sqlite3.threadsafety == 3
        self.connection = cast(Any, sqlite3.connect)(*args, timeout=0, **kwargs)

    def note_hook(self, method: str, args: tuple[Any, ...]) -> None:
        """Keep statements that a Python callback registered by ``method`` may run in
        off the event loop's thread (the callback may wait on that loop)."""
        if method in _CALLBACK_HOOKS and args and args[0] is not None:
            self.inline = False
        elif method in _NAMED_HOOKS and args and isinstance(args[0], str):
            name = args[0].lower()
            if method != "create_function" or name not in _DIALECT_FUNCTIONS:
                pattern = rf"\b{re.escape(name)}\b"
                if self.user_names is not None:
                    pattern = f"{self.user_names.pattern}|{pattern}"
                self.user_names = re.compile(pattern, re.I)

    def close_connection(self) -> None:
        """Close the ``sqlite3`` connection, on the thread; rolls back any transaction."""
        if self.connection is not None:
            connection, self.connection = self.connection, None
            connection.close()


class _Nothing:
    """An awaitable that completes at once, without a trip through the event loop."""

    def __await__(self) -> Generator[None, None, None]:
        yield from ()


_NOTHING: Final = _Nothing()


def _deliver(future: asyncio.Future[Any], outcome: Any, failed: bool) -> None:
    if future.cancelled():
        return  # the waiting task was cancelled; the call ran to its end regardless
    if failed:
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _call(thread: ConnectionThread, fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn(*args)`` for ``thread``'s connection, waiting in SQLAlchemy's greenlet.

    Inline — on the event loop's thread, no hop — when the connection is idle and
    ``fn`` is a statement (or COMMIT/ROLLBACK) that has been quick so far; otherwise on
    the connection's thread. A statement seen for the first time runs on the thread,
    timed there; one whose time (a moving average) exceeds ``INLINE_BUDGET`` goes back
    to the thread, so a slow query blocks the loop at most once before it moves.

    Inline, SQLite's busy timeout is 0: a lock another connection holds fails the
    statement at once (``SQLITE_BUSY``: it did nothing). Outside a transaction (a
    BEGIN, a statement on its own), where SQLite would always wait, it is tried again
    inline after an ``asyncio.sleep`` backoff (0.5 ms doubling to 10 ms), so the loop
    runs the lock's holder meanwhile, until ``busy_timeout``. Inside one, it runs again
    on the connection's thread, where SQLite waits with its own busy handler — which
    knows when waiting cannot help (a reader turned writer) and fails at once then. A
    BEGIN that went through is not sent again.
    """
    if not in_greenlet():
        # Checked first: a job queued before await_ refused would still run.
        raise MissingGreenlet(
            "sqlite+sessionforge runs SQL on the connection's thread and must be awaited "
            "in SQLAlchemy's greenlet: use it through create_async_engine/AsyncSession"
        )
    fn, args = thread.with_pending_begin(fn, args)
    key = _timing_key(thread, fn, args)
    if key is None:
        return cast(_T, util.await_(thread.submit(_with_busy_timeout, thread, fn, args)))
    timings = thread.timings
    known = timings.get(key)
    if known is None or known > INLINE_BUDGET or not thread.inline or not thread.idle:
        outcome, elapsed = util.await_(thread.submit(_timed, thread, fn, args))
        if elapsed is not None:
            if len(timings) >= _MOST_TIMINGS:
                timings.clear()  # literal SQL without parameters: do not grow without end
            timings[key] = elapsed if known is None else known + (elapsed - known) * _SMOOTHING
        return cast(_T, outcome)
    deadline: float | None = None
    pause = _FIRST_PAUSE
    while True:
        started = time.perf_counter()
        try:
            outcome = fn(*args)
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) not in _BUSY:
                raise
            fn, args = _after_busy(thread, fn, args)
            connection = thread.connection
            if connection is None or connection.in_transaction or not thread.idle:
                break  # SQLite's own wait, on the thread: it knows when waiting cannot help
            # Outside a transaction (a BEGIN, a statement on its own) waiting is always
            # what SQLite would do: wait here, letting the loop run the lock's holder.
            now = time.monotonic()
            deadline = now + thread.busy_timeout if deadline is None else deadline
            if now >= deadline:
                raise
            util.await_(asyncio.sleep(min(pause, deadline - now)))
            pause = min(pause * 2, _LONGEST_PAUSE)
            continue
        timings[key] = known + (time.perf_counter() - started - known) * _SMOOTHING
        # AsyncConnection.execute() refuses a statement that awaited nothing
        # (AwaitRequired, its test for sync drivers): a no-op await, no loop turn.
        util.await_(_NOTHING)
        return outcome
    return cast(_T, util.await_(thread.submit(_with_busy_timeout, thread, fn, args)))


def _timing_key(
    thread: ConnectionThread, fn: Callable[..., Any], args: tuple[Any, ...]
) -> str | None:
    """The SQL a call runs, when it may run inline; ``None`` for the thread only.

    Statements and COMMIT/ROLLBACK may; so may a pending BEGIN before them. Not:
    ``executemany`` (its time grows with its rows, which the SQL does not show), a
    statement naming a function or collation registered through the DBAPI connection,
    a ``busy_timeout`` pragma (SQLite's own value is the driver's to keep),
    server-side cursors, connect and close.
    """
    if fn is _after_begin:
        fn, args = args[2], args[3]
    if fn is _execute:
        _connection, operation, _parameters, many = args
        if many or "busy_timeout" in operation.lower():
            return None
        if thread.user_names is not None and thread.user_names.search(operation):
            return None
        return cast(str, operation)
    name = getattr(fn, "__name__", None)
    if name in ("commit", "rollback") and isinstance(
        getattr(fn, "__self__", None), sqlite3.Connection
    ):
        return str(name).upper()
    return None


def _after_busy(
    thread: ConnectionThread, fn: Callable[..., _T], args: tuple[Any, ...]
) -> tuple[Callable[..., _T], tuple[Any, ...]]:
    """The call to make again after ``SQLITE_BUSY``: without a BEGIN that went through."""
    connection = thread.connection
    if fn is _after_begin and connection is not None and connection.in_transaction:
        return args[2], args[3]
    return fn, args


def _with_busy_timeout(
    thread: ConnectionThread, fn: Callable[..., _T], args: tuple[Any, ...]
) -> _T:
    """``fn(*args)`` with SQLite's own busy wait (on the connection's thread).

    A ``busy_timeout`` pragma among the calls sets (or reads) the driver's value: it is
    read back from SQLite afterwards.
    """
    connection = thread.connection
    if connection is None:
        return fn(*args)
    connection.execute(f"PRAGMA busy_timeout = {round(thread.busy_timeout * 1000)}").close()
    try:
        return fn(*args)
    finally:
        if thread.connection is not None:
            if fn is _execute and "busy_timeout" in args[1].lower():
                (milliseconds,) = connection.execute("PRAGMA busy_timeout").fetchone()
                thread.busy_timeout = milliseconds / 1000
            connection.execute("PRAGMA busy_timeout = 0").close()


def _timed(
    thread: ConnectionThread, fn: Callable[..., _T], args: tuple[Any, ...]
) -> tuple[_T, float | None]:
    """``fn(*args)`` and how long it took; a lock wait is not timed (``None``)."""
    started = time.perf_counter()
    try:
        outcome = fn(*args)  # SQLite's busy timeout is 0 here
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", None) not in _BUSY:
            raise
        fn, args = _after_busy(thread, fn, args)
        return _with_busy_timeout(thread, fn, args), None
    return outcome, time.perf_counter() - started


# --- work done on the connection's thread ---------------------------------------------

_Outcome = tuple[Any, int, Any, list[Any]]  # description, rowcount, lastrowid, rows

# The statements that begin a transaction (SQLAlchemy's recipe, sessionforge's preset).
_BEGIN: Final = re.compile(
    r"\s*BEGIN(?:\s+(?:DEFERRED|IMMEDIATE|EXCLUSIVE))?(?:\s+TRANSACTION)?\s*;?\s*", re.I
)
_LONGEST_BEGIN: Final = 64


def _execute(
    connection: sqlite3.Connection, operation: str, parameters: Any, many: bool
) -> _Outcome:
    """Execute, fetch every row and close the cursor: one statement, one hop."""
    cursor = connection.cursor()
    try:
        if many:
            cursor.executemany(operation, parameters)
        elif parameters is None:
            cursor.execute(operation)
        else:
            cursor.execute(operation, parameters)
        description = cursor.description
        rows = cursor.fetchall() if description is not None else []
        return description, cursor.rowcount, cursor.lastrowid, rows
    finally:
        cursor.close()


def _open_cursor(
    connection: sqlite3.Connection, operation: str, parameters: Any
) -> tuple[sqlite3.Cursor, Any, int, Any]:
    """Execute on a cursor kept open for a server-side (streamed) result."""
    cursor = connection.cursor()
    try:
        if parameters is None:
            cursor.execute(operation)
        else:
            cursor.execute(operation, parameters)
    except BaseException:
        cursor.close()
        raise
    return cursor, cursor.description, cursor.rowcount, cursor.lastrowid


def _after_begin(
    connection: sqlite3.Connection, begin: str, fn: Callable[..., _T], args: tuple[Any, ...]
) -> _T:
    """A deferred ``BEGIN``, then the call that follows it (in the same hop)."""
    connection.execute(begin).close()
    return fn(*args)


def _set_isolation_level(connection: sqlite3.Connection, value: str | None) -> None:
    # typeshed allows only None/DEFERRED/IMMEDIATE/EXCLUSIVE; SQLAlchemy also sets "".
    cast(Any, connection).isolation_level = value


# --- the DBAPI adapter ---------------------------------------------------------------


class AsyncAdapt_sessionforge_cursor(SoftClosingCursor):
    """A buffered cursor: each ``execute`` is one hop that brings back every row."""

    server_side = False
    __slots__ = ("_adapt_connection", "_rows", "arraysize", "description", "lastrowid", "rowcount")

    def __init__(self, adapt_connection: AsyncAdapt_sessionforge_connection) -> None:
        self._adapt_connection = adapt_connection
        self._rows: collections.deque[Any] = collections.deque()
        self.arraysize = 1
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: Any = None

    def execute(self, operation: str, parameters: Any = None) -> None:
        self._run(operation, parameters, many=False)

    def executemany(self, operation: str, seq_of_parameters: Any) -> None:
        self._run(operation, seq_of_parameters, many=True)

    def _run(self, operation: str, parameters: Any, *, many: bool) -> None:
        adapt = self._adapt_connection
        if not many and not parameters and adapt._defer_begin(operation):
            self.description, self.rowcount, self.lastrowid = None, -1, None
            self._rows.clear()
            # SQLAlchemy's AsyncConnection.execute() refuses a statement that awaited
            # nothing (AwaitRequired, its test for sync drivers): await a no-op.
            util.await_(_NOTHING)
            return
        outcome = adapt._run(_execute, adapt._sqlite, operation, parameters, many)
        self.description, self.rowcount, self.lastrowid, rows = outcome
        self._rows = collections.deque(rows)

    def fetchone(self) -> Any:
        return self._rows.popleft() if self._rows else None

    def fetchmany(self, size: int | None = None) -> list[Any]:
        rows = self._rows
        count = min(self.arraysize if size is None else size, len(rows))
        return [rows.popleft() for _ in range(count)]

    def fetchall(self) -> list[Any]:
        rows = list(self._rows)
        self._rows.clear()
        return rows

    def __iter__(self) -> Iterator[Any]:
        while self._rows:
            yield self._rows.popleft()

    def close(self) -> None:
        self._rows.clear()

    def setinputsizes(self, *sizes: Any) -> None:
        pass

    def setoutputsize(self, size: Any, column: Any = None) -> None:
        pass


class AsyncAdapt_sessionforge_ss_cursor(AsyncAdapt_sessionforge_cursor):
    """A server-side cursor: the ``sqlite3`` cursor stays open; one hop per fetch."""

    server_side = True
    __slots__ = ("_cursor",)

    def __init__(self, adapt_connection: AsyncAdapt_sessionforge_connection) -> None:
        super().__init__(adapt_connection)
        self._cursor: sqlite3.Cursor | None = None

    def _run(self, operation: str, parameters: Any, *, many: bool) -> None:
        if many:
            super()._run(operation, parameters, many=True)
            return
        self.close()
        adapt = self._adapt_connection
        outcome = adapt._run(_open_cursor, adapt._sqlite, operation, parameters)
        self._cursor, self.description, self.rowcount, self.lastrowid = outcome

    def fetchone(self) -> Any:
        if self._cursor is None:
            return super().fetchone()
        return self._adapt_connection._run(self._cursor.fetchone)

    def fetchmany(self, size: int | None = None) -> list[Any]:
        if self._cursor is None:
            return super().fetchmany(size)
        size = self.arraysize if size is None else size
        return self._adapt_connection._run(self._cursor.fetchmany, size)

    def fetchall(self) -> list[Any]:
        if self._cursor is None:
            return super().fetchall()
        return self._adapt_connection._run(self._cursor.fetchall)

    def __iter__(self) -> Iterator[Any]:
        while rows := self.fetchmany(max(self.arraysize, 100)):
            yield from rows

    def close(self) -> None:
        super().close()
        if self._cursor is not None:
            # Queued, not waited for: it runs before anything queued after it.
            cursor, self._cursor = self._cursor, None
            self._adapt_connection._thread.post(cursor.close)


class AsyncAdapt_sessionforge_connection(AdaptedConnection):
    """The DBAPI connection SQLAlchemy sees; its I/O is done by a ``ConnectionThread``."""

    __slots__ = ("__weakref__", "_finalizer", "_sqlite", "_thread", "dbapi")

    _connection: Any

    def __init__(self, dbapi: AsyncAdapt_sessionforge_dbapi, thread: ConnectionThread) -> None:
        assert thread.connection is not None
        self.dbapi = dbapi
        self._thread = thread
        self._sqlite: sqlite3.Connection = thread.connection
        self._connection = thread
        # A connection collected without close(): its thread closes it and ends.
        self._finalizer = weakref.finalize(self, _abandon, thread)

    # Attribute reads need no hop: sqlite3 allows them from any thread, and they read
    # state only our thread's calls change, all of which were awaited.
    @property
    def isolation_level(self) -> str | None:
        return self._sqlite.isolation_level

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        # Setting None COMMITs an open transaction, so it runs on the thread.
        _call(self._thread, _set_isolation_level, self._sqlite, value)

    @property
    def in_transaction(self) -> bool:
        return self._thread.pending_begin is not None or self._sqlite.in_transaction

    def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return _call(self._thread, fn, *args)

    def _defer_begin(self, operation: str) -> bool:
        """Keep a BEGIN to send with the next statement, saving it a hop of its own.

        Only on an idle connection outside a transaction, where the BEGIN can fail
        only by waiting for a lock (its error then comes from the next statement).
        Nothing reaches the database in between, so the transaction is the same: it
        starts just before its first statement, as if the BEGIN had been slow.
        """
        if (
            len(operation) > _LONGEST_BEGIN
            or _BEGIN.fullmatch(operation) is None
            or self._thread.pending_begin is not None
            or not self._thread.idle
            or self._sqlite.in_transaction
        ):
            return False
        self._thread.pending_begin = operation
        return True

    def cursor(self, server_side: bool = False) -> AsyncAdapt_sessionforge_cursor:
        if server_side:
            return AsyncAdapt_sessionforge_ss_cursor(self)
        return AsyncAdapt_sessionforge_cursor(self)

    def interrupt(self) -> None:
        """Abort the statement running on the thread (sqlite3 allows this from any thread)."""
        self._sqlite.interrupt()

    def execute(self, operation: str, parameters: Any = None) -> AsyncAdapt_sessionforge_cursor:
        cursor = self.cursor()
        cursor.execute(operation, parameters)
        return cursor

    def commit(self) -> None:
        self._end(self._sqlite.commit)

    def rollback(self) -> None:
        self._end(self._sqlite.rollback)

    def _end(self, method: Callable[[], None]) -> None:
        if self._thread.pending_begin is not None:
            # BEGIN then COMMIT/ROLLBACK with nothing between: nothing to send.
            self._thread.pending_begin = None
            return
        # sqlite3 does nothing on COMMIT/ROLLBACK outside a transaction; we spare the
        # hop. Read only when idle: a cancelled statement may still be running.
        if self._thread.idle and not self._sqlite.in_transaction:
            return
        _call(self._thread, method)

    def close(self) -> None:
        if not self._finalizer.alive:
            return
        self._finalizer.detach()
        thread = self._thread
        thread.pending_begin = None
        try:
            _call(thread, thread.close_connection)
        finally:
            thread.stop()
        thread.join()

    def terminate(self) -> None:
        """Close without waiting (invalidation, garbage collection): the thread closes
        the connection once the statement in flight ends, then stops."""
        if self._finalizer.alive:
            self._finalizer()

    def __getattr__(self, name: str) -> Any:
        if name in _FORWARDED:
            method = getattr(self._sqlite, name)
            thread = self._thread

            def forwarded(*args: Any, **kwargs: Any) -> Any:
                thread.note_hook(name, args)
                return self._run(_apply, method, args, kwargs)

            return forwarded
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def _apply(fn: Callable[..., _T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> _T:
    return fn(*args, **kwargs)


def _abandon(thread: ConnectionThread) -> None:
    thread.post(thread.close_connection)
    thread.stop()


class AsyncAdapt_sessionforge_dbapi:
    """The DBAPI module SQLAlchemy sees: ``sqlite3``'s names, our ``connect``."""

    paramstyle = "qmark"

    def __init__(self) -> None:
        # Statement timings shared by the connections of one engine (see _call).
        self._timings: dict[str, float] = {}
        for name in (
            "DatabaseError",
            "DataError",
            "Error",
            "IntegrityError",
            "InterfaceError",
            "InternalError",
            "NotSupportedError",
            "OperationalError",
            "ProgrammingError",
            "Warning",
            "Binary",
            "PARSE_COLNAMES",
            "PARSE_DECLTYPES",
            "sqlite_version",
            "sqlite_version_info",
        ):
            setattr(self, name, getattr(sqlite3, name))

    def connect(self, *args: Any, **kwargs: Any) -> AsyncAdapt_sessionforge_connection:
        if "async_creator_fn" in kwargs:
            raise NotImplementedError(
                "sqlite+sessionforge opens its own connections; use create_async_engine "
                "without async_creator, or sqlite+aiosqlite with it"
            )
        thread = ConnectionThread(self._timings)
        try:
            _call(thread, thread.open, args, kwargs)
        except BaseException:
            # Cancelled or failed: the connect may still complete on the thread.
            _abandon(thread)
            raise
        return AsyncAdapt_sessionforge_connection(self, thread)


# --- the dialect ---------------------------------------------------------------------


class SQLiteExecutionContext_sessionforge(SQLiteExecutionContext):
    def create_server_side_cursor(self) -> DBAPICursor:
        return cast("DBAPICursor", server_side_cursor(self))


class SQLiteDialect_sessionforge(SQLiteDialect_pysqlite):
    """``sqlite+sessionforge://``: the pysqlite dialect over one thread per connection.

    Example::

        from sqlalchemy.ext.asyncio import create_async_engine

        import sessionforge  # registers the driver name with SQLAlchemy

        engine = create_async_engine("sqlite+sessionforge:///app.db")
    """

    driver = DRIVER
    supports_statement_cache = True
    is_async = True
    has_terminate = True
    supports_server_side_cursors = True
    execution_ctx_cls = SQLiteExecutionContext_sessionforge

    @classmethod
    def import_dbapi(cls) -> DBAPIModule:
        return cast("DBAPIModule", AsyncAdapt_sessionforge_dbapi())

    @classmethod
    def get_pool_class(cls, url: URL) -> type[pool.Pool]:
        return sqlite_pool_class(cls, url, pool.AsyncAdaptedQueuePool, pool.StaticPool)

    def get_driver_connection(self, connection: DBAPIConnection) -> ConnectionThread:
        return cast(AsyncAdapt_sessionforge_connection, connection)._thread

    def do_terminate(self, dbapi_connection: DBAPIConnection) -> None:
        cast(AsyncAdapt_sessionforge_connection, dbapi_connection).terminate()


dialect = SQLiteDialect_sessionforge
