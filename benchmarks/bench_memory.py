"""Scenario "memory": the Python memory an open session holds, sessionforge vs bare.

Measured with ``tracemalloc`` (Python allocations only: SQLite's and the drivers' C
memory is not seen), after a full garbage collection, as the memory still allocated
while N sessions are open, divided by N. Two states:

* ``new``: ``--sessions`` (200) sessions made and not used: ``db()`` against
  ``async_sessionmaker(engine)()``; nothing connects;
* ``in transaction``: ``--held`` (50) sessions open at once, each in its own task,
  inside ``begin()`` after one primary-key read (so each holds a pooled connection,
  its transaction and one loaded row), on a pool of ``--held`` connections. The
  memory of as many tasks that hold nothing is subtracted, so the figure is the
  session's, not the task's. The pool is filled by an unmeasured pass first: a
  connection's own memory is the driver's, not the session's.

Contenders: ``sessionforge`` (``SessionFactory(url)``, as a user writes the URL) and
the baseline ``bare async_sessionmaker`` (``create_async_engine(url)`` with the async
driver named). On SQLite sessionforge runs with ``sqlite_begin="deferred"`` here: its
default ``BEGIN IMMEDIATE`` lets one writer in at a time, so 50 transactions could not
be open at once. Each figure is the smallest of ``--repeats`` (3) measurements: an
allocation made once (a cache growing) lands on one of them, and is no session's. The
ratio is sessionforge / bare (the issue's target: <= 1.1).

Run: ``python -m benchmarks.bench_memory --url sqlite`` (a few seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, ExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from sessionforge import SessionFactory

from . import harness
from .bench_factory import BASELINE, Item, create_table, drop_table, random_id

SCENARIO = "memory"
SESSIONFORGE = "sessionforge"
STATES = ("new", "in transaction")
SESSIONS = 200
HELD = 50
REPEATS = 3
QUICK = (20, 5, 2)  # sessions, held, repeats
MAXIMUM = 1.1  # sessionforge's bytes per session / bare's, at most

Opener = Callable[[], AbstractAsyncContextManager[AsyncSession]]


@dataclass(frozen=True)
class Maker:
    """One contender: how it makes a plain session, and a session in a transaction."""

    name: str
    new: Callable[[], AsyncSession]
    begin: Opener


def traced(fn: Callable[[], Awaitable[int]]) -> Callable[[], Awaitable[int]]:
    """``fn`` run under tracemalloc; returns its bytes still allocated at its hold point."""

    async def run() -> int:
        gc.collect()
        tracemalloc.start()
        try:
            return await fn()
        finally:
            tracemalloc.stop()

    return run


def held_now() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0


async def new_sessions(make: Callable[[], AsyncSession], count: int) -> int:
    """Bytes held by ``count`` sessions made and not used."""
    before = held_now()
    sessions = [make() for _ in range(count)]
    held = held_now() - before
    for session in sessions:
        await session.close()
    return held


async def open_transactions(begin: Opener | None, count: int) -> int:
    """Bytes held while ``count`` tasks each sit in ``begin()`` after one read.

    ``begin=None`` holds the same tasks with no session: the tasks' own memory.
    """
    release = asyncio.Event()
    ready = asyncio.Event()
    waiting = count

    async def hold() -> None:
        nonlocal waiting
        if begin is None:
            waiting -= 1
            if not waiting:
                ready.set()
            await release.wait()
            return
        async with begin() as session:
            await session.get(Item, random_id())
            waiting -= 1
            if not waiting:
                ready.set()
            await release.wait()

    before = held_now()
    tasks = [asyncio.create_task(hold()) for _ in range(count)]
    try:
        await ready.wait()
        return held_now() - before
    finally:
        release.set()
        await asyncio.gather(*tasks)


@asynccontextmanager
async def makers(url: str, factory_url: str, pool: int) -> AsyncIterator[list[Maker]]:
    """The two contenders on pools of ``pool`` connections; the table made and dropped."""
    async with AsyncExitStack() as stack:
        engine = create_async_engine(url, pool_size=pool, max_overflow=0)
        stack.push_async_callback(engine.dispose)
        await create_table(engine)
        stack.push_async_callback(drop_table, engine)
        options: dict[str, Any] = {"pool_size": pool, "max_overflow": 0}
        if url.startswith("sqlite"):
            options["sqlite_begin"] = "deferred"  # see the module docstring
        db = SessionFactory(factory_url, **options)
        stack.push_async_callback(db.dispose)
        maker = async_sessionmaker(engine, expire_on_commit=False)
        yield [Maker(SESSIONFORGE, db, db.begin), Maker(BASELINE, maker, maker.begin)]


async def measure(
    url: str, factory_url: str, sessions: int, held: int, repeats: int
) -> dict[str, dict[str, Any]]:
    """Per state: the session count and each contender's bytes per session."""
    total = len(STATES) * 2 * repeats
    done = 0
    states: dict[str, dict[str, Any]] = {}
    async with makers(url, factory_url, held) as contenders:
        for _ in range(2):  # fill each pool and every cache first
            for contender in contenders:
                await open_transactions(contender.begin, held)
                await new_sessions(contender.new, sessions)
        tasks_only = min([await traced(lambda: open_transactions(None, held))() for _ in range(3)])
        for state in STATES:
            count = sessions if state == "new" else held
            by_name: dict[str, dict[str, Any]] = {}
            for contender in contenders:
                run = traced(state_run(state, contender, count))
                samples = []
                for index in range(repeats):
                    harness.progress(
                        f"[{done / total:4.0%}] memory: {state}: {contender.name} "
                        f"{index + 1}/{repeats} ..."
                    )
                    samples.append(await run())
                    done += 1
                # The tasks' own memory is no session's (the "new" state has no tasks).
                net = min(samples) - (tasks_only if state != "new" else 0)
                by_name[contender.name] = {
                    "bytes_per_session": net / count,
                    "samples_bytes": samples,
                }
                harness.progress(
                    f"[{done / total:4.0%}] memory: {state}: {contender.name}: "
                    f"{net / count:,.0f} bytes/session"
                )
            base = by_name[BASELINE]["bytes_per_session"]
            for values in by_name.values():
                values["ratio_to_baseline"] = values["bytes_per_session"] / base if base else 0.0
            states[state] = {"sessions": count, "contenders": by_name}
            if state != "new":
                states[state]["tasks_only_bytes"] = tasks_only
    harness.progress("")
    return states


def state_run(state: str, contender: Maker, count: int) -> Callable[[], Awaitable[int]]:
    if state == "new":
        return lambda: new_sessions(contender.new, count)
    return lambda: open_transactions(contender.begin, count)


def document(
    url: str, factory_url: str, states: Mapping[str, Any], repeats: int
) -> dict[str, Any]:
    worst = max(states[s]["contenders"][SESSIONFORGE]["ratio_to_baseline"] for s in STATES)
    return {
        "scenario": SCENARIO,
        "created": datetime.now(UTC).isoformat(),
        "machine": harness.machine_info(),
        "params": {
            "url": harness.masked(url),
            "factory_url": harness.masked(factory_url),
            "repeats": repeats,
        },
        "contender": SESSIONFORGE,
        "baseline": BASELINE,
        "states": dict(states),
        "target": {"maximum": MAXIMUM, "worst_ratio": worst, "met": worst <= MAXIMUM},
    }


def format_table(doc: Mapping[str, Any]) -> str:
    lines = [f"{'state':<16}{'contender':<26}{'sessions':>9}{'bytes/session':>15}{'ratio':>8}"]
    lines.append("-" * len(lines[0]))
    for state, entry in doc["states"].items():
        for name, values in entry["contenders"].items():
            star = " *" if name == doc["baseline"] else ""
            lines.append(
                f"{state:<16}{name + star:<26}{entry['sessions']:>9}"
                f"{values['bytes_per_session']:>15,.0f}{values['ratio_to_baseline']:>8.3f}"
            )
    target = doc["target"]
    lines.append(
        f"\nbytes/session = tracemalloc, Python allocations held per open session "
        f"(least of {doc['params']['repeats']}); * = baseline\n"
        f"worst ratio {target['worst_ratio']:.3f} (target <= {target['maximum']:g}: "
        f"{'met' if target['met'] else 'NOT MET'})"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; see ``--help``."""
    from .suite import resolve_urls  # the suite imports this module

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    harness.add_url_argument(parser)
    add("--sessions", type=int, default=SESSIONS, help="sessions made in the 'new' state")
    add("--held", type=int, default=HELD, help="transactions open at once (and pool size)")
    add("--repeats", type=int, default=REPEATS, help="measurements per figure (median)")
    add("--quick", action="store_true", help="20 sessions, 5 held, 2 repeats")
    add("--json", type=Path, default=None, dest="json_path", help="results file")
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.held, args.repeats = QUICK
    if min(args.sessions, args.held, args.repeats) < 1:
        parser.error("--sessions, --held and --repeats must be >= 1")
    with ExitStack() as stack:
        url, written = resolve_urls(args.url, stack)
        bare = url.render_as_string(hide_password=False)
        figures = asyncio.run(measure(bare, written, args.sessions, args.held, args.repeats))
    doc = document(bare, written, figures, args.repeats)
    print(format_table(doc))
    path = (
        args.json_path
        or harness.RESULTS_DIR / f"{SCENARIO}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"results: {path}")
    return doc


if __name__ == "__main__":
    main()
