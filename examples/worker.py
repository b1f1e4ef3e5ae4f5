"""A queue worker on sessionforge: one session per job, graceful shutdown on SIGTERM.

Each job moves an amount into an account *and* writes a ledger line for it, in one
transaction through ``db.run_transaction`` (re-run on serialization failures and SQLite
busy errors). Workers run in a ``TaskGroup``. On SIGTERM (or SIGINT) the worker stops
taking jobs, gives the jobs in flight ``--grace`` seconds to finish, then cancels the
rest: a cancelled job's transaction is rolled back, so the database never holds half a
job — every ledger line has its balance change, and no balance change lacks its line.

    python examples/worker.py --url sqlite:///worker.db --jobs 500 --workers 8
    kill -TERM <pid>      # finishes or rolls back what is in flight, then exits 0

The factory is made at import time, as in a real app: it builds its engine on first
use inside the running loop (and would build a fresh one in the next ``asyncio.run``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sys

from sqlalchemy import ForeignKey, Integer, String, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sessionforge import SessionFactory


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "worker_account"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    balance: Mapped[int] = mapped_column(Integer, default=0)


class Ledger(Base):
    __tablename__ = "worker_ledger"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job: Mapped[str] = mapped_column(String(40), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("worker_account.id"))
    amount: Mapped[int] = mapped_column(Integer)


URL = os.environ.get("DATABASE_URL", "sqlite:///worker.db")
db = SessionFactory(URL)  # import time: no loop yet, nothing connected


async def apply_job(session: AsyncSession, job: str, account_id: int, amount: int) -> None:
    """Both writes of a job, or (on error or cancellation) neither."""
    account = await session.get(Account, account_id, with_for_update=True)
    assert account is not None
    account.balance += amount
    await asyncio.sleep(random.uniform(0, 0.01))  # pretend to do some work in between
    session.add(Ledger(job=job, account_id=account_id, amount=amount))


async def worker(queue: asyncio.Queue[tuple[str, int, int]], done: list[str]) -> None:
    while True:
        job, account_id, amount = await queue.get()
        try:
            await db.run_transaction(apply_job, job, account_id, amount, retries=20)
            done.append(job)
        finally:
            queue.task_done()


async def setup(accounts: int) -> None:
    async with db.engine.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)
        await connection.run_sync(Base.metadata.create_all)
    async with db.begin() as session:
        session.add_all(Account(id=i, balance=0) for i in range(1, accounts + 1))


async def check() -> tuple[int, int, int]:
    """(ledger lines, sum of ledger amounts, sum of balances): the last two must match."""
    async with db() as session:
        lines = await session.scalar(select(func.count()).select_from(Ledger)) or 0
        ledger = await session.scalar(select(func.coalesce(func.sum(Ledger.amount), 0))) or 0
        balances = await session.scalar(select(func.coalesce(func.sum(Account.balance), 0))) or 0
    return int(lines), int(ledger), int(balances)


async def run(jobs: int, workers: int, accounts: int, grace: float) -> int:
    await setup(accounts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    queue: asyncio.Queue[tuple[str, int, int]] = asyncio.Queue()
    for number in range(jobs):
        queue.put_nowait((f"job-{number}", random.randint(1, accounts), random.randint(1, 100)))
    done: list[str] = []
    print("ready", flush=True)
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(worker(queue, done)) for _ in range(workers)]
        finished = asyncio.create_task(queue.join())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({finished, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            print("stopping: draining jobs in flight", flush=True)
            while not queue.empty():  # take no new jobs
                queue.get_nowait()
                queue.task_done()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await finished
        for task in tasks:
            task.cancel()  # idle workers, and any job still running after the grace period
        finished.cancel()
        stopped.cancel()
    lines, ledger, balances = await check()
    print(f"jobs done {len(done)} ledger lines {lines} ledger sum {ledger} balances {balances}")
    await db.dispose()
    # Atomicity is the invariant. (A job cancelled while its COMMIT was in flight may
    # have committed without being counted as done, so lines >= done.)
    consistent = ledger == balances and lines >= len(done)
    print("CONSISTENT" if consistent else "INCONSISTENT", flush=True)
    return 0 if consistent else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--accounts", type=int, default=10)
    parser.add_argument("--grace", type=float, default=5.0)
    args = parser.parse_args(argv)
    return asyncio.run(run(args.jobs, args.workers, args.accounts, args.grace))


if __name__ == "__main__":
    sys.exit(main())
