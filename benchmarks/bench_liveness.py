"""Scenario "liveness": what checking pooled connections for liveness costs on a busy pool.

Each operation is the "factory" scenario's: open a transaction, read one row by primary
key, commit. ``--tasks`` loops keep all ``--pool-size`` connections busy, so every
connection goes back to work milliseconds after it was returned: the pool is busy, and
a liveness check at checkout has nothing to find. The contenders:

* ``sessionforge (ping_after=1.0)``: ``SessionFactory(url)`` with its default policy,
  ping a connection at checkout only when it sat idle in the pool for more than
  ``ping_after`` seconds (1.0 by default) -- on a busy pool, never;
* ``async_sessionmaker + pool_pre_ping``: plain SQLAlchemy's check, a ping round trip
  at every checkout;
* ``async_sessionmaker, no check`` (the baseline): neither; the floor.

The figure of interest is ``sessionforge / pre_ping`` (the target is >= 1.15). On
SQLite there is nothing to check (connections cannot be dropped by a server), so
sessionforge installs no policy and ``pool_pre_ping`` costs only a local ``SELECT 1``.

Run: ``python -m benchmarks.bench_liveness --rounds 5 --seconds 1.5``
"""

from __future__ import annotations

import statistics
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from sessionforge import SessionFactory

from . import harness
from .bench_factory import Item, item_table, pooled_engine, pooled_factory, random_id
from .harness import Contender, Params

SCENARIO = "liveness"
BASELINE = "async_sessionmaker, no check"
SESSIONFORGE = "sessionforge (ping_after=1.0)"
PRE_PING = "async_sessionmaker + pool_pre_ping"


def contender(
    name: str, maker: async_sessionmaker[AsyncSession] | SessionFactory[AsyncSession]
) -> Contender:
    async def op() -> None:
        async with maker.begin() as session:
            await session.get(Item, random_id())

    return Contender(name, op)


@asynccontextmanager
async def contenders(params: Params) -> AsyncIterator[Sequence[Contender]]:
    """Create the table, yield the contenders, then dispose of them and drop the table."""
    async with AsyncExitStack() as stack:
        bare = await item_table(params, stack)
        pinged = pooled_engine(params, stack, pool_pre_ping=True)
        db = pooled_factory(params, stack)
        yield [
            contender(SESSIONFORGE, db),
            contender(PRE_PING, async_sessionmaker(pinged, expire_on_commit=False)),
            contender(BASELINE, async_sessionmaker(bare, expire_on_commit=False)),
        ]


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; see ``--help`` and benchmarks/README.md."""
    report = harness.main(SCENARIO, __doc__ or SCENARIO, contenders, BASELINE, argv)
    ours, theirs = report.ops_per_s[SESSIONFORGE], report.ops_per_s[PRE_PING]
    median = statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
    print(f"sessionforge / pre_ping: {median:.3f} (target >= 1.15)")


if __name__ == "__main__":
    main()
