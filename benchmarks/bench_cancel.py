"""Scenario "cancel": cancellation-heavy load -- half the requests are cancelled midway.

Each operation opens a transaction, reads one row by primary key and commits, as in
the "factory" scenario. With probability 0.5 the operation runs under
``asyncio.timeout(delay)``, ``delay`` drawn uniformly from 0 to the mean duration of an
uncancelled operation (measured on the baseline at start), so the cancellation lands at
a random point: waiting for a connection, during BEGIN, the SELECT, the COMMIT, or the
session's close -- what a web server does when a client disconnects or a deadline
passes. The same random draws serve every contender.

* ``sessionforge``: ``SessionFactory(url).begin()``;
* ``bare async_sessionmaker`` (the baseline): ``async_sessionmaker(...).begin()``;
* ``raw asyncpg`` / ``raw aiosqlite``: the driver's pool, BEGIN/SELECT/COMMIT.

Throughput counts every finished operation, completed or cancelled. Failures other
than the cancellation (e.g. a connection left in a broken state) are counted as errors
and do not stop the run. Every pool has ``pool_timeout=2`` so a leaked pool fails
fast rather than hanging. After each measured window the scenario records, per
contender: completed, cancelled and errored operations, the error types, errors nobody
caught (logged by SQLAlchemy's pool, or futures whose exception was never retrieved),
and how many connections its pool still has checked out once every task has finished (allowing
0.5 s for cleanup). That figure must be 0; a non-zero value is a leaked connection and
is reported, not hidden.

Run: ``python -m benchmarks.bench_cancel --rounds 5 --seconds 1.5``
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import Any

from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from sessionforge import SessionFactory

from . import harness
from .bench_factory import Item, create_table, drop_table, random_id, raw_transaction
from .harness import Contender, Params
from .raw import open_pool, raw_name

SCENARIO = "cancel"
BASELINE = "bare async_sessionmaker"
SESSIONFORGE = "sessionforge"
CANCEL_PROBABILITY = 0.5
POOL_TIMEOUT = 2.0
SETTLE_SECONDS = 0.5


class Stray(logging.Handler):
    """Counts what nobody awaited or caught: errors logged by SQLAlchemy's pool (e.g.
    "Exception during reset or similar") and exceptions handed to the event loop's
    exception handler (e.g. "Future exception was never retrieved"), instead of
    printing them. Contenders are measured one at a time, so each count belongs to the
    contender measured (or warming up) since the previous ``after()``.
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[f"logged: {record.getMessage()[:60]}"] += 1

    def loop_exception(self, _loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        what = type(exc).__name__ if exc is not None else context.get("message", "?")
        self.counts[f"unretrieved: {what}"] += 1

    @contextmanager
    def installed(self) -> Iterator[None]:
        logger = logging.getLogger("sqlalchemy.pool")
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()
        logger.addHandler(self)
        propagate, logger.propagate = logger.propagate, False
        loop.set_exception_handler(self.loop_exception)
        try:
            yield
        finally:
            loop.set_exception_handler(previous)
            logger.propagate = propagate
            logger.removeHandler(self)


class Outcomes:
    """Counts of one contender's outcomes since the last ``after()``."""

    def __init__(self, checked_out: Callable[[], int], stray: Stray) -> None:
        self.counts: Counter[str] = Counter()
        self.checked_out = checked_out
        self.stray = stray

    async def after(self) -> Mapping[str, float]:
        deadline = time.perf_counter() + SETTLE_SECONDS
        while self.checked_out() and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        gc.collect()  # unretrieved futures are reported when collected
        figures: dict[str, float] = dict(self.counts + self.stray.counts)
        figures["checked_out_after"] = self.checked_out()
        self.counts.clear()
        self.stray.counts.clear()
        return figures


def cancelling(
    name: str, work: Callable[[], Awaitable[object]], window: list[float], outcomes: Outcomes
) -> Contender:
    """``work`` run to completion, or under a random timeout half of the time."""
    counts = outcomes.counts

    async def op() -> None:
        try:
            if random.random() < CANCEL_PROBABILITY:
                try:
                    async with asyncio.timeout(random.uniform(0.0, window[0])):
                        await work()
                except TimeoutError:
                    counts["cancelled"] += 1
                    return
            else:
                await work()
        except Exception as exc:
            counts["errors"] += 1
            counts[f"error: {type(exc).__name__}"] += 1
        else:
            counts["completed"] += 1

    return Contender(name, op, outcomes.after)


def pool_checked_out(engine: AsyncEngine) -> Callable[[], int]:
    pool = engine.sync_engine.pool
    return lambda: int(pool.checkedout())  # type: ignore[attr-defined]


def maker_work(maker: async_sessionmaker[AsyncSession]) -> Callable[[], Awaitable[None]]:
    async def work() -> None:
        async with maker.begin() as session:
            await session.get(Item, random_id())

    return work


def sessionforge_work(db: SessionFactory[AsyncSession]) -> Callable[[], Awaitable[None]]:
    async def work() -> None:
        async with db.begin() as session:
            await session.get(Item, random_id())

    return work


async def mean_duration(work: Callable[[], Awaitable[None]], tasks: int) -> float:
    """Mean seconds per uncancelled operation with ``tasks`` concurrent loops."""
    sample = await harness.measure(work, tasks=tasks, seconds=0.3)
    return tasks / sample.ops_per_s


@asynccontextmanager
async def contenders(params: Params) -> AsyncIterator[Sequence[Contender]]:
    """Create the table, yield the contenders, then dispose of them and drop the table."""
    url, size = params.url, params.pool_size
    async with AsyncExitStack() as stack:
        setup = create_async_engine(url)
        stack.push_async_callback(setup.dispose)
        await create_table(setup)
        stack.push_async_callback(drop_table, setup)
        bare = create_async_engine(url, pool_size=size, max_overflow=0, pool_timeout=POOL_TIMEOUT)
        stack.push_async_callback(bare.dispose)
        db = SessionFactory(
            params.sessionforge_url(), pool_size=size, max_overflow=0, pool_timeout=POOL_TIMEOUT
        )
        stack.push_async_callback(db.dispose)
        stray = Stray()
        stack.enter_context(stray.installed())
        window = [0.0]
        base_work = maker_work(async_sessionmaker(bare, expire_on_commit=False))
        window[0] = await mean_duration(base_work, params.tasks)
        chosen = [
            cancelling(
                SESSIONFORGE,
                sessionforge_work(db),
                window,
                Outcomes(pool_checked_out(db.engine), stray),
            ),
            cancelling(BASELINE, base_work, window, Outcomes(pool_checked_out(bare), stray)),
        ]
        name = raw_name(url)
        if name is not None:
            pool = await open_pool(url, size, stack)
            chosen.append(
                cancelling(name, raw_transaction(pool), window, Outcomes(pool.checked_out, stray))
            )
        yield chosen


def leaks(report: harness.Report) -> dict[str, list[float]]:
    """Per contender, the connections still checked out after each round (all 0: none)."""
    return {
        name: [notes.get("checked_out_after", 0.0) for notes in rounds]
        for name, rounds in report.notes.items()
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; see ``--help`` and benchmarks/README.md."""
    report = harness.main(SCENARIO, __doc__ or SCENARIO, contenders, BASELINE, argv)
    for name, rounds in report.notes.items():
        total: Counter[str] = Counter()
        for notes in rounds:
            total.update({k: int(v) for k, v in notes.items() if k != "checked_out_after"})
        left = leaks(report)[name]
        verdict = "no leak" if not any(left) else f"LEAKED connections after rounds: {left}"
        details = ", ".join(f"{key} {value}" for key, value in sorted(total.items()))
        print(f"{name}: {details}; {verdict}")


if __name__ == "__main__":
    main()
