"""What running SQLite statements on the event loop's thread costs the loop's other tasks.

``sqlite+sessionforge://`` runs a statement that has been quick so far (and COMMIT /
ROLLBACK) inline, on the event loop's thread, instead of handing it to the connection's
thread. That saves two thread switches per statement, and blocks the loop while the
statement runs. This scenario measures both sides at once: ``--tasks`` tasks run the
factory operation (begin, one primary-key read, commit) in a loop while one unrelated
task sleeps 1 ms at a time and records how late each wake-up is — what any other
request on the same loop would feel. Contenders, all on the same SQLite file:

* ``bare SQLAlchemy + aiosqlite``: the baseline (every statement on aiosqlite's thread);
* ``sessionforge, sqlite+aiosqlite``: the factory on aiosqlite;
* ``sessionforge driver, thread only``: ``sqlite+sessionforge`` with inline execution
  off (``check_same_thread=True`` keeps every call on the connection's thread);
* ``sessionforge driver (default)``: ``sqlite+sessionforge`` as it ships: inline.

Reported per contender: ops/s (median of rounds, and the median per-round ratio to the
baseline) and the ticker's lateness: median, 99th percentile and maximum, in ms.

Run: ``python -m benchmarks.bench_loop_latency --rounds 3 --seconds 1``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from benchmarks.bench_factory import ROWS, Base, Item
from benchmarks.harness import RESULTS_DIR, git_state, machine_info, progress
from sessionforge import SessionFactory

BASELINE = "bare SQLAlchemy + aiosqlite"
TICK = 0.001


async def _run(op: Callable[[], Awaitable[None]], tasks: int, seconds: float) -> dict[str, Any]:
    """Run ``op`` in ``tasks`` tasks for ``seconds`` beside a 1 ms ticker."""
    stop = time.perf_counter() + seconds
    done = 0
    late: list[float] = []

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await op()
            done += 1

    async def ticker() -> None:
        while time.perf_counter() < stop:
            asked = time.perf_counter()
            await asyncio.sleep(TICK)
            late.append((time.perf_counter() - asked - TICK) * 1000)

    started = time.perf_counter()
    await asyncio.gather(ticker(), *(worker() for _ in range(tasks)))
    elapsed = time.perf_counter() - started
    late.sort()
    return {
        "ops_per_s": done / elapsed,
        "late_p50_ms": late[len(late) // 2],
        "late_p99_ms": late[min(len(late) - 1, int(len(late) * 0.99))],
        "late_max_ms": late[-1],
    }


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="sf-latency-"))
    path = directory / "latency.db"
    setup = create_async_engine(f"sqlite+aiosqlite:///{path}")
    async with setup.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
        rows = [{"id": i, "name": f"item {i}", "quantity": i % 97} for i in range(1, ROWS + 1)]
        await connection.execute(insert(Item), rows)
    await setup.dispose()
    pool = {"pool_size": args.pool_size, "max_overflow": 0}
    bare_engine = create_async_engine(f"sqlite+aiosqlite:///{path}", **pool)
    bare = async_sessionmaker(bare_engine, expire_on_commit=False)
    factories = {
        "sessionforge, sqlite+aiosqlite": SessionFactory(f"sqlite+aiosqlite:///{path}", **pool),
        "sessionforge driver, thread only": SessionFactory(
            f"sqlite+sessionforge:///{path}", connect_args={"check_same_thread": True}, **pool
        ),
        "sessionforge driver (default)": SessionFactory(f"sqlite+sessionforge:///{path}", **pool),
    }

    async def bare_op() -> None:
        async with bare.begin() as session:
            await session.get(Item, random.randint(1, ROWS))

    def factory_op(db: SessionFactory[Any]) -> Callable[[], Awaitable[None]]:
        async def op() -> None:
            async with db.begin() as session:
                await session.get(Item, random.randint(1, ROWS))

        return op

    ops: dict[str, Callable[[], Awaitable[None]]] = {BASELINE: bare_op}
    ops.update({name: factory_op(db) for name, db in factories.items()})
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in ops}
    names = list(ops)
    try:
        for index in range(args.rounds):
            order = names[index % len(names) :] + names[: index % len(names)]
            for position, name in enumerate(order, 1):
                where = f"round {index + 1}/{args.rounds}  {position}/{len(order)} {name}"
                progress(f"{where} ...")
                await _run(ops[name], args.tasks, args.warmup)
                sample = await _run(ops[name], args.tasks, args.seconds)
                samples[name].append(sample)
                progress(f"{where}: {sample['ops_per_s']:,.0f} ops/s")
        progress("")
    finally:
        await bare_engine.dispose()
        for db in factories.values():
            await db.dispose()
    baseline = [s["ops_per_s"] for s in samples[BASELINE]]
    summary = {
        name: {
            "ops_per_s": statistics.median(s["ops_per_s"] for s in runs),
            "ratio": statistics.median(
                s["ops_per_s"] / b for s, b in zip(runs, baseline, strict=True)
            ),
            **{
                key: statistics.median(s[key] for s in runs)
                for key in ("late_p50_ms", "late_p99_ms", "late_max_ms")
            },
        }
        for name, runs in samples.items()
    }
    return {"samples": samples, "summary": summary}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_loop_latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--warmup", type=float, default=0.25)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="1 round of 0.3 s")
    parser.add_argument("--json", type=Path, default=None, dest="json_path")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.warmup = 1, 0.3, 0.05
    measured = asyncio.run(_measure(args))
    now = datetime.now(UTC)
    document = {
        "scenario": "loop_latency",
        "baseline": BASELINE,
        "measured_at": now.isoformat(),
        "params": {k: v for k, v in vars(args).items() if k != "json_path"},
        "machine": machine_info(),
        "git": git_state(),
        **measured,
    }
    print(f"loop latency: {args.tasks} tasks, pool {args.pool_size}, 1 ms ticker beside them")
    print(f"{'contender':34} {'ops/s':>8} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    for name, row in measured["summary"].items():
        mark = " *" if name == BASELINE else ""
        print(
            f"{name + mark:34} {row['ops_per_s']:8,.0f} {row['ratio']:6.2f} "
            f"{row['late_p50_ms']:7.2f} {row['late_p99_ms']:7.2f} {row['late_max_ms']:7.2f}"
        )
    path = args.json_path or RESULTS_DIR / f"loop_latency-{now:%Y%m%dT%H%M%SZ}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results: {path}")
    return document


if __name__ == "__main__":
    main(sys.argv[1:])
