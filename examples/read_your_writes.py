"""Read-your-writes while a replica lags: what sessionforge returns, and a naive router.

Usage::

    python examples/read_your_writes.py PRIMARY_URL REPLICA_URL [REPLICA_URL ...]

The URLs need a role allowed to pause WAL replay on the replicas (a superuser, or one
granted ``pg_wal_replay_pause``/``pg_wal_replay_resume``). The script pauses replay on
every replica — they now lag further with each commit — and then, ``--writes`` times,
commits a row on the primary and reads it back at once, twice: through a router that
sends reads to a replica without knowing what the caller wrote (sessionforge with
``read_your_writes=False``), and through sessionforge as configured by default. Replay
is resumed at the end (also on an error), and the table dropped. Example output::

    replay paused on 2 replicas; 20 writes, each read back at once
    naive router:   0 of 20 writes visible (20 reads served by a replica)
    sessionforge:  20 of 20 writes visible (0 by a replica, 20 by the primary)
    replay resumed; 20 more writes
    sessionforge:  20 of 20 writes visible (20 by a replica, 0 by the primary)

To try it without servers of your own, ``python -m benchmarks.bench_replicas`` shows how
the project's tests build a primary and two replicas on loopback
(``tests/pgcluster.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from sessionforge import SessionFactory


async def read_back(db: SessionFactory[AsyncSession], table: str, writes: int) -> tuple[int, int]:
    """Commit ``writes`` rows one by one, reading each back at once: (seen, on a replica)."""
    seen = on_replica = 0
    for _ in range(writes):
        row = uuid.uuid4().int % 2**31
        async with db.begin() as session:
            await session.execute(text(f"INSERT INTO {table} VALUES ({row})"))
        async with db.reader() as session:
            found, in_recovery = (
                await session.execute(
                    text(f"SELECT count(*), pg_is_in_recovery() FROM {table} WHERE id = {row}")
                )
            ).one()
        seen += found
        on_replica += bool(in_recovery)
    return seen, on_replica


async def replay(replicas: Sequence[SessionFactory[AsyncSession]], action: str) -> None:
    for replica in replicas:
        async with replica() as session:
            await session.execute(text(f"SELECT pg_wal_replay_{action}()"))


async def main(primary: str, replica_urls: list[str], writes: int) -> None:
    table = f"ryw_demo_{uuid.uuid4().hex[:8]}"
    db = SessionFactory(primary, replicas=replica_urls)
    naive = SessionFactory(primary, replicas=replica_urls, read_your_writes=False)
    replicas = [SessionFactory(url) for url in replica_urls]
    async with db.begin() as session:
        await session.execute(text(f"CREATE TABLE {table} (id int PRIMARY KEY)"))
    try:
        await asyncio.sleep(0.5)  # let the replicas replay the CREATE TABLE
        await replay(replicas, "pause")
        print(
            f"replay paused on {len(replicas)} replicas; {writes} writes, each read back at once"
        )
        seen, served = await read_back(naive, table, writes)
        print(f"naive router: {seen:3} of {writes} writes visible ({served} reads by a replica)")
        seen, served = await read_back(db, table, writes)
        print(
            f"sessionforge: {seen:3} of {writes} writes visible "
            f"({served} by a replica, {writes - served} by the primary)"
        )
        await replay(replicas, "resume")
        print(f"replay resumed; {writes} more writes")
        seen, served = await read_back(db, table, writes)
        print(
            f"sessionforge: {seen:3} of {writes} writes visible "
            f"({served} by a replica, {writes - served} by the primary)"
        )
    finally:
        await replay(replicas, "resume")
        async with db.begin() as session:
            await session.execute(text(f"DROP TABLE {table}"))
        for factory in (db, naive, *replicas):
            await factory.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("primary")
    parser.add_argument("replicas", nargs="+")
    parser.add_argument("--writes", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main(args.primary, args.replicas, args.writes))
