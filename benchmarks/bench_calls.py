"""Deterministic costs per operation: Python calls and thread hops, which noise cannot move.

Throughput on a shared 2-core VM drifts by ±15 % from one round to the next, so a few
percent of overhead cannot be seen in ops/s. Two counts do not drift:

* **Python function calls** per operation (``cProfile``, one task, after a warm-up):
  the same on every run of the same code and library versions. A proxy, not a
  timing: a C function or a wait for I/O counts as one call, whatever it costs.
* **Thread hops** per operation on SQLite: how many times work is handed to a
  driver thread and its result handed back to the event loop -- each a queue put,
  a thread wake-up and a ``call_soon_threadsafe``. Counted by wrapping, for the
  duration of the count only, ``aiosqlite.Connection._execute`` (every aiosqlite
  call goes through it) and ``ConnectionThread.submit`` / ``.post`` of
  ``sqlite+sessionforge`` (every call of that driver does). Other drivers have no
  thread: no hop count.

Contenders, each one task on a warm pool:

* read transactions (begin, ``session.get`` of one row by primary key, commit):
  ``sessionforge begin()`` against the baseline ``bare async_sessionmaker.begin()``,
  ``sessionforge reader()`` and ``async_sessionmaker, AUTOCOMMIT engine`` (a second
  engine with ``isolation_level="AUTOCOMMIT"``);
* write transactions (begin, ``session.add`` of one row, commit):
  ``sessionforge begin() + insert`` against ``bare begin() + insert``.

sessionforge gets the URL as a user writes it (``--url sqlite`` -> ``sqlite:///…``:
its default driver), plain SQLAlchemy the async driver named (``sqlite+aiosqlite``).

Run: ``python -m benchmarks.bench_calls --url sqlite`` (or a PostgreSQL URL).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import async_sessionmaker

from . import harness
from .bench_factory import Item, item_table, pooled_engine, pooled_factory, random_id
from .bench_write import drop, new_entry, recreate

BASELINE = "bare async_sessionmaker.begin()"
WRITE_BASELINE = "bare begin() + insert"
SESSIONFORGE_BEGIN = "sessionforge begin()"
SESSIONFORGE_READER = "sessionforge reader()"
SESSIONFORGE_WRITE = "sessionforge begin() + insert"


@dataclass(frozen=True, slots=True)
class Count:
    contender: str
    versus: str
    calls_per_op: float
    primitive_calls_per_op: float
    hops_per_op: float | None = None  # None: the driver has no thread
    hops_by_kind: dict[str, float] | None = None


@dataclass(frozen=True, slots=True)
class Case:
    """One contender: its name, the contender its counts are compared with, its op."""

    name: str
    versus: str
    op: Callable[[], Awaitable[None]]


async def count_calls(op: Callable[[], Awaitable[None]], ops: int) -> tuple[float, float]:
    """(calls, primitive calls) per op over ``ops`` runs of ``op``, one after another."""
    profile = cProfile.Profile()
    profile.enable()
    try:
        for _ in range(ops):
            await op()
    finally:
        profile.disable()
    stats = pstats.Stats(profile)
    return stats.total_calls / ops, stats.prim_calls / ops  # type: ignore[attr-defined]


@contextmanager
def counting_hops() -> Iterator[Counter[str]]:
    """Count hand-offs to SQLite driver threads while the block runs (class-level wraps)."""
    counts: Counter[str] = Counter()
    undo: list[Callable[[], None]] = []

    def wrap(owner: Any, name: str, kind: str) -> None:
        original = getattr(owner, name, None)
        if original is None:  # the driver changed: count nothing rather than fail
            return
        if asyncio.iscoroutinefunction(original):

            async def counted_async(*args: Any, **kwargs: Any) -> Any:
                counts[kind] += 1
                return await original(*args, **kwargs)

            setattr(owner, name, counted_async)
        else:

            def counted(*args: Any, **kwargs: Any) -> Any:
                counts[kind] += 1
                return original(*args, **kwargs)

            setattr(owner, name, counted)
        undo.append(lambda: setattr(owner, name, original))

    try:
        import aiosqlite

        wrap(aiosqlite.Connection, "_execute", "aiosqlite")
    except ImportError:
        pass
    from sessionforge.drivers.sqlite import ConnectionThread

    wrap(ConnectionThread, "submit", "sessionforge submit")
    wrap(ConnectionThread, "post", "sessionforge post")
    try:
        yield counts
    finally:
        for restore in reversed(undo):
            restore()


async def count_hops(op: Callable[[], Awaitable[None]], ops: int) -> dict[str, float]:
    with counting_hops() as counts:
        for _ in range(ops):
            await op()
    return {kind: n / ops for kind, n in counts.items()}


async def measure(url: str, ops: int, warmup: int, factory_url: str | None = None) -> list[Count]:
    """Every contender's counts; hops only on SQLite (the drivers with a thread)."""
    params = harness.Params(
        url=url, rounds=1, seconds=1.0, warmup=0, tasks=1, pool_size=2, factory_url=factory_url
    )
    on_sqlite = url.startswith("sqlite")
    async with AsyncExitStack() as stack:
        bare = await item_table(params, stack)
        await recreate(bare)
        stack.push_async_callback(drop, bare)
        autocommit = pooled_engine(params, stack, isolation_level="AUTOCOMMIT")
        db = pooled_factory(params, stack)
        maker = async_sessionmaker(bare, expire_on_commit=False)
        reading_maker = async_sessionmaker(autocommit, expire_on_commit=False)

        async def sessionforge_begin() -> None:
            async with db.begin() as session:
                await session.get(Item, random_id())

        async def bare_begin() -> None:
            async with maker.begin() as session:
                await session.get(Item, random_id())

        async def sessionforge_reader() -> None:
            async with db.reader() as session:
                await session.get(Item, random_id())

        async def autocommit_session() -> None:
            async with reading_maker() as session:
                await session.get(Item, random_id())

        async def sessionforge_write() -> None:
            async with db.begin() as session:
                session.add(new_entry())

        async def bare_write() -> None:
            async with maker.begin() as session:
                session.add(new_entry())

        cases = (
            Case(SESSIONFORGE_BEGIN, BASELINE, sessionforge_begin),
            Case(BASELINE, BASELINE, bare_begin),
            Case(SESSIONFORGE_READER, BASELINE, sessionforge_reader),
            Case("async_sessionmaker, AUTOCOMMIT engine", BASELINE, autocommit_session),
            Case(SESSIONFORGE_WRITE, WRITE_BASELINE, sessionforge_write),
            Case(WRITE_BASELINE, WRITE_BASELINE, bare_write),
        )
        counts = []
        for index, case in enumerate(cases):
            where = f"[{index / len(cases):4.0%}] calls: {case.name}"
            harness.progress(f"{where} ...")
            for _ in range(warmup):  # fill SQLAlchemy's caches first
                await case.op()
            calls, primitive = await count_calls(case.op, ops)
            count = Count(case.name, case.versus, calls, primitive)
            if on_sqlite:
                kinds = await count_hops(case.op, ops)
                count = replace(count, hops_per_op=sum(kinds.values()), hops_by_kind=kinds)
            counts.append(count)
            hops = "" if count.hops_per_op is None else f", {count.hops_per_op:g} hops/op"
            harness.progress(f"{where}: {calls:,.0f} calls/op{hops}")
        harness.progress("")
        return counts


def ratios(counts: Sequence[Count]) -> dict[str, dict[str, float | None]]:
    """Per contender: calls and hops as a share of its ``versus`` contender's."""
    by_name = {count.contender: count for count in counts}
    shares: dict[str, dict[str, float | None]] = {}
    for count in counts:
        versus = by_name[count.versus]
        hops = None
        if count.hops_per_op is not None and versus.hops_per_op:
            hops = count.hops_per_op / versus.hops_per_op
        shares[count.contender] = {"calls": count.calls_per_op / versus.calls_per_op, "hops": hops}
    return shares


def format_counts(counts: Sequence[Count]) -> str:
    shares = ratios(counts)
    width = max(len(count.contender) for count in counts) + 2
    with_hops = any(count.hops_per_op is not None for count in counts)
    header = f"{'contender':<{width}}{'calls/op':>10}{'vs':>9}"
    if with_hops:
        header += f"{'hops/op':>9}{'vs':>9}"
    lines = [header, "-" * len(header)]
    for count in counts:
        star = " *" if count.contender == count.versus else ""
        line = (
            f"{count.contender + star:<{width}}{count.calls_per_op:>10,.0f}"
            f"{shares[count.contender]['calls']:>8.3f}x"
        )
        if with_hops:
            hops, share = count.hops_per_op, shares[count.contender]["hops"]
            line += f"{'-' if hops is None else f'{hops:g}':>9}"
            line += f"{'-' if share is None else f'{share:.3f}x':>9}"
        lines.append(line)
    lines.append(
        "calls/op = Python function calls per operation (cProfile, one task); "
        "hops/op = hand-offs to a driver thread (SQLite); vs = ratio to the * above it"
    )
    return "\n".join(lines)


def document(
    url: str, factory_url: str | None, ops: int, counts: Sequence[Count]
) -> dict[str, Any]:
    return {
        "scenario": "calls",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "url": harness.masked(url),
        "factory_url": harness.masked(factory_url or url),
        "machine": harness.machine_info(),
        "git": harness.git_state(),
        "ops": ops,
        "counts": [asdict(count) for count in counts],
        "ratios": ratios(counts),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; see ``--help``."""
    from .suite import resolve_urls  # the suite imports this module

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_calls",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--url",
        default=os.environ.get(harness.URL_ENV) or harness.DEFAULT_URL,
        help=f"database URL, or sqlite (default: ${harness.URL_ENV} if set, else "
        f"{harness.DEFAULT_URL})",
    )
    parser.add_argument("--ops", type=int, default=500, help="counted operations per contender")
    parser.add_argument("--warmup", type=int, default=50, help="operations before counting")
    parser.add_argument("--json", type=Path, default=None, dest="json_path", help="results file")
    args = parser.parse_args(argv)
    if args.ops < 1 or args.warmup < 0:
        parser.error("--ops must be >= 1 and --warmup >= 0")
    with ExitStack() as stack:  # ``sqlite`` means a temporary file, as in the suite
        parsed, written = resolve_urls(args.url, stack)
        url = parsed.render_as_string(hide_password=False)
        factory_url = written if written != url else None
        counts = asyncio.run(measure(url, args.ops, args.warmup, factory_url))
    print(format_counts(counts))
    path = args.json_path or harness.RESULTS_DIR / f"calls-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document(url, factory_url, args.ops, counts), indent=2) + "\n")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
