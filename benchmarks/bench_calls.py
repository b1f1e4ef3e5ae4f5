"""Python function calls per operation: a cost measure that machine noise cannot move.

Throughput on a shared 2-core VM drifts by ±15 % from one round to the next, so a few
percent of overhead cannot be seen in ops/s. The number of Python function calls an
operation makes (counted by ``cProfile``, one task, after a warm-up) is the same on
every run of the same code and the same library versions. It is a proxy, not a
timing: C functions and I/O are counted as one call each, whatever they cost. It says
where sessionforge adds Python work compared with plain SQLAlchemy, and it changes
when the code does.

Contenders (each op reads one row by primary key from ``sf_bench_item``):

* ``sessionforge begin()`` and the baseline ``bare async_sessionmaker.begin()``;
* ``sessionforge reader()`` and ``async_sessionmaker, AUTOCOMMIT engine`` (a second
  engine created with ``isolation_level="AUTOCOMMIT"``).

Run: ``python -m benchmarks.bench_calls --url postgresql+asyncpg://postgres@127.0.0.1/test``
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.ext.asyncio import async_sessionmaker

from . import harness
from .bench_factory import Item, item_table, pooled_engine, pooled_factory, random_id
from .suite import resolve_url

BASELINE = "bare async_sessionmaker.begin()"


@dataclass(frozen=True, slots=True)
class Count:
    contender: str
    calls_per_op: float
    primitive_calls_per_op: float


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


async def measure(url: str, ops: int, warmup: int) -> list[Count]:
    params = harness.Params(
        url=url, rounds=1, seconds=1.0, ops=None, warmup=0, tasks=1, pool_size=2
    )
    async with AsyncExitStack() as stack:
        bare = await item_table(params, stack)
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

        contenders: Sequence[tuple[str, Callable[[], Awaitable[None]]]] = (
            ("sessionforge begin()", sessionforge_begin),
            (BASELINE, bare_begin),
            ("sessionforge reader()", sessionforge_reader),
            ("async_sessionmaker, AUTOCOMMIT engine", autocommit_session),
        )
        counts = []
        for name, op in contenders:
            for _ in range(warmup):  # fill SQLAlchemy's caches first
                await op()
            calls, primitive = await count_calls(op, ops)
            counts.append(Count(name, calls, primitive))
            harness.progress(f"calls: {name}: {calls:,.0f} calls/op")
        return counts


def format_counts(counts: Sequence[Count]) -> str:
    base = next(count.calls_per_op for count in counts if count.contender == BASELINE)
    width = max(len(count.contender) for count in counts) + 2
    lines = [f"{'contender':<{width}}{'calls/op':>10}{'vs baseline':>13}", "-" * (width + 23)]
    for count in counts:
        star = " *" if count.contender == BASELINE else ""
        ratio = count.calls_per_op / base
        lines.append(
            f"{count.contender + star:<{width}}{count.calls_per_op:>10,.0f}{ratio:>12.3f}x"
        )
    lines.append(
        "calls/op = Python function calls per operation (cProfile, one task); * = baseline"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; see ``--help``."""
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
    parser.add_argument("--ops", type=int, default=500, help="profiled operations per contender")
    parser.add_argument("--warmup", type=int, default=50, help="operations before profiling")
    parser.add_argument("--json", type=Path, default=None, dest="json_path", help="results file")
    args = parser.parse_args(argv)
    if args.ops < 1 or args.warmup < 0:
        parser.error("--ops must be >= 1 and --warmup >= 0")
    with ExitStack() as stack:  # ``sqlite`` means a temporary file, as in the suite
        url = resolve_url(args.url, stack).render_as_string(hide_password=False)
        counts = asyncio.run(measure(url, args.ops, args.warmup))
    print(format_counts(counts))
    document = {
        "scenario": "calls",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "url": harness.masked(url),
        "machine": harness.machine_info(),
        "git": harness.git_state(),
        "ops": args.ops,
        "counts": [asdict(count) for count in counts],
    }
    path = args.json_path or harness.RESULTS_DIR / f"calls-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
